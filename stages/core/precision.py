"""TensorFloat-32 for every stage, from the config's `tf32` (docs/method.md#precision).

The Snakefile exports CMT_TF32=0 or 1 for every job. The official CIFAR-10/FFHQ/AFHQv2 code turns
TF32 off for both float32 matmuls and cuDNN convolutions, where PyTorch's own default leaves cuDNN's
on; a stage run by hand without the variable gets the config's default, off. The flags change the
last bits of GPU results, not what a stage computes; on CPUs they change nothing.
"""

import os

ENV = "CMT_TF32"


def tf32_from_env():
    value = os.environ.get(ENV, "0")
    if value not in ("0", "1"):
        raise ValueError(f"{ENV}={value!r}: expected 0 or 1 (the Snakefile sets it from the config's tf32)")
    return value == "1"


def apply():
    """Set torch's TF32 flags from CMT_TF32; returns them as model.json records them."""
    import torch

    on = tf32_from_env()
    torch.backends.cuda.matmul.allow_tf32 = on
    torch.backends.cudnn.allow_tf32 = on
    return flags()


def flags():
    """The TF32 flags this process runs with (what model.json records)."""
    import torch

    return {"matmul": bool(torch.backends.cuda.matmul.allow_tf32), "cudnn": bool(torch.backends.cudnn.allow_tf32)}
