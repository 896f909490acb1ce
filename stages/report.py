"""Stage report: the row's table (init x {1-step, 2-step} FD, mean and min over seed ranges), the
teacher's own solver endpoints as the ceiling, the mid-trained model alone, images seen and wall
time per stage, an FD-vs-images curve per init and sample grids.

Family cm (consistency models, ECT) compares inits at the same post-training budget; family mf
(MeanFlow) compares at the same total budget (mid + post for the CMT init), so its curves and table
use images_seen_total."""

import argparse
import csv
import json
import time
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from stages.files import atomic, checkpoints  # noqa: E402
from stages.runtime import ledger  # noqa: E402

p = argparse.ArgumentParser(description=__doc__)
p.add_argument("--config", type=json.loads, required=True)
p.add_argument("--fid", nargs="+", required=True, help="fid/<init>.json, in the order of config inits")
p.add_argument("--ceiling", required=True, help="fid/teacher-solver.json")
p.add_argument("--samples", nargs="+", required=True, help="final-snapshot samples per init")
p.add_argument("--models", nargs="+", required=True, help="teacher, midtrain, then posttrain per init")
p.add_argument("--benchmarks", required=True, help="the row's benchmarks folder")
p.add_argument("--out", required=True)
p.add_argument("--curve", required=True)
p.add_argument("--grids", required=True)
p.add_argument("--table", required=True, help="results.csv: ours and the paper's per method")
p.add_argument("--midtrain-fid", default=None, help="fid/midtrain.json: the mid-trained model alone")
p.add_argument("--latent-vgg-accuracy", default=None,
               help="latent rows: latent_vgg/accuracy.json, the E-LatentLPIPS backbone's held-out accuracy")
args = p.parse_args()
cfg = args.config
inits, steps, final = cfg["inits"], cfg["sampling"]["steps"], cfg["final_snapshot"]
family = cfg.get("family", "cm")
fids = {init: json.load(open(path)) for init, path in zip(inits, args.fid)}
ceiling = json.load(open(args.ceiling))["teacher"]
out_dir = Path(args.out).parent
if family == "mf":
    LABELS = {"cmt": "CMT-MF init (ours)", "random": "random init (MeanFlow from scratch)"}
    TITLE, TWO_STEP = "CMT-MF mid-training, then MeanFlow", f"t_mid = {cfg['sampling']['t_mid']}"
    IMAGES, X_LABEL = "images_seen_total", "total training kimg (mid + post)"
else:
    LABELS = {"cmt": "CMT init (ours)", "teacher": "teacher (diffusion) init", "random": "random init",
              "baseline": "vanilla ECT from the teacher (equal total budget)"}
    method = {"ect": "ECT", "ecd": "ECD (consistency distillation)",
              "ect_snr": "ECT (the ImageNet-512 code's weighting)"}[cfg.get("method", "ect")]
    TITLE, TWO_STEP = f"CMT mid-training, then {method}", f"sigma_mid = {cfg['sampling']['sigma_mid']}"
    IMAGES, X_LABEL = "images_seen", "post-training kimg"


def fd_cell(summary):
    return f"{summary['mean']:.3f} / {summary['min']:.3f}"


# ---- table
lines = [f"# {cfg['row']}: {TITLE}", "",
         f"Fréchet distance ({fids[inits[0]]['features']} features) against the real data, "
         f"mean / min over {cfg['sampling']['num_ranges']} seed ranges of {cfg['sampling']['per_range']} "
         f"samples; 2-step sampling uses {TWO_STEP}. Lower is better.", "",
         "| post-training init | " + " | ".join(f"{s}-step FD" for s in steps) + " | images seen (post) |"
         + (" images seen (mid + post) |" if family == "mf" else ""),
         "|---|" + "---|" * (len(steps) + 1 + (family == "mf"))]
for init in inits:
    snap = fids[init]["snapshots"][final]
    lines.append(f"| {LABELS[init]} | " + " | ".join(fd_cell(snap[f'{s}step']) for s in steps)
                 + f" | {snap['images_seen']:,} |"
                 + (f" {snap.get('images_seen_total', snap['images_seen']):,} |" if family == "mf" else ""))
lines.append(f"| teacher's own {ceiling['nfe']}-NFE solver (ceiling) | "
             + " | ".join(fd_cell(ceiling) for _ in steps) + " | |" + (" |" if family == "mf" else ""))
