"""The row's tables in the report: Fréchet distances per init and sampler, the inits on their own,
the order of the inits, the cost per stage and ours beside the paper's, method by method. Each
function takes what it shows and returns markdown lines (or table rows)."""

import csv
from pathlib import Path

from stages.reporting import ledger

# How the report names each post-training init (a row's paper.methods.<init>.label overrides it)
LABELS = {
    "cm": {"cmt": "CMT init (ours)", "teacher": "teacher (diffusion) init", "random": "random init",
           "baseline": "vanilla ECT from the teacher (equal total budget)"},
    "mf": {"cmt": "CMT-MF init (ours)", "random": "random init (MeanFlow from scratch)"},
}
METHODS = {"ect": "ECT", "ecd": "ECD (consistency distillation)", "ect_snr": "ECT (the ImageNet-512 code's weighting)"}


def fd_cell(summary):
    return f"{summary['mean']:.3f} / {summary['min']:.3f}"


def results(fids, inits, steps, final, labels, ceiling, family):
    """The main table: each init's final snapshot, then the teacher's own solver as the ceiling."""
    total = family == "mf"  # the MeanFlow rows compare inits at equal total images (mid + post)
    lines = ["| post-training init | " + " | ".join(f"{s}-step FD" for s in steps) + " | images seen (post) |"
             + (" images seen (mid + post) |" if total else ""),
             "|---|" + "---|" * (len(steps) + 1 + total)]
    for init in inits:
        snap = fids[init]["snapshots"][final]
        lines.append(f"| {labels[init]} | " + " | ".join(fd_cell(snap[f'{s}step']) for s in steps)
                     + f" | {snap['images_seen']:,} |"
                     + (f" {snap.get('images_seen_total', snap['images_seen']):,} |" if total else ""))
    lines.append(f"| teacher's own {ceiling['nfe']}-NFE solver (ceiling) | "
                 + " | ".join(fd_cell(ceiling) for _ in steps) + " | |" + (" |" if total else ""))
    return lines


def starting_points(fids, inits, steps, labels):
    """One line: each init's FD before any post-training (its first snapshot, step 0)."""
    start = {init: fids[init]["snapshots"][sorted(fids[init]["snapshots"])[0]] for init in inits}
    return ["Each initialisation on its own (post-training step 0, i.e. before any post-training): "
            + "; ".join(f"{labels[i]} " + ", ".join(f"{s}-step {start[i][f'{s}step']['mean']:.3f}" for s in steps)
                        for i in inits) + "."]


def ordering(fids, inits, steps, final):
    """The paper's claim, stated rather than assumed: cmt < teacher < random at the final snapshot, and
    CMT against vanilla ECT at equal total budget where the row runs that baseline."""
    order = [i for i in ("cmt", "teacher", "random") if i in inits]
    lines = []
    for s in steps:
        vals = [fids[i]["snapshots"][final][f"{s}step"]["mean"] for i in order]
        holds = all(a < b for a, b in zip(vals, vals[1:], strict=False))
        lines.append(f"- {s}-step: {' < '.join(order)} {'holds' if holds else 'does NOT hold'} "
                     f"({', '.join(f'{v:.3f}' for v in vals)}).")
    if "baseline" in inits and "cmt" in inits:
        for s in steps:
            cmt, base = (fids[i]["snapshots"][final][f"{s}step"]["mean"] for i in ("cmt", "baseline"))
            lines.append(f"- {s}-step: CMT + ECT {cmt:.3f} vs vanilla ECT at the same total budget {base:.3f}: "
                         f"CMT {'better' if cmt < base else 'NOT better'}.")
    return lines


def midtrained_alone(mid, steps, sigma_mid):
    """The mid-trained model alone, scored as the official mid-training evaluation does."""
    return [f"The mid-trained model alone (its EMA, sampled as the official mid-training evaluation does, 2-step "
            f"sigma_mid = {sigma_mid}): " + ", ".join(f"{s}-step {fd_cell(mid[f'{s}step'])}" for s in steps)
            + f" after {mid['images_seen']:,} mid-training images."]


def latent_vgg(accuracy):
    """The latent rows' E-LatentLPIPS backbone: the classifier its features come from."""
    topk = {k: v for k, v in accuracy.items() if k.startswith("top") and k != "top1"}
    return [f"Mid-training distance: E-LatentLPIPS with the latent VGG16 trained here as a classifier on the "
            f"encoded latents ({accuracy['steps']:,} steps, {accuracy['epochs']:.3g} epochs): held-out top-1 "
            f"{100 * accuracy['top1']:.2f} %" + "".join(f", {k[:3]}-{k[3:]} {100 * v:.2f} %" for k, v in topk.items())
            + f" on {accuracy['held_out_images']:,} encoded images."]


