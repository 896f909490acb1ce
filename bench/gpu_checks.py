"""First-contact checks on a GPU, each a function of CHECKS, in seconds: the device as the stages see
it, the launcher's GPU claim, the TF32 flags taking effect, bf16 autocast, and one training step of
each network the rows train (at its smoke overlay's size) with its tensors on the device.

    python -m bench.gpu_checks --out checks.json                   # every check, on CUDA
    python -m bench.gpu_checks --device cpu --out checks.json      # the CPU dry run of the same code
    python -m bench.gpu_checks --out guide.json guide_fp16         # some checks by name

Each check passes, fails (its first error line is recorded), is skipped (not for this device) or is
not available (what it checks does not exist). The JSON is rewritten after every check, so a
run cut short keeps the checks it finished. Exit status: 0 when none failed, 1 when one failed, 3
when every check asked for is not available.
"""

import argparse
import json
import math
import os
import sys
import tempfile
import time
import traceback
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from stages import networks  # noqa: E402
from stages.config import resolve, stage_configs  # noqa: E402
from stages.core import precision  # noqa: E402
from stages.data import labels as class_labels  # noqa: E402
from stages.method import losses  # noqa: E402
from stages.recipes import examples  # noqa: E402
from stages.recipes import posttrain as posttrain_recipe  # noqa: E402
from stages.recipes import posttrain_mf as posttrain_mf_recipe  # noqa: E402
from stages.recipes import teacher as teacher_recipe  # noqa: E402

ROWS = REPO / "config" / "rows"
# one row per network its stages train, at its smoke overlay's size
RECIPE_ROWS = {
    "small_unet (digits)": [],
    "ddpmpp (cifar10-cmt-ect)": [ROWS / "cifar10-cmt-ect.yaml", ROWS / "smoke" / "pixel-ect.yaml"],
    "edm2 (imagenet64-cmt-ecd)": [ROWS / "imagenet64-cmt-ecd.yaml", ROWS / "smoke" / "imagenet64.yaml"],
    "edm2 on latents (imagenet512-cmt-ecd)": [ROWS / "imagenet512-cmt-ecd.yaml", ROWS / "smoke" / "imagenet512.yaml"],
    "dit (imagenet256-cmt-mf)": [ROWS / "imagenet256-cmt-mf.yaml", ROWS / "smoke" / "imagenet256.yaml"],
}


class Skip(Exception):
    """The check does not apply on this device."""


class NotAvailable(Exception):
    """What the check checks does not exist yet."""


def relative_error(a, b):
    return float((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30))


def cuda_device(dev):
    """torch sees the GPU the stages will pick (they take `cuda` whenever it is available)."""
    if dev.type != "cuda":
        raise Skip("CPU dry run")
    props = torch.cuda.get_device_properties(0)
    x = torch.arange(1000.0, device=dev)
    assert float(x.sum()) == 499500.0, "a sum on the GPU is wrong"
    return (f"{torch.cuda.device_count()} device(s); {props.name}, capability {props.major}.{props.minor}, "
            f"{props.total_memory / 2**30:.1f} GiB, {props.multi_processor_count} SMs; torch {torch.__version__}, "
            f"CUDA {torch.version.cuda}, cuDNN {torch.backends.cudnn.version()}")


def launch_claim(dev):
    """stages.launch finds this machine's GPUs (/dev/nvidiaN or CUDA_VISIBLE_DEVICES) and claims one with
    its lock, as a job with gpu=1 outside SLURM does."""
    if dev.type != "cuda":
        raise Skip("CPU dry run")
    from stages import launch

    devices = launch.visible_devices(os.environ)
    assert devices, "stages.launch sees no GPU (no /dev/nvidiaN, no CUDA_VISIBLE_DEVICES): jobs would claim none"
    assert len(devices) >= torch.cuda.device_count(), f"stages.launch sees {devices}, torch {torch.cuda.device_count()}"
    with tempfile.TemporaryDirectory() as locks:
        processes, visible, fds = launch.plan(1, {k: v for k, v in os.environ.items() if k != "SLURM_JOB_ID"},
                                              locks, timeout=5)
        for fd in fds:
            os.close(fd)
    assert processes == 1 and visible in devices, (processes, visible)
    return f"devices {devices}; a gpu=1 job gets CUDA_VISIBLE_DEVICES={visible}"


