"""Recipe of train_latent_vgg: the latent VGG16 of E-LatentLPIPS (stages/method/elatentlpips.py)
trained as an ImageNet classifier on the encoded latents, the backbone the latent rows'
mid-training distance (`midtrain.distance: elatentlpips`) reads.

The recipe is torchvision's VGG16 one (SGD lr 0.1, momentum 0.9, weight decay 1e-4, batch 256,
100 epochs, the rate times 0.1 every 30 epochs), in steps: an epoch is the training images / batch.
Inputs are the networks' latents (one posterior draw per use, whitened: stages/data/latents.py),
not flipped, as sony/cmt's imagenet512/train_latent_vgg.py (`latent_vgg.hflip: true` flips them
left-right at random). The last `holdout_shards` shards of the
encoded pool (a uniform sample of the classes, stages/data/latents.py) are held out; top-1 and top-5
accuracy on them, at the posterior mean, go to the log, to the model file and to accuracy.json
(the report's). The model file holds the LatentVGG16 under `net.` (no EMA), which
ELatentLPIPS.from_file reads.
"""

import numpy as np
import torch
from torch.nn import functional as F

from stages.core import rng
from stages.data import latents, training_data
from stages.files import atomic
from stages.method import losses
from stages.method.elatentlpips import LatentVGG16
from stages.training.ema import NoEMA
from stages.training.run import Recipe


def optimizer_section(cfg, train_images):
    """The SGD section of the training loop (build_optimizer, lr_at): StepLR every step_epochs."""
    vc = cfg["latent_vgg"]
    return {"name": "sgd", "lr": vc["lr"], "momentum": vc["momentum"], "weight_decay": vc["weight_decay"],
            "schedule": "step", "step_every": max(1, round(vc["step_epochs"] * train_images / vc["batch"])),
            "gamma": vc["gamma"]}


def network(cfg, channels):
    """(the classifier with its random initial weights, its architecture)."""
    torch.manual_seed(rng.fold(cfg["seed"], "latent-vgg-init"))
    architecture = {"in_channels": channels, "num_classes": cfg["latent_vgg"]["num_classes"],
                    **cfg["latent_vgg"]["architecture"]}
    return LatentVGG16(**architecture), architecture


def objective(cfg, where="the encoded dataset"):
    """loss(model, batch, generator, terms=None) of a batch (latents, class indices): cross-entropy, after
    random left-right flips drawn from `generator` where latent_vgg.hflip says so; `terms` gets whether
    each image's top class is its label (`top1`, the training batch's accuracy)."""
    vc = cfg["latent_vgg"]
    num_classes = vc["num_classes"]

    def loss(model, batch, generator, terms=None):
        x, y = batch
        if (y < 0).any() or (y >= num_classes).any():
            bad = y[(y < 0) | (y >= num_classes)][:5].tolist()
            raise ValueError(f"{where}: labels {bad} outside 0..{num_classes - 1}; the latent VGG is a classifier "
                             f"of latent_vgg.num_classes classes and needs a labelled dataset")
        if vc["hflip"]:
            flip = torch.rand(len(x), generator=generator) < 0.5
            x = torch.where(flip.to(x.device)[:, None, None, None], x.flip(3), x)
        logits = model(x)
        if terms is not None:
            losses.note(terms, top1=(logits.argmax(1) == y).float())
        return F.cross_entropy(logits, y, reduction="none")

    return loss


@torch.no_grad()
def held_out_accuracy(model, cfg, paths, channels, device):
    """Top-1 and top-5 on the held-out shards `paths`, each latent at its posterior mean (no draw)."""
    vc = cfg["latent_vgg"]
    model.eval()
    scale, bias = (t.to(device) for t in latents.whitening(cfg["latents"]))
    k = min(5, vc["num_classes"])
    top1 = topk = n = 0
    for path in paths:
        samples = latents.read_shard(path)
        for lo in range(0, len(samples), vc["eval_batch"]):
            chunk = samples[lo:lo + vc["eval_batch"]]
            stored = torch.from_numpy(np.stack([s["latents"] for s in chunk]).astype(np.float32)).to(device)
            y = torch.tensor([s["label"] for s in chunk], device=device)
            best = model(stored[:, :channels] * scale + bias).topk(k, dim=1).indices
            top1 += (best[:, 0] == y).sum().item()
            topk += (best == y[:, None]).any(1).sum().item()
            n += len(chunk)
    return {"top1": top1 / n, f"top{k}": topk / n, "held_out_images": n, "held_out_shards": [str(p) for p in paths]}


def build(cfg, args, accelerator):
    vc, seed = cfg["latent_vgg"], cfg["seed"]
    # training shards and held-out shards of the encoded pool
    manifest, paths, counts = latents.manifest_shards(args.manifest, fast=args.verify == "fast")
    hold = vc["holdout_shards"]
    if hold >= len(paths):
        raise ValueError(f"latent_vgg.holdout_shards {hold}: the encoded pool has {len(paths)} shards, leaving none "
                         "to train on; hold out fewer or encode more shards (latents.num_shards)")
    kept = len(paths) - hold
    train_paths, train_counts, held_paths = paths[:kept], counts[:kept], paths[kept:]
    train_images, batch = sum(train_counts), vc["batch"]
    steps = vc["steps"] or max(1, round(vc["epochs"] * train_images / batch))
    opt_cfg = optimizer_section(cfg, train_images)
    world, rank = accelerator.num_processes, accelerator.process_index
    local, micro_batches = training_data.split_batch(batch, vc.get("batch_per_gpu"), world, "latent_vgg")
    data = latents.LatentBatches(train_paths, train_counts, seed, local, cfg["latents"], rank, world,
                                 vc["shuffle_buffer"], accelerator.device)
    channels = latents.read_first(paths[0]).shape[0] // 2
    net, architecture = network(cfg, channels)
    manifest_sha256 = atomic.sha256_file(args.manifest)
    loss_of = objective(cfg, args.manifest)

    def loss(model, step, part):
        terms = {}
        return loss_of(model, data.next(step, part), rng.generator(seed, step, part, "hflip"), terms=terms), terms

    def finish(model):
        accuracy = held_out_accuracy(model, cfg, held_paths, channels, accelerator.device)
        print(f"[train_latent_vgg] held-out accuracy: top-1 {accuracy['top1']:.4f}  "
              + "  ".join(f"{k} {v:.4f}" for k, v in accuracy.items() if k.startswith("top") and k != "top1")
              + f"  ({accuracy['held_out_images']} images)", flush=True)
        epochs = steps * batch / train_images
        atomic.write_json(args.accuracy, {**accuracy, "steps": steps, "epochs": epochs})
        return {"accuracy": accuracy, "epochs": epochs,
                "evaluation": {k: v for k, v in accuracy.items() if k.startswith("top")}}

    return Recipe(
        stage="train_latent_vgg", seed=seed, net=net, ema=NoEMA(), optimizer=opt_cfg, total_steps=steps,
        batch=batch, micro_batches=micro_batches, loss=loss, data=data, finish=finish,
        identity={"manifest_sha256": manifest_sha256},
        describe=(f"{sum(p.numel() for p in net.parameters()):,} parameters; {train_images} training images in "
                  f"{len(train_paths)} shards, {sum(counts) - train_images} held out; "
                  f"{steps * batch / train_images:.3g} epochs; lr x {vc['gamma']} every {opt_cfg['step_every']} "
                  "steps; "),
        meta={"role": "latent_vgg", "architecture": architecture,
              "inputs": {"manifest": {"path": args.manifest, "sha256": manifest_sha256}}})