def benchmark(bench_dir, name, model=None):
    """(wall seconds, max RSS of the last job, jobs) of a benchmarked job, or None where it did not run
    here; a training job's `model` records the jobs of a sliced or resumed run (ledger.job_seconds)."""
    path = Path(bench_dir) / f"{name}.tsv"
    if not path.exists():
        return None
    with open(path) as f:
        row = next(csv.DictReader(f, delimiter="\t"))
    seconds, jobs = ledger.job_seconds(path, model)
    return seconds, float(row["max_rss"]) if row["max_rss"] not in ("-", "NA") else float("nan"), jobs


def cost(models, metas, bench_dir, online=False):
    """(lines of the cost-per-stage table, images seen per stage, wall seconds per stage): `models`
    maps each training stage's benchmark name to its model file, `metas` to its model.json."""
    images, seconds = {}, {}
    lines = ["## Cost per stage", "", "| stage | images seen | wall time (s) | max RSS (MB) |", "|---|---|---|---|"]
    for name, model in models.items():
        meta = metas[name]
        if meta.get("source") == "import":  # an official snapshot: no training here
            name, meta, model = "import_teacher", {**meta, "images_seen": 0}, None
        b = benchmark(bench_dir, name, model)
        images[name], seconds[name] = meta["images_seen"], b[0] if b else None
        split = b is not None and b[2] > 1
        lines.append(f"| {name} | {meta['images_seen']:,} | "
                     f"{(f'{b[0]:.0f}' + (f' ({b[2]} jobs)' if split else '')) if b else 'reused from the store'} | "
                     f"{(f'{b[1]:.0f}' + (' (last job)' if split else '')) if b else ''} |")
    shards = [benchmark(bench_dir, f"trajectory_shard/{p.stem}")
              for p in sorted(Path(bench_dir, "trajectory_shard").glob("*.tsv"))]
    if shards:
        seconds["trajectories"] = sum(t[0] for t in shards)
        lines.append(f"| trajectory_shard x{len(shards)}"
                     + (" (the ceiling's only: midtrain solves its own)" if online else "")
                     + f" | | {seconds['trajectories']:.0f} | {max(t[1] for t in shards):.0f} |")
    return lines + [""], images, seconds


def mimg(budget):
    total = f" = {sum(budget.values()):g}" if len(budget) > 1 else ""
    return " + ".join(f"{v:g} {k}" for k, v in budget.items()) + total


def route_budget(init, post_images, images, seconds, online):
    """({stage: Mimg} of an init's route, [its stages' seconds, None where reused])."""
    if init == "cmt":
        secs = [seconds.get("midtrain"), seconds.get(f"posttrain/{init}")]
        if not online:  # online, mid-training's time holds the trajectories; the shards are the ceiling's
            secs.append(seconds.get("trajectories"))
        return {"midtrain": images["midtrain"] / 1e6, "posttrain": post_images / 1e6}, secs
    return {"posttrain": post_images / 1e6}, [seconds.get(f"posttrain/{init}")]


def against_paper(fids, inits, steps, final, labels, paper, images, seconds, online):
    """Rows of results.csv: per init, ours and the paper's FD per sampler with the difference, the
    budgets in Mimg and our wall time. A row of another data set and model is not compared."""
    methods = paper.get("methods", {})
    table = [["method", *[f"{s}-step {col}" for s in steps for col in ("ours", "paper", "difference")],
              "Mimg (ours)", "Mimg (paper)", "wall time (ours, s)"]]
    for init in inits:
        entry = methods.get(init, {})
        ours = fids[init]["snapshots"][final]
        budget, secs = route_budget(init, ours["images_seen"], images, seconds, online)
        known = [s for s in secs if s is not None]
        row = [entry.get("label", labels[init])]
        for s in steps:
            theirs = entry.get(f"{s}step")
            if theirs is None:
                row += [f"{ours[f'{s}step']['mean']:.3f}", "", ""]
            else:
                diff = f"{ours[f'{s}step']['mean'] - theirs:+.2f}" if paper.get("comparable", True) else "n/a"
                row += [f"{ours[f'{s}step']['mean']:.3f}", f"{theirs:g}", diff]
        row += [mimg(budget), mimg(entry["budget_mimg"]) if entry.get("budget_mimg") else "",
                f"{sum(known):.0f}" + ("" if len(known) == len(secs) else " (part reused)") if known else "reused"]
        table.append(row)
    return table


