"""Stage train_latent_vgg: the latent VGG16 of E-LatentLPIPS (stages/method/elatentlpips.py) trained
as an ImageNet classifier on the encoded latents, the backbone the latent rows' mid-training distance
(`midtrain.distance: elatentlpips`) reads.

The recipe is torchvision's VGG16 one (SGD lr 0.1, momentum 0.9, weight decay 1e-4, batch 256,
100 epochs, the rate times 0.1 every 30 epochs), in steps: an epoch is the training images / batch.
Inputs are the networks' latents (one posterior draw per use, whitened: stages/data/latents.py),
not flipped, as sony/cmt's imagenet512/train_latent_vgg.py (`latent_vgg.hflip: true` flips them
left-right at random). The last `holdout_shards` shards of the
encoded pool (a uniform sample of the classes, stages/data/latents.py) are held out; top-1 and
top-5 accuracy on them, at the posterior mean, go to the log and to --accuracy (the report's).
The weights file holds the LatentVGG16 state dict under its own names (features.*, classifier.*),
which ELatentLPIPS.from_file reads; model.json beside it says the architecture and the accuracy.
"""


import numpy as np
import torch
from safetensors.torch import save_file
from torch.nn import functional as F

from stages.data import latents
from stages.files import atomic
from stages.method.elatentlpips import LatentVGG16
from stages.runtime import cli, precision
from stages.training import loop, rng
from stages.training.job import TrainingJob

FORMAT = "cmt-latent-vgg/1"

p = cli.add_state_args(cli.parser(__doc__))
p.add_argument("--manifest", required=True, help="the encoded dataset's manifest (latent_manifest)")
p.add_argument("--verify", choices=["full", "fast"], default="full",
               help="check every shard against the manifest: size and sha256 (full) or size only (fast)")
p.add_argument("--out", required=True, help="model.safetensors to write")
p.add_argument("--accuracy", required=True, help="accuracy.json to write")
args = p.parse_args()
cfg = cli.start(args, "train_latent_vgg")
vc, seed = cfg["latent_vgg"], cfg["seed"]

# ---- data: training shards and held-out shards of the encoded pool
manifest, paths, counts = latents.manifest_shards(args.manifest, fast=args.verify == "fast")
hold = vc["holdout_shards"]
if hold >= len(paths):
    raise ValueError(f"latent_vgg.holdout_shards {hold}: the encoded pool has {len(paths)} shards, leaving none to "
                     "train on; hold out fewer or encode more shards (latents.num_shards)")
train_paths, train_counts, held_paths = paths[:len(paths) - hold], counts[:len(paths) - hold], paths[len(paths) - hold:]
train_images = sum(train_counts)
batch = vc["batch"]
steps = vc["steps"] or max(1, round(vc["epochs"] * train_images / batch))
opt_cfg = {"name": "sgd", "lr": vc["lr"], "momentum": vc["momentum"], "weight_decay": vc["weight_decay"],
           "schedule": "step", "step_every": max(1, round(vc["step_epochs"] * train_images / batch)),
           "gamma": vc["gamma"]}
accelerator = loop.make_accelerator()
world, rank = accelerator.num_processes, accelerator.process_index
local, micro_batches = loop.split_batch(batch, vc.get("batch_per_gpu"), world, "latent_vgg")
data = latents.LatentBatches(train_paths, train_counts, seed, local, cfg["latents"], rank, world,
                             vc["shuffle_buffer"], accelerator.device)
channels = latents.read_first(paths[0]).shape[0] // 2
num_classes = vc["num_classes"]

# ---- model
torch.manual_seed(rng.fold(seed, "latent-vgg-init"))
architecture = {"in_channels": channels, "num_classes": num_classes, **vc["architecture"]}
net = LatentVGG16(**architecture)
optimizer = loop.build_optimizer(net.parameters(), opt_cfg)
net, optimizer = accelerator.prepare(net, optimizer)
manifest_sha256 = atomic.sha256_file(args.manifest)
job = TrainingJob(args, cfg, stage="train_latent_vgg", accelerator=accelerator,
                  identity={"manifest_sha256": manifest_sha256})
