"""Stage fid_reference: feature statistics (mean, covariance) of the whole real data set."""

import argparse
import json

from stages.data import datasets, features
from stages.runtime import precision

p = argparse.ArgumentParser(description=__doc__)
p.add_argument("--config", type=json.loads, required=True, help="the `features` config section as JSON")
p.add_argument("--dataset", required=True,
               help="the prepared dataset.npz whose features to summarise, or EDM2's reference statistics "
                    "(dataset-refs/img512.pkl, a .pkl), read without running its code")
p.add_argument("--out", required=True)
args = p.parse_args()
precision.apply()  # Inception features on a GPU: TF32 as the config says

if args.dataset.endswith(".pkl"):
    if args.config["kind"] != "inception":
        raise ValueError(f"features.reference: {args.dataset} holds Inception statistics, but features.kind is "
                         f"{args.config['kind']}; use kind inception or drop features.reference")
    mu, sigma = features.edm2_reference(args.dataset)
    features.save_statistics(args.out, mu, sigma, count=None, features=args.config, source=args.dataset)
    print(f"[fid_reference] {len(mu)}-d statistics from {args.dataset} -> {args.out}", flush=True)
    raise SystemExit(0)
images, _ = datasets.load(args.dataset)
feats = features.extract(images, args.config)
mu, sigma = features.statistics(feats)
features.save_statistics(args.out, mu, sigma, count=len(images), features=args.config, source=args.dataset)
print(f"[fid_reference] {len(images)} real images, {feats.shape[1]}-d {args.config['kind']} features "
      f"-> {args.out}", flush=True)