lines.append("")
start = {init: fids[init]["snapshots"][sorted(fids[init]["snapshots"])[0]] for init in inits}
lines.append("Each initialisation on its own (post-training step 0, i.e. before any post-training): "
             + "; ".join(f"{LABELS[i]} " + ", ".join(f"{s}-step {start[i][f'{s}step']['mean']:.3f}"
                                                      for s in steps) for i in inits) + ".")
lines.append("")

# ---- ordering check, stated rather than assumed
order = [i for i in ("cmt", "teacher", "random") if i in inits]
if family == "mf":
    lines.append("Budget: the random init trains MeanFlow for as many images as the CMT init's "
                 "mid-training and post-training together (the CMT-MF step has no JVP and is cheaper; "
                 "the teacher and its trajectories are further costs of the CMT init, in the cost table). "
                 + ("The teacher is a MeanFlow model trained here; its multi-step sampler "
                    "z_r = z_t - (t - r) u(z_t, r, t) made the trajectories in flow time, from z_1 = eps at t = 1, "
                    "where the 1-step sampler x = z - u(z, 0, 1) starts."
                    if checkpoints.read_meta(args.models[0])["precond"] == "meanflow" else
                    "The teacher is the EDM model read in flow-matching time (z = x / (1 + sigma), "
                    "t = sigma / (1 + sigma)); its trajectories start at sigma_max, t = sigma_max / (1 + sigma_max), "
                    "and mid-training puts the prior noise x_T / sigma_max in front of them at t = 1, "
                    "where the 1-step sampler x = z - u(z, 0, 1) starts."))
    lines.append("")
for s in steps:
    vals = [fids[i]["snapshots"][final][f"{s}step"]["mean"] for i in order]
    holds = all(a < b for a, b in zip(vals, vals[1:]))
    lines.append(f"- {s}-step: {' < '.join(order)} {'holds' if holds else 'does NOT hold'} "
                 f"({', '.join(f'{v:.3f}' for v in vals)}).")
if "baseline" in inits and "cmt" in inits:
    for s in steps:
        cmt, base = (fids[i]["snapshots"][final][f"{s}step"]["mean"] for i in ("cmt", "baseline"))
        lines.append(f"- {s}-step: CMT + ECT {cmt:.3f} vs vanilla ECT at the same total budget {base:.3f}: "
                     f"CMT {'better' if cmt < base else 'NOT better'}.")
lines.append("")

# ---- the mid-trained model alone, scored as the official mid-training evaluation does
if args.midtrain_fid:
    mid = json.load(open(args.midtrain_fid))["snapshots"]["final"]
    lines.append(f"The mid-trained model alone (its EMA, sampled as the official mid-training evaluation "
                 f"does, 2-step sigma_mid = {cfg['sampling']['sigma_mid_midtrain']}): "
                 + ", ".join(f"{s}-step {fd_cell(mid[f'{s}step'])}" for s in steps)
                 + f" after {mid['images_seen']:,} mid-training images.")
    lines.append("")

# ---- the latent rows' E-LatentLPIPS backbone, the classifier its features come from
if args.latent_vgg_accuracy:
    acc = json.load(open(args.latent_vgg_accuracy))
    topk = {k: v for k, v in acc.items() if k.startswith("top") and k != "top1"}
    lines.append(f"Mid-training distance: E-LatentLPIPS with the latent VGG16 trained here as a classifier on the "
                 f"encoded latents ({acc['steps']:,} steps, {acc['epochs']:.3g} epochs): held-out top-1 "
                 f"{100 * acc['top1']:.2f} %" + "".join(f", {k[:3]}-{k[3:]} {100 * v:.2f} %" for k, v in topk.items())
                 + f" on {acc['held_out_images']:,} encoded images.")
    lines.append("")

# ---- cost per stage: wall time and peak memory from Snakemake's benchmarks
models = dict(zip(["train_teacher", "midtrain"] + [f"posttrain/{i}" for i in inits], args.models))


def bench(name, model=None):
    """(wall seconds, max RSS of the last job, jobs) of a benchmarked job, or None where it did not run
    here; a training job's `model` records the jobs of a sliced or resumed run (ledger.job_seconds)."""
    path = Path(args.benchmarks) / f"{name}.tsv"
    if not path.exists():
        return None
    with open(path) as f:
        row = next(csv.DictReader(f, delimiter="\t"))
    seconds, jobs = ledger.job_seconds(path, model)
    return seconds, float(row["max_rss"]) if row["max_rss"] not in ("-", "NA") else float("nan"), jobs


