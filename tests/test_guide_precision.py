"""The autoguidance guide's precision (posttrain.guidance.guide_dtype): float16 applies on CUDA only,
as EDM2's own Precond runs a use_fp16 network; on a CPU the guide runs float32 whatever the key says,
and the guided denoiser is g + w (D - g) of the float32 passes. (The CUDA side is checked on a GPU by
losses.guide_precision_check: the raw network receives float16 and stays close to float32.)"""

import pytest
import torch

from stages.method import losses
from tests.tiny_edm2 import tiny_inputs, tiny_net


@pytest.mark.parametrize("guide_dtype", ["float16", "float32"])
def test_cpu_guide_runs_float32(guide_dtype):
    teacher, guide = tiny_net(seed=1).eval(), tiny_net(seed=2).eval()
    x, sigma, labels = tiny_inputs()
    assert losses.guide_execution_dtype(guide, guide_dtype) == torch.float32
    check = losses.guide_precision_check(guide, x, sigma, labels, guide_dtype)
    assert check == {"dtype": "float32", "max_rel_diff": 0.0}
    with torch.no_grad():
        got = losses.guided_denoiser(teacher, guide, 2.05, guide_dtype)(x, sigma, labels)
        g, d = guide(x, sigma, labels), teacher(x, sigma, labels)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, g + 2.05 * (d - g), rtol=0, atol=0)


def test_the_dtype_reaches_the_raw_network_and_the_output_stays_float32():
    """What float16 on CUDA does, forced on the CPU: the raw network runs in the given dtype, the
    preconditioning and the output in float32, close to the float32 output."""
    guide = tiny_net(seed=2).eval()
    x, sigma, labels = tiny_inputs()
    seen = []
    guide.network.register_forward_pre_hook(lambda m, args: seen.append(args[0].dtype))
    with torch.no_grad():
        out = guide(x, sigma, labels, dtype=torch.float16)
        ref = guide(x, sigma, labels)
    assert seen == [torch.float16, torch.float32] and out.dtype == torch.float32
    assert 0 < (out - ref).abs().max() < 1e-2 * ref.square().mean().sqrt()


def test_unknown_guide_dtype_is_refused():
    with pytest.raises(ValueError, match="guide_dtype"):
        losses.guided_denoiser(tiny_net(seed=1), tiny_net(seed=2), 2.05, "bfloat16")
