"""Stage posttrain: consistency post-training from one initialisation: `cmt` (the mid-trained EMA),
`teacher` (the diffusion model) or `random`. The weights of the init go into both the trained
network and its EMA. `posttrain.method` picks the objective:
- `ect`: ECT consistency training from data (docs/method.md#ect);
- `ecd`: ECD, consistency distillation with the target point from one Heun step of the teacher,
  autoguided by `--guide` with weight guidance.weight (docs/method.md#ecd);
- `ect_snr`: the ImageNet-512 code's ECT: ECD's distance and weight with the shared noise.
EMA snapshots at fixed fractions of the budget (step 0 included: the initialisation itself) are
what the FD curve is drawn from. A class-conditional student gets the batch's classes.
"""

import torch

from stages import networks
from stages.files import atomic, checkpoints
from stages.runtime import cli
from stages.data import labels as class_labels, training_data
from stages.method import losses
from stages.training import loop, rng
from stages.training.job import TrainingJob

p = cli.add_state_args(cli.parser(__doc__))
p.add_argument("--init", required=True, choices=["cmt", "teacher", "random", "baseline"],
               help="baseline = vanilla ECT from the teacher (the row's `baseline` settings)")
p.add_argument("--init-model", required=True,
               help="model.safetensors to start from; for --init random only its architecture is used")
cli.add_data_args(p, dataset_required=True)
p.add_argument("--teacher", default=None, help="method ecd: the teacher model.safetensors (EMA, EDM preconditioning)")
p.add_argument("--guide", default=None, help="method ecd with autoguidance: the guide model.safetensors")
p.add_argument("--out", required=True, help="final model.safetensors")
p.add_argument("--snapshots", required=True, help="folder for the EMA snapshots p000.safetensors, ...")
args = p.parse_args()
cfg = cli.start(args, f"posttrain:{args.init}")
pc, seed = cfg["posttrain"], cfg["seed"]
stage_name = f"posttrain:{args.init}"

# ---- data
accelerator = loop.make_accelerator()
source = None
if args.latents:  # the encoded dataset: each use a fresh posterior draw (stages/data/training_data.py)
    source = training_data.open_training_data(args, cfg, accelerator, pc["batch"], "posttrain.batch", seed,
                                              pc.get("batch_per_gpu"))
    micro_batches = source.micro_batches
else:
    data, local_batch, data_labels = loop.load_images(args.dataset, accelerator, pc["batch"], "posttrain.batch",
                                                     labels=True)
    local_batch, micro_batches = loop.split_batch(pc["batch"], pc.get("batch_per_gpu"), accelerator.num_processes,
                                                 "posttrain")
data_path = args.latents or args.dataset

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
if source is None:
    class_labels.check_dataset(data_labels.cpu().numpy(), label_dim, args.dataset)
else:
    source.expect_classes(label_dim)
ema = loop.EMA(net, pc["ema"]["beta"], pc["ema"].get("rampup"))
optimizer = loop.build_optimizer(net.parameters(), pc["optimizer"])
net, optimizer = accelerator.prepare(net, optimizer)

# ---- ECD's teacher and guide: frozen, eval mode; the guide in guidance.guide_dtype on CUDA
method = pc.get("method", "ect")
denoise, extra_identity = None, {}


def frozen(path, what):
    model, model_meta = checkpoints.load(path, which="ema")
    if model_meta["precond"] != "edm" or class_labels.label_dim_of(model) != label_dim:
        raise ValueError(f"{path}: the {what} must be a diffusion model (precond edm) with the student's "
                         f"{label_dim} classes; it has precond {model_meta['precond']!r}, "
                         f"{class_labels.label_dim_of(model)} classes")
    extra_identity[f"{what}_sha256"] = model_meta["sha256"]
    return model.to(accelerator.device).eval().requires_grad_(False)


if method == "ecd":
    if args.teacher is None:
        raise ValueError("posttrain.method ecd distils the teacher: pass --teacher")
    guidance = pc.get("guidance") or {}
    weight = guidance.get("weight", 1.0)
    if (args.guide is None) != (weight == 1.0):
        raise ValueError(f"posttrain.guidance: weight {weight} with {'no' if args.guide is None else 'a'} guide "
                         "network; autoguidance needs both (w = 1 and no guide: plain distillation)")
    denoise = losses.guided_denoiser(frozen(args.teacher, "teacher"),
                                     frozen(args.guide, "guide") if args.guide else None, weight,
                                     guide_dtype=guidance.get("guide_dtype", "float16"))
elif args.teacher or args.guide:
    raise ValueError(f"posttrain.method {method} uses no teacher or guide network")

# ---- the job: resumable state, EMA snapshots, what the model files say
job = TrainingJob(args, cfg, stage=stage_name, accelerator=accelerator, identity={
    "init": args.init, "init_sha256": init_meta["sha256"], "dataset_sha256": atomic.sha256_file(data_path),
    **extra_identity})
total = pc["steps"]
meta = {k: init_meta[k] for k in ("sigma_data", "sigma_max", "time")}
meta["sigma_min"] = cfg["sigma_boundary"]  # the eval-mode boundary, whatever the init's own
meta.update(architecture={**init_meta["architecture"], "dropout": pc["dropout"]}, precond=student_kind, init=args.init,
            inputs={"init": {"path": args.init_model, "sha256": init_meta["sha256"]}})
snapshots = job.snapshots(pc["snapshots"], total_steps=total, batch=pc["batch"], ema=ema, meta=meta)


def loss_fn(step, part):
    g = rng.generator(seed, step, part, "ect-batch")
    if source is not None:  # the next encoded images of this rank's stream, a fresh posterior draw each
        y, classes = source.batch(step, part, g)
        onehot = class_labels.dataset_one_hot(classes, label_dim)
    else:
        pick = torch.randint(len(data), (local_batch,), generator=g).to(data.device)
        y, onehot = data[pick], class_labels.dataset_one_hot(data_labels[pick], label_dim)
    common = dict(stage=losses.ect_stage(step, pc["double_every"]), q=pc["q"], k=pc["k"], b=pc["b"],
                  P_mean=pc["P_mean"], P_std=pc["P_std"], c=pc["c"], labels=onehot, target_context=target_context)
    if method == "ecd":
        return losses.ecd_loss(net, y, g, denoise, sigma_data=init_meta["sigma_data"], **common)
    if method == "ect_snr":
        return losses.ect_snr_loss(net, y, g, sigma_data=init_meta["sigma_data"], **common)
    return losses.ect_loss(net, y, g, sigma_min=cfg["sigma_min"], **common)


print(f"[{stage_name}] {method.upper()} q={pc['q']} k={pc['k']} b={pc['b']} batch {pc['batch']} {total} steps, "
      f"snapshots at steps {sorted(snapshots.steps)}", flush=True)
snapshots.save(0)
elapsed = loop.fit(stage=stage_name, accelerator=accelerator, net=net, ema=ema, optimizer=optimizer,
                   opt_cfg=pc["optimizer"], total_steps=total, batch=pc["batch"], seed=seed,
                   loss_fn=loss_fn, on_step_end=snapshots.save, state=job.state,
                   data=source.state if source is not None else None,
                   micro_batches=micro_batches)

job.finish(net, ema, meta={**meta, "role": "posttrain"}, steps=total, batch=pc["batch"], train_seconds=elapsed)