def tf32_flags(dev):
    """CMT_TF32 (the config's `tf32`) sets torch's flags, and on this card they change float32 matmuls:
    with TF32 on, a product's error against float64 is TF32's (about 1e-3), off it is float32's."""
    saved = os.environ.get(precision.ENV)
    a = torch.randn(1024, 1024, device=dev, generator=torch.Generator(dev).manual_seed(0))
    b = torch.randn(1024, 1024, device=dev, generator=torch.Generator(dev).manual_seed(1))
    exact = a.double() @ b.double()
    errors = {}
    try:
        for value in ("0", "1"):
            os.environ[precision.ENV] = value
            flags = precision.apply()
            assert flags == {"matmul": value == "1", "cudnn": value == "1"}, f"CMT_TF32={value} gave flags {flags}"
            errors[value] = relative_error(a @ b, exact)
    finally:
        if saved is None:
            os.environ.pop(precision.ENV, None)
        else:
            os.environ[precision.ENV] = saved
        precision.apply()
    note = f"matmul error against float64: TF32 off {errors['0']:.1e}, on {errors['1']:.1e}"
    assert errors["0"] < 1e-4, note + ": float32 itself is off"
    if dev.type == "cuda" and torch.cuda.get_device_capability(0) >= (8, 0):
        assert errors["1"] > 5 * errors["0"], note + ": the flag did not reach the matmul"
    else:
        note += " (no TF32 on this device: the flags change nothing)"
    return note


def recipe_network(stack, dev):
    """(the row's post-training student as its recipe builds it, in train mode on `dev`, a loss of one
    random batch of the recipe's data shapes) at the row's smoke size (stages/recipes/)."""
    cfg = resolve(stack)
    shape = examples.data_shape(cfg)
    if cfg.get("family", "cm") == "mf":
        scfg = stage_configs.stage_config("posttrain_mf", cfg, "random")
        net = posttrain_mf_recipe.student(scfg, "random", teacher_recipe.model_meta(
            stage_configs.stage_config("train_teacher", cfg), shape))[0].to(dev).train()
        loss_of, _ = posttrain_mf_recipe.objective(scfg, net)
        classes = int(getattr(net, "num_classes", 0) or 0)

        def loss(g):
            return loss_of(net, examples.images(4, shape, classes, dev, cfg["sigma_data"]), g).mean()
    else:
        scfg = stage_configs.stage_config("posttrain", cfg, "teacher")
        net = posttrain_recipe.student(scfg, teacher_recipe.model_meta(
            stage_configs.stage_config("train_teacher", cfg), shape))[0].to(dev).train()
        loss_of = posttrain_recipe.objective({**scfg, "posttrain": {**scfg["posttrain"], "method": "ect"}}, net)
        classes = class_labels.label_dim_of(net)

        def loss(g):
            return loss_of(net, examples.images(4, shape, classes, dev, cfg["sigma_data"]), g, 0).mean()
    return net, shape, loss


def one_step(net, loss_fn):
    """One optimizer step of the recipe's own loss on the device: every trained parameter gets a finite
    gradient on the device and moves. Returns the loss."""
    loss = loss_fn(torch.Generator().manual_seed(0))
    opt = torch.optim.Adam([p for p in net.parameters() if p.requires_grad], lr=1e-3)
    before = [p.detach().clone() for p in net.parameters() if p.requires_grad]
    loss.backward()
    dev = next(net.parameters()).device
    for name, p in net.named_parameters():
        if p.requires_grad:
            assert p.grad is not None, f"{name} got no gradient"
            assert p.grad.device.type == dev.type, f"{name}'s gradient is on {p.grad.device}"
            assert torch.isfinite(p.grad).all(), f"{name}'s gradient is not finite"
    opt.step()
    after = [p for p in net.parameters() if p.requires_grad]
    assert any(not torch.equal(a, b) for a, b in zip(after, before, strict=True)), "the step changed no parameter"
    return loss.item()


def on_device(net, dev):
    wrong = [n for n, t in [*net.named_parameters(), *net.named_buffers()] if t.device.type != dev.type]
    assert not wrong, f"not on {dev}: {wrong[:5]}"


def train_step_check(label, stack):
    def check(dev):
        net, shape, loss_fn = recipe_network(stack, dev)
        on_device(net, dev)
        loss = one_step(net, loss_fn)
        on_device(net, dev)
        assert math.isfinite(loss), f"loss {loss}"
        params = sum(p.numel() for p in net.parameters())
        return f"{params:,} parameters, data {list(shape)}, loss {loss:.4f}"

    check.__name__ = "train_step " + label
    check.__doc__ = f"one training step of {label}'s post-training recipe on the device"
    return check


