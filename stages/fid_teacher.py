"""Stage fid_teacher: Fréchet distance of the teacher's own solver endpoints (the final states of
the trajectory shards), split into seed ranges like the samples: the ceiling that mid-training
distils. In a latent row (`decode` in the config) the endpoints are latents, decoded by the VAE first."""

import argparse
import json

import numpy as np
import torch

from stages.data import datasets, features, shards
from stages.files import atomic
from stages.runtime import precision

p = argparse.ArgumentParser(description=__doc__)
p.add_argument("--config", type=json.loads, required=True, help='{"features": ..., "sampling": ...}')
p.add_argument("--reference", required=True)
p.add_argument("--manifest", required=True, help="trajectory manifest.json")
p.add_argument("--out", required=True)
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
ends = torch.from_numpy(ends[:k * n].astype(np.float32))
if cfg.get("decode"):
    from stages.networks import latent_codec

    dc = cfg["decode"]
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    codec = latent_codec.build_codec(dc["vae"], dc.get("folder"), dc["latents"], batch_size=dc["batch"]).to(device)
    images = torch.cat([codec.decode(chunk.to(device)).cpu() for chunk in ends.split(dc["batch"])]).numpy()
else:
    images = datasets.to_uint8(ends).numpy()
teacher = features.summary([features.score(images[r * n:(r + 1) * n], cfg["features"], reference) for r in range(k)])
teacher["nfe"] = manifest["spec"]["nfe"]
atomic.write_json(args.out, {"features": cfg["features"]["kind"], "reference": args.reference, "teacher": teacher})
print(f"[fid_teacher] teacher endpoints: FD {teacher['mean']:.4f} (mean of {k} ranges)", flush=True)
