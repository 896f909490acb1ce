"""Stage midtrain_mf: Consistency Mid-Training for the average-velocity flow map, CMT-MF
(docs/method.md#meanflow).

Two kinds of trajectories. An EDM teacher's stay in the store as EDM states at their sigmas; here
each one is read in flow-matching time through flowmap.trajectory_to_flow (z = x / (1 + sigma),
t = sigma / (1 + sigma), plus the prior noise at t = 1). A MeanFlow teacher's (trajectories.solver
meanflow) are stored in flow time already, z_1 = eps first, with their class (the null class where
the spec's label dropout dropped it): they are read as they are, and a class-conditional student
gets each trajectory's class with every pair drawn from it. A step draws `pairs_per_trajectory`
random pairs i > j from each of batch / pairs_per_trajectory trajectories and regresses u(z_i, t_j, t_i) onto (z_i - z_j) / (t_i - t_j):
no JVP, no stop-gradient. The student starts from random weights (the paper's MF student is a
different, larger network than its teacher): the teacher's architecture for an EDM teacher, the
row's `network` section (MF-XL/2 against an MF-B/4 teacher) where the config passes one.
"""

import numpy as np
import torch

from stages.files import atomic, checkpoints, store
from stages.runtime import cli
from stages.method import flowmap, losses, meanflow, solvers, trajectories
from stages.training import loop, rng
from stages.training.job import TrainingJob
from stages.data import shards

p = cli.add_trajectory_args(cli.add_state_args(cli.parser(__doc__)))
p.add_argument("--teacher", required=True, help="teacher model.safetensors (architecture, sigma_data, spot check)")
p.add_argument("--out", required=True, help="model.safetensors to write")
args = p.parse_args()
cfg = cli.start(args, "midtrain_mf")
mc, seed = cfg["midtrain_mf"], cfg["seed"]

# ---- data: every shard checked against the manifest, and a few regenerated, before any step
manifest, shard_paths = shards.check_manifest(args.manifest, fast=args.verify == "fast")
remake = {str(p): store.remake_command(e.get("receipt")) for p, e in zip(shard_paths, manifest["shards"])}
if trajectories.spot_check(args.spot_check, shard_paths, manifest["spec"], args.teacher, args.dataset, remake):
    print(f"[midtrain_mf] spot check: {args.spot_check} trajectories regenerated from their seeds match", flush=True)
P = mc["pairs_per_trajectory"]
if mc["batch"] % P:
    raise ValueError(f"midtrain_mf.batch {mc['batch']} is not a multiple of pairs_per_trajectory {P}")
accelerator = loop.make_accelerator()
world, rank = accelerator.num_processes, accelerator.process_index
traj_per_step = mc["batch"] // P
if traj_per_step % world:
    raise ValueError(f"midtrain_mf: {traj_per_step} trajectories per step cannot be split over {world} processes")
per_gpu = mc.get("batch_per_gpu")
if per_gpu is not None and per_gpu % P:
    raise ValueError(f"midtrain_mf.batch_per_gpu {per_gpu} is not a multiple of pairs_per_trajectory {P}")
local_traj, micro_batches = loop.split_batch(traj_per_step, per_gpu and per_gpu // P, world, "midtrain_mf",
                                             unit=f"trajectories (pairs / {P})")
# each rank reads its own shards, as midtrain (with one process: the plain stream of all shards)
stream = shards.RankTrajectoryStream(shard_paths, [e["count"] for e in manifest["shards"]], seed,
                                     mc["shuffle_buffer"], rank, world)
if world > 1:
    print(f"[midtrain_mf] rank {rank} of {world} reads shards {stream.paths}", flush=True)
sigma_max = manifest["spec"]["sigma_max"]
solver = manifest["spec"].get("solver", "dpm_solver_pp")  # the spec's default (schema)
flow_time = solver in solvers.FLOW_SOLVERS

# ---- model: the teacher's network (or the row's) with the second time input, random weights
teacher_meta = checkpoints.read_meta(args.teacher)
if flow_time != (teacher_meta["precond"] == "meanflow"):
    raise ValueError(f"{args.manifest}: solver {solver!r} but the teacher {args.teacher} has "
                     f"precond {teacher_meta['precond']!r}; the trajectories are not this teacher's")
