"""The jobs that trained one run, for the cost ledger (stages/reporting/ledger.py).

A run sliced by checkpoint.slice_kimg, stopped by a signal (a SLURM time limit, a preemption) or
killed is trained by several jobs: Snakemake attempts of one job, or jobs of several invocations.
Snakemake's benchmark file of the job keeps the last attempt only, so each training job records
itself: its wall seconds, from its start (stages.launch's, which starts the stage's processes,
else the stage's call of stages.core.cli.start) to the moment it saved its state and exited or
wrote the model; the steps [from, to] it trained; how it ended; and what it computed on, nodes
included (stages.launch says how many: CMT_NODES). The list travels from job to
job in the training state (resume.py) and ends in the model's .json as `jobs`, oldest first:

    "jobs": [{"wall_seconds": 3571.2, "steps": [0, 5000], "ended": "slice", "device": "cuda", "gpus": 4, ...},
             {"wall_seconds": 2204.9, "steps": [5000, 8000], "ended": "signal", "signal": "SIGUSR1", ...},
             {"wall_seconds": 1502.0, "steps": [8000, 10000], "ended": "finished", ...}]

Each record also says what the job computed on (`device_of`): `device` (cuda or cpu), `processes`
(over all nodes), `gpus` (one per process on CUDA, 0 on a CPU), `nodes` and `gpu_model`; its
GPU-hours are wall_seconds x gpus / 3600 = nodes x GPUs per node x wall. Records written before
the device was recorded have none of these keys (the ledger then takes the rule's resources, on
the record's `nodes` where it has them, else one node).

`ended`:
- slice: trained its checkpoint.slice_kimg, saved and exited 75;
- signal: SIGTERM, SIGUSR1 or SIGINT (`signal` names it): saved after its step and exited;
- lost: stopped without saving (SIGKILL, out of memory, a crash, a lost node). Such a job cannot
  record its end: its record is the one its last periodic save wrote (checkpoint.every_steps,
  every_minutes), wall seconds and steps up to that save. The time it ran after that save is not
  counted anywhere, and its steps after it are trained again by the next job, which starts from
  that save. A job killed before its first save leaves no record at all;
- finished: wrote the model.
Each job starts where the state it resumed was saved and its record ends at its last save, so the
steps of the records follow one another without a gap from 0 to the run's last step. A run without
a state folder (no --state-dir) is one job.
"""

import math
import os
import time

from stages.core import cli

# what a saved state holds for the job that saved it while it was still training; the next job to
# read it finds that job ended without another save: lost
RUNNING = "running"
ENDINGS = ("slice", "signal", "lost", "finished")
DEVICE_KEYS = ("device", "processes", "gpus", "nodes")


def device_of(accelerator):
    """What a job's processes compute on: one device each (stages/launch.py starts one process per
    GPU), over the nodes stages.launch started it on (CMT_NODES), of LOCAL_WORLD_SIZE processes each
    (torchrun's, accelerate's launcher)."""
    processes = accelerator.num_processes
    per_node = int(os.environ.get("LOCAL_WORLD_SIZE") or processes)
    device = accelerator.device
    record = {"device": device.type, "processes": processes, "gpus": processes if device.type == "cuda" else 0,
              "nodes": max(cli.launched_nodes(), processes // max(per_node, 1))}
    if device.type == "cuda":
        import torch

        record["gpu_model"] = torch.cuda.get_device_name(device)
    return record


class JobLog:
    """The records of the jobs before this one (from the training state) and this job's clock.

    `started`: this job's start in seconds since the epoch (stages.core.cli.started()); None,
    the time the log is made. `nodes`: the nodes this job runs on; None, what stages.launch says."""

    def __init__(self, started=None, nodes=None):
        self.started = time.time() if started is None else float(started)
        self.before = []
        self.first_step = 0
        # device_of(accelerator), set by the training job; until then the nodes stages.launch says
        self.device = {"nodes": cli.launched_nodes() if nodes is None else nodes}

    def resume(self, records, step):
        """This job continues a state saved at `step` holding `records`: a record still running
        is a job that never saved again."""
        self.before = [{**r, "ended": "lost"} if r["ended"] == RUNNING else dict(r) for r in records]
        self.first_step = step

    def through(self, step, ended, signal=None):
        """Every job's record, this one's up to now at `step` with `ended` (an ENDINGS value, or
        RUNNING for a save the job trains on from)."""
        if ended not in ENDINGS + (RUNNING,):
            raise ValueError(f"job ended {ended!r}: expected one of {ENDINGS + (RUNNING,)}")
        this = {"wall_seconds": max(0.0, time.time() - self.started), "steps": [self.first_step, step],
                "ended": ended, **self.device}
        if signal is not None:
            this["signal"] = signal
        return self.before + [this]


def check(records, where):
    """`records` as a model's .json holds them (`where` names the file), or ValueError naming the
    record that is not one."""
    if not isinstance(records, list) or not records:
        raise ValueError(f"{where}: `jobs` is {records!r}, not a list of job records; rerun the rule that made it")
    for i, r in enumerate(records):
        ok = (isinstance(r, dict) and isinstance(r.get("wall_seconds"), (int, float))
              and math.isfinite(r["wall_seconds"]) and r["wall_seconds"] >= 0
              and isinstance(r.get("steps"), list) and len(r["steps"]) == 2
              and all(isinstance(s, int) for s in r["steps"]) and 0 <= r["steps"][0] <= r["steps"][1]
              and r.get("ended") in ENDINGS
              and all(isinstance(r.get(k, 0), int) and r.get(k, 0) >= 0 for k in DEVICE_KEYS[1:])
              and nodes(r) is not None and r.get("device", "cpu") in ("cpu", "cuda", "mps", "xpu"))
        if not ok:
            raise ValueError(f"{where}: jobs[{i}] = {r!r} is not a job record (wall_seconds >= 0, steps "
                             f"[from, to], ended one of {ENDINGS}, and where given a device, processes, gpus and "
                             "nodes as counts, nodes >= 1 where given); rerun the rule that made it")
    return records


def nodes(record):
    """The nodes a job record ran on (1 for a record without them), None where it is no number of nodes."""
    n = record.get("nodes", 1)
    return n if isinstance(n, int) and not isinstance(n, bool) and n >= 1 else None
