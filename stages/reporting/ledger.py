"""The cost ledger of a row: GPU-hours per stage of the method, from Snakemake's benchmark files.

A job's GPU-hours are its benchmark's wall seconds (column `s`) times the GPUs it used / 3600; a job
that used none counts its wall hours apart, as CPU hours. The GPUs a job used are what it recorded:
a training job in its model file's job records (`gpus`, stages/training/job_log.py: a digits run on
a CPU used none, whatever its rule asked for), a trajectory shard in its store receipt (the device
its stage computed on, stages/core/provenance.py; a receipt of a shard made elsewhere marks a job
that only read the store's record). Where a job recorded nothing (made before jobs recorded their
device), the rule's `gpu` resource stands for it, which stages/launch.py starts one process per on
each node, times the nodes the record names (one where it names none).

The stages are the paper's cost table's (ImageNet-256 MeanFlow row): pre-training
(the teacher), mid-training (the teacher's trajectories and CMT), post-training, each init's route
adding up to a total. Sampling and FID are evaluation, outside the table as in the paper.

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
import json
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
    each = job_devices(bench_path, model)
    return sum(s for s, _, _ in each), len(each)


def job_devices(bench_path, model=None, rule_gpus=0):
    """[(wall seconds, GPUs, nodes)] of each job behind one benchmark: the jobs a training `model`
    records (several for a sliced or resumed run, each with its own seconds), else the benchmark's
    seconds; GPUs and nodes as each job recorded them, else `rule_gpus` on one node."""
    jobs = recorded_jobs(model) if model is not None else None
    if jobs is not None and len(jobs) > 1:
        return [(j["wall_seconds"], used_gpus(j, rule_gpus), job_log.nodes(j)) for j in jobs]
    if jobs:
        return [(read_seconds(bench_path), used_gpus(jobs[0], rule_gpus), job_log.nodes(jobs[0]))]
    return [(read_seconds(bench_path), rule_gpus, 1)]


def used_gpus(record, rule_gpus):
    """The GPUs a job record says its job used; for a record that says none, the rule's GPUs per node
    times the record's nodes."""
    return record["gpus"] if "gpus" in record else rule_gpus * job_log.nodes(record)


def receipt_gpus(receipt):
    """The GPUs the job that wrote a store `receipt` used: those its stage computed on where this job
    made the item, 0 where it only read the store's record; None where the record kept no device."""
    receipt = json.loads(Path(receipt).read_text())
    if not receipt.get("made_by_this_job"):
        return 0
    env = (receipt.get("made") or {}).get("env") or {}
    if "device" not in env:
        return None
    return len(env.get("gpus") or []) if env["device"] == "cuda" else 0


def stage_cost(bench_dir, names, gpus_of, models=None, receipts=None):
    """{jobs, seconds, gpu_hours, cpu_hours, split} over the benchmark files `names` (globs) of one
    stage; None where none exists (a stage reused from the store, an imported teacher). `gpus_of(kind)`:
    the GPUs per job of a benchmark's first path part (train_teacher, trajectory_shard, midtrain,
    posttrain), the rule's resources, for jobs that recorded none. `models`: benchmark name -> the model
    file its job made (job_devices); `receipts`: the row's receipts folder, whose shards/<id>.json say
    what each trajectory_shard/<id> job used; `split`: name -> jobs, of the benchmarks that stand for
    several jobs."""
    jobs = seconds = gpu_hours = cpu_hours = 0.0
    split = {}
    found = False
    for name in names:
        for path in sorted(Path(bench_dir).glob(f"{name}.tsv")):
            found = True
            bench_name = path.relative_to(bench_dir).with_suffix("").as_posix()
            rule_gpus = int(gpus_of(Path(name).parts[0]) or 0)
            receipt = Path(receipts or "", "shards", f"{path.stem}.json")
            if receipts is not None and bench_name.startswith("trajectory_shard/") and receipt.exists():
                recorded = receipt_gpus(receipt)
                rule_gpus = rule_gpus if recorded is None else recorded
            each = job_devices(path, (models or {}).get(bench_name), rule_gpus)
            if len(each) > 1:
                split[bench_name] = len(each)
            jobs += len(each)
            for s, gpus, nodes in each:
                seconds += s
                if gpus:
                    gpu_hours += s * gpus / 3600
                else:  # a job on several nodes without GPUs held each node's CPUs
                    cpu_hours += s * nodes / 3600
    if not found:
        return None
    return {"jobs": int(jobs), "seconds": seconds, "gpu_hours": gpu_hours, "cpu_hours": cpu_hours, "split": split}


def ledger(bench_dir, inits, gpus, models=None, receipts=None):
    """init -> {stage -> cost or None, "total" -> summed cost of the stages found}; `gpus`: benchmark
    kind (train_teacher, trajectory_shard, midtrain, posttrain) -> GPUs per job (the row's resources,
    for jobs that recorded none); `models`: benchmark name (train_teacher, midtrain, posttrain/<init>)
    -> the model file its job made, whose recorded jobs say their seconds and GPUs (job_devices);
    `receipts`: the row's receipts folder (the trajectory shards' devices, stage_cost)."""
    out = {}
    for init in inits:
        route = {stage: stage_cost(bench_dir, names, lambda r: gpus.get(r, 0), models, receipts)
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
