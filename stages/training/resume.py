"""Training state for auto-resume: save it often, atomically, outside the rule's outputs.

Snakemake deletes the outputs of a failed job, so a stage keeps its state in a folder of its own
(the rule passes `--state-dir`). A state is one folder `step-<step:09d>/` holding
`state.safetensors` (network `net.*`, EMA `ema.*`, the further averages of an EMA that keeps some
under their names, e.g. the power-function profiles `power_ema.<i>.*`, optimizer tensors
`optimizer.<param>.<name>`)
and `state.json` (step, images, data-stream position, the optimizer's other fields, the identity
the run was started with, the training seconds so far and the record of every job that trained
the run, job_log.py). It is written into a temporary folder and renamed: a folder named
`step-*` is complete, and the previous one is removed only after the new one is in place.

Nothing random needs saving: every draw is folded from (seed, step, rank, purpose) and the
schedules are functions of the step. Tensors load through safetensors and the rest is JSON, so
restoring a state executes no code from the file.
"""

import fcntl
import json
import os
import shutil
import signal
import socket
import time
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from stages.files import atomic, checkpoints
from stages.training.job_log import RUNNING, JobLog

FORMAT = "cmt-train-state/1"
# Exit codes of a job that stopped on purpose after saving its state (the rerun continues):
# a signal exits as a process killed by it would (128 + signal number), a finished slice with
# EX_TEMPFAIL ("temporary failure, try again").
EXIT_SLICE = 75
# SLURM sends SIGTERM (or the SIGUSR1 its --signal asks for) before a time limit or preemption;
# Ctrl-C sends SIGINT to Snakemake's whole process group, jobs included, and left to Python it
# is a KeyboardInterrupt that loses every step since the last save.
SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)


class Interrupted(SystemExit):
    """The run stopped after saving its state; a rerun of the same command continues it."""


def flatten(obj, prefix=""):
    """{'a': {'b': 1}} -> {'a.b': 1}; lists stay values."""
    if isinstance(obj, dict):
        out = {}
        for key, value in obj.items():
            out.update(flatten(value, f"{prefix}{key}."))
        return out
    return {prefix[:-1]: obj}


def differences(saved, current):
    """Dotted keys whose values differ between two nested dicts, as 'key: saved -> current' lines."""
    a, b = flatten(saved), flatten(current)
    missing = object()
    lines = []
    for key in sorted(set(a) | set(b)):
        old, new = a.get(key, missing), b.get(key, missing)
        if old != new:
            show = lambda v: "(absent)" if v is missing else json.dumps(v)  # noqa: E731
            lines.append(f"{key}: {show(old)} in the state, {show(new)} now")
    return lines


