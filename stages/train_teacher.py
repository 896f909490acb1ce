"""Stage train_teacher: EDM diffusion training of the teacher (EDM preconditioning, log-normal
sigma, EDM loss weighting), writing model.safetensors + model.json."""

import torch

from stages.files import atomic
from stages.runtime import cli
from stages.data import labels as class_labels, latents
from stages.method import losses
from stages import networks
from stages.training import loop, rng
from stages.training.job import TrainingJob

p = cli.add_state_args(cli.parser(__doc__))
p.add_argument("--dataset", required=True,
               help="prepared dataset.npz, or (latent rows) the encoded dataset's manifest.json: a posterior draw per use")
p.add_argument("--out", required=True, help="model.safetensors to write")
p.add_argument("--key", required=True, help="store key of this teacher (provenance digest)")
args = p.parse_args()
cfg = cli.start(args, "train_teacher")
tc, seed = cfg["teacher"], cfg["seed"]

# ---- data
accelerator = loop.make_accelerator()
data_path = args.dataset
stream = None
local_batch, micro_batches = loop.split_batch(tc["batch"], tc.get("batch_per_gpu"), accelerator.num_processes,
                                             "teacher")
if latents.is_manifest(data_path):
    stream = latents.training_batches(data_path, seed, local_batch, cfg["latents"], accelerator)
    channels, resolution = latents.latent_shape(data_path)
else:
    data, _, data_labels = loop.load_images(args.dataset, accelerator, tc["batch"], "teacher.batch", labels=True)
    channels, resolution = data.shape[1], data.shape[2]

# ---- model
torch.manual_seed(rng.fold(seed, "teacher-init"))
architecture = networks.architecture(cfg["network"], channels, resolution, tc["dropout"])
net = networks.freeze_unused_heads(networks.build_precond(architecture, "edm", cfg["sigma_data"], cfg["sigma_min"]))
print(f"[train_teacher] {sum(p.numel() for p in net.parameters()):,} parameters, "
      f"{'encoded latents' if stream else f'{len(data)} images'}, batch {tc['batch']}, {tc['steps']} steps", flush=True)
label_dim = class_labels.label_dim_of(net)
if stream is None:
    class_labels.check_dataset(data_labels.cpu().numpy(), label_dim, args.dataset)
ema = loop.EMA(net, tc["ema"]["beta"], tc["ema"].get("rampup"))
optimizer = loop.build_optimizer(net.parameters(), tc["optimizer"])
net, optimizer = accelerator.prepare(net, optimizer)
dataset_sha256 = atomic.sha256_file(data_path)
job = TrainingJob(args, cfg, stage="train_teacher", accelerator=accelerator, identity={
    "key": args.key, "dataset_sha256": dataset_sha256})


def loss_fn(step, part):
    g = rng.generator(seed, step, part, "teacher-batch")
    if stream is not None:  # the next encoded images of this rank's stream, a fresh posterior draw each
        y, classes = stream.next(step, part)
        onehot = class_labels.one_hot(classes.cpu(), label_dim, y.device, what=f"{data_path}: labels")
    else:
        pick = torch.randint(len(data), (local_batch,), generator=g).to(data.device)
        y, onehot = data[pick], class_labels.dataset_one_hot(data_labels[pick], label_dim)
    return losses.edm_loss(net, y, g, cfg["sigma_data"], tc["P_mean"], tc["P_std"], labels=onehot)


elapsed = loop.fit(stage="train_teacher", accelerator=accelerator, net=net, ema=ema,
                       optimizer=optimizer, opt_cfg=tc["optimizer"], total_steps=tc["steps"],
                       batch=tc["batch"], seed=seed, loss_fn=loss_fn, state=job.state, data=stream,
                       micro_batches=micro_batches)

# ---- write
job.finish(net, ema, steps=tc["steps"], batch=tc["batch"], train_seconds=elapsed, meta={
    "role": "teacher", "key": args.key, "architecture": architecture, "precond": "edm",
    "sigma_data": cfg["sigma_data"], "sigma_min": cfg["sigma_min"], "sigma_max": cfg["sigma_max"],
    "time": "sigma", "inputs": {"latents" if stream else "dataset": {"path": data_path, "sha256": dataset_sha256}},
})
