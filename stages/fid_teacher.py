"""Stage fid_teacher: Fréchet distance of the teacher's own solver endpoints (the final states of
the trajectory shards), split into seed ranges like the samples: the ceiling that mid-training
distils."""

import argparse
import json

import numpy as np
import torch

from stages.core import precision, progress
from stages.data import datasets, features, shards
from stages.files import atomic

p = argparse.ArgumentParser(description=__doc__)
p.add_argument("--config", type=json.loads, required=True, help='{"features": ..., "sampling": ...}')
p.add_argument("--reference", required=True)
p.add_argument("--manifest", required=True, help="trajectory manifest.json")
p.add_argument("--out", required=True)
p.add_argument("--vae", default=None, help="latent rows: the AutoencoderKL folder that decodes the endpoints")
p.add_argument("--latents", type=json.loads, default=None, help="latent rows: the row's `latents` section")
args = p.parse_args()
cfg = args.config
precision.apply()  # Inception features on a GPU: TF32 as the config says
reference = features.load_statistics(args.reference)

manifest, paths = shards.check_manifest(args.manifest, fast=True)
ends = np.concatenate([np.stack([s["states"][-1] for s in shards.read_shard(p)]) for p in paths])
n, k = cfg["sampling"]["per_range"], cfg["sampling"]["num_ranges"]
if len(ends) < n:
    raise ValueError(f"{args.manifest}: {len(ends)} trajectories, fewer than one seed range ({n})")
k = min(k, len(ends) // n)
if args.latents:  # a latent teacher's endpoints are final latents: decoded as the samples are
    from stages.networks import latent_codec

    codec = latent_codec.from_config(args.latents, args.vae)
    images = codec.decode(torch.from_numpy(ends.astype(np.float32))).numpy()
else:
    images = datasets.to_uint8(torch.from_numpy(ends.astype(np.float32))).numpy()
shown = progress.Progress("[fid_teacher]", k, "seed ranges")
values = []
for r in range(k):
    values.append(features.score(images[r * n:(r + 1) * n], cfg["features"], reference))
    shown.update(r + 1)
teacher = features.summary(values)
teacher["nfe"] = manifest["spec"]["nfe"]
atomic.write_json(args.out, {"features": cfg["features"]["kind"], "reference": args.reference, "teacher": teacher})
print(f"[fid_teacher] teacher endpoints: FD {teacher['mean']:.4f} (mean of {k} ranges)", flush=True)
