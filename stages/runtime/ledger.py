"""The cost ledger of a row: GPU-hours per stage of the method, from Snakemake's benchmark files.

A job's GPU-hours are its benchmark's wall seconds (column `s`) times the GPUs it held (the rule's
`gpu` resource, which stages/launch.py starts one process per) / 3600; a CPU job (gpu 0) counts its
wall hours apart. The stages are the paper's cost table's (ImageNet-256 MeanFlow row): pre-training
(the teacher), mid-training (the teacher's trajectories and CMT), post-training, each init's route
adding up to a total. Sampling and FID are evaluation, outside the table as in the paper.

A benchmark file holds the last attempt of its job: a training run sliced into several jobs
(checkpoint.slice_kimg) or resumed after a failure records its last slice only, and the ledger says
so rather than guessing the rest.
"""

import csv
import math
from pathlib import Path

# paper stage -> benchmark names (relative to the row's benchmarks folder, without .tsv; globs allowed)
ROUTES = {
    "cmt": {"pretrain": ["train_teacher"], "midtrain": ["trajectory_shard/*", "midtrain"],
            "posttrain": ["posttrain/cmt"]},
    "random": {"posttrain": ["posttrain/random"]},
}


def read_seconds(path):
    """Wall seconds of one Snakemake benchmark file (the sum over its rows: repeats of one job)."""
    with open(path) as f:
        rows = list(csv.DictReader(f, delimiter="\t"))
    if not rows or "s" not in rows[0]:
        raise ValueError(f"{path}: not a Snakemake benchmark file (no `s` column); delete it and rerun its job")
    seconds = [float(r["s"]) for r in rows]
    if not all(math.isfinite(s) and s >= 0 for s in seconds):
        raise ValueError(f"{path}: wall seconds {seconds} are not finite and non-negative")
    return sum(seconds)


def stage_cost(bench_dir, names, gpus_of):
    """{jobs, seconds, gpu_hours, cpu_hours} over the benchmark files `names` (globs) of one stage;
    None where none exists (a stage reused from the store, an imported teacher). `gpus_of(kind)`: the
    GPUs per job of a benchmark's first path part (train_teacher, trajectory_shard, midtrain, posttrain)."""
    jobs = seconds = gpu_hours = cpu_hours = 0.0
    found = False
    for name in names:
        for path in sorted(Path(bench_dir).glob(f"{name}.tsv")):
            found = True
            s = read_seconds(path)
            gpus = int(gpus_of(Path(name).parts[0]) or 0)
            jobs, seconds = jobs + 1, seconds + s
            if gpus:
                gpu_hours += s * gpus / 3600
            else:
                cpu_hours += s / 3600
    if not found:
        return None
    return {"jobs": int(jobs), "seconds": seconds, "gpu_hours": gpu_hours, "cpu_hours": cpu_hours}


def ledger(bench_dir, inits, gpus):
    """init -> {stage -> cost or None, "total" -> summed cost of the stages found}; `gpus`: benchmark
    kind (train_teacher, trajectory_shard, midtrain, posttrain) -> GPUs per job (the row's resources)."""
    out = {}
    for init in inits:
        route = {stage: stage_cost(bench_dir, names, lambda r: gpus.get(r, 0))
                 for stage, names in ROUTES.get(init, {"posttrain": [f"posttrain/{init}"]}).items()}
        known = [c for c in route.values() if c is not None]
        route["total"] = {k: sum(c[k] for c in known) for k in ("jobs", "seconds", "gpu_hours", "cpu_hours")}
        out[init] = route
    return out


def table(costs, paper_hours, labels):
    """Markdown lines: per init and stage, our GPU-hours (CPU hours where the jobs had no GPU) beside
    the paper's (`paper_hours`: init -> stage -> hours)."""
    lines = ["| route | stage | jobs | ours: GPU-hours | ours: CPU hours | paper: GPU-hours |",
             "|---|---|---|---|---|---|"]
    for init, route in costs.items():
        for stage, cost in route.items():
            theirs = (paper_hours.get(init) or {}).get(stage)
            theirs = "" if theirs is None else f"{theirs:g}"
            if cost is None:
                lines.append(f"| {labels.get(init, init)} | {stage} | | not run here (store or import) | | {theirs} |")
                continue
            name = "**total**" if stage == "total" else stage
            lines.append(f"| {labels.get(init, init)} | {name} | {cost['jobs']} | "
                         f"{cost['gpu_hours']:.3g} | {cost['cpu_hours']:.3g} | {theirs} |")
    return lines