def autocast_bf16(dev):
    """bf16 autocast (the speed lever bench/gpu_figures.py measures) runs the DDPM++ on the device, and
    its output stays within bf16's precision of float32's."""
    net, shape, _ = recipe_network(RECIPE_ROWS["ddpmpp (cifar10-cmt-ect)"], dev)
    net.eval()
    x = torch.randn(4, shape[0], shape[1], shape[1], device=dev, generator=torch.Generator(dev).manual_seed(0))
    sigma = torch.full((4,), 2.0, device=dev)
    with torch.no_grad():
        full = net(x, sigma)
        with torch.autocast(dev.type, dtype=torch.bfloat16):
            half = net(x, sigma)
    error = relative_error(half.float(), full)
    note = f"relative difference to float32 {error:.2e}, output {half.dtype}"
    assert error < 0.05, f"bf16 output differs from float32 by {error:.3g}"
    if error < 1e-5:
        # CPU autocast leaves these float32 convolutions alone; on CUDA that would make the lever a no-op
        assert dev.type != "cuda", note + ": autocast ran nothing in bf16"
        note += " (autocast changed nothing on this device)"
    return note


def guide_fp16(dev):
    """The ECD autoguidance guide as the official loop runs the guide's pickle: its network in float16
    on CUDA (posttrain.guidance.guide_dtype), its output within float16's precision of float32's; on a
    CPU it runs in float32."""
    cfg = resolve(RECIPE_ROWS["edm2 (imagenet64-cmt-ecd)"])
    shape = examples.data_shape(cfg)
    arch = networks.architecture(cfg["network"], *shape, 0.0)
    torch.manual_seed(0)
    guide = networks.build_precond(arch, "edm", cfg["sigma_data"]).to(dev).eval()
    x, classes = examples.images(4, shape, 0, dev, 1.0)
    labels = examples.one_hot(4, class_labels.label_dim_of(guide), dev)
    sigma = torch.full((4,), 2.0, device=dev)
    seen = losses.guide_precision_check(guide, x, sigma, labels, guide_dtype="float16")
    note = f"the guide's network ran in {seen['dtype']}, {seen['max_rel_diff']:.2e} from float32 (relative to RMS)"
    if dev.type == "cuda":
        assert seen["dtype"] == "float16", note + ": expected float16 on CUDA"
        assert seen["max_rel_diff"] < 1e-2, note + ": too far from float32"
    else:
        assert seen["dtype"] == "float32" and seen["max_rel_diff"] == 0, note + ": a CPU runs it in float32"
    return note


CHECKS = [cuda_device, launch_claim, tf32_flags, autocast_bf16,
          *[train_step_check(label, stack) for label, stack in RECIPE_ROWS.items()], guide_fp16]


def run(checks, dev, out):
    results = []
    for check in checks:
        t0 = time.perf_counter()
        result = {"name": check.__name__, "what": " ".join((check.__doc__ or "").split())}
        print(f"== {check.__name__}", flush=True)
        try:
            result.update(status="passed", note=check(dev))
        except Skip as e:
            result.update(status="skipped", note=str(e))
        except NotAvailable as e:
            result.update(status="not available", note=str(e))
        except Exception as e:  # noqa: BLE001 - every failure is recorded, the next check still runs
            traceback.print_exc()
            result.update(status="failed", error=f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}")
        result["seconds"] = round(time.perf_counter() - t0, 2)
        print(f"   {result['status']}: {result.get('note') or result.get('error')}", flush=True)
        results.append(result)
        if out:
            tmp = Path(str(out) + ".tmp")
            tmp.write_text(json.dumps({"device": str(dev), "checks": results}, indent=1) + "\n")
            tmp.replace(out)
    return results


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("names", nargs="*", help=f"checks to run (default all): {', '.join(c.__name__ for c in CHECKS)}; "
                                            "a prefix such as train_step selects every such check")
    p.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    p.add_argument("--out", type=Path, default=None)
    a = p.parse_args(argv)
    if a.device == "cuda" and not torch.cuda.is_available():
        sys.exit("bench.gpu_checks: torch sees no CUDA device (run with --device cpu for the dry run)")
    if a.device == "cpu":
        torch.set_num_threads(1)
    checks = [c for c in CHECKS if not a.names or any(c.__name__.startswith(n) for n in a.names)]
    if not checks:
        sys.exit(f"bench.gpu_checks: no check named {a.names}")
    results = run(checks, torch.device(a.device), a.out)
    statuses = {r["status"] for r in results}
    sys.exit(1 if "failed" in statuses else 3 if statuses == {"not available"} else 0)


if __name__ == "__main__":
    main()