class TrainState:
    """The resumable state of one training stage.

    `identity` is everything a resumed run must share with the run that saved the state (the
    stage's configuration and the digests of its inputs); a difference stops the resume with the
    differing keys listed. `every_steps`, `every_minutes` and `slice_kimg` come from the config's
    `checkpoint` section and may change between jobs. `started`: this job's start in seconds since
    the epoch (stages.core.cli.started(); None: now), from which `log` times it.
    """

    def __init__(self, folder, *, stage, identity, every_steps=None, every_minutes=None, slice_kimg=None,
                 started=None):
        self.dir = Path(folder)
        self.stage = stage
        self.identity = json.loads(json.dumps(identity))  # what JSON would give back on restore
        self.every_steps = every_steps
        self.every_seconds = None if every_minutes is None else 60.0 * every_minutes
        self.slice_images = None if slice_kimg is None else 1000.0 * slice_kimg
        self.last_save_time = time.monotonic()
        self.signal_received = None
        self.log = JobLog(started)
        self.kept = None  # what the run keeps past its state (kept.py), rolled back with it
        self._old_handlers = {}
        self._lock = None

    @classmethod
    def from_args(cls, state_dir, checkpoint_cfg, *, stage, identity, started=None):
        """The state a stage's `--state-dir` / `--checkpoint` arguments describe (None: no resume)."""
        if state_dir is None:
            return None
        cfg = checkpoint_cfg or {}
        return cls(state_dir, stage=stage, identity=identity, every_steps=cfg.get("every_steps"),
                   every_minutes=cfg.get("every_minutes"), slice_kimg=cfg.get("slice_kimg"), started=started)

    # ------------------------------------------------------------------------------------------
    # Where the states are

    def saved(self):
        """Complete states, oldest first, as (step, folder)."""
        if not self.dir.is_dir():
            return []
        found = []
        for path in self.dir.glob("step-*"):
            try:
                found.append((int(path.name[len("step-"):]), path))
            except ValueError:
                continue
        return sorted(found)

    def latest(self):
        states = self.saved()
        return states[-1] if states else None

    def describe_latest(self):
        """For error messages: which state a rerun would resume from."""
        latest = self.latest()
        if latest is None:
            return f"none yet (state folder {self.dir}); a rerun starts this stage from step 0"
        return f"{latest[1]} (step {latest[0]}); a rerun resumes from it"

    def lock(self):
        """Hold the folder for this job: two jobs training the same thing (two Snakemake runs
        sharing a store) must not overwrite each other's states. The kernel drops the lock
        when the process dies, however it dies. The main process of a job takes it (on a job of
        several nodes, the first node's), an flock on the shared filesystem: it keeps out a job on
        another node where the filesystem's flock is cluster-wide (docs/cluster.md). The holder
        writes who it is into the lock file, for the message of a job it keeps out."""
        self.dir.mkdir(parents=True, exist_ok=True)
        self._lock = open(self.dir / ".lock", "a+")
        try:
            fcntl.flock(self._lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self._lock.seek(0)
            holder = self._lock.read().strip() or "another Snakemake run on the same store?"
            self._lock.close()
            self._lock = None
            raise RuntimeError(f"{self.dir}: another job is training from this state folder right now "
                               f"({holder}); wait for it to finish") from None
        self._lock.truncate(0)
        job = os.environ.get("SLURM_JOB_ID")
        self._lock.write(f"pid {os.getpid()} on {socket.gethostname()}{f', SLURM job {job}' if job else ''}\n")
        self._lock.flush()

    def remove_partial(self):
        """Temporary folders of a writer that was killed; never taken for a state."""
        for path in self.dir.glob(".tmp-*"):
            shutil.rmtree(path, ignore_errors=True)

    def finish(self):
        """The stage wrote its outputs: the state is no longer needed (and must not be resumed
        by a later run with another config)."""
        shutil.rmtree(self.dir, ignore_errors=True)
        self.unlock()

    def unlock(self):
        if self._lock is not None:
            self._lock.close()
            self._lock = None

    # ------------------------------------------------------------------------------------------
    # Save and restore

    def save(self, *, step, total_steps, batch, net, ema, optimizer, data=None, train_seconds=0.0,
             ended=RUNNING, signal_name=None, averages=None):
        """Save the state of `step`. `ended`: how this job ends after the save (job_log.ENDINGS:
        slice, signal named `signal_name`), or RUNNING where it trains on. `averages`: further
        modules saved under `<name>.` ({name: module}, the EMA's averages())."""
        tensors, meta = _tensors_and_meta(net, ema, optimizer, averages)
        info = {
            "format": FORMAT, "stage": self.stage, "step": step, "total_steps": total_steps,
            "images": step * batch, "identity": self.identity,
            "data": None if data is None else data.state_dict(),
            "train_seconds": train_seconds, **meta,
        }
        final = self.dir / f"step-{step:09d}"
        self.dir.mkdir(parents=True, exist_ok=True)
        tmp = self.dir / f".tmp-step-{step:09d}-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        try:
            write_tensors(tmp / "state.safetensors", tensors)
            info["sha256"] = atomic.sha256_file(tmp / "state.safetensors")
            # this job's wall time runs to here: the tensors, the bulk of a save, are written
            info["jobs"] = self.log.through(step, ended, signal_name)
            (tmp / "state.json").write_text(json.dumps(info, indent=1, sort_keys=True) + "\n")
            _fsync(tmp / "state.json")
            if final.exists():  # the same step saved again (a resumed run repeating it)
                shutil.rmtree(final)
            os.replace(tmp, final)
            _fsync_dir(self.dir)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        for old_step, old in self.saved():
            if old_step != step:
                shutil.rmtree(old, ignore_errors=True)
        self.last_save_time = time.monotonic()
        return final

    def restore(self, *, net, ema, optimizer, data=None, averages=None, tidy=True):
        """Load the newest state into the given objects; returns (step, train_seconds), or
        (0, 0.0) when there is none. The jobs it records precede this one in `log`. `averages` as
        save's: each must be in the state (a state holds those its run's config asked for). `tidy`:
        also remove a killed writer's partial state and roll what the run keeps back to the state's
        step (the process that holds the lock; the other ranks only read)."""
        if tidy:
            self.remove_partial()
        latest = self.latest()
        if latest is None:
            if self.kept is not None and tidy:
                self.kept.rollback(0)
            return 0, 0.0
        step, folder = latest
        info = json.loads((folder / "state.json").read_text())
        if info.get("format") != FORMAT:
            raise ValueError(f"{folder}: format {info.get('format')!r}, expected {FORMAT!r}; "
                             f"delete {self.dir} to start this stage over")
        diff = differences(info["identity"], self.identity)
        if diff:
            raise ValueError(
                f"{folder}: this training state was made with a different configuration or inputs:\n  "
                + "\n  ".join(diff)
                + f"\nRestore those values to resume it, or delete {self.dir} to start the stage over.")
        weights = folder / "state.safetensors"
        if atomic.sha256_file(weights) != info["sha256"]:
            raise ValueError(f"{weights}: sha256 differs from {folder / 'state.json'}; the state is "
                             f"damaged: delete {folder} (and {self.dir} if nothing older is left)")
        tensors = load_file(str(weights))
        for prefix, module in _modules(net, ema, averages):
            state = {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}
            checkpoints.check_fits(module.state_dict(), state, f"the saved {prefix[:-1]} tensors", weights)
            module.load_state_dict(state)
        optimizer.load_state_dict(_optimizer_state(tensors, info["optimizer"]))
        if data is not None:
            data.load_state_dict(info["data"])
        self.log.resume(info.get("jobs", []), step)  # none in a state saved before jobs were recorded
        if self.kept is not None and tidy:
            self.kept.rollback(step)
        self.last_save_time = time.monotonic()
        return step, info.get("train_seconds", 0.0)

    # ------------------------------------------------------------------------------------------
    # When to save and when to stop

    def due(self, steps_done):
        if self.every_steps and steps_done % self.every_steps == 0:
            return True
        return self.every_seconds is not None and time.monotonic() - self.last_save_time >= self.every_seconds

    def slice_done(self, images_this_job):
        return self.slice_images is not None and images_this_job >= self.slice_images

    def catch_signals(self):
        """SIGNALS (SLURM's warning before a time limit, Ctrl-C) only set a flag: the loop saves
        the state at the end of the current step and exits."""
        def handler(signum, frame):
            self.signal_received = signum
            print(f"[{self.stage}] received {signal.Signals(signum).name}: saving the state after "
                  "this step", flush=True)

        for sig in SIGNALS:
            self._old_handlers[sig] = signal.signal(sig, handler)

    def release_signals(self):
        for sig, old in self._old_handlers.items():
            signal.signal(sig, old)
        self._old_handlers = {}


# ----------------------------------------------------------------------------------------------
# Tensors and JSON


def write_tensors(path, tensors):
    # through atomic_path for the file's mode: safetensors alone leaves 0600, which a teammate
    # resuming a shared teacher's state could not read
    with atomic.atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata={"format": FORMAT})


