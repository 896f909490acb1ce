"""Stage midtrain: Consistency Mid-Training, CMT-CM (docs/method.md#cmt-cm).

The student starts from the teacher's weights (EMA too) with the ECM preconditioning, and maps
each of the K pre-final states of a teacher trajectory, at its sigma, to the trajectory's final
state. One step sees `batch` student inputs = batch / K whole trajectories: read from the stored shards
(midtrain.trajectories = offline, the pipeline's route), or solved by the teacher inside the step
(online, the official code's design: no shards; the config then carries the trajectory spec as
`trajectory_spec`).
"""

import numpy as np
import torch

from stages.files import atomic, checkpoints, store
from stages.runtime import cli
from stages.data import datasets, shards
from stages.method import losses, trajectories
from stages.training import loop
from stages.training.job import TrainingJob

p = cli.add_trajectory_args(cli.add_state_args(cli.parser(__doc__)), manifest_required=False)
p.add_argument("--teacher", required=True, help="teacher model.safetensors (the initialisation)")
p.add_argument("--out", required=True, help="model.safetensors to write")
args = p.parse_args()
cfg = cli.start(args, "midtrain")
mc, seed = cfg["midtrain"], cfg["seed"]
online = mc.get("trajectories", "offline") == "online"

if online:
    spec = cfg["trajectory_spec"]
    K = spec["nfe"]
else:
    # ---- data: every shard checked against the manifest, and a few regenerated, before any step
    if args.manifest is None:
        raise ValueError("midtrain: --manifest is required unless midtrain.trajectories is online")
    manifest, shard_paths = shards.check_manifest(args.manifest, fast=args.verify == "fast")
    K = manifest["spec"]["nfe"]
    remake = {str(p): store.remake_command(e.get("receipt")) for p, e in zip(shard_paths, manifest["shards"])}
    if trajectories.spot_check(args.spot_check, shard_paths, manifest["spec"], args.teacher, args.dataset, remake):
        print(f"[midtrain] spot check: {args.spot_check} trajectories regenerated from their seeds match", flush=True)
if mc["batch"] % K:
    raise ValueError(f"midtrain.batch {mc['batch']} is not a multiple of the {K} points per trajectory")
accelerator = loop.make_accelerator()
world, rank = accelerator.num_processes, accelerator.process_index
traj_per_step = mc["batch"] // K
if traj_per_step % world:
    raise ValueError(f"midtrain.batch / {K} = {traj_per_step} trajectories per step cannot be split "
                     f"over {world} processes")
local_traj = traj_per_step // world
if online:
    # the teacher as trajectory_shard uses it (EDM preconditioning, EMA weights, float32), beside the student
    solver_net, solver_meta = checkpoints.load(args.teacher, which="ema")
    if solver_meta["key"] != spec["teacher_key"]:
        raise ValueError(f"{args.teacher}: teacher key {solver_meta['key']} but the trajectory spec expects "
                         f"{spec['teacher_key']}; the teacher file is stale: rerun train_teacher")
    start_data = None
    if spec["x_T"] == "data_plus_noise":
        start_data = torch.from_numpy(datasets.to_model_range(datasets.load(args.dataset)[0]))
    online_source = trajectories.OnlineTrajectories(
        trajectories.Generator(solver_net, solver_meta, spec, accelerator.device, start_data), traj_per_step, rank, world)
    stream = None  # nothing to resume but the step: the trajectories are a function of it
else:
    # each rank reads its own shards (no DataLoader workers: ranks x 1)
    stream = shards.RankTrajectoryStream(shard_paths, [e["count"] for e in manifest["shards"]], seed,
                                         mc["shuffle_buffer"], rank, world)
    if world > 1:
        print(f"[midtrain] rank {rank} of {world} reads shards {stream.paths}", flush=True)

# ---- model: teacher weights, ECM preconditioning with the student's boundary (not the teacher's
# grid end: docs/method.md#preconditioning), the mid-training dropout
net, teacher_meta = checkpoints.load(args.teacher, which="ema", kind="ecm", dropout=mc["dropout"],
                                     sigma_min=cfg["sigma_boundary"])
ema = loop.EMA(net, mc["ema"]["beta"], mc["ema"].get("rampup"))
optimizer = loop.build_optimizer(net.parameters(), mc["optimizer"])
net, optimizer = accelerator.prepare(net, optimizer)
identity = {"teacher_sha256": teacher_meta["sha256"]}
if online:  # the spec is in the config, which the identity holds already
    inputs = {"trajectories": "online"}
else:
    identity["manifest_sha256"] = atomic.sha256_file(args.manifest)
    inputs = {"manifest": {"path": args.manifest, "sha256": identity["manifest_sha256"]}}
job = TrainingJob(args, cfg, stage="midtrain", accelerator=accelerator, identity=identity)
distance = losses.make_distance(mc["distance"], pseudo_huber_c=mc.get("pseudo_huber_c"),
                                lpips_weights=mc.get("lpips_weights"))
if isinstance(distance, torch.nn.Module):
    distance = distance.to(accelerator.device)
source = ("online: the teacher solves each step's trajectories" if online else
          f"{manifest['total']} trajectories in {len(shard_paths)} shards")
print(f"[midtrain] {source}, {traj_per_step} trajectories x {K} points = batch {mc['batch']}, "
      f"{mc['steps']} steps, distance {mc['distance']}", flush=True)


def next_batch():
    """This rank's share of the next global batch: local_traj trajectories from its own shards."""
    chosen = [next(stream) for _ in range(local_traj)]
    states = torch.from_numpy(np.stack([c["states"] for c in chosen]).astype(np.float32))
    sigmas = torch.from_numpy(chosen[0]["sigmas"].astype(np.float32))
    return states.to(accelerator.device), sigmas.to(accelerator.device)


def loss_fn(step):
    states, sigmas = online_source.batch(step) if online else next_batch()
    return losses.cmt_cm_loss(net, states, sigmas, distance)


elapsed = loop.fit(stage="midtrain", accelerator=accelerator, net=net, ema=ema, optimizer=optimizer,
                   opt_cfg=mc["optimizer"], total_steps=mc["steps"], batch=mc["batch"], seed=seed,
                   loss_fn=loss_fn, state=job.state, data=stream)

meta = {k: teacher_meta[k] for k in ("sigma_data", "sigma_max", "time")}
meta["sigma_min"] = cfg["sigma_boundary"]  # the eval-mode boundary that build_precond reads
job.finish(net, ema, steps=mc["steps"], batch=mc["batch"], train_seconds=elapsed, meta={
    **meta, "architecture": {**teacher_meta["architecture"], "dropout": mc["dropout"]}, "role": "midtrain",
    "precond": "ecm", "trajectories_seen": mc["steps"] * traj_per_step,
    "inputs": {"teacher": {"path": args.teacher, "sha256": teacher_meta["sha256"]}, **inputs},
})