images, seconds = {}, {}
cost = ["## Cost per stage", "", "| stage | images seen | wall time (s) | max RSS (MB) |", "|---|---|---|---|"]
for name, model in models.items():
    meta = checkpoints.read_meta(model)
    if meta.get("source") == "import":  # an official snapshot: no training here
        name = "import_teacher"
        meta = {**meta, "images_seen": 0}
    b = bench(name, None if name == "import_teacher" else model)
    images[name], seconds[name] = meta["images_seen"], b[0] if b else None
    split = b is not None and b[2] > 1
    cost.append(f"| {name} | {meta['images_seen']:,} | "
                f"{(f'{b[0]:.0f}' + (f' ({b[2]} jobs)' if split else '')) if b else 'reused from the store'} | "
                f"{(f'{b[1]:.0f}' + (' (last job)' if split else '')) if b else ''} |")
shard_times = [bench(f"trajectory_shard/{p.stem}") for p in sorted(Path(args.benchmarks, "trajectory_shard").glob("*.tsv"))]
if shard_times:
    seconds["trajectories"] = sum(t[0] for t in shard_times)
    cost.append(f"| trajectory_shard x{len(shard_times)}"
                + (" (the ceiling's only: midtrain solves its own)" if cfg.get("midtrain_online") else "")
                + f" | | {seconds['trajectories']:.0f} | "
                f"{max(t[1] for t in shard_times):.0f} |")
cost.append("")

# ---- ours against the paper: one table, method by method
paper = cfg.get("paper") or {}
methods = paper.get("methods", {})


def our_budget(init):
    """Mimg per stage of this init's route and its measured seconds (None where reused)."""
    post = fids[init]["snapshots"][final]["images_seen"] / 1e6
    if init == "cmt":
        mid = images["midtrain"] / 1e6
        secs = [seconds.get("midtrain"), seconds.get(f"posttrain/{init}")]
        if not cfg.get("midtrain_online"):  # online, mid-training's time holds the trajectories; the shards are the ceiling's
            secs.append(seconds.get("trajectories"))
        return {"midtrain": mid, "posttrain": post}, secs
    return {"posttrain": post}, [seconds.get(f"posttrain/{init}")]


def mimg(budget):
    return " + ".join(f"{v:g} {k}" for k, v in budget.items()) + (f" = {sum(budget.values()):g}" if len(budget) > 1 else "")


def fid_cell(ours, theirs):
    if theirs is None:
        return [f"{ours:.3f}", "", ""]
    diff = f"{ours - theirs:+.2f}" if paper.get("comparable", True) else "n/a"
    return [f"{ours:.3f}", f"{theirs:g}", diff]


table = [["method", *[f"{s}-step {col}" for s in steps for col in ("ours", "paper", "difference")],
          "Mimg (ours)", "Mimg (paper)", "wall time (ours, s)"]]
for init in inits:
    entry = methods.get(init, {})
    ours = fids[init]["snapshots"][final]
    budget, secs = our_budget(init)
    known = [s for s in secs if s is not None]
    row = [entry.get("label", LABELS[init])]
    for s in steps:
        row += fid_cell(ours[f"{s}step"]["mean"], entry.get(f"{s}step"))
    row += [mimg(budget), mimg(entry["budget_mimg"]) if entry.get("budget_mimg") else "",
            f"{sum(known):.0f}" + ("" if len(known) == len(secs) else " (part reused)") if known else "reused"]
    table.append(row)
with atomic.atomic_path(args.table) as tmp:
    with open(tmp, "w", newline="") as f:
        csv.writer(f).writerows(table)
if methods:
    lines += ["## Ours and the paper's, method by method", "",
              f"Ours: mean over seed ranges, {fids[inits[0]]['features']} features. Paper: {paper.get('source', '')}."]
    if not paper.get("comparable", True):
        lines += ["", "The paper's numbers are for another data set and model size than this row's: they are "
                      "shown for orientation, and no difference is computed."]
    lines += ["", "| " + " | ".join(table[0]) + " |", "|" + "---|" * len(table[0])]
    lines += ["| " + " | ".join(row) + " |" for row in table[1:]]
    for extra in ("gpu_hours", "notes"):
        rows = [(methods[i].get("label", LABELS.get(i, i)), methods[i][extra]) for i in methods if extra in methods[i]]
        for label, value in rows:
            shown = ", ".join(f"{k} {v:g}" for k, v in value.items()) if isinstance(value, dict) else value
            lines.append(f"- Paper, {label}: {extra.replace('_', '-')} {shown}.")
    lines.append("")