def _fsync(path):
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def _fsync_dir(path):
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _modules(net, ema, averages):
    return [("net.", net), ("ema.", ema), *((f"{name}.", module) for name, module in (averages or {}).items())]


def _tensors_and_meta(net, ema, optimizer, averages=None):
    tensors = {}
    for prefix, module in _modules(net, ema, averages):
        for name, value in module.state_dict().items():
            tensors[prefix + name] = value.detach().to("cpu").contiguous()
    opt = optimizer.state_dict()
    other = {}
    for index, fields in opt["state"].items():
        for name, value in fields.items():
            if torch.is_tensor(value):
                tensors[f"optimizer.{index}.{name}"] = value.detach().to("cpu").contiguous()
            else:
                other.setdefault(str(index), {})[name] = value
    groups = [{k: list(v) if isinstance(v, tuple) else v for k, v in g.items()} for g in opt["param_groups"]]
    return tensors, {"optimizer": {"param_groups": groups, "state": other}}


def _optimizer_state(tensors, meta):
    state = {}
    for key, value in tensors.items():
        if key.startswith("optimizer."):
            _, index, name = key.split(".", 2)
            state.setdefault(int(index), {})[name] = value
    for index, fields in meta["state"].items():
        state.setdefault(int(index), {}).update(fields)
    groups = [{k: tuple(v) if k == "betas" else v for k, v in g.items()} for g in meta["param_groups"]]
    return {"state": state, "param_groups": groups}
