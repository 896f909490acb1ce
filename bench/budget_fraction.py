"""Ratio 4: the CMT route against vanilla ECT from the teacher at equal total budget, read from a
finished run of a row with the `cmt` and `baseline` inits (config/rows/variants/digits-cmt-ect-equal-total.yaml).

The CMT route's cost at its post-training snapshot f is the trajectories + mid-training + f of its
post-training; the baseline's budget is its whole post-training. Counted two ways:
- images: mid-training and post-training images as the model files record them, plus the
  trajectories in images of ECT steps at their cost measured in this run (the trajectory_shard
  jobs' seconds per trajectory / the baseline's seconds per image);
- seconds: the run's Snakemake benchmarks (trajectory_shard jobs + midtrain + f x posttrain/cmt,
  against posttrain/baseline). Wall seconds of a shared machine vary with its load: say which.
Prints both final FDs and the fraction of the baseline's budget at which the CMT route's FD
curve first reaches the baseline's final FD (2-step, and 1-step). The curve is sampled at the
snapshots only, so the fraction is an upper bound at that resolution; at the first snapshot (the
mid-trained model alone) the route may have reached it earlier, during mid-training.

    python bench/budget_fraction.py results/digits-cmt-ect-equal-total [--out fraction.json]
"""

import argparse
import csv
import json
from pathlib import Path


def bench_seconds(path):
    with open(path) as f:
        return float(next(csv.DictReader(f, delimiter="\t"))["s"])


def fraction(res):
    res = Path(res)
    fids = {init: json.loads((res / "fid" / f"{init}.json").read_text()) for init in ("cmt", "baseline")}
    mid = json.loads((res / "midtrain" / "model.json").read_text())
    bench = res / "benchmarks"
    shard_tsvs = sorted((bench / "trajectory_shard").glob("*.tsv"))
    if not shard_tsvs:
        raise FileNotFoundError(f"{bench / 'trajectory_shard'}: no trajectory_shard benchmarks (the shards came "
                                "from the store): the trajectories' cost was not measured in this run")
    manifest = json.loads((res / "trajectories" / "manifest.json").read_text())
    n_traj = sum(e["count"] for e in manifest["shards"])
    if len(shard_tsvs) != len(manifest["shards"]):
        raise ValueError(f"{len(shard_tsvs)} trajectory_shard benchmarks for {len(manifest['shards'])} shards")
    secs = {"trajectories": sum(bench_seconds(p) for p in shard_tsvs),
            "midtrain": bench_seconds(bench / "midtrain.tsv"),
            "posttrain_cmt": bench_seconds(bench / "posttrain" / "cmt.tsv"),
            "baseline": bench_seconds(bench / "posttrain" / "baseline.tsv")}
    base_snaps, cmt_snaps = fids["baseline"]["snapshots"], fids["cmt"]["snapshots"]
    base_final = base_snaps[max(base_snaps, key=lambda n: base_snaps[n]["images_seen"])]
    cmt_order = sorted(cmt_snaps, key=lambda n: cmt_snaps[n]["images_seen"])
    post_total = cmt_snaps[cmt_order[-1]]["images_seen"]
    base_images = base_final["images_seen"]
    ect_s_per_image = secs["baseline"] / base_images
    traj_images = secs["trajectories"] / ect_s_per_image
    out = {"trajectories": n_traj, "seconds": secs, "ect_images_per_trajectory": traj_images / n_traj,
           "budget_images": {"baseline": base_images, "cmt_route": traj_images + mid["images_seen"] + post_total,
                             "midtrain": mid["images_seen"], "posttrain": post_total,
                             "trajectories_as_ect_images": traj_images},
           "budget_seconds": {"baseline": secs["baseline"],
                              "cmt_route": secs["trajectories"] + secs["midtrain"] + secs["posttrain_cmt"]}}
    for steps in ("2step", "1step"):
        target = base_final[steps]["mean"]
        entry = {"baseline_final": target, "cmt_final": cmt_snaps[cmt_order[-1]][steps]["mean"],
                 "curve": [], "reached_at": None}
        for name in cmt_order:
            f = cmt_snaps[name]["images_seen"] / post_total
            images = traj_images + mid["images_seen"] + cmt_snaps[name]["images_seen"]
            seconds = secs["trajectories"] + secs["midtrain"] + f * secs["posttrain_cmt"]
            point = {"snapshot": name, "fd": cmt_snaps[name][steps]["mean"], "images_fraction": images / base_images,
                     "seconds_fraction": seconds / secs["baseline"]}
            entry["curve"].append(point)
            if entry["reached_at"] is None and point["fd"] <= target:
                entry["reached_at"] = point
        out[steps] = entry
    return out


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("results", help="results/<row> of a finished run with the cmt and baseline inits")
    p.add_argument("--out", default=None)
    args = p.parse_args()
    r = fraction(args.results)
    b = r["budget_images"]
    print(f"budget in images: baseline {b['baseline']:,}; CMT route {b['cmt_route']:,.0f} = trajectories "
          f"{b['trajectories_as_ect_images']:,.0f} ({r['trajectories']:,} x {r['ect_images_per_trajectory']:.2f} ECT "
          f"images, measured) + mid {b['midtrain']:,} + post {b['posttrain']:,}")
    s = r["budget_seconds"]
    print(f"budget in measured seconds: baseline {s['baseline']:.0f}; CMT route {s['cmt_route']:.0f} "
          f"(trajectories {r['seconds']['trajectories']:.0f} + mid {r['seconds']['midtrain']:.0f} + "
          f"post {r['seconds']['posttrain_cmt']:.0f})")
    for steps in ("2step", "1step"):
        e = r[steps]
        hit = e["reached_at"]
        where = (f"first reached at snapshot {hit['snapshot']}: {100 * hit['images_fraction']:.1f} % of the baseline's "
                 f"images, {100 * hit['seconds_fraction']:.1f} % of its seconds" if hit else "never reached")
        print(f"{steps}: baseline final FD {e['baseline_final']:.4f}, CMT route final FD {e['cmt_final']:.4f}; "
              f"baseline's final FD {where}")
        print("   CMT curve (fraction of the baseline's images: FD): "
              + ", ".join(f"{100 * c['images_fraction']:.0f}%: {c['fd']:.4f}" for c in e["curve"]))
    if args.out:
        Path(args.out).write_text(json.dumps(r, indent=2) + "\n")


if __name__ == "__main__":
    main()
