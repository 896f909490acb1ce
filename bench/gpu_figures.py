"""GPU figures of the CIFAR-10 row's DDPM++: teacher forward img/s, trajectory generation traj/s,
CMT mid-training and ECT post-training step img/s at batch 128, in fp32 and bf16 autocast, and peak
memory. (Every row's figures at its own sizes, EDM2 and DiT included, and its projected GPU-hours
beside the paper's: bench/row_costs.py.) Then the speed levers, each against the fp32 baseline, side by
side in one run (`levers` in the output):
channels_last, torch.compile of the network, the fused Adam, 2x and 4x the solver batch, and bf16
autocast of the teacher in trajectory generation with the error of its states against fp32, which
must stay below what storing the fp32 states in float16 already costs (else bf16 changes the pool
and is not used, however fast). `--teacher model.safetensors` measures that error on a trained
teacher (any pipeline model) instead of the random-weight DDPM++.

Runs the project's own code (DDPM++ in stages/networks/ddpmpp.py, the DPM-Solver++ of
stages/method/solvers.py, the CMT-CM and ECT losses of stages/method/losses.py, LPIPS with a random VGG trunk:
same cost as the real one) on random weights. On one H100 the full run takes a few minutes:
    python bench/gpu_figures.py --out bench/gpu_figures.json
On a CPU, prove it works at a tiny size (a narrow network, small batches):
    python bench/gpu_figures.py --tiny --out /tmp/cpu.json
"""

import argparse
import datetime
import json
import platform
import resource
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from stages import networks  # noqa: E402
from stages.core import precision  # noqa: E402
from stages.files import checkpoints  # noqa: E402
from stages.method import losses, solvers  # noqa: E402
from stages.networks.precond import Precond  # noqa: E402
from stages.training import loop  # noqa: E402
from stages.training.ema import EMA  # noqa: E402

CIFAR = {"kind": "ddpmpp", "in_channels": 3, "resolution": 32, "channels": 128, "channel_mult": [2, 2, 2],
         "num_blocks": 4, "attn_resolutions": [16], "augment_dim": 9, "channel_mult_emb": 4}
BATCH, NFE = 128, 16  # the row's mid- and post-training batch, its solver's NFE

p = argparse.ArgumentParser(description=__doc__)
p.add_argument("--tiny", action="store_true", help="CPU proof run: 16 channels, 1 block, batch 16")
p.add_argument("--repeats", type=int, default=None, help="timed iterations per figure")
p.add_argument("--teacher", help="a trained model.safetensors for the bf16 states error (default: the random DDPM++)")
p.add_argument("--skip-compile", action="store_true", help="leave torch.compile out (it needs a C++ compiler on CPU)")
p.add_argument("--out", required=True)
args = p.parse_args()

device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
precision.apply()  # TF32 as the rows run (CMT_TF32, off unless set): cuDNN's default would be on
if device.type == "cpu":
    torch.set_num_threads(1)
arch = dict(CIFAR, **({"channels": 16, "num_blocks": 1} if args.tiny else {}))
batch = 16 if args.tiny else BATCH
repeats = args.repeats or (2 if args.tiny else 20)
nfe = 4 if args.tiny else NFE


def sync():
    if device.type == "cuda":
        torch.cuda.synchronize()


def peak_reset():
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()


def peak_gb():
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated() / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # process peak RSS


def timed(fn, warmup=1):
    for _ in range(warmup):
        fn()
    sync()
    t0 = time.perf_counter()
    for _ in range(repeats):
        fn()
    sync()
    return (time.perf_counter() - t0) / repeats


def autocast(dtype):
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=dtype == "bf16")


def model(kind="edm", dropout=0.0):
    torch.manual_seed(0)
    return Precond(networks.build({**arch, "dropout": dropout}), kind, 0.5, 0.002).to(device)


results = {"device": torch.cuda.get_device_name() if device.type == "cuda" else platform.processor() or "cpu",
           "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
           "torch": torch.__version__, "tiny": args.tiny, "architecture": arch, "batch": batch, "nfe": nfe,
           "repeats": repeats, "figures": {}}