print(f"[train_latent_vgg] {sum(p.numel() for p in net.parameters()):,} parameters; {train_images} training "
      f"images in {len(train_paths)} shards, {sum(counts) - train_images} held out; batch {batch}, {steps} steps "
      f"= {steps * batch / train_images:.3g} epochs; lr x {vc['gamma']} every {opt_cfg['step_every']} steps",
      flush=True)


def loss_fn(step, part):
    x, y = data.next(step, part)
    if (y < 0).any() or (y >= num_classes).any():
        bad = y[(y < 0) | (y >= num_classes)][:5].tolist()
        raise ValueError(f"{args.manifest}: labels {bad} outside 0..{num_classes - 1}; the latent VGG is a classifier "
                         f"of latent_vgg.num_classes classes and needs a labelled dataset")
    if vc["hflip"]:
        flip = torch.rand(len(x), generator=rng.generator(seed, step, part, "hflip")) < 0.5
        x = torch.where(flip.to(x.device)[:, None, None, None], x.flip(3), x)
    return F.cross_entropy(net(x), y, reduction="none")


elapsed = loop.fit(stage="train_latent_vgg", accelerator=accelerator, net=net, ema=loop.NoEMA(),
                   optimizer=optimizer, opt_cfg=opt_cfg, total_steps=steps, batch=batch, seed=seed,
                   loss_fn=loss_fn, state=job.state, data=data, micro_batches=micro_batches)


@torch.no_grad()
def held_out_accuracy(model):
    """Top-1 and top-5 on the held-out shards, each latent at its posterior mean (no draw)."""
    model.eval()
    scale, bias = (t.to(accelerator.device) for t in latents.whitening(cfg["latents"]))
    k = min(5, num_classes)
    top1 = topk = n = 0
    for path in held_paths:
        samples = latents.read_shard(path)
        for lo in range(0, len(samples), vc["eval_batch"]):
            chunk = samples[lo:lo + vc["eval_batch"]]
            stored = torch.from_numpy(np.stack([s["latents"] for s in chunk]).astype(np.float32)).to(accelerator.device)
            y = torch.tensor([s["label"] for s in chunk], device=accelerator.device)
            best = model(stored[:, :channels] * scale + bias).topk(k, dim=1).indices
            top1 += (best[:, 0] == y).sum().item()
            topk += (best == y[:, None]).any(1).sum().item()
            n += len(chunk)
    return {"top1": top1 / n, f"top{k}": topk / n, "held_out_images": n, "held_out_shards": [str(p) for p in held_paths]}


if accelerator.is_main_process:
    model = accelerator.unwrap_model(net)
    accuracy = held_out_accuracy(model)
    print(f"[train_latent_vgg] held-out accuracy: top-1 {accuracy['top1']:.4f}  "
          + "  ".join(f"{k} {v:.4f}" for k, v in accuracy.items() if k.startswith("top") and k != "top1")
          + f"  ({accuracy['held_out_images']} images)", flush=True)
    with atomic.atomic_path(args.out) as tmp:
        save_file({k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}, str(tmp),
                  metadata={"format": FORMAT})
    meta = {"format": FORMAT, "role": "latent_vgg", "architecture": architecture, "accuracy": accuracy,
            "config": cfg, "steps": steps, "images_seen": steps * batch, "epochs": steps * batch / train_images,
            "train_seconds": elapsed, "jobs": job.jobs(steps), "tf32": precision.flags(),
            "sha256": atomic.sha256_file(args.out),
            "inputs": {"manifest": {"path": args.manifest, "sha256": manifest_sha256}}}
    atomic.write_json(str(args.out).removesuffix(".safetensors") + ".json", meta)
    atomic.write_json(args.accuracy, {**accuracy, "steps": steps, "epochs": meta["epochs"]})
    print(f"[train_latent_vgg] wrote {args.out} after {elapsed:.0f}s", flush=True)
    if job.state is not None:
        job.state.finish()
accelerator.end_training()
