"""Stage prepare_dataset: read a source (digits, ...) into the project's dataset format."""

import argparse
import json
import time

from stages.data import datasets

p = argparse.ArgumentParser(description=__doc__)
p.add_argument("--config", type=json.loads, required=True, help="the `dataset` config section as JSON")
p.add_argument("--out", required=True, help="output folder (dataset.npz + manifest.json)")
args = p.parse_args()

t0 = time.perf_counter()
manifest = datasets.prepare(args.config, args.out)
print(f"[prepare_dataset] {manifest['count']} images of shape {manifest['shape']} "
      f"from {args.config['source']} -> {args.out} in {time.perf_counter() - t0:.1f}s", flush=True)