if cfg.get("network"):
    data_shape = {k: teacher_meta["architecture"][k] for k in ("in_channels", "resolution")}
    architecture = {**cfg["network"], **data_shape, "dropout": mc["dropout"], "dual_time": True}
else:
    architecture = {**teacher_meta["architecture"], "dropout": mc["dropout"], "dual_time": True}
meta = {"architecture": architecture, "precond": "meanflow", "sigma_data": teacher_meta["sigma_data"],
        "sigma_min": teacher_meta["sigma_min"], "sigma_max": teacher_meta["sigma_max"], "time": "flow_t"}
torch.manual_seed(rng.fold(seed, "midtrain-mf-init"))
net = checkpoints.build_precond(meta)
ema = loop.EMA(net, mc["ema"]["beta"], mc["ema"].get("rampup"))
optimizer = loop.build_optimizer(net.parameters(), mc["optimizer"])
num_classes = net.num_classes
net, optimizer = accelerator.prepare(net, optimizer)
if num_classes and not flow_time:
    raise ValueError("midtrain_mf: a class-conditional student needs class-labelled flow-time trajectories "
                     "(trajectories.solver meanflow from a class-conditional MeanFlow teacher)")
manifest_sha256 = atomic.sha256_file(args.manifest)
job = TrainingJob(args, cfg, stage="midtrain_mf", accelerator=accelerator, identity={
    "teacher_sha256": teacher_meta["sha256"], "manifest_sha256": manifest_sha256})
distance = losses.make_distance(mc["distance"])
# the solver's K+1 states, and for an EDM teacher the prior noise at t = 1 in front of them
K = manifest["spec"]["nfe"] + (1 if flow_time else 2)
print(f"[midtrain_mf] {manifest['total']} trajectories in {len(shard_paths)} shards, {K} points each "
      f"in flow time; {traj_per_step} trajectories x {P} pairs = batch {mc['batch']}, {mc['steps']} steps, "
      f"distance {mc['distance']}", flush=True)


def trajectory_label(c):
    if "label" not in c["meta"]:
        raise ValueError(f"trajectory {c['index']} has no class label but the student is class-conditional: "
                         "make the pool with a class-conditional MeanFlow teacher")
    return c["meta"]["label"]


def next_batch():
    """This rank's share of the next global batch: local_traj trajectories from its own shards,
    in flow-matching time, and their classes (None for an unconditional student)."""
    chosen = [next(stream) for _ in range(local_traj)]
    states = torch.from_numpy(np.stack([c["states"] for c in chosen]).astype(np.float32))
    labels = (torch.tensor([trajectory_label(c) for c in chosen], dtype=torch.int64, device=accelerator.device)
              if num_classes else None)
    if flow_time:
        t = torch.from_numpy(chosen[0]["times"].astype(np.float32))
        return states.to(accelerator.device), t.to(accelerator.device), labels
    sigmas = torch.from_numpy(chosen[0]["sigmas"].astype(np.float64))
    z, t = flowmap.trajectory_to_flow(states.double(), sigmas, sigma_max)
    return z.float().to(accelerator.device), t.float().to(accelerator.device), labels


def loss_fn(step, part):
    z, t, labels = next_batch()
    g = rng.generator(seed, step, part, "cmt-mf-pairs")
    return meanflow.cmt_mf_loss(net, z, t, P, g, distance, labels=labels)


elapsed = loop.fit(stage="midtrain_mf", accelerator=accelerator, net=net, ema=ema, optimizer=optimizer,
                   opt_cfg=mc["optimizer"], total_steps=mc["steps"], batch=mc["batch"], seed=seed,
                   loss_fn=loss_fn, state=job.state, data=stream, micro_batches=micro_batches)

job.finish(net, ema, steps=mc["steps"], batch=mc["batch"], train_seconds=elapsed, meta={
    **meta, "role": "midtrain", "objective": "cmt-mf", "trajectories_seen": mc["steps"] * traj_per_step,
    "time_convention": {"trajectories": ("flow time (MeanFlow teacher)" if flow_time else
                                         "sigma (EDM), converted by flowmap.trajectory_to_flow"),
                        "model": "flow-matching t in [0, 1], t = 1 noise; z = x_sigma / (1 + sigma)"},
    "inputs": {"teacher": {"path": args.teacher, "sha256": teacher_meta["sha256"]},
               "manifest": {"path": args.manifest, "sha256": manifest_sha256}},
})
