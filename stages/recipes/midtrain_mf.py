"""Recipe of midtrain_mf: Consistency Mid-Training for the average-velocity flow map, CMT-MF
(docs/method.md#meanflow).

Two kinds of trajectories. An EDM teacher's stay in the store as EDM states at their sigmas; here
each one is read in flow-matching time through flowmap.trajectory_to_flow (z = x / (1 + sigma),
t = sigma / (1 + sigma), plus the prior noise at t = 1). A MeanFlow teacher's (trajectories.solver
meanflow) are stored in flow time already, z_1 = eps first, with their class (the null class where
the spec's label dropout dropped it): they are read as they are, and a class-conditional student
gets each trajectory's class with every pair drawn from it. A step draws `pairs_per_trajectory`
random pairs i > j from each of batch / pairs_per_trajectory trajectories and regresses
u(z_i, t_j, t_i) onto (z_i - z_j) / (t_i - t_j): no JVP, no stop-gradient. The student starts from
random weights (the paper's MF student is a different, larger network than its teacher): the
teacher's architecture for an EDM teacher, the row's `network` section (MF-XL/2 against an MF-B/4
teacher) where the config passes one.
"""

import numpy as np
import torch

from stages.core import rng
from stages.data import shards, training_data
from stages.files import atomic, checkpoints, store
from stages.method import flowmap, losses, meanflow, solvers, trajectories
from stages.recipes import averaging
from stages.training.run import Recipe


def model_meta(cfg, teacher_meta):
    """model.json's description of the student of a teacher described by `teacher_meta`."""
    mc = cfg["midtrain_mf"]
    if cfg.get("network"):
        data_shape = {k: teacher_meta["architecture"][k] for k in ("in_channels", "resolution")}
        architecture = {**cfg["network"], **data_shape, "dropout": mc["dropout"], "dual_time": True}
    else:
        architecture = {**teacher_meta["architecture"], "dropout": mc["dropout"], "dual_time": True}
    return {"architecture": architecture, "precond": "meanflow", "sigma_data": teacher_meta["sigma_data"],
            "sigma_min": teacher_meta["sigma_min"], "sigma_max": teacher_meta["sigma_max"], "time": "flow_t"}


def student(cfg, teacher_meta):
    """(the average-velocity student with its random initial weights, its model.json description)."""
    meta = model_meta(cfg, teacher_meta)
    torch.manual_seed(rng.fold(cfg["seed"], "midtrain-mf-init"))
    return checkpoints.build(meta), meta


def objective(cfg):
    """loss(model, batch, generator) of a batch (z [T, K, C, H, W] noise first, t [K], labels [T] or None)."""
    mc = cfg["midtrain_mf"]
    distance = losses.make_distance(mc["distance"])

    def cmt_mf_loss(model, batch, generator):
        z, t, labels = batch
        return meanflow.cmt_mf_loss(model, z, t, mc["pairs_per_trajectory"], generator, distance, labels=labels)

    return cmt_mf_loss


