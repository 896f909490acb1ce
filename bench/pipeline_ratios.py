"""How fast the pipeline's data path is against its physical bounds, as ratios measured side by side
in one run (CPU here, GPU where there is one):

1. trajectory stage: seconds per trajectory of what trajectory_shard does (start points, the
   DPM-Solver++ solve, fp16 conversion, encoding and writing the shard) / (NFE x the teacher's
   forward time per image at the same batch). Everything above 1 is overhead; bound 1.10.
2. mid-training input pipeline: trajectories per second the shard reader delivers to the step
   (TrajectoryStream: tar reading, decoding, shuffle buffer, stacking into the step's tensors) /
   trajectories per second the CMT-CM step consumes (forward, backward, optimizer, EMA at the
   row's batch). Bound: at least 3 (the step never waits on data).
3. offline against online mid-training: the time of an offline step (reading its trajectories from
   a shard + the CMT-CM step) / that of an online step (the teacher solving the same number of
   trajectories inside the step, stages/method/trajectories.OnlineTrajectories, + the same CMT-CM
   step), at the row's batch; and the whole cost of each route at the CIFAR row's budget (2.4M
   trajectories, 300k steps of 8: --project-trajectories, --project-steps), PROJECTED from the
   times measured here: offline = trajectories x the trajectory stage's time per trajectory (at
   the solver batch) + steps x offline step; online = steps x online step. Taken with the bench's
   network (the digits one unless --config names another), so it says how the routes compare on
   this machine, not what a CIFAR run costs on a GPU.
Also measured, for converting trajectories into images of ECT post-training (bench/budget_fraction.py):
the ECT step's seconds per image at the row's posttrain batch, and one trajectory in those images.

Runs the project's own code on the digits default's network (config/default.yaml) with random
weights, or on a row's (a consistency-family row: CMT-CM) with --config, read as the workflow reads it
(its `extends` bases, the schema's defaults; a class-conditional teacher solves and trains with
classes). Results are printed and, with --out, written as JSON.

    python bench/pipeline_ratios.py                    # digits default
    python bench/pipeline_ratios.py --config config/rows/cifar10-cmt-ect.yaml --out bench/ratios-<card>.json
"""

import argparse
import datetime
import json
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from stages import networks  # noqa: E402
from stages.config import resolve  # noqa: E402
from stages.data import labels as class_labels  # noqa: E402
from stages.data import shards
from stages.method import losses, trajectories  # noqa: E402
from stages.training import loop  # noqa: E402
from stages.training.ema import EMA  # noqa: E402

p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
p.add_argument("--config", nargs="*", default=[], help="row config files over config/default.yaml, as --configfile")
p.add_argument("--repeats", type=int, default=5, help="timed repetitions per figure (the median is reported)")
p.add_argument("--threads", type=int, default=1, help="torch threads (the pipeline runs 1 per job on CPU)")
p.add_argument("--project-trajectories", type=float, default=2.4e6,
               help="ratio 3's projection: trajectories (CIFAR row)")
p.add_argument("--project-steps", type=float, default=3e5, help="ratio 3's projection: mid-training steps (CIFAR row)")
p.add_argument("--out", default=None)
args = p.parse_args()

cfg = resolve(args.config)
if cfg["family"] != "cm" or "latents" in cfg:
    raise SystemExit(f"{args.config}: the ratios are CMT-CM's on pixels; this row is family {cfg['family']}"
                     f"{' on latents' if 'latents' in cfg else ''} (bench/row_costs.py measures every row)")
device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
torch.set_num_threads(args.threads)
resolution = cfg["dataset"]["resolution"]
channels = 1 if cfg["dataset"]["source"] == "digits" else 3
arch = networks.architecture(cfg["network"], channels, resolution, 0.0)
traj = cfg["trajectories"]
nfe, solve_batch = traj["nfe"], traj["batch"]
spec = {"solver": "dpm_solver_pp", "order": traj["order"], "lower_order_final": traj["lower_order_final"], "nfe": nfe,
        "x_T": "noise", "seed": 1, "per_shard": solve_batch, "batch": solve_batch,
        "dtype": traj["dtype"], "sigma_max": cfg["sigma_max"], "sigma_min": cfg["sigma_min"]}


def sync():
    if device.type == "cuda":
        torch.cuda.synchronize()


def median_seconds(fn, repeats=args.repeats, warmup=1):
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        sync()
        t0 = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


torch.manual_seed(0)
teacher = networks.freeze_unused_heads(networks.build_precond(arch, "edm", cfg["sigma_data"], cfg["sigma_min"]))
teacher = teacher.to(device).eval()
label_dim = class_labels.label_dim_of(teacher)
with torch.no_grad():  # a denoiser that is not the identity: the zero-initialised output layer perturbed
    for param in teacher.parameters():
        if param.abs().sum() == 0 and param.ndim > 1:
            param.normal_(0, 0.05)
