"""Stage midtrain: Consistency Mid-Training, CMT-CM (docs/method.md#cmt-cm).

The student starts from the teacher's weights (EMA too) with the ECM preconditioning, and maps
each of the K pre-final states of a teacher trajectory, at its sigma, to the trajectory's final
state. One step sees `batch` student inputs = batch / K whole trajectories.
"""

import numpy as np
import torch

from stages import networks
from stages.files import atomic, checkpoints, store
from stages.runtime import cli
from stages.data import labels as class_labels, shards
from stages.method import losses, trajectories
from stages.training import loop
from stages.training.job import TrainingJob

p = cli.add_trajectory_args(cli.add_state_args(cli.parser(__doc__)))
p.add_argument("--teacher", required=True, help="teacher model.safetensors (the initialisation)")
p.add_argument("--out", required=True, help="model.safetensors to write")
args = p.parse_args()
cfg = cli.start(args, "midtrain")
mc, seed = cfg["midtrain"], cfg["seed"]

# ---- data: every shard checked against the manifest, and a few regenerated, before any step
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
# gradient accumulation: batch_per_gpu student inputs (whole trajectories) per micro-batch
per_gpu = mc.get("batch_per_gpu")
if per_gpu is not None and per_gpu % K:
    raise ValueError(f"midtrain.batch_per_gpu {per_gpu} is not a multiple of the {K} points per trajectory")
local_traj, micro_batches = loop.split_batch(traj_per_step, per_gpu and per_gpu // K, world, "midtrain",
                                             unit=f"trajectories (student inputs / {K})")
# each rank reads its own shards (no DataLoader workers: ranks x 1)
stream = shards.RankTrajectoryStream(shard_paths, [e["count"] for e in manifest["shards"]], seed,
                                     mc["shuffle_buffer"], rank, world)
if world > 1:
    print(f"[midtrain] rank {rank} of {world} reads shards {stream.paths}", flush=True)

# ---- model: teacher weights, ECM preconditioning with the student's boundary (not the teacher's
# grid end: docs/method.md#preconditioning), the mid-training dropout
# (EDM2 students: plain EDM preconditioning in both modes, no boundary; networks.student_kind)
student_kind = networks.student_kind(checkpoints.read_meta(args.teacher)["architecture"])
net, teacher_meta = checkpoints.load(args.teacher, which="ema", kind=student_kind, dropout=mc["dropout"],
                                     sigma_min=cfg["sigma_boundary"])
networks.freeze_unused_heads(net)
ema = loop.EMA(net, mc["ema"]["beta"], mc["ema"].get("rampup"))
optimizer = loop.build_optimizer(net.parameters(), mc["optimizer"])
net, optimizer = accelerator.prepare(net, optimizer)
manifest_sha256 = atomic.sha256_file(args.manifest)
job = TrainingJob(args, cfg, stage="midtrain", accelerator=accelerator, identity={
    "teacher_sha256": teacher_meta["sha256"], "manifest_sha256": manifest_sha256})
distance = losses.make_distance(mc["distance"], pseudo_huber_c=mc.get("pseudo_huber_c"),
                                lpips_weights=mc.get("lpips_weights"))
if isinstance(distance, torch.nn.Module):
    distance = distance.to(accelerator.device)
print(f"[midtrain] {manifest['total']} trajectories in {len(shard_paths)} shards, "
      f"{traj_per_step} trajectories x {K} points = batch {mc['batch']}, {mc['steps']} steps, "
      f"distance {mc['distance']}", flush=True)


label_dim = class_labels.label_dim_of(net)


def trajectory_labels(chosen):
    """One-hot [T, label_dim] of the classes the (conditional) teacher solved the trajectories for."""
    if not label_dim:
        return None
    missing = [c["index"] for c in chosen if "label" not in c["meta"]]
    if missing:
        raise ValueError(f"{args.manifest}: trajectories {missing[:5]} carry no class label but the teacher is "
                         f"class-conditional (label_dim {label_dim}); the shards are not this teacher's: "
                         "rerun the trajectory_shard jobs")
    return class_labels.one_hot([c["meta"]["label"] for c in chosen], label_dim, accelerator.device,
                                what=f"{args.manifest}: trajectory labels")


def next_batch():
    """This rank's share of the next global batch: local_traj trajectories from its own shards."""
    chosen = [next(stream) for _ in range(local_traj)]
    states = torch.from_numpy(np.stack([c["states"] for c in chosen]).astype(np.float32))
    sigmas = torch.from_numpy(chosen[0]["sigmas"].astype(np.float32))
    return states.to(accelerator.device), sigmas.to(accelerator.device), trajectory_labels(chosen)


def loss_fn(step, part):
    states, sigmas, onehot = next_batch()
    return losses.cmt_cm_loss(net, states, sigmas, distance, onehot)


elapsed = loop.fit(stage="midtrain", accelerator=accelerator, net=net, ema=ema, optimizer=optimizer,
                   opt_cfg=mc["optimizer"], total_steps=mc["steps"], batch=mc["batch"], seed=seed,
                   loss_fn=loss_fn, state=job.state, data=stream, micro_batches=micro_batches)

meta = {k: teacher_meta[k] for k in ("sigma_data", "sigma_max", "time")}
meta["sigma_min"] = cfg["sigma_boundary"]  # the eval-mode boundary that build_precond reads
job.finish(net, ema, steps=mc["steps"], batch=mc["batch"], train_seconds=elapsed, meta={
    **meta, "architecture": {**teacher_meta["architecture"], "dropout": mc["dropout"]}, "role": "midtrain",
    "precond": student_kind, "trajectories_seen": mc["steps"] * traj_per_step,
    "inputs": {"teacher": {"path": args.teacher, "sha256": teacher_meta["sha256"]},
               "manifest": {"path": args.manifest, "sha256": manifest_sha256}},
})