lines += cost

# ---- the cost ledger: GPU-hours per stage of each init's route, beside the paper's
if cfg.get("gpus") is not None:
    costs = ledger.ledger(args.benchmarks, inits, cfg["gpus"], models=models)
    paper_hours = {i: methods[i]["gpu_hours"] for i in methods if "gpu_hours" in methods[i]}
    lines += ["## GPU-hours per stage", "",
              "Ours: each job's benchmarked wall time x the GPUs of its rule (the row's `resources`), jobs "
              "without a GPU counted in CPU hours. A training run sliced into several jobs or resumed counts "
              "every job its model file records (a job killed without saving, up to its last save). "
              "Sampling and FID are left out, as in the paper's table."
              + (f" Paper: {paper.get('source', '')}." if paper_hours else ""), ""]
    lines += ledger.table(costs, paper_hours, {i: methods.get(i, {}).get("label", LABELS.get(i, i)) for i in inits})
    lines.append("")

# ---- FD curve
fig, axes = plt.subplots(1, len(steps), figsize=(5.5 * len(steps), 4), squeeze=False)
for ax, s in zip(axes[0], steps):
    for init in inits:
        snaps = fids[init]["snapshots"]
        names = sorted(snaps)
        x = [snaps[n].get(IMAGES, snaps[n]["images_seen"]) / 1e3 for n in names]
        y = [snaps[n][f"{s}step"]["mean"] for n in names]
        ax.plot(x, y, marker="o", label=LABELS[init])
    ax.axhline(ceiling["mean"], color="grey", ls="--", label=f"teacher {ceiling['nfe']}-NFE solver")
    ax.set_yscale("log")
    ax.set_xlabel(X_LABEL)
    ax.set_ylabel(f"{s}-step FD")
    ax.set_title(f"{cfg['row']}: {s}-step")
    ax.legend(fontsize=8)
fig.tight_layout()
with atomic.atomic_path(args.curve) as tmp:
    fig.savefig(tmp, format="png", dpi=100)
plt.close(fig)

# ---- sample grids: one row block per init, 1-step then 2-step


def tile(images, pad=1):
    """[n, C, H, W] uint8 -> one [rows * (H + pad), cols * (W + pad), C] image with grey separators."""
    n, c, h, w = images.shape
    side = int(np.ceil(np.sqrt(n)))
    grid = np.full((side * (h + pad) + pad, side * (w + pad) + pad, c), 128, np.uint8)
    for k, img in enumerate(images):
        r, q = divmod(k, side)
        grid[pad + r * (h + pad):pad + r * (h + pad) + h, pad + q * (w + pad):pad + q * (w + pad) + w] = \
            img.transpose(1, 2, 0)
    return grid


fig, axes = plt.subplots(len(inits), len(steps), figsize=(3.2 * len(steps), 3.2 * len(inits)), squeeze=False)
for row, (init, path) in enumerate(zip(inits, args.samples)):
    with np.load(path) as data:
        for col, s in enumerate(steps):
            grid = tile(data[f"images_{s}step_r0"][:64])
            ax = axes[row][col]
            ax.imshow(grid[..., 0] if grid.shape[-1] == 1 else grid, cmap="gray", vmin=0, vmax=255,
                      interpolation="nearest")
            ax.set_title(f"{LABELS[init]}, {s}-step", fontsize=8)
            ax.axis("off")
fig.tight_layout()
with atomic.atomic_path(args.grids) as tmp:
    fig.savefig(tmp, format="png", dpi=100)
plt.close(fig)

if cfg.get("notes"):
    lines += ["## Notes on this row", "", cfg["notes"].strip(), ""]
lines += ["## Figures", "", f"![FD against training images]({Path(args.curve).name})", "",
          f"![Samples from each init after post-training]({Path(args.grids).name})", "",
          f"Generated {time.strftime('%Y-%m-%d %H:%M:%S')}."]
atomic.write_text(args.out, "\n".join(lines) + "\n")
print(f"[report] wrote {args.out}", flush=True)
