"""Stage train_teacher: training of the teacher from scratch, writing model.safetensors + model.json.

teacher.objective edm (the default): EDM diffusion training (EDM preconditioning, log-normal sigma,
EDM loss weighting). teacher.objective meanflow: MeanFlow (docs/method.md#meanflow), the teacher of
the CMT-MF rows (the paper's MF-B/4), an average-velocity model u(z, r, t) in flow time whose
multi-step sampler makes the trajectories (trajectories.solver meanflow); with class labels, label
dropout and guidance in the target as teacher.meanflow says. Its network is teacher.network where
given (MF-B/4 beside an MF-XL/2 student), else the row's; on a latent row (--latents) it trains on
the encoded dataset's posterior draws (stages/data/training_data.py)."""

import torch

from stages.files import atomic, checkpoints
from stages.runtime import cli
from stages.data import labels as class_labels, training_data
from stages.method import losses, meanflow
from stages import networks
from stages.training import loop, rng
from stages.training.job import TrainingJob

p = cli.add_state_args(cli.parser(__doc__))
cli.add_data_args(p)
p.add_argument("--out", required=True, help="model.safetensors to write")
p.add_argument("--key", required=True, help="store key of this teacher (provenance digest)")
args = p.parse_args()
cfg = cli.start(args, "train_teacher")
tc, seed = cfg["teacher"], cfg["seed"]

# ---- data: the EDM teacher's prepared images; the MeanFlow teacher's images or encoded latents
accelerator = loop.make_accelerator()
objective = tc.get("objective", "edm")
source = None
if objective == "meanflow" or args.latents:  # an EDM teacher of a latent row (smoke runs) reads latents too
    source = training_data.open_training_data(args, cfg, accelerator, tc["batch"], "teacher.batch", seed,
                                              tc.get("batch_per_gpu"))
    micro_batches, input_sha256, input_path = source.micro_batches, source.sha256, source.path
elif not args.dataset:
    raise ValueError("train_teacher: pass the prepared dataset (--dataset) or an encoded one (--latents)")
else:
    data, local_batch, data_labels = loop.load_images(args.dataset, accelerator, tc["batch"], "teacher.batch",
                                                     labels=True)
    local_batch, micro_batches = loop.split_batch(tc["batch"], tc.get("batch_per_gpu"), accelerator.num_processes,
                                                 "teacher")
    input_sha256, input_path = atomic.sha256_file(args.dataset), args.dataset

# ---- model
torch.manual_seed(rng.fold(seed, "teacher-init"))
if objective == "meanflow":
    channels, resolution = source.shape
    architecture = {**networks.architecture(tc.get("network") or cfg["network"], channels, resolution,
                                            tc["dropout"]), "dual_time": True}
    model_meta = {"architecture": architecture, "precond": "meanflow", "sigma_data": cfg["sigma_data"],
                  "sigma_min": cfg["sigma_min"], "sigma_max": cfg["sigma_max"], "time": "flow_t"}
    net = checkpoints.build_precond(model_meta)
    label_dim = net.num_classes
else:
    channels, resolution = source.shape if source is not None else (data.shape[1], data.shape[2])
    architecture = networks.architecture(cfg["network"], channels, resolution, tc["dropout"])
    model_meta = {"architecture": architecture, "precond": "edm", "sigma_data": cfg["sigma_data"],
                  "sigma_min": cfg["sigma_min"], "sigma_max": cfg["sigma_max"], "time": "sigma"}
    net = networks.freeze_unused_heads(networks.build_precond(architecture, "edm", cfg["sigma_data"], cfg["sigma_min"]))
    label_dim = class_labels.label_dim_of(net)
print(f"[train_teacher] objective {objective}: {sum(p.numel() for p in net.parameters()):,} parameters, "
      f"data {input_path}, batch {tc['batch']}, {tc['steps']} steps", flush=True)
if source is not None:
    source.expect_classes(label_dim)
else:
    class_labels.check_dataset(data_labels.cpu().numpy(), label_dim, input_path)
ema = loop.EMA(net, tc["ema"]["beta"], tc["ema"].get("rampup"))
optimizer = loop.build_optimizer(net.parameters(), tc["optimizer"])
net, optimizer = accelerator.prepare(net, optimizer)
if objective == "meanflow":
    mf = meanflow.Objective.from_config(tc["meanflow"], net=accelerator.unwrap_model(net), what="teacher.meanflow")
    print(f"[train_teacher] MeanFlow {mf.describe()}", flush=True)
job = TrainingJob(args, cfg, stage="train_teacher", accelerator=accelerator, identity={
    "key": args.key, "dataset_sha256": input_sha256})


def loss_fn(step, part):
    g = rng.generator(seed, step, part, "teacher-batch")
    if objective == "meanflow":
        x, y = source.batch(step, part, g)
        return mf.loss(net, x, g, y if label_dim else None)
    if source is not None:  # the encoded images of this rank's stream, a fresh posterior draw each
        y, classes = source.batch(step, part, g)
        onehot = class_labels.dataset_one_hot(classes, label_dim)
    else:
        pick = torch.randint(len(data), (local_batch,), generator=g).to(data.device)
        y, onehot = data[pick], class_labels.dataset_one_hot(data_labels[pick], label_dim)
    return losses.edm_loss(net, y, g, cfg["sigma_data"], tc["P_mean"], tc["P_std"], labels=onehot)


elapsed = loop.fit(stage="train_teacher", accelerator=accelerator, net=net, ema=ema,
                       optimizer=optimizer, opt_cfg=tc["optimizer"], total_steps=tc["steps"],
                       batch=tc["batch"], seed=seed, loss_fn=loss_fn, state=job.state,
                       data=source.state if source is not None else None, micro_batches=micro_batches)

# ---- write
job.finish(net, ema, steps=tc["steps"], batch=tc["batch"], train_seconds=elapsed, meta={
    "role": "teacher", "key": args.key, **model_meta, **({"objective": objective} if objective != "edm" else {}),
    "inputs": {"latents" if args.latents else "dataset": {"path": input_path, "sha256": input_sha256}},
})
