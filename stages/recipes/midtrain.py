"""Recipe of midtrain: Consistency Mid-Training, CMT-CM (docs/method.md#cmt-cm).

The student starts from the teacher's weights (EMA too) with the ECM preconditioning and the
config's boundary sigma_boundary (not the teacher's grid end: docs/method.md#preconditioning; EDM2
students keep plain EDM preconditioning, networks.student_kind), and maps each of the K pre-final
states of a teacher trajectory, at its sigma, to the trajectory's final state. One step sees
`batch` student inputs = batch / K whole trajectories: read from the stored shards
(midtrain.trajectories offline, the pipeline's route), or solved by the teacher inside the step
(online, the official code's design: no shards; the config then carries the trajectory spec as
`trajectory_spec`).
"""

import numpy as np
import torch

from stages import networks
from stages.data import datasets, shards, training_data
from stages.data import labels as class_labels
from stages.files import atomic, checkpoints, store
from stages.method import losses, solvers, trajectories
from stages.recipes import averaging, examples
from stages.training.run import Recipe


def student(cfg, teacher_meta):
    """(the consistency student of a teacher described by `teacher_meta`, with random weights, its
    preconditioning kind)."""
    kind = networks.student_kind(teacher_meta["architecture"])
    net = checkpoints.build(teacher_meta, kind=kind, dropout=cfg["midtrain"]["dropout"],
                            sigma_boundary=cfg["sigma_boundary"])
    return networks.freeze_unused_heads(net), kind


def distance_of(cfg, latent_vgg=None):
    mc = cfg["midtrain"]
    return losses.make_distance(mc["distance"], pseudo_huber_c=mc.get("pseudo_huber_c"),
                                lpips_weights=mc.get("lpips_weights"), latent_vgg=latent_vgg,
                                elatentlpips_augment=mc.get("elatentlpips_augment", "sony_cmt"))


def objective(distance):
    """loss(model, batch) of a batch (states [T, K+1, C, H, W], sigmas [K+1], one-hot classes [T] or None);
    `terms`: a dict for the loss's parts (stages/method/losses.py)."""

    def cmt_cm_loss(model, batch, generator=None, terms=None):
        states, sigmas, onehot = batch
        return losses.cmt_cm_loss(model, states, sigmas, distance, onehot, terms=terms)

    return cmt_cm_loss


