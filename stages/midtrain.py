"""Stage midtrain: Consistency Mid-Training, CMT-CM (PAPER.md 3.1-3.2).

The student starts from the teacher's weights (EMA too) with the ECM preconditioning, and maps
each of the K pre-final states of a teacher trajectory, at its sigma, to the trajectory's final
state. One step sees `batch` student inputs = batch / K whole trajectories.
"""

import numpy as np
import torch

from stages.files import atomic, checkpoints, store
from stages.runtime import cli
from stages.data import datasets, shards
from stages.method import losses, trajectories
from stages.training import loop, resume

p = cli.add_state_args(cli.parser(__doc__))
p.add_argument("--teacher", required=True, help="teacher model.safetensors (the initialisation)")
p.add_argument("--manifest", required=True, help="trajectory manifest.json")
p.add_argument("--dataset", default=None, help="prepared dataset.npz (the spot check of x_T = data_plus_noise)")
p.add_argument("--spot-check", type=int, default=0,
               help="trajectories to regenerate from their seeds and compare before training")
p.add_argument("--out", required=True, help="model.safetensors to write")
args = p.parse_args()
cfg = cli.start(args, "midtrain")
mc, seed = cfg["midtrain"], cfg["seed"]

# ---- data: every shard checked against the manifest before any step
manifest, shard_paths = shards.check_manifest(args.manifest, fast=mc["verify"] == "fast")
K = manifest["spec"]["nfe"]


def spot_check(count):
    """Regenerate `count` stored trajectories (spread over the pool) from their seeds with the
    teacher and compare: a shard from another teacher, solver or code version, or one edited
    in place with its manifest rewritten, stops the run here. Tolerance: another GPU model or
    batch size changes the last bits, a different trajectory changes everything."""
    if count == 0:
        return
    teacher, meta = checkpoints.load(args.teacher, which="ema")
    spec = manifest["spec"]
    data = None
    if spec["x_T"] == "data_plus_noise":
        data = torch.from_numpy(datasets.to_model_range(datasets.load(args.dataset)[0]))
    generator = trajectories.Generator(teacher, meta, spec, torch.device("cpu"), data)
    picks = np.linspace(0, len(shard_paths) - 1, min(count, len(shard_paths))).round().astype(int)
    picks = list(picks) + [picks[-1]] * (count - len(picks))
    per_shard = {}
    for k, p in enumerate(picks):
        per_shard.setdefault(int(p), []).append(k)
    for p, ks in per_shard.items():
        stored = shards.read_shard(shard_paths[p])
        for k in ks:
            s = stored[(k * 7919) % len(stored)]
            (_, states, sigmas, _), = generator.batch([s["index"]])
            err = np.abs(states.astype(np.float32) - s["states"].astype(np.float32))
            scale = np.abs(s["states"].astype(np.float32)) + 1.0
            if not np.allclose(sigmas, s["sigmas"]) or float((err / scale).max()) > 1e-2:
                raise ValueError(
                    f"{shard_paths[p]}: trajectory {s['index']} differs from the one its seed gives with "
                    f"{args.teacher} (max relative error {float((err / scale).max()):.3g}); the shard is "
                    "not this teacher's and solver's: "
                    + store.remake_command(manifest["shards"][p].get("receipt")))
    print(f"[midtrain] spot check: {count} trajectories regenerated from their seeds match", flush=True)


spot_check(args.spot_check)
if mc["batch"] % K:
    raise ValueError(f"midtrain.batch {mc['batch']} is not a multiple of the {K} points per trajectory")
accelerator = loop.make_accelerator()
world, rank = accelerator.num_processes, accelerator.process_index
traj_per_step = mc["batch"] // K
if traj_per_step % world:
    raise ValueError(f"midtrain.batch / {K} = {traj_per_step} trajectories per step cannot be split "
                     f"over {world} processes")
local_traj = traj_per_step // world
# each rank reads its own shards (no DataLoader workers: ranks x 1)
stream = shards.RankTrajectoryStream(shard_paths, [e["count"] for e in manifest["shards"]], seed,
                                     mc["shuffle_buffer"], rank, world)
if world > 1:
    print(f"[midtrain] rank {rank} of {world} reads shards {stream.paths}", flush=True)

# ---- model: teacher weights, ECM preconditioning, the mid-training dropout
net, teacher_meta = checkpoints.load(args.teacher, which="ema", kind="ecm", dropout=mc["dropout"])
ema = loop.EMA(net, mc["ema"]["beta"], mc["ema"].get("rampup"))
optimizer = loop.build_optimizer(net.parameters(), mc["optimizer"])
net, optimizer = accelerator.prepare(net, optimizer)
manifest_sha256 = atomic.sha256_file(args.manifest)
state = resume.TrainState.from_args(args.state_dir, args.checkpoint, stage="midtrain", identity={
    "config": cfg, "teacher_sha256": teacher_meta["sha256"], "manifest_sha256": manifest_sha256})
distance = losses.make_distance(mc["distance"], pseudo_huber_c=mc.get("pseudo_huber_c"),
                                lpips_weights=mc.get("lpips_weights"))
if isinstance(distance, torch.nn.Module):
    distance = distance.to(accelerator.device)
print(f"[midtrain] {manifest['total']} trajectories in {len(shard_paths)} shards, "
      f"{traj_per_step} trajectories x {K} points = batch {mc['batch']}, {mc['steps']} steps, "
      f"distance {mc['distance']}", flush=True)


def next_batch():
    """This rank's share of the next global batch: local_traj trajectories from its own shards."""
    chosen = [next(stream) for _ in range(local_traj)]
    states = torch.from_numpy(np.stack([c["states"] for c in chosen]).astype(np.float32))
    sigmas = torch.from_numpy(chosen[0]["sigmas"].astype(np.float32))
    return states.to(accelerator.device), sigmas.to(accelerator.device)


def loss_fn(step):
    states, sigmas = next_batch()
    return losses.cmt_cm_loss(net, states, sigmas, distance)


elapsed = loop.fit(stage="midtrain", accelerator=accelerator, net=net, ema=ema, optimizer=optimizer,
                       opt_cfg=mc["optimizer"], total_steps=mc["steps"], batch=mc["batch"], seed=seed,
                       loss_fn=loss_fn, state=state, data=stream)

if accelerator.is_main_process:
    meta = {k: teacher_meta[k] for k in ("architecture", "sigma_data", "sigma_min", "sigma_max", "time")}
    meta["architecture"] = {**meta["architecture"], "dropout": mc["dropout"]}
    checkpoints.save(args.out, net=accelerator.unwrap_model(net), ema=ema.module, meta={
        **meta, "role": "midtrain", "precond": "ecm", "config": cfg, "steps": mc["steps"],
        "images_seen": mc["steps"] * mc["batch"], "trajectories_seen": mc["steps"] * traj_per_step,
        "train_seconds": elapsed,
        "inputs": {"teacher": {"path": args.teacher, "sha256": teacher_meta["sha256"]},
                   "manifest": {"path": args.manifest, "sha256": manifest_sha256}},
    })
    print(f"[midtrain] wrote {args.out} after {elapsed:.0f}s", flush=True)
    if state is not None:
        state.finish()

# Every rank ends its process group: left to interpreter exit, gloo aborted a 2-process run
# ("terminate called without an active exception") after the outputs were written.
accelerator.end_training()
