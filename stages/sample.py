"""Stage sample: 1-step and 2-step generation with a model's EMA (eval mode).

Consistency model: 1-step x = f(sigma_max z, sigma_max). 2-step: x1 = f(sigma_max z, sigma_max),
then x = f(x1 + sigma_mid z', sigma_mid) with fresh z' (docs/method.md#sampling).
Average-velocity model (precond "meanflow", flow-matching time): 1-step x = z - u(z, 0, 1) from
z_1 = z; 2-step: z_mid = z - (1 - t_mid) u(z, t_mid, 1), then x = z_mid - t_mid u(z_mid, 0, t_mid).
Sample i of a seed range uses noise folded from (seed, i), so a range is the same images whatever
the batch size, and both kinds of model start from the same z. A class-conditional model draws
image i's class uniformly, folded from (seed, i) too (the same class for 1 and 2 steps), and the
file records the classes as `labels_r<range>` (int64); an unconditional model's file is unchanged.
A class-conditional average-velocity model (the DiT, num_classes > 0) takes the class index itself.

Latent models (`--latents`, the row's latents section, and `--vae`, a diffusers AutoencoderKL
folder, or a random VAE from the section's spec): the samples are final latents, decoded to uint8
pixels by the latent codec (stages/networks/latent_codec.py) before they are stored, so the FID
stages see images either way.
"""

import io
import json
import time

import numpy as np
import torch

from stages import networks
from stages.core import cli, progress, rng
from stages.data import datasets
from stages.data import labels as class_labels
from stages.files import atomic, checkpoints
from stages.method import flowmap, losses

p = cli.parser(__doc__)
p.add_argument("--model", required=True)
p.add_argument("--out", required=True, help="samples .npz: images_<steps>step_r<range> uint8 arrays")
p.add_argument("--vae", default=None, help="latent models: the AutoencoderKL folder that decodes the samples")
p.add_argument("--latents", type=json.loads, default=None,
               help="latent models: the row's `latents` section (whitening; a random VAE's spec without --vae)")
args = p.parse_args()
sc = cli.start(args, "sample")

device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
meta = checkpoints.read_meta(args.model)
average_velocity = meta["precond"] == "meanflow"
net, meta = checkpoints.load(args.model, which="ema",
                             kind=None if average_velocity else networks.student_kind(meta["architecture"]))
net = net.to(device).eval()
arch = meta["architecture"]
shape = (arch["in_channels"], arch["resolution"], arch["resolution"])
sigma_max = meta["sigma_max"]
label_dim = int(getattr(net, "num_classes", 0) or 0) if average_velocity else class_labels.label_dim_of(net)
codec = None
if args.vae or args.latents:
    from stages.networks import latent_codec

    codec = (latent_codec.from_config(args.latents, args.vae) if args.latents
             else latent_codec.LatentCodec.from_folder(args.vae)).to(device)
    if codec.latent_channels != shape[0]:
        raise ValueError(f"{args.vae}: a VAE of {codec.latent_channels} latent channels cannot decode the "
                         f"{shape[0]}-channel samples of {args.model}")


def noise(indices, purpose):
    return torch.stack([torch.randn(shape, generator=rng.generator(sc["seed"], i, purpose))
                        for i in indices]).to(device)


@torch.no_grad()
def generate(indices, steps):
    if average_velocity:
        z = noise(indices, "z")
        y = torch.tensor(classes(indices), dtype=torch.int64, device=device) if label_dim else None
        x = flowmap.one_step(net, z, y) if steps == 1 else flowmap.two_step(net, z, sc["t_mid"], y)
    else:
        x = consistency(indices, steps)
    if not torch.isfinite(x).all():
        raise FloatingPointError(f"{args.model}: non-finite samples ({steps}-step)")
    if codec is not None:
        return codec.decode(x).cpu().numpy()
    return datasets.to_uint8(x).cpu().numpy()


def classes(indices):
    return [class_labels.random_label(sc["seed"], i, label_dim) for i in indices]


def consistency(indices, steps):
    onehot = class_labels.one_hot(classes(indices), label_dim, device) if label_dim else None
    x = losses.call(net, sigma_max * noise(indices, "z"), sigma_max, onehot)
    if steps == 2:
        x = losses.call(net, x + sc["sigma_mid"] * noise(indices, "z-mid"), sc["sigma_mid"], onehot)
    return x


arrays, made, t0 = {}, 0, time.perf_counter()
shown = progress.Progress("[sample]", sc["num_ranges"] * len(sc["steps"]) * sc["per_range"], "images")
for r in range(sc["num_ranges"]):
    first = r * sc["per_range"]
    for steps in sc["steps"]:
        out = []
        for lo in range(first, first + sc["per_range"], sc["batch"]):
            out.append(generate(range(lo, min(lo + sc["batch"], first + sc["per_range"])), steps))
            made += len(out[-1])
            shown.update(made, f"range {r}, {steps}-step")
        arrays[f"images_{steps}step_r{r}"] = np.concatenate(out)
    if label_dim:
        arrays[f"labels_r{r}"] = np.asarray(classes(range(first, first + sc["per_range"])), dtype=np.int64)
n = sum(len(a) for k, a in arrays.items() if k.startswith("images_"))
buf = io.BytesIO()
np.savez(buf, **arrays)
atomic.write_bytes(args.out, buf.getvalue())
print(f"[sample] {n} images ({sc['num_ranges']} seed ranges x steps {sc['steps']}) from {args.model} "
      f"in {time.perf_counter() - t0:.1f}s -> {args.out}", flush=True)