results = {"device": torch.cuda.get_device_name() if device.type == "cuda" else (platform.processor() or "cpu"),
           "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
           "torch": torch.__version__, "threads": args.threads, "architecture": arch,
           "parameters": sum(q.numel() for q in teacher.parameters()), "nfe": nfe}

# ---- 1. trajectory stage against NFE teacher forwards
x = cfg["sigma_max"] * torch.randn(solve_batch, channels, resolution, resolution, device=device)
sigma = torch.full((solve_batch,), 2.0, device=device)
onehot = class_labels.one_hot([0] * solve_batch, label_dim, device)
with torch.no_grad():
    forward = median_seconds(lambda: losses.call(teacher, x, sigma, onehot))
generator = trajectories.Generator(teacher, {"architecture": arch}, spec, device)
tmp = Path(tempfile.mkdtemp())
per_shard = traj.get("per_shard", 4 * solve_batch)
first = [0]


def make_shard(path, background=True):
    """One shard as trajectory_shard makes it (solver batches produced in a thread while the tar is
    written), over a new range of indices each time."""
    indices = list(range(first[0], first[0] + per_shard))
    first[0] += per_shard

    def samples():
        for lo in range(0, per_shard, solve_batch):
            yield from generator.batch(indices[lo:lo + solve_batch])

    shards.write_shard(path, samples(), background=background)


