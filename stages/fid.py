"""Stage fid: Fréchet distance of generated images against the real-data reference statistics,
one .npz per snapshot of a post-training run (from the sample stage), scored per number of steps
and seed range."""

import argparse
import json
from pathlib import Path

import numpy as np

from stages.core import precision, progress
from stages.data import features
from stages.files import atomic, checkpoints

p = argparse.ArgumentParser(description=__doc__)
p.add_argument("--config", type=json.loads, required=True, help='{"features": ..., "sampling": ...}')
p.add_argument("--reference", required=True)
p.add_argument("--samples", nargs="+", required=True, help="sample .npz files, one per snapshot")
p.add_argument("--models", nargs="+", required=True, help="the snapshot models the samples came from, same order")
p.add_argument("--out", required=True)
args = p.parse_args()
cfg = args.config
precision.apply()  # Inception features on a GPU: TF32 as the config says
reference = features.load_statistics(args.reference)
if len(args.models) != len(args.samples):
    raise ValueError("--models must list one model per --samples file")

result = {"features": cfg["features"]["kind"], "reference": args.reference, "snapshots": {}}
shown = progress.Progress("[fid]", len(args.samples) * len(cfg["sampling"]["steps"]) * cfg["sampling"]["num_ranges"],
                          "seed ranges")
scored = 0
for sample_path, model_path in zip(args.samples, args.models, strict=True):
    meta = checkpoints.read_meta(model_path)
    # images_seen_total counts mid-training too (MeanFlow row: compared at equal total budget)
    entry = {"images_seen": meta["images_seen"], "steps_trained": meta["steps"],
             "images_seen_total": meta.get("images_seen_total", meta["images_seen"])}
    if "posthoc_ema" in meta:  # a post-hoc EMA (stages/posthoc_ema.py): its width and fit, for the report
        entry["posthoc_ema"] = meta["posthoc_ema"]
    with np.load(sample_path) as data:
        for steps in cfg["sampling"]["steps"]:
            keys = sorted(k for k in data.files if k.startswith(f"images_{steps}step_"))
            values = []
            for k in keys:
                values.append(features.score(data[k], cfg["features"], reference))
                scored += 1
                shown.update(scored, f"{sample_path} {k}")
            entry[f"{steps}step"] = features.summary(values)
    result["snapshots"][Path(sample_path).stem] = entry
    print(f"[fid] {sample_path}: " + "  ".join(
        f"{s}-step FD {entry[f'{s}step']['mean']:.4f}" for s in cfg["sampling"]["steps"]), flush=True)
atomic.write_json(args.out, result)
