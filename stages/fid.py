"""Stage fid: Fréchet distance of generated images against the real-data reference statistics.

With --samples: one .npz per snapshot of a run (from the sample stage), scored per number of
steps and seed range. With --manifest: the teacher's own solver endpoints from the trajectory
shards, split into seed ranges the same way: the ceiling that mid-training distils.
"""

import argparse
import json
from pathlib import Path

import numpy as np
import torch

from . import atomic, checkpoints, datasets, features, shards

p = argparse.ArgumentParser(description=__doc__)
p.add_argument("--config", type=json.loads, required=True, help='{"features": ..., "sampling": ...}')
p.add_argument("--reference", required=True)
p.add_argument("--samples", nargs="+", help="sample .npz files, one per snapshot")
p.add_argument("--models", nargs="+", help="the snapshot models the samples came from, same order")
p.add_argument("--manifest", help="trajectory manifest: score the teacher's solver endpoints")
p.add_argument("--out", required=True)
args = p.parse_args()
cfg = args.config
reference = features.load_statistics(args.reference)


def score(images_uint8):
    return features.frechet(features.statistics(features.extract(images_uint8, cfg["features"])), reference)


def summary(values):
    return {"per_range": values, "mean": float(np.mean(values)), "min": float(np.min(values))}


result = {"features": cfg["features"]["kind"], "reference": args.reference}
if args.manifest:
    _, paths = shards.check_manifest(args.manifest, fast=True)
    ends = np.concatenate([np.stack([s["states"][-1] for s in shards.read_shard(p)]) for p in paths])
    n, k = cfg["sampling"]["per_range"], cfg["sampling"]["num_ranges"]
    if len(ends) < n:
        raise ValueError(f"{args.manifest}: {len(ends)} trajectories, fewer than one seed range ({n})")
    k = min(k, len(ends) // n)
    images = datasets.to_uint8(torch.from_numpy(ends.astype(np.float32))).numpy()
    result["teacher"] = summary([score(images[r * n:(r + 1) * n]) for r in range(k)])
    result["teacher"]["nfe"] = json.load(open(args.manifest))["spec"]["nfe"]
    print(f"[fid] teacher endpoints: FD {result['teacher']['mean']:.4f} (mean of {k} ranges)", flush=True)
else:
    if not args.models or len(args.models) != len(args.samples):
        raise ValueError("--models must list one model per --samples file")
    result["snapshots"] = {}
    for sample_path, model_path in zip(args.samples, args.models):
        meta = checkpoints.read_meta(model_path)
        # images_seen_total counts mid-training too (MeanFlow row: compared at equal total budget)
        entry = {"images_seen": meta["images_seen"], "steps_trained": meta["steps"],
                 "images_seen_total": meta.get("images_seen_total", meta["images_seen"])}
        with np.load(sample_path) as data:
            for steps in cfg["sampling"]["steps"]:
                keys = sorted(k for k in data.files if k.startswith(f"images_{steps}step_"))
                entry[f"{steps}step"] = summary([score(data[k]) for k in keys])
        result["snapshots"][Path(sample_path).stem] = entry
        print(f"[fid] {sample_path}: " + "  ".join(
            f"{s}-step FD {entry[f'{s}step']['mean']:.4f}" for s in cfg["sampling"]["steps"]), flush=True)
atomic.write_json(args.out, result)
