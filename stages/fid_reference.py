"""Stage fid_reference: feature statistics (mean, covariance) of the whole real data set, or, with
features.reference, those of a published reference batch: the ADM suite's (.npz, read by numpy) or
EDM2's (dataset-refs/img512.pkl, read by the restricted unpickler: the pickle runs no code)."""

import argparse
import json

from stages.core import precision
from stages.data import datasets, features

p = argparse.ArgumentParser(description=__doc__)
p.add_argument("--config", type=json.loads, required=True, help="the `features` config section as JSON")
p.add_argument("--dataset", required=True)
p.add_argument("--out", required=True)
args = p.parse_args()
precision.apply()  # Inception features on a GPU: TF32 as the config says

if args.config.get("reference"):
    if args.config["kind"] != "inception":
        raise ValueError(f"features.reference: the ADM statistics are Inception features; features.kind is "
                         f"{args.config['kind']!r}")
    reference = args.config["reference"]
    mu, sigma = (features.edm2_reference(reference) if reference.endswith(".pkl")
                 else features.load_adm_reference(reference))
    features.save_statistics(args.out, mu, sigma, features=args.config, source=args.config["reference"])
    print(f"[fid_reference] published reference statistics {reference} -> {args.out}", flush=True)
    raise SystemExit(0)

images, _ = datasets.load(args.dataset)
feats = features.extract(images, args.config)
mu, sigma = features.statistics(feats)
features.save_statistics(args.out, mu, sigma, count=len(images), features=args.config, source=args.dataset)
print(f"[fid_reference] {len(images)} real images, {feats.shape[1]}-d {args.config['kind']} features "
      f"-> {args.out}", flush=True)
