"""Stage posttrain_meanflow: MeanFlow training from data (docs/method.md#meanflow) from one initialisation:
`cmt` (the CMT-MF mid-trained EMA) or `random` (MeanFlow from scratch, the paper's baseline).

The budget is set by the rule: at equal total budget the random init trains for the mid-training's
images on top of the post-training's. Snapshots record `images_seen_total` (mid-training images
included), the axis on which the two inits are compared.

A class-conditional network (the DiT rows, network.num_classes > 0) trains on the dataset's labels
with label dropout to the null class and, with posttrain_mf.guidance, classifier-free guidance in
the target (meanflow.Objective); an unconditional one ignores labels, as before they existed. The
random init takes the row's `network` section where the config passes one (MF-XL/2 against an
MF-B/4 teacher), else the teacher's architecture. A latent row (--latents) trains on the encoded
dataset's posterior draws (stages/data/training_data.py).
"""

import torch

from stages.data import training_data
from stages.files import checkpoints
from stages.runtime import cli
from stages.method import meanflow
from stages.training import loop, rng
from stages.training.job import TrainingJob

p = cli.add_state_args(cli.parser(__doc__))
p.add_argument("--init", required=True, choices=["cmt", "random"])
p.add_argument("--init-model", required=True,
               help="model.safetensors to start from; for --init random the teacher (architecture only)")
cli.add_data_args(p)
p.add_argument("--out", required=True, help="final model.safetensors")
p.add_argument("--snapshots", required=True, help="folder for the EMA snapshots p000.safetensors, ...")
args = p.parse_args()
cfg = cli.start(args, f"posttrain_meanflow:{args.init}")
pc, seed, total = cfg["posttrain_mf"], cfg["seed"], cfg["steps"]
stage_name = f"posttrain_meanflow:{args.init}"

# ---- data: the prepared images, or a latent row's encoded dataset
accelerator = loop.make_accelerator()
source = training_data.open_training_data(args, cfg, accelerator, pc["batch"], "posttrain_mf.batch", seed,
                                          pc.get("batch_per_gpu"))
micro_batches = source.micro_batches

# ---- model
init_meta = checkpoints.read_meta(args.init_model)
if args.init == "cmt" and init_meta["precond"] != "meanflow":
    raise ValueError(f"{args.init_model}: precond {init_meta['precond']!r}; the cmt init must be a "
                     "CMT-MF mid-trained model (midtrain_mf)")
data_shape = (init_meta["architecture"]["in_channels"], init_meta["architecture"]["resolution"])
if tuple(source.shape) != data_shape:
    raise ValueError(f"{source.path}: data of {source.shape[0]} channels at {source.shape[1]}^2, but {args.init_model} "
                     f"was made for {data_shape[0]} at {data_shape[1]}^2 (pixels and latents mixed up?)")
architecture = {**init_meta["architecture"], "dropout": pc["dropout"], "dual_time": True}
if args.init == "random" and cfg.get("network"):
    architecture = {**cfg["network"], **{k: init_meta["architecture"][k] for k in ("in_channels", "resolution")},
                    "dropout": pc["dropout"], "dual_time": True}
meta = {"architecture": architecture, "precond": "meanflow", "sigma_data": init_meta["sigma_data"],
        "sigma_min": init_meta["sigma_min"], "sigma_max": init_meta["sigma_max"], "time": "flow_t"}
torch.manual_seed(rng.fold(seed, "random-init"))
net = checkpoints.build_precond(meta)
if args.init == "cmt":
    checkpoints.load_into(net, args.init_model, which="ema")
prior_images = init_meta["images_seen"] if args.init == "cmt" else 0
ema = loop.EMA(net, pc["ema"]["beta"], pc["ema"].get("rampup"))
optimizer = loop.build_optimizer(net.parameters(), pc["optimizer"])
net, optimizer = accelerator.prepare(net, optimizer)
# The JVP runs without a graph on the bare module and the graph forward goes through the (DDP)
# wrapper (meanflow.meanflow_loss_at), in one process too: a single JVP with a graph keeps the
# tangent's activations and costs 3x the memory of a flow-matching step (bench/RESULTS.md).
objective = meanflow.Objective.from_config(pc, net=accelerator.unwrap_model(net), what="posttrain_mf")
if objective.null_class is not None:
    source.expect_classes(objective.null_class)

# ---- the job: resumable state, EMA snapshots, what the model files say (images_seen_total:
# the mid-training's images included, the axis on which the two inits are compared)
job = TrainingJob(args, cfg, stage=stage_name, accelerator=accelerator, images_before=prior_images, identity={
    "init": args.init, "init_sha256": init_meta["sha256"], "dataset_sha256": source.sha256})
meta.update(init=args.init, images_seen_before=prior_images,
            inputs={"init": {"path": args.init_model, "sha256": init_meta["sha256"]}})
snapshots = job.snapshots(pc["snapshots"], total_steps=total, batch=pc["batch"], ema=ema, meta=meta)


def loss_fn(step, part):
    g = rng.generator(seed, step, part, "meanflow-batch")
    x, y = source.batch(step, part, g)
    return objective.loss(net, x, g, y)


print(f"[{stage_name}] MeanFlow {objective.describe()} batch {pc['batch']} {total} steps "
      f"(after {prior_images:,} mid-training images), snapshots at steps {sorted(snapshots.steps)}", flush=True)
snapshots.save(0)
elapsed = loop.fit(stage=stage_name, accelerator=accelerator, net=net, ema=ema, optimizer=optimizer,
                   opt_cfg=pc["optimizer"], total_steps=total, batch=pc["batch"], seed=seed,
                   loss_fn=loss_fn, on_step_end=snapshots.save, state=job.state, data=source.state,
                   micro_batches=micro_batches)

job.finish(net, ema, meta={**meta, "role": "posttrain"}, steps=total, batch=pc["batch"], train_seconds=elapsed)
