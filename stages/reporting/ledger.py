"""The cost ledger of a row: GPU-hours per stage of the method, from Snakemake's benchmark files.

A job's GPU-hours are its benchmark's wall seconds (column `s`) times the GPUs it held (the rule's
`gpu` resource, which stages/launch.py starts one process per, on each node) times its nodes (what
the job's record in the model file says, stages/training/job_log.py; 1 where none says) / 3600; a
CPU job (gpu 0) counts its wall hours apart. The stages are the paper's cost table's (ImageNet-256
MeanFlow row): pre-training (the teacher), mid-training (the teacher's trajectories and CMT),
post-training, each init's route adding up to a total. Sampling and FID are evaluation, outside
the table as in the paper.

A benchmark file holds the last attempt of its job only, so a training run sliced into several jobs
(checkpoint.slice_kimg), stopped by a signal (a SLURM time limit, a preemption) or resumed after a
kill is costed from the jobs its model file records (`jobs`, stages/training/job_log.py): where the
model of a training stage (train_teacher, midtrain, posttrain/<init>) records more than one job, the
stage's seconds are the sum of their wall seconds, and the table counts each of them as a job. The
benchmark stays the source of an unsliced job and of the jobs that are not training (trajectory
shards). What the records cannot hold is not counted: a job killed without saving (SIGKILL, out of
memory) counts up to its last save, and one killed before its first save not at all.
"""

import csv
import math
from pathlib import Path

from stages.files import checkpoints
from stages.training import job_log

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


def recorded_jobs(model):
    """The jobs a training stage's model file records (its .json's `jobs`, checked), or None where it
    records none (a model made before jobs were recorded, an imported one)."""
    meta = checkpoints.read_meta(model)
    if "jobs" not in meta:
        return None
    return job_log.check(meta["jobs"], checkpoints.json_path(model))


def job_seconds(bench_path, model=None):
    """(wall seconds, jobs) of one benchmarked job: with the `model` file a training job made and
    more than one job recorded in it (a sliced or resumed run), the sum of their wall seconds and
    their number; else the benchmark's seconds, one job."""
    seconds, jobs, _ = job_cost(bench_path, model)
    return seconds, jobs


def job_cost(bench_path, model=None):
    """(wall seconds, jobs, node-seconds) of one benchmarked job as job_seconds counts it; node-seconds
    weigh each job's seconds by the nodes its record says it ran on (one where none says)."""
    jobs = recorded_jobs(model) if model is not None else None
    if jobs is not None and len(jobs) > 1:
        return (sum(j["wall_seconds"] for j in jobs), len(jobs),
                sum(j["wall_seconds"] * job_log.nodes(j) for j in jobs))
    seconds = read_seconds(bench_path)
    return seconds, 1, seconds * (job_log.nodes(jobs[0]) if jobs else 1)


def stage_cost(bench_dir, names, gpus_of, models=None):
    """{jobs, seconds, gpu_hours, cpu_hours, split} over the benchmark files `names` (globs) of one
    stage; None where none exists (a stage reused from the store, an imported teacher). `gpus_of(kind)`:
    the GPUs per job and node of a benchmark's first path part (train_teacher, trajectory_shard, midtrain,
    posttrain). `models`: benchmark name -> the model file its job made (job_seconds); `split`: name
    -> jobs, of the benchmarks that stand for several jobs."""
    jobs = seconds = gpu_hours = cpu_hours = 0.0
    split = {}
    found = False
    for name in names:
        for path in sorted(Path(bench_dir).glob(f"{name}.tsv")):
            found = True
            bench_name = path.relative_to(bench_dir).with_suffix("").as_posix()
            s, n, node_s = job_cost(path, (models or {}).get(bench_name))
            if n > 1:
                split[bench_name] = n
            gpus = int(gpus_of(Path(name).parts[0]) or 0)
            jobs, seconds = jobs + n, seconds + s
            if gpus:
                gpu_hours += node_s * gpus / 3600
            else:
                cpu_hours += node_s / 3600
    if not found:
        return None
    return {"jobs": int(jobs), "seconds": seconds, "gpu_hours": gpu_hours, "cpu_hours": cpu_hours, "split": split}


def ledger(bench_dir, inits, gpus, models=None):
    """init -> {stage -> cost or None, "total" -> summed cost of the stages found}; `gpus`: benchmark
    kind (train_teacher, trajectory_shard, midtrain, posttrain) -> GPUs per job (the row's resources);
    `models`: benchmark name (train_teacher, midtrain, posttrain/<init>) -> the model file its job
    made, whose recorded jobs cost a sliced or resumed run (job_seconds)."""
    out = {}
    for init in inits:
        route = {stage: stage_cost(bench_dir, names, lambda r: gpus.get(r, 0), models)
                 for stage, names in ROUTES.get(init, {"posttrain": [f"posttrain/{init}"]}).items()}
        known = [c for c in route.values() if c is not None]
        route["total"] = {k: sum(c[k] for c in known) for k in ("jobs", "seconds", "gpu_hours", "cpu_hours")}
        out[init] = route
    return out


def table(costs, paper_hours, labels):
    """Markdown lines: per init and stage, our GPU-hours (CPU hours where the jobs had no GPU) beside
    the paper's (`paper_hours`: init -> stage -> hours). A stage's jobs say which training ran as
    several jobs (slices, resumes)."""
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
            jobs = str(cost["jobs"])
            if cost.get("split") and stage != "total":
                jobs += " (" + ", ".join(f"{k} in {n} jobs" for k, n in cost["split"].items()) + ")"
            lines.append(f"| {labels.get(init, init)} | {name} | {jobs} | "
                         f"{cost['gpu_hours']:.3g} | {cost['cpu_hours']:.3g} | {theirs} |")
    return lines