def against_paper_lines(table, paper, features, labels):
    """The results.csv rows as markdown, with the paper's source, GPU-hours and notes per method."""
    methods = paper.get("methods", {})
    if not methods:
        return []
    lines = ["## Ours and the paper's, method by method", "",
             f"Ours: mean over seed ranges, {features} features. Paper: {paper.get('source', '')}."]
    if not paper.get("comparable", True):
        lines += ["", "The paper's numbers are for another data set and model size than this row's: they are "
                      "shown for orientation, and no difference is computed."]
    lines += ["", "| " + " | ".join(table[0]) + " |", "|" + "---|" * len(table[0])]
    lines += ["| " + " | ".join(row) + " |" for row in table[1:]]
    for extra in ("gpu_hours", "notes"):
        for init, entry in methods.items():
            if extra in entry:
                value = entry[extra]
                shown = ", ".join(f"{k} {v:g}" for k, v in value.items()) if isinstance(value, dict) else value
                label = entry.get("label", labels.get(init, init))
                lines.append(f"- Paper, {label}: {extra.replace('_', '-')} {shown}.")
    return lines + [""]


def gpu_hours(bench_dir, inits, gpus, models, paper, labels, receipts=None):
    """The cost ledger: GPU-hours per stage of each init's route beside the paper's."""
    methods = paper.get("methods", {})
    costs = ledger.ledger(bench_dir, inits, gpus, models=models, receipts=receipts)
    paper_hours = {i: methods[i]["gpu_hours"] for i in methods if "gpu_hours" in methods[i]}
    lines = ["## GPU-hours per stage", "",
             "Ours: each job's benchmarked wall time x the GPUs it used as it recorded them (a training job in its "
             "model file, a trajectory shard in its store receipt; a job recorded before devices were: the GPUs of "
             "its rule in the row's `resources` on each of its nodes), jobs that used none counted in CPU hours. "
             "A training run sliced into several jobs or resumed counts every job its model file records (a job "
             "killed without saving, up to its last save). "
             "Sampling and FID are left out, as in the paper's table."
             + (f" Paper: {paper.get('source', '')}." if paper_hours else ""), ""]
    lines += ledger.table(costs, paper_hours, {i: methods.get(i, {}).get("label", labels.get(i, i)) for i in inits})
    return lines + [""]


def posthoc_ema(posthoc, own, steps, labels):
    """The post-hoc EMAs of each run that keeps power-EMA profiles: FD (mean over seed ranges) against
    the width sigma_rel, the best in bold, beside the run's own per-step EMA (`own`: init -> its final
    FD entry) at its equivalent width; then how well the snapshots' profiles fit each width's."""
    def widths(fid):
        snaps = fid["snapshots"]
        return [snaps[n] for n in sorted(snaps, key=lambda n: snaps[n]["posthoc_ema"]["sigma_rel"])]

    header = [e["posthoc_ema"]["sigma_rel"] for e in widths(next(iter(posthoc.values())))]
    lines = ["Post-hoc EMA (EDM2's power-function profiles): the EMA of each width sigma_rel synthesised from the "
             "snapshots of its run's profiles at the step given; FD (mean over seed ranges), the best in bold, and "
             "the run's own per-step EMA (the model file's, at the run's end) at its equivalent width.", "",
             "| run | step | sampler | " + " | ".join(f"{w:g}" for w in header) + " | best | own EMA |",
             "|---|---|---|" + "---|" * (len(header) + 2)]
    summary, fits = [], []
    for init, fid in posthoc.items():
        entries = widths(fid)
        info = [e["posthoc_ema"] for e in entries]
        if [i["sigma_rel"] for i in info] != header:
            raise ValueError(f"posthoc-{init}: widths {[i['sigma_rel'] for i in info]}, other runs' {header}")
        own_width = info[0]["per_step_sigma_rel"]
        for s in steps:
            fd = [e[f"{s}step"]["mean"] for e in entries]
            best = min(range(len(fd)), key=fd.__getitem__)
            cells = [f"**{v:.3f}**" if k == best else f"{v:.3f}" for k, v in enumerate(fd)]
            mine = own[init][f"{s}step"]["mean"]
            lines.append(f"| {labels[init]} | {info[0]['step']:,} | {s}-step | " + " | ".join(cells)
                         + f" | {header[best]:g} | {mine:.3f} at {own_width:.3f} |")
            summary.append(f"- {labels[init]}, {s}-step: the best width {header[best]:g} gives {fd[best]:.3f}; the "
                           f"run's own EMA (width {own_width:.3f}) {mine:.3f}, {100 * (mine / fd[best] - 1):+.1f} % "
                           "against the best.")
        fits.append(f"- {labels[init]}: {info[0]['snapshots']} snapshots of the profiles "
                    f"{', '.join(f'{p:g}' for p in info[0]['profiles'])}; "
                    + ", ".join(f"{i['sigma_rel']:g}: {i['fit_error']:.1e} ({i['mass']:.4f})" for i in info) + ".")
    lines += ["", "Fit of each width's profile by the snapshots' (relative L2 error; the least-squares coefficients' "
              "sum before they are rescaled to 1):", ""] + fits + [""]
    return lines + summary
