"""Stage posttrain: ECT consistency training from data (docs/method.md#ect), from one initialisation:
`cmt` (the mid-trained EMA), `teacher` (the diffusion model) or `random`. The weights of the init
go into both the trained network and its EMA. EMA snapshots at fixed fractions of the budget
(step 0 included: the initialisation itself) are what the FD curve is drawn from.
"""

from pathlib import Path

import torch

from stages.files import atomic, checkpoints
from stages.runtime import cli
from stages.method import losses
from stages.training import loop, resume, rng

p = cli.add_state_args(cli.parser(__doc__))
p.add_argument("--init", required=True, choices=["cmt", "teacher", "random", "baseline"],
               help="baseline = vanilla ECT from the teacher (the row's `baseline` settings)")
p.add_argument("--init-model", required=True,
               help="model.safetensors to start from; for --init random only its architecture is used")
p.add_argument("--dataset", required=True)
p.add_argument("--out", required=True, help="final model.safetensors")
p.add_argument("--snapshots", required=True, help="folder for the EMA snapshots p000.safetensors, ...")
args = p.parse_args()
cfg = cli.start(args, f"posttrain:{args.init}")
pc, seed = cfg["posttrain"], cfg["seed"]
stage_name = f"posttrain:{args.init}"

# ---- data
accelerator = loop.make_accelerator()
data, local_batch = loop.load_images(args.dataset, accelerator, pc["batch"], "posttrain.batch")
rank = accelerator.process_index

# ---- model
init_meta = checkpoints.read_meta(args.init_model)
torch.manual_seed(rng.fold(seed, "random-init"))
# The boundary of the consistency function is the config's, whatever the init: a teacher's model.json
# carries its solver grid's end there (docs/method.md#preconditioning).
net = checkpoints.build_precond(init_meta, kind="ecm", dropout=pc["dropout"], sigma_min=cfg["sigma_boundary"])
if args.init != "random":
    checkpoints.load_into(net, args.init_model, which="ema")
ema = loop.EMA(net, pc["ema"]["beta"], pc["ema"].get("rampup"))
optimizer = loop.build_optimizer(net.parameters(), pc["optimizer"])
net, optimizer = accelerator.prepare(net, optimizer)
state = resume.TrainState.from_args(args.state_dir, args.checkpoint, stage=stage_name, identity={
    "config": cfg, "init": args.init, "init_sha256": init_meta["sha256"],
    "dataset_sha256": atomic.sha256_file(args.dataset)})
# Snakemake deletes a failed job's outputs, snapshots included: a resumable run keeps them in its
# state folder until the end, as a later job could not remake the EMA of an earlier step.
snapshot_dir = state.dir / "snapshots" if state is not None else Path(args.snapshots)

total = pc["steps"]
snapshot_steps = {round(f * total): f"p{round(100 * f):03d}" for f in pc["snapshots"]}
meta_base = {k: init_meta[k] for k in ("sigma_data", "sigma_max", "time")}
meta_base["sigma_min"] = cfg["sigma_boundary"]
meta_base["architecture"] = {**init_meta["architecture"], "dropout": pc["dropout"]}
meta_base.update(precond="ecm", init=args.init, config=cfg,
                 inputs={"init": {"path": args.init_model, "sha256": init_meta["sha256"]}})


def save_snapshot(steps_done):
    name = snapshot_steps.get(steps_done)
    if name is not None and accelerator.is_main_process:
        checkpoints.save(snapshot_dir / f"{name}.safetensors", ema=ema.module, meta={
            **meta_base, "role": "posttrain-snapshot", "steps": steps_done,
            "images_seen": steps_done * pc["batch"], "fraction": steps_done / total})


def loss_fn(step):
    g = rng.generator(seed, step, rank, "ect-batch")
    y = data[torch.randint(len(data), (local_batch,), generator=g).to(data.device)]
    return losses.ect_loss(net, y, g, stage=losses.ect_stage(step, pc["double_every"]), q=pc["q"],
                           k=pc["k"], b=pc["b"], P_mean=pc["P_mean"], P_std=pc["P_std"], c=pc["c"],
                           sigma_min=cfg["sigma_min"])


print(f"[{stage_name}] ECT q={pc['q']} k={pc['k']} b={pc['b']} batch {pc['batch']} {total} steps, "
      f"snapshots at steps {sorted(snapshot_steps)}", flush=True)
save_snapshot(0)
elapsed = loop.fit(stage=stage_name, accelerator=accelerator, net=net, ema=ema, optimizer=optimizer,
                       opt_cfg=pc["optimizer"], total_steps=total, batch=pc["batch"], seed=seed,
                       loss_fn=loss_fn, on_step_end=save_snapshot, state=state)

if accelerator.is_main_process:
    checkpoints.save(args.out, net=accelerator.unwrap_model(net), ema=ema.module, meta={
        **meta_base, "role": "posttrain", "steps": total, "images_seen": total * pc["batch"],
        "train_seconds": elapsed})
    if state is not None:  # the snapshots become outputs now that the job will succeed
        checkpoints.copy(snapshot_dir, snapshot_steps.values(), args.snapshots)
    print(f"[{stage_name}] wrote {args.out} after {elapsed:.0f}s", flush=True)
    if state is not None:
        state.finish()

# Every rank ends its process group: left to interpreter exit, gloo aborted a 2-process run
# ("terminate called without an active exception") after the outputs were written.
accelerator.end_training()
