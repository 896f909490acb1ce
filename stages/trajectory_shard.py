"""Stage trajectory_shard: solve the teacher's PF-ODE from the prior for one shard's trajectories.

Trajectory i is a pure function of (teacher, solver spec, base seed, i): its start noise comes from
a generator folded from (seed, i), and each shard is solved in fixed micro-batches that belong to
the spec. So shard k is the same bytes whoever makes it and however the jobs are split.
"""

import json
import time

import numpy as np
import torch

from . import checkpoints, cli, datasets, rng, shards, solvers

p = cli.parser(__doc__)
p.add_argument("--teacher", required=True, help="teacher model.safetensors")
p.add_argument("--shard", type=int, required=True)
p.add_argument("--dataset", default=None, help="prepared dataset.npz (x_T = data_plus_noise only)")
p.add_argument("--out", required=True)
args = p.parse_args()
spec = cli.start(args, "trajectory_shard")

teacher, meta = checkpoints.load(args.teacher, which="ema")
if meta["key"] != spec["teacher_key"]:
    raise ValueError(f"{args.teacher}: teacher key {meta['key']} but the trajectory spec expects "
                     f"{spec['teacher_key']}; the teacher file is stale: rerun train_teacher")
device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
teacher = teacher.to(device).eval().to(torch.float32)
shape = (meta["architecture"]["in_channels"], meta["architecture"]["resolution"],
         meta["architecture"]["resolution"])
sigmas = solvers.logsnr_grid(spec["nfe"], spec["sigma_max"], spec["sigma_min"])
solve = solvers.SOLVERS[spec["solver"]]
data = None
if spec["x_T"] == "data_plus_noise":
    images, _ = datasets.load(args.dataset)
    data = torch.from_numpy(datasets.to_model_range(images))
store_dtype = {"float16": np.float16, "float32": np.float32}[spec["dtype"]]

first = args.shard * spec["per_shard"]
indices = list(range(first, first + spec["per_shard"]))


@torch.no_grad()
def denoise(x, sigma):
    return teacher(x, torch.full((x.shape[0],), sigma, device=device))


def start_point(i):
    g = rng.generator(spec["seed"], i, "x_T")
    x = spec["sigma_max"] * torch.randn(shape, generator=g)
    meta = {"index": i, "seed": spec["seed"]}
    if data is not None:  # the official code's start: a real image plus 80 z (PAPER.md 10.1)
        j = int(torch.randint(len(data), (1,), generator=g))
        x = data[j] + x
        meta["data_index"] = j
    return x, meta


def samples():
    t0, done = time.perf_counter(), 0
    for lo in range(0, len(indices), spec["batch"]):
        chunk = indices[lo:lo + spec["batch"]]
        starts = [start_point(i) for i in chunk]
        x = torch.stack([s[0] for s in starts]).to(device)
        states = solve(denoise, x, sigmas, order=spec["order"],
                       lower_order_final=spec["lower_order_final"]).cpu().numpy()
        for (_, meta), i, traj in zip(starts, chunk, states):
            if not np.isfinite(traj.astype(store_dtype)).all():
                raise FloatingPointError(f"trajectory {i} overflows {spec['dtype']}; store float32")
            yield i, traj.astype(store_dtype), sigmas.numpy(), meta
        done += len(chunk)
        rate = done / (time.perf_counter() - t0)
        print(f"[trajectory_shard] shard {args.shard}: {done}/{len(indices)} trajectories  "
              f"traj/s {rate:.1f}  teacher NFE/s {rate * spec['nfe']:.0f}", flush=True)


count = shards.write_shard(args.out, samples())
print(f"[trajectory_shard] wrote {count} trajectories to {args.out}", flush=True)
