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

from stages import networks
from stages.files import atomic, checkpoints, store
from stages.runtime import cli
from stages.data import datasets, labels as class_labels, shards
from stages.method import losses, trajectories
from stages.training import loop
from stages.training.job import TrainingJob

p = cli.add_trajectory_args(cli.add_state_args(cli.parser(__doc__)), manifest_required=False)
p.add_argument("--teacher", required=True, help="teacher model.safetensors (the initialisation)")
p.add_argument("--out", required=True, help="model.safetensors to write")
p.add_argument("--latent-vgg", default=None, help="distance elatentlpips: the latent VGG16 (train_latent_vgg)")
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
# gradient accumulation: batch_per_gpu student inputs (whole trajectories) per micro-batch
per_gpu = mc.get("batch_per_gpu")
if per_gpu is not None and per_gpu % K:
    raise ValueError(f"midtrain.batch_per_gpu {per_gpu} is not a multiple of the {K} points per trajectory")
local_traj, micro_batches = loop.split_batch(traj_per_step, per_gpu and per_gpu // K, world, "midtrain",
                                             unit=f"trajectories (student inputs / {K})")
if online:
    # the teacher as trajectory_shard uses it (EDM preconditioning, EMA weights, float32), beside the student
    solver_net, solver_meta = checkpoints.load(args.teacher, which="ema")
    if solver_meta["key"] != spec["teacher_key"]:
        raise ValueError(f"{args.teacher}: teacher key {solver_meta['key']} but the trajectory spec expects "
                         f"{spec['teacher_key']}; the teacher file is stale: rerun train_teacher")
    start_data = start_labels = None
    if spec["x_T"] == "data_plus_noise":
        images, start_labels = datasets.load(args.dataset)
        start_data = torch.from_numpy(datasets.to_model_range(images))
    online_source = trajectories.OnlineTrajectories(
        trajectories.Generator(solver_net, solver_meta, spec, accelerator.device, start_data, start_labels),
        traj_per_step, rank, world)
    stream = None  # nothing to resume but the step: the trajectories are a function of it
else:
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
identity = {"teacher_sha256": teacher_meta["sha256"]}
if args.latent_vgg:  # the distance's backbone is an input like the teacher
    identity["latent_vgg_sha256"] = atomic.sha256_file(args.latent_vgg)
if online:  # the spec is in the config, which the identity holds already
    inputs = {"trajectories": "online"}
else:
    identity["manifest_sha256"] = atomic.sha256_file(args.manifest)
    inputs = {"manifest": {"path": args.manifest, "sha256": identity["manifest_sha256"]}}
job = TrainingJob(args, cfg, stage="midtrain", accelerator=accelerator, identity=identity)
distance = losses.make_distance(mc["distance"], pseudo_huber_c=mc.get("pseudo_huber_c"),
                                lpips_weights=mc.get("lpips_weights"), latent_vgg=args.latent_vgg,
                                elatentlpips_augment=mc.get("elatentlpips_augment", "sony_cmt"))
if isinstance(distance, torch.nn.Module):
    distance = distance.to(accelerator.device)
source = ("online: the teacher solves each step's trajectories" if online else
          f"{manifest['total']} trajectories in {len(shard_paths)} shards")
print(f"[midtrain] {source}, {traj_per_step} trajectories x {K} points = batch {mc['batch']}, "
      f"{mc['steps']} steps, distance {mc['distance']}", flush=True)


label_dim = class_labels.label_dim_of(net)


def labels_of(metas, source):
    """One-hot [T, label_dim] of the classes the (conditional) teacher solved the trajectories for
    (`metas`: their meta.json dicts, each with its `index`); None for an unconditional teacher."""
    if not label_dim:
        return None
    missing = [m.get("index") for m in metas if "label" not in m]
    if missing:
        raise ValueError(f"{source}: trajectories {missing[:5]} carry no class label but the teacher is "
                         f"class-conditional (label_dim {label_dim}); the shards are not this teacher's: "
                         "rerun the trajectory_shard jobs")
    return class_labels.one_hot([m["label"] for m in metas], label_dim, accelerator.device,
                                what=f"{source}: trajectory labels")


def next_batch():
    """This rank's share of the next global batch: local_traj trajectories from its own shards."""
    chosen = [next(stream) for _ in range(local_traj)]
    states = torch.from_numpy(np.stack([c["states"] for c in chosen]).astype(np.float32))
    sigmas = torch.from_numpy(chosen[0]["sigmas"].astype(np.float32))
    onehot = labels_of([{"index": c["index"], **c["meta"]} for c in chosen], args.manifest) if label_dim else None
    return states.to(accelerator.device), sigmas.to(accelerator.device), onehot


def loss_fn(step, part):
    if online:
        states, sigmas, metas = online_source.batch(step, part, local_traj)
        onehot = labels_of(metas, "the teacher's online trajectories")
    else:
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
    "inputs": {"teacher": {"path": args.teacher, "sha256": teacher_meta["sha256"]}, **inputs},
})