def example_batch(cfg, meta, net, pairs, device):
    """Random flow-time trajectories of the row's solver grid: `pairs` pairs = pairs / P trajectories."""
    P, nfe = cfg["midtrain_mf"]["pairs_per_trajectory"], cfg["trajectories"]["nfe"]
    arch = meta["architecture"]
    t = solvers.flow_time_grid(nfe).to(torch.float32).to(device)
    z = torch.randn(pairs // P, nfe + 1, arch["in_channels"], arch["resolution"], arch["resolution"], device=device)
    classes = int(getattr(net, "num_classes", 0) or 0)
    labels = torch.randint(classes, (pairs // P,), device=device) if classes else None
    return z, t, labels


def build(cfg, args, accelerator):
    mc, seed = cfg["midtrain_mf"], cfg["seed"]
    # every shard checked against the manifest, and a few regenerated, before any step
    manifest, shard_paths = shards.check_manifest(args.manifest, fast=args.verify == "fast")
    remake = {str(p): store.remake_command(e.get("receipt"))
              for p, e in zip(shard_paths, manifest["shards"], strict=True)}
    if trajectories.spot_check(args.spot_check, shard_paths, manifest["spec"], args.teacher, args.dataset, remake):
        print(f"[midtrain_mf] spot check: {args.spot_check} trajectories regenerated from their seeds match",
              flush=True)
    P = mc["pairs_per_trajectory"]
    if mc["batch"] % P:
        raise ValueError(f"midtrain_mf.batch {mc['batch']} is not a multiple of pairs_per_trajectory {P}")
    world, rank = accelerator.num_processes, accelerator.process_index
    traj_per_step = mc["batch"] // P
    if traj_per_step % world:
        raise ValueError(f"midtrain_mf: {traj_per_step} trajectories per step cannot be split over {world} processes")
    per_gpu = mc.get("batch_per_gpu")
    if per_gpu is not None and per_gpu % P:
        raise ValueError(f"midtrain_mf.batch_per_gpu {per_gpu} is not a multiple of pairs_per_trajectory {P}")
    local_traj, micro_batches = training_data.split_batch(traj_per_step, per_gpu and per_gpu // P, world,
                                                         "midtrain_mf", unit=f"trajectories (pairs / {P})")
    # each rank reads its own shards, as midtrain (with one process: the plain stream of all shards)
    stream = shards.RankTrajectoryStream(shard_paths, [e["count"] for e in manifest["shards"]], seed,
                                         mc["shuffle_buffer"], rank, world)
    if world > 1:
        print(f"[midtrain_mf] rank {rank} of {world} reads shards {stream.paths}", flush=True)
    sigma_max = manifest["spec"]["sigma_max"]
    solver = manifest["spec"].get("solver", "dpm_solver_pp")  # the spec's default (schema)
    flow_time = solver in solvers.FLOW_SOLVERS

    teacher_meta = checkpoints.read_meta(args.teacher)
    if flow_time != (teacher_meta["precond"] == "meanflow"):
        raise ValueError(f"{args.manifest}: solver {solver!r} but the teacher {args.teacher} has "
                         f"precond {teacher_meta['precond']!r}; the trajectories are not this teacher's")
    net, meta = student(cfg, teacher_meta)
    ema = averaging.ema_of(net, mc["ema"], mc["steps"])
    num_classes = net.num_classes
    if num_classes and not flow_time:
        raise ValueError("midtrain_mf: a class-conditional student needs class-labelled flow-time trajectories "
                         "(trajectories.solver meanflow from a class-conditional MeanFlow teacher)")
    manifest_sha256 = atomic.sha256_file(args.manifest)
    # the solver's K+1 states, and for an EDM teacher the prior noise at t = 1 in front of them
    K = manifest["spec"]["nfe"] + (1 if flow_time else 2)

    def trajectory_label(c):
        if "label" not in c["meta"]:
            raise ValueError(f"trajectory {c['index']} has no class label but the student is class-conditional: "
                             "make the pool with a class-conditional MeanFlow teacher")
        return c["meta"]["label"]

    def batch():
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

    loss_of = objective(cfg)

    def loss(model, step, part):
        z_t_labels = batch()
        return loss_of(model, z_t_labels, rng.generator(seed, step, part, "cmt-mf-pairs"))

    return Recipe(
        stage="midtrain_mf", seed=seed, net=net, ema=ema, optimizer=mc["optimizer"], total_steps=mc["steps"],
        batch=mc["batch"], micro_batches=micro_batches, loss=loss, data=stream,
        identity={"teacher_sha256": teacher_meta["sha256"], "manifest_sha256": manifest_sha256},
        describe=(f"{manifest['total']} trajectories in {len(shard_paths)} shards, {K} points each in flow time; "
                  f"{traj_per_step} trajectories x {P} pairs, distance {mc['distance']}: "),
        meta={**meta, "role": "midtrain", "objective": "cmt-mf", "trajectories_seen": mc["steps"] * traj_per_step,
              "time_convention": {"trajectories": ("flow time (MeanFlow teacher)" if flow_time else
                                                   "sigma (EDM), converted by flowmap.trajectory_to_flow"),
                                  "model": "flow-matching t in [0, 1], t = 1 noise; z = x_sigma / (1 + sigma)"},
              "inputs": {"teacher": {"path": args.teacher, "sha256": teacher_meta["sha256"]},
                         "manifest": {"path": args.manifest, "sha256": manifest_sha256}}})