def example_batch(cfg, teacher_meta, student_net, inputs, device):
    """Random trajectories of the row's solver grid: `inputs` student inputs = inputs / K trajectories."""
    K = cfg["trajectories"]["nfe"]
    arch = teacher_meta["architecture"]
    sigmas = solvers.logsnr_grid(K, cfg["sigma_max"], cfg["sigma_min"]).to(torch.float32).to(device)
    states = torch.randn(inputs // K, K + 1, arch["in_channels"], arch["resolution"], arch["resolution"])
    states = states.to(device) * sigmas[:, None, None, None] + cfg["sigma_data"]
    return states, sigmas, examples.one_hot(inputs // K, class_labels.label_dim_of(student_net), device)


def build(cfg, args, accelerator):
    mc, seed = cfg["midtrain"], cfg["seed"]
    online = mc.get("trajectories", "offline") == "online"
    if online:
        spec = cfg["trajectory_spec"]
        K = spec["nfe"]
    else:
        # every shard checked against the manifest, and a few regenerated, before any step
        if args.manifest is None:
            raise ValueError("midtrain: --manifest is required unless midtrain.trajectories is online")
        manifest, shard_paths = shards.check_manifest(args.manifest, fast=args.verify == "fast")
        K = manifest["spec"]["nfe"]
        remake = {str(p): store.remake_command(e.get("receipt"))
                  for p, e in zip(shard_paths, manifest["shards"], strict=True)}
        if trajectories.spot_check(args.spot_check, shard_paths, manifest["spec"], args.teacher, args.dataset, remake):
            print(f"[midtrain] spot check: {args.spot_check} trajectories regenerated from their seeds match",
                  flush=True)
    if mc["batch"] % K:
        raise ValueError(f"midtrain.batch {mc['batch']} is not a multiple of the {K} points per trajectory")
    world, rank = accelerator.num_processes, accelerator.process_index
    traj_per_step = mc["batch"] // K
    if traj_per_step % world:
        raise ValueError(f"midtrain.batch / {K} = {traj_per_step} trajectories per step cannot be split "
                         f"over {world} processes")
    # gradient accumulation: batch_per_gpu student inputs (whole trajectories) per micro-batch
    per_gpu = mc.get("batch_per_gpu")
    if per_gpu is not None and per_gpu % K:
        raise ValueError(f"midtrain.batch_per_gpu {per_gpu} is not a multiple of the {K} points per trajectory")
    local_traj, micro_batches = training_data.split_batch(traj_per_step, per_gpu and per_gpu // K, world, "midtrain",
                                                         unit=f"trajectories (student inputs / {K})")
    stream = online_source = None
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
    else:
        # each rank reads its own shards (no DataLoader workers: ranks x 1)
        stream = shards.RankTrajectoryStream(shard_paths, [e["count"] for e in manifest["shards"]], seed,
                                             mc["shuffle_buffer"], rank, world)
        if world > 1:
            print(f"[midtrain] rank {rank} of {world} reads shards {stream.paths}", flush=True)

    # the student: the teacher's EMA weights
    teacher_meta = checkpoints.read_meta(args.teacher)
    net, kind = student(cfg, teacher_meta)
    checkpoints.load_into(net, args.teacher, which="ema")
    ema = averaging.ema_of(net, mc["ema"], mc["steps"])
    identity = {"teacher_sha256": teacher_meta["sha256"]}
    if args.latent_vgg:  # the distance's backbone is an input like the teacher
        identity["latent_vgg_sha256"] = atomic.sha256_file(args.latent_vgg)
    if online:  # the spec is in the config, which the identity holds already
        inputs = {"trajectories": "online"}
    else:
        identity["manifest_sha256"] = atomic.sha256_file(args.manifest)
        inputs = {"manifest": {"path": args.manifest, "sha256": identity["manifest_sha256"]}}
    distance = distance_of(cfg, args.latent_vgg)
    if isinstance(distance, torch.nn.Module):
        distance = distance.to(accelerator.device)
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

    def batch(step, part):
        """This rank's share of the step's global batch: local_traj trajectories."""
        if online:
            states, sigmas, metas = online_source.batch(step, part, local_traj)
            return states, sigmas, labels_of(metas, "the teacher's online trajectories")
        chosen = [next(stream) for _ in range(local_traj)]
        states = torch.from_numpy(np.stack([c["states"] for c in chosen]).astype(np.float32))
        sigmas = torch.from_numpy(chosen[0]["sigmas"].astype(np.float32))
        onehot = labels_of([{"index": c["index"], **c["meta"]} for c in chosen], args.manifest) if label_dim else None
        return states.to(accelerator.device), sigmas.to(accelerator.device), onehot

    loss_of = objective(distance)

    def loss(model, step, part):
        terms = {}
        return loss_of(model, batch(step, part), terms=terms), terms

    source = ("online: the teacher solves each step's trajectories" if online else
              f"{manifest['total']} trajectories in {len(shard_paths)} shards")
    return Recipe(
        stage="midtrain", seed=seed, net=net, ema=ema, optimizer=mc["optimizer"], total_steps=mc["steps"],
        batch=mc["batch"], micro_batches=micro_batches,
        loss=loss,
        data=stream, identity=identity,
        describe=f"{source}, {traj_per_step} trajectories x {K} points, distance {mc['distance']}: ",
        meta={**{k: teacher_meta[k] for k in ("sigma_data", "sigma_min", "sigma_max", "time")},
              "sigma_boundary": cfg["sigma_boundary"],
              "architecture": {**teacher_meta["architecture"], "dropout": mc["dropout"]}, "role": "midtrain",
              "precond": kind, "trajectories_seen": mc["steps"] * traj_per_step,
              "inputs": {"teacher": {"path": args.teacher, "sha256": teacher_meta["sha256"]}, **inputs}})

