"""Stage encode_dataset: one shard of the dataset encoded by the latent codec (the latent rows).

Shard k holds pool positions k * per_shard ... of the source's images in the pool's fixed random
order (stages/data/latents.py says why; datasets.read_selection: for an ImageNet folder the ADM crop
at dataset.resolution, decoding only this shard's files), each stored as the VAE posterior's mean
and std with its label. The VAE is the SD-VAE folder from
the assets (`--vae`) or, for smoke runs and tests, a random AutoencoderKL built from
`latents.vae` = {config, seed}. Images go through the VAE `--vae-batch` at a time (how, not what: not
part of the spec); a shard depends on nothing else, so the pool can be made by any number of jobs in
any order.
"""

from pathlib import Path

import torch

from stages.core import cli, progress
from stages.data import datasets, latents
from stages.files import atomic
from stages.networks import latent_codec

p = cli.parser(__doc__)
p.add_argument("--shard", type=int, required=True)
p.add_argument("--vae", default=None, help="the SD-VAE's diffusers folder (when latents.vae names the asset)")
p.add_argument("--vae-batch", type=int, default=8, help="images per VAE call (latents.batch)")
p.add_argument("--out", required=True)
args = p.parse_args()
spec = cli.start(args, "encode_dataset")

dataset, per_shard = spec["dataset"], spec["per_shard"]
resolution = dataset["resolution"]
if resolution % 8:
    raise ValueError(f"dataset.resolution {resolution}: the SD-VAE downsamples 8x; use a multiple of 8")
dtype = latents.encoded_dtype(spec["dtype"])
start = args.shard * per_shard


def select(count):
    return latents.encoding_order(count)[start:start + per_shard]


images, labels, source_indices, total = datasets.read_selection(dataset, select)
if start >= total:
    raise ValueError(f"shard {args.shard} starts at image {start}, but the dataset "
                     f"({dataset.get('path', 'synthetic')}) "
                     f"has {total} images; set latents.num_shards to ceil({total} / {per_shard}) = "
                     f"{-(-total // per_shard)}")

device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
if not isinstance(spec["vae"], dict) and not args.vae:
    raise ValueError(f"latents.vae names the asset folder {spec['vae']!r}: pass its local path with --vae")
# the stored form is the posterior before any whitening: the section's scale and bias play no part
codec = latent_codec.from_config({"vae": spec["vae"], "pixels": spec.get("pixels", "unit")}, args.vae,
                                 batch_size=args.vae_batch).to(device)
print(f"[encode_dataset] shard {args.shard}: pool positions {start}..{start + len(images) - 1} of {total}, "
      f"{resolution}x{resolution} -> {2 * codec.latent_channels}x{resolution // 8}x{resolution // 8} {dtype}",
      flush=True)


def samples():
    shown = progress.Progress(f"[encode_dataset] shard {args.shard}:", len(images), "images")
    for lo in range(0, len(images), args.vae_batch):
        pixels = torch.from_numpy(images[lo:lo + args.vae_batch]).to(device)
        stored = latents.stored_array(codec.encode_pixels(pixels), dtype)
        for i, array in enumerate(stored):
            yield start + lo + i, source_indices[lo + i], array, labels[lo + i], total
        shown.update(lo + len(stored))


count = latents.write_shard(args.out, samples())
spec_file = Path(args.out).parent / "spec.json"  # so the store folder says what made it (same text from every job)
if not spec_file.exists():
    atomic.write_json(spec_file, spec["spec"])
print(f"[encode_dataset] wrote {count} encoded images to {args.out}", flush=True)