stage = median_seconds(lambda: make_shard(tmp / "shard.tar"), repeats=max(1, args.repeats // 2))
# the same with the tar written after each solver batch, in the solving thread (the lever's effect)
foreground = median_seconds(lambda: make_shard(tmp / "fg.tar", background=False), repeats=max(1, args.repeats // 2))
per_traj, bound = stage / per_shard, nfe * forward / solve_batch
results["trajectory_stage"] = {
    "batch": solve_batch, "per_shard": per_shard, "teacher_forward_s": forward, "stage_s_per_shard": stage,
    "s_per_trajectory": per_traj, "nfe_forwards_s_per_trajectory": bound, "ratio": per_traj / bound,
    "bound": 1.10, "ratio_writing_in_the_solving_thread": foreground / per_shard / bound}

# ---- 2. shard reader against the CMT-CM step
mc = cfg["midtrain"]
per_step = mc["batch"] // nfe
paths = [tmp / "shard.tar"]  # one shard read round and round: the reader's cost does not depend on pool size
stream = shards.TrajectoryStream(paths, seed=0, shuffle_buffer=mc.get("shuffle_buffer", 1000))


def next_batch():
    """What stages/midtrain.py does per step to get its trajectories onto the device."""
    chosen = [next(stream) for _ in range(per_step)]
    states = torch.from_numpy(np.stack([c["states"] for c in chosen]).astype(np.float32)).to(device)
    sigmas = torch.from_numpy(chosen[0]["sigmas"].astype(np.float32)).to(device)
    return states, sigmas, class_labels.one_hot([c["meta"].get("label") for c in chosen], label_dim, device)


for _ in range(2 * len(paths)):  # fill the shuffle buffer first: steady state, not start-up
    next_batch()
reader = median_seconds(lambda: [next_batch() for _ in range(20)], warmup=0) / 20


def consistency_student(dropout):
    """The teacher's weights in the student's preconditioning (ECM; EDM2: plain EDM)."""
    net = networks.build_precond({**arch, "dropout": dropout}, networks.student_kind(arch), cfg["sigma_data"],
                                 cfg["sigma_boundary"])
    net.load_state_dict(teacher.state_dict())
    return networks.freeze_unused_heads(net).to(device).train()


student = consistency_student(mc["dropout"])
ema = EMA(student, mc["ema"]["beta"])
optimizer = loop.build_optimizer([q for q in student.parameters() if q.requires_grad], mc["optimizer"])
# LPIPS with a random VGG trunk: the cost of the real one, without its download
distance = (losses.LPIPSDistance(None).to(device) if mc["distance"] == "lpips"
            else losses.make_distance(mc["distance"], pseudo_huber_c=mc.get("pseudo_huber_c")))
states, sigmas, labels = next_batch()


def step():
    loss = losses.cmt_cm_loss(student, states, sigmas, distance, labels).mean()
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    ema.update(student, 1)


train_step = median_seconds(step)
results["input_pipeline"] = {
    "trajectories_per_step": per_step, "reader_s_per_step": reader, "step_s": train_step,
    "reader_traj_per_s": per_step / reader, "step_traj_per_s": per_step / train_step,
    "ratio": train_step / reader, "bound": 3.0}

# ---- 3. offline step (shard reader + CMT-CM step) against online step (teacher solve + the same step)
online = trajectories.OnlineTrajectories(generator, per_step)
step_index = [0]


def offline_step():
    global states, sigmas, labels
    states, sigmas, labels = next_batch()
    step()


def online_step():
    global states, sigmas, labels
    states, sigmas, metas = online.batch(step_index[0])
    labels = class_labels.one_hot([m.get("label") for m in metas], label_dim, device)
    step_index[0] += 1
    step()


offline_s, online_s = median_seconds(offline_step), median_seconds(online_step)
traj_total, steps_total = args.project_trajectories, args.project_steps
results["offline_vs_online"] = {
    "trajectories_per_step": per_step, "offline_step_s": offline_s, "online_step_s": online_s,
    "ratio": offline_s / online_s, "projection": {
        "trajectories": traj_total, "steps": steps_total, "note": "projected from the times measured here",
        "offline_trajectories_s": traj_total * per_traj, "offline_steps_s": steps_total * offline_s,
        "offline_total_s": traj_total * per_traj + steps_total * offline_s,
        "online_total_s": steps_total * online_s}}

# ---- the ECT post-training step per image, and a trajectory in those images
pc = cfg["posttrain"]
post_batch = pc["batch"]
ect_student = consistency_student(pc["dropout"])
ect_optimizer = loop.build_optimizer([q for q in ect_student.parameters() if q.requires_grad], pc["optimizer"])
ect_ema = EMA(ect_student, pc["ema"]["beta"])
images = torch.rand(post_batch, channels, resolution, resolution, device=device) * 2 - 1
image_labels = class_labels.one_hot([0] * post_batch, label_dim, device)
ect_rng = torch.Generator().manual_seed(0)


def ect_step():
    loss = losses.ect_loss(ect_student, images, ect_rng, stage=0, q=pc["q"], k=pc["k"], b=pc["b"], P_mean=pc["P_mean"],
                           P_std=pc["P_std"], c=pc["c"], labels=image_labels,
                           target_context=networks.target_context(ect_student)).mean()
    ect_optimizer.zero_grad(set_to_none=True)
    loss.backward()
    ect_optimizer.step()
    ect_ema.update(ect_student, 1)


ect_s = median_seconds(ect_step)
results["ect_step"] = {"batch": post_batch, "step_s": ect_s, "s_per_image": ect_s / post_batch,
                       "trajectory_in_ect_images": per_traj / (ect_s / post_batch)}

# ---- print and record
r1, r2 = results["trajectory_stage"], results["input_pipeline"]
r3, ect = results["offline_vs_online"], results["ect_step"]
print(f"device {results['device']}, torch {results['torch']}, threads {args.threads}, "
      f"{arch['kind']} {results['parameters']:,} parameters, NFE {nfe}")
print(f"1. trajectory stage: {1e3 * r1['s_per_trajectory']:.3f} ms/trajectory vs NFE x forward "
      f"{1e3 * r1['nfe_forwards_s_per_trajectory']:.3f} ms/trajectory (batch {solve_batch}, {per_shard} per shard): "
      "ratio "
      f"{r1['ratio']:.3f} (bound <= {r1['bound']}: {'met' if r1['ratio'] <= r1['bound'] else 'NOT met'}); "
      f"writing in the solving thread instead: {r1['ratio_writing_in_the_solving_thread']:.3f}")
print(f"2. input pipeline: reader {r2['reader_traj_per_s']:.0f} traj/s vs step {r2['step_traj_per_s']:.0f} traj/s "
      f"({per_step} trajectories per step): ratio {r2['ratio']:.2f} "
      f"(bound >= {r2['bound']}: {'met' if r2['ratio'] >= r2['bound'] else 'NOT met'})")
pr = r3["projection"]
print(f"3. offline vs online mid-training step ({per_step} trajectories): offline {1e3 * offline_s:.1f} ms "
      f"(reader + step) vs online {1e3 * online_s:.1f} ms (teacher solve + step): ratio {r3['ratio']:.3f}")
print(f"   whole route, PROJECTED from these times to {traj_total:.3g} trajectories and {steps_total:.3g} steps: "
      f"offline {pr['offline_total_s'] / 3600:.1f} h ({pr['offline_trajectories_s'] / 3600:.1f} h trajectories + "
      f"{pr['offline_steps_s'] / 3600:.1f} h steps) vs online {pr['online_total_s'] / 3600:.1f} h: "
      f"offline / online {pr['offline_total_s'] / pr['online_total_s']:.3f}")
print(f"ECT post-training step (batch {post_batch}): {1e3 * ect['s_per_image']:.3f} ms/image; one trajectory "
      f"({nfe} NFE, stage time) costs {ect['trajectory_in_ect_images']:.2f} ECT images")
if args.out:
    Path(args.out).write_text(json.dumps(results, indent=2) + "\n")
