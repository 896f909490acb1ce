"""Stage trajectory_shard: solve the teacher's PF-ODE (an EDM teacher in sigma, a MeanFlow teacher with
its multi-step sampler in flow time) from the prior for one shard's trajectories.

Trajectory i is a pure function of (teacher, solver spec, base seed, i): its start noise comes from
a generator folded from (seed, i), and each shard is solved in fixed micro-batches that belong to
the spec, so how the jobs are split never changes a shard. Floating point does: another thread
count, CPU instruction set or GPU model may change the last bits of the solver states (not the
start point, sigmas or metadata), so copies made in different settings agree within the spot
check's tolerance rather than byte for byte; the manifest records the bytes actually present.
"""

import torch

from stages.core import cli, progress
from stages.data import datasets, shards
from stages.files import checkpoints
from stages.method import trajectories

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
data = labels = None
if spec["x_T"] == "data_plus_noise":
    images, labels = datasets.load(args.dataset)
    data = torch.from_numpy(datasets.to_model_range(images))
generator = trajectories.Generator(teacher, meta, spec, device, data, labels)

first = args.shard * spec["per_shard"]
indices = list(range(first, first + spec["per_shard"]))


def samples():
    shown = progress.Progress(f"[trajectory_shard] shard {args.shard}:", len(indices), "trajectories")
    for lo in range(0, len(indices), spec["batch"]):
        chunk = indices[lo:lo + spec["batch"]]
        yield from generator.batch(chunk)
        done = lo + len(chunk)
        shown.update(done, f"teacher NFE/s {done * spec['nfe'] / max(shown.clock() - shown.t0, 1e-9):.0f}")


count = shards.write_shard(args.out, samples(), background=True, grid_name=generator.grid_name)
print(f"[trajectory_shard] wrote {count} trajectories to {args.out}", flush=True)