teacher = model().eval()
results["parameters"] = sum(p.numel() for p in teacher.parameters())
x = torch.randn(batch, 3, 32, 32, device=device) * 80
sigma = torch.full((batch,), 2.0, device=device)
sigmas = solvers.logsnr_grid(nfe).to(torch.float32)

def figures_of(dtype):
    """The teacher's forward and solver rates and one CMT-CM and ECT step, at precision `dtype`."""
    fig = {}
    peak_reset()
    with torch.no_grad(), autocast(dtype):
        sec = timed(lambda: teacher(x, sigma))
    fig["teacher_forward_img_per_s"] = batch / sec

    def denoise(z, s):
        with autocast(dtype):
            return teacher(z, torch.full((z.shape[0],), float(s), device=device)).float()

    with torch.no_grad():
        sec = timed(lambda: solvers.dpm_solver_pp(denoise, x, sigmas, order=3, lower_order_final=True), warmup=0)
    fig["trajectories_per_s"] = batch / sec
    fig["teacher_peak_gb"] = peak_gb()

    # CMT-CM mid-training step: batch / nfe trajectories x nfe points, LPIPS, RAdam, EMA
    peak_reset()
    student = model("ecm", dropout=0.2).train()
    ema = EMA(student, 0.999)
    opt = loop.build_optimizer(student.parameters(), {"name": "radam", "lr": 2e-4, "betas": [0.9, 0.999],
                                                      "eps": 1e-8})
    lpips = losses.LPIPSDistance(None).to(device)
    states = torch.randn(batch // nfe, nfe + 1, 3, 32, 32, device=device)

    def mid_step():
        with autocast(dtype):
            loss = losses.cmt_cm_loss(student, states, sigmas.to(device), lpips).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        ema.update(student, 1)

    sec = timed(mid_step)
    fig["midtrain_step_img_per_s"] = batch / sec
    fig["midtrain_peak_gb"] = peak_gb()

    # ECT post-training step at batch 128 (same-network target under no_grad)
    peak_reset()
    y = torch.rand(batch, 3, 32, 32, device=device) * 2 - 1
    g = torch.Generator().manual_seed(0)

    def post_step():
        with autocast(dtype):
            loss = losses.ect_loss(student, y, g, stage=0, q=4096).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        ema.update(student, 1)

    sec = timed(post_step)
    fig["posttrain_step_img_per_s"] = batch / sec
    fig["posttrain_peak_gb"] = peak_gb()
    return fig


for dtype in ("fp32", "bf16"):
    fig = results["figures"][dtype] = figures_of(dtype)
    print(f"[{dtype}] " + ", ".join(f"{k} {v:.3g}" for k, v in fig.items() if not isinstance(v, dict)), flush=True)


# ---- speed levers, each against the fp32 baseline of the same figure in this process


def forward_rate(net, inp, **kw):
    with torch.no_grad():
        return inp.shape[0] / timed(lambda: net(inp, torch.full((inp.shape[0],), 2.0, device=device), **kw))


def trajectory_rate(net, inp, dtype="fp32"):
    def denoise(z, s):
        with autocast(dtype):
            return net(z, torch.full((z.shape[0],), float(s), device=device)).float()

    with torch.no_grad():
        return inp.shape[0] / timed(lambda: solvers.dpm_solver_pp(denoise, inp, sigmas, order=3), warmup=0)


def save():  # what is measured so far survives a time limit that stops the run later
    Path(args.out).write_text(json.dumps(results, indent=2) + "\n")


save()
levers = results["levers"] = {}
base_fwd = forward_rate(teacher, x)
levers["baseline_fp32"] = {"teacher_forward_img_per_s": base_fwd}

cl_teacher = model().eval().to(memory_format=torch.channels_last)
rate = forward_rate(cl_teacher, x.contiguous(memory_format=torch.channels_last))
levers["channels_last"] = {"teacher_forward_img_per_s": rate, "speedup": rate / base_fwd}
del cl_teacher

# fused Adam on the ECT post-training step (the optimizer's share grows with the network)
y = torch.rand(batch, 3, 32, 32, device=device) * 2 - 1


def ect_step_rate(fused):
    """Images/s of an ECT step with Adam, fused or not."""
    student = model("ecm", dropout=0.2).train()
    opt = torch.optim.Adam(student.parameters(), lr=1e-4, fused=fused)
    g = torch.Generator().manual_seed(0)

    def step():
        loss = losses.ect_loss(student, y, g, stage=0, q=4096).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    return batch / timed(step)


try:
    unfused = ect_step_rate(False)
    rate = ect_step_rate(True)
    levers["fused_adam"] = {"posttrain_step_img_per_s": rate, "speedup": rate / unfused}
except RuntimeError as err:
    levers["fused_adam"] = {"error": str(err)[:300]}

save()
# more samples per solver batch
base_traj = trajectory_rate(teacher, x)
levers["solver_batch"] = {"batch": batch, "trajectories_per_s": base_traj}
for mult in (2, 4):
    peak_reset()
    rate = trajectory_rate(teacher, torch.randn(mult * batch, 3, 32, 32, device=device) * 80)
    levers[f"solver_batch_x{mult}"] = {"batch": mult * batch, "trajectories_per_s": rate, "speedup": rate / base_traj,
                                       "peak_gb": peak_gb()}

# bf16 autocast of the teacher in trajectory generation: its states' error against fp32, against
# the float16 storage error of the fp32 states (rms over all elements of all states but x_T, which
# both share, relative to the states' rms)
if args.teacher:
    net, meta = checkpoints.load(args.teacher)
    net = net.to(device).eval()
    arch = meta["architecture"]
    shape = (arch["in_channels"], arch["resolution"], arch["resolution"])
else:
    net, shape = teacher, (3, 32, 32)
z = torch.randn(batch, *shape, device=device, generator=torch.Generator(device).manual_seed(1)) * 80


def solve(dtype):
    def denoise(zz, s):
        with autocast(dtype):
            return net(zz, torch.full((zz.shape[0],), float(s), device=device)).float()

    with torch.no_grad():
        return solvers.dpm_solver_pp(denoise, z, sigmas.to(torch.float64), order=3)[:, 1:]


exact, bf16 = solve("fp32"), solve("bf16")
scale = exact.pow(2).mean().sqrt()
bf16_err = float((bf16 - exact).pow(2).mean().sqrt() / scale)
fp16_err = float((exact.half().float() - exact).pow(2).mean().sqrt() / scale)
final_bf16 = float((bf16[:, -1] - exact[:, -1]).pow(2).mean().sqrt() / exact[:, -1].pow(2).mean().sqrt())
final_fp16 = float((exact[:, -1].half().float() - exact[:, -1]).pow(2).mean().sqrt()
                   / exact[:, -1].pow(2).mean().sqrt())
levers["bf16_trajectories"] = {
    "teacher": args.teacher or "random-weight DDPM++ of this run",
    "trajectories_per_s": trajectory_rate(net, z, "bf16"), "fp32_trajectories_per_s": trajectory_rate(net, z),
    "states_rel_rms_error_bf16": bf16_err, "states_rel_rms_error_fp16_storage": fp16_err,
    "final_state_rel_rms_error_bf16": final_bf16, "final_state_rel_rms_error_fp16_storage": final_fp16,
    "within_storage_error": bf16_err <= fp16_err}
levers["bf16_trajectories"]["speedup"] = (levers["bf16_trajectories"]["trajectories_per_s"]
                                          / levers["bf16_trajectories"]["fp32_trajectories_per_s"])
save()
# torch.compile last: its first call compiles (89 s on this CPU), which a time limit may cut short
if not args.skip_compile:
    try:
        compiled = torch.compile(teacher)
        t0 = time.perf_counter()
        with torch.no_grad():
            compiled(x, sigma)
        sync()
        first = time.perf_counter() - t0
        rate = forward_rate(compiled, x)
        levers["torch_compile"] = {"teacher_forward_img_per_s": rate, "speedup": rate / base_fwd,
                                   "first_call_s": first}
    except Exception as err:  # no compiler here: say so in the record rather than stopping the run
        levers["torch_compile"] = {"error": f"{type(err).__name__}: {str(err)[:300]}"}

for name, fig in levers.items():
    print(f"[lever {name}] "
          + ", ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in fig.items()),
          flush=True)

if args.tiny:
    results["note"] = ("tiny run: 16-channel DDPM++ with one block per level and batch 16; the figures prove the "
                       "script runs, they are not the row's costs")
save()
print(json.dumps(results, indent=2))
