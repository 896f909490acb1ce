"""Stage posttrain: ECT consistency training from data (docs/method.md#ect), from one initialisation:
`cmt` (the mid-trained EMA), `teacher` (the diffusion model) or `random`. The weights of the init
go into both the trained network and its EMA. EMA snapshots at fixed fractions of the budget
(step 0 included: the initialisation itself) are what the FD curve is drawn from.
"""

import torch

from stages import networks
from stages.files import atomic, checkpoints
from stages.runtime import cli
from stages.data import labels as class_labels
from stages.method import losses
from stages.training import loop, rng
from stages.training.job import TrainingJob

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
data, local_batch, data_labels = loop.load_images(args.dataset, accelerator, pc["batch"], "posttrain.batch",
                                                 labels=True)
local_batch, micro_batches = loop.split_batch(pc["batch"], pc.get("batch_per_gpu"), accelerator.num_processes,
                                             "posttrain")

# ---- model
init_meta = checkpoints.read_meta(args.init_model)
torch.manual_seed(rng.fold(seed, "random-init"))
# The boundary of the consistency function is the config's, whatever the init: a teacher's model.json
# carries its solver grid's end there (docs/method.md#preconditioning).
student_kind = networks.student_kind(init_meta["architecture"])  # EDM2: plain EDM, no boundary
net = checkpoints.build_precond(init_meta, kind=student_kind, dropout=pc["dropout"], sigma_min=cfg["sigma_boundary"])
if args.init != "random":
    checkpoints.load_into(net, args.init_model, which="ema")
networks.freeze_unused_heads(net)
target_context = networks.target_context(net)
label_dim = class_labels.label_dim_of(net)
class_labels.check_dataset(data_labels.cpu().numpy(), label_dim, args.dataset)
ema = loop.EMA(net, pc["ema"]["beta"], pc["ema"].get("rampup"))
optimizer = loop.build_optimizer(net.parameters(), pc["optimizer"])
net, optimizer = accelerator.prepare(net, optimizer)

# ---- the job: resumable state, EMA snapshots, what the model files say
job = TrainingJob(args, cfg, stage=stage_name, accelerator=accelerator, identity={
    "init": args.init, "init_sha256": init_meta["sha256"], "dataset_sha256": atomic.sha256_file(args.dataset)})
total = pc["steps"]
meta = {k: init_meta[k] for k in ("sigma_data", "sigma_max", "time")}
meta["sigma_min"] = cfg["sigma_boundary"]  # the eval-mode boundary, whatever the init's own
meta.update(architecture={**init_meta["architecture"], "dropout": pc["dropout"]}, precond=student_kind, init=args.init,
            inputs={"init": {"path": args.init_model, "sha256": init_meta["sha256"]}})
snapshots = job.snapshots(pc["snapshots"], total_steps=total, batch=pc["batch"], ema=ema, meta=meta)


def loss_fn(step, part):
    g = rng.generator(seed, step, part, "ect-batch")
    pick = torch.randint(len(data), (local_batch,), generator=g).to(data.device)
    y, onehot = data[pick], class_labels.one_hot(data_labels[pick].cpu(), label_dim, data.device)
    return losses.ect_loss(net, y, g, stage=losses.ect_stage(step, pc["double_every"]), q=pc["q"],
                           k=pc["k"], b=pc["b"], P_mean=pc["P_mean"], P_std=pc["P_std"], c=pc["c"],
                           sigma_min=cfg["sigma_min"], labels=onehot, target_context=target_context)


print(f"[{stage_name}] ECT q={pc['q']} k={pc['k']} b={pc['b']} batch {pc['batch']} {total} steps, "
      f"snapshots at steps {sorted(snapshots.steps)}", flush=True)
snapshots.save(0)
elapsed = loop.fit(stage=stage_name, accelerator=accelerator, net=net, ema=ema, optimizer=optimizer,
                   opt_cfg=pc["optimizer"], total_steps=total, batch=pc["batch"], seed=seed,
                   loss_fn=loss_fn, on_step_end=snapshots.save, state=job.state, micro_batches=micro_batches)

job.finish(net, ema, meta={**meta, "role": "posttrain"}, steps=total, batch=pc["batch"], train_seconds=elapsed)
