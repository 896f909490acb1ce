"""The metrics log of a training run and its live curves in a tracker (TensorBoard, W&B, MLflow).

Every `log_every` steps (a step interval, so which steps are logged never depends on timing) and at
the last step, the main process appends one JSON line to the run's metrics log:

    {"kind": "train", "step": 500, "images": 64000, "loss": 0.0213, "term/distance": 0.19,
     "term/weight": 0.11, "grad_norm": 1.7, "lr": 0.0001, "images_per_second": 812.4,
     "peak_memory_gib": 0.41, "wall_seconds": 78.5}

- `loss`, and `term/<name>` for every part the stage's loss reports (stages/method/losses.py `note`:
  a distance, a weight, MeanFlow's raw error and adaptive weight): each the mean over a part's
  samples, then over the parts of a step (micro-batches and processes) and over the steps since the
  previous line. They are summed on the device, without a sync; a line costs one all-reduce;
- `grad_norm`: the mean over those steps of the norm before clipping; `lr`: the logged step's rate;
- `images` (and `images_total` where the init saw images before: MeanFlow's equal total budget);
- `images_per_second` over the steps since the previous line in this job; `wall_seconds`: the
  run's training seconds over all its jobs; `peak_memory_gib`: the peak of the device's allocated
  memory (CUDA) or of the process's resident memory (CPU) in this job.
A stage that evaluates adds lines of kind `eval` (the latent VGG's held-out top-1 / top-5).

The log is kept past the state (kept.py): while the run trains it lives in the state folder, is
rolled back to the step a resumed run starts from (lines past the last save are dropped, never
written twice) and is published to the rule's output when the run finishes. The sums since the last
line are kept with every save too (`metrics-pending/`), so the lines of a resumed or sliced run
equal those of an uninterrupted one (timings aside).

Trackers (`tracking.log_with`) receive the same values under the same names at the same steps,
through Accelerate (`Accelerator(log_with=...)`, `init_trackers`, `accelerator.log`), and, on the
pixel rows, a grid of one-step samples of the EMA at each snapshot. One training run is one tracker
run: its name (<row>/<stage>) and id are kept in the state folder (`tracker.json`), so its slices
and resumes continue it. TensorBoard drops the events a killed job wrote past the resume point
(purge_step); W&B runs offline unless WANDB_MODE says otherwise; MLflow writes to a file store in
the tracking folder (mlruns/) unless MLFLOW_TRACKING_URI names another. None needs the internet. A job killed
without saving (SIGKILL, out of memory) leaves its W&B and MLflow points past the last save, which
the resumed job logs again at the same steps; slices and signals save where they stop, leaving none.
"""

import importlib.util
import json
import math
import os
import resource
import secrets
import sys
import time
from pathlib import Path

import torch

from stages.core import image_grid
from stages.files import atomic
from stages.training.kept import JsonLog, step_name

TRACKERS = ("tensorboard", "wandb", "mlflow")
LOG_EVERY = 100
PACKAGES = {"tensorboard": "tensorboard", "wandb": "wandb", "mlflow": "mlflow"}


# ----------------------------------------------------------------------------------------------
# Options and the accelerator


def log_with(tracking):
    """The tracker the options name, or None; a tracker whose package is missing is an error."""
    name = (tracking or {}).get("log_with", "none")
    if name in (None, "none"):
        return None
    if name not in TRACKERS:
        raise ValueError(f"tracking.log_with: {name!r} is no tracker; use none or one of {list(TRACKERS)}")
    if importlib.util.find_spec(PACKAGES[name]) is None:
        raise ModuleNotFoundError(f"tracking.log_with {name}: the {PACKAGES[name]} package is not installed here; "
                                  "pip install 'cmt-pipeline[tracking]', or set tracking.log_with: none")
    return name


def tracking_dir(tracking):
    return Path((tracking or {}).get("dir") or "tracking").absolute()


def accelerator_options(tracking):
    """Accelerator(...) keywords for the tracker the options name ({} for none)."""
    name = log_with(tracking)
    if name is None:
        return {}
    from accelerate.utils import ProjectConfiguration

    folder = tracking_dir(tracking)
    return {"log_with": name, "project_config": ProjectConfiguration(project_dir=str(folder), logging_dir=str(folder))}


def flat(config, prefix=""):
    """{'a': {'b': [1, 2]}} -> {'a.b': '[1, 2]'}: hyperparameters as trackers take them."""
    out = {}
    for key, value in config.items():
        if isinstance(value, dict):
            out.update(flat(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value if isinstance(value, (int, float, str, bool)) else json.dumps(value)
    return out


def peak_memory_gib(device):
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    return kib * (1 if sys.platform != "darwin" else 1 / 1024) / 2**20


# ----------------------------------------------------------------------------------------------
# The monitor loop.fit reports to


class Monitor:
    """The metrics log and tracker of one training job. loop.fit calls `begin` after restoring the
    state, `part` with each part's mean loss and terms, `step` after each optimizer step and `saving`
    before each save; every process calls all of them (a line and a save reduce over processes).

    `metrics`: the path the log is published to (None: no log); `tracking`: the options
    (stage_configs.tracking_options); `kept`: the run's kept.Kept; `images_before`: images the init
    saw (given: lines carry images_total); `preview()`: a uint8 [n, C, H, W] batch of samples of
    the EMA, logged as an image at `preview_steps` (the snapshots) where a tracker runs."""

    def __init__(self, stage, accelerator, kept, *, metrics=None, tracking=None, batch, total_steps, config=None,
                 images_before=None, preview=None, preview_steps=()):
        self.stage, self.accelerator, self.kept = stage, accelerator, kept
        self.tracking = tracking or {}
        self.tracker = log_with(self.tracking)
        self.every = int(self.tracking.get("log_every") or LOG_EVERY)
        self.batch, self.total, self.config, self.images_before = batch, total_steps, config or {}, images_before
        self.preview, self.preview_steps = preview, set(preview_steps)
        self.main = accelerator.is_main_process
        self.log = JsonLog(kept.keep("metrics.jsonl", metrics)) if metrics is not None else None
        self.active = self.log is not None or self.tracker is not None
        self.pending_dir = kept.keep("metrics-pending", None, folder=True) if self.active else None
        self.names = None  # "loss", then "term/<name>" in sorted order, fixed by the first part
        self.sums = None
        self.parts = self.steps = 0
        self.grad_sum = 0.0
        self.seconds_before = 0.0
        self.last_saved = 0

    # -- what loop.fit calls

    def begin(self, start_step, seconds_before):
        """The run starts (or resumes) at `start_step` with `seconds_before` seconds of training."""
        self.seconds_before, self.last_saved = seconds_before, start_step
        self.t0 = self.t_line = time.perf_counter()
        self.step_line = start_step
        if not self.active:
            return
        if self.main:
            self._restore_pending(start_step)
        if self.tracker is not None:
            self._start_tracker(start_step)
            if start_step == 0 and 0 in self.preview_steps:
                self._log_preview(0)

    def part(self, loss, terms):
        """One part's mean loss (a 0-d tensor) and its terms ({name: per-sample values})."""
        if not self.active:
            return
        names = ["loss"] + [f"term/{k}" for k in sorted(terms)]
        if self.names is None:
            self.names = names
        elif names != self.names:
            raise ValueError(f"[{self.stage}] the loss reported terms {names[1:]} after {self.names[1:]}: a loss "
                             "must report the same terms on every call")
        values = torch.stack([loss.detach().float()] + [terms[k].float().mean() for k in sorted(terms)])
        values = values.to(torch.float64)
        self.sums = values if self.sums is None else self.sums + values
        self.parts += 1

    def step(self, done, *, lr, grad_norm):
        """After optimizer step `done` (1-based): a line every `log_every` steps and at the last."""
        if not self.active:
            return
        self.steps += 1
        self.grad_sum += float(grad_norm)
        if done % self.every == 0 or done == self.total:
            self._line(done, lr)
        if done in self.preview_steps and self.tracker is not None:
            self._log_preview(done)

    def saving(self, step):
        """The state of `step` is saved next: keep the sums since the last line with it."""
        if not self.active:
            return
        sums, parts = self._reduced()
        if self.main:
            pending = {"names": self.names, "sums": sums, "parts": parts, "steps": self.steps,
                       "grad_sum": self.grad_sum}
            atomic.write_json(self.pending_dir / step_name("pending", step, "json"), pending)
            # the state saved last keeps its own until this one is in place
            for path in self.pending_dir.glob("pending-step*.json"):
                if path.name not in (step_name("pending", step, "json"), step_name("pending", self.last_saved, "json")):
                    path.unlink()
        self.last_saved = step

    # -- what run.run calls on the main process

    def evaluation(self, step, values):
        """An evaluation line at `step` (e.g. {"top1": 0.71, "top5": 0.9}: named eval/<name>)."""
        if not self.active or not self.main or not values:
            return
        entry = {"kind": "eval", "step": step, **self._images(step), **{f"eval/{k}": v for k, v in values.items()}}
        self._write(entry)

    # -- the pieces

    def _images(self, step):
        seen = {"images": step * self.batch}
        if self.images_before is not None:
            seen["images_total"] = self.images_before + step * self.batch
        return seen

    def _reduced(self):
        """(sums by name, parts) over every process, or ({}, 0) before any part."""
        device = self.accelerator.device
        count = torch.tensor([float(self.parts)], dtype=torch.float64, device=device)
        if self.names is None:
            vector = count
        else:
            sums = self.sums if self.sums is not None else torch.zeros(len(self.names), dtype=torch.float64,
                                                                       device=device)
            vector = torch.cat([sums.to(device), count])
        if self.accelerator.num_processes > 1:
            vector = self.accelerator.reduce(vector, reduction="sum")
        values = vector.tolist()
        if self.names is None:
            return {}, int(values[0])
        return dict(zip(self.names, values[:-1], strict=True)), int(values[-1])

    def _line(self, done, lr):
        sums, parts = self._reduced()
        now = time.perf_counter()
        trained = done - self.step_line
        entry = {"kind": "train", "step": done, **self._images(done)}
        entry.update({name: value / parts for name, value in sums.items()})
        entry.update({"grad_norm": self.grad_sum / max(self.steps, 1), "lr": lr,
                      "images_per_second": trained * self.batch / max(now - self.t_line, 1e-9),
                      "peak_memory_gib": peak_memory_gib(self.accelerator.device),
                      "wall_seconds": self.seconds_before + now - self.t0})
        bad = sorted(k for k, v in entry.items() if isinstance(v, float) and not math.isfinite(v))
        if bad:
            # the loss and the gradient were finite (loop.fit stops otherwise): a term overflowed, which
            # the log says as null (JSON has no infinity) rather than stopping a healthy run
            print(f"[{self.stage}] step {done}: {', '.join(bad)} not finite over the steps since the last line; "
                  "logged as null", flush=True)
            entry.update({k: None for k in bad})
        if self.main:
            self._write(entry)
        self.sums, self.parts, self.steps, self.grad_sum = None, 0, 0, 0.0
        self.t_line, self.step_line = now, done

    def _write(self, entry):
        if self.log is not None:
            self.log.write(entry)
        if self.tracker is not None:
            self.accelerator.log({k: v for k, v in entry.items() if k not in ("kind", "step") and v is not None},
                                 step=entry["step"])

    def _restore_pending(self, step):
        """The sums a saved state of `step` kept (the main process carries them: a line sums over
        processes); the pending files of other steps go."""
        path = self.pending_dir / step_name("pending", step, "json")
        if step and path.exists():
            pending = json.loads(path.read_text())
            if pending["names"] is not None:
                self.names = pending["names"]
                self.sums = torch.tensor([pending["sums"][n] for n in self.names], dtype=torch.float64,
                                         device=self.accelerator.device)
            self.parts, self.steps, self.grad_sum = pending["parts"], pending["steps"], pending["grad_sum"]
        for other in self.pending_dir.glob("pending-step*.json"):
            if other != path:
                other.unlink()

    # -- the tracker

    def _start_tracker(self, start_step):
        """Start (or, with the id the state folder keeps, continue) this run's tracker run."""
        ident_path = self.kept.folder / "tracker.json"
        ident = json.loads(ident_path.read_text()) if self.main and ident_path.exists() else None
        resumed = ident is not None
        name = f"{self.tracking.get('run') or 'run'}/{self.stage}"
        if ident is None:
            ident = {"name": name, "id": secrets.token_hex(4), "tracker": self.tracker}
        project = self.tracking.get("project") or "cmt"
        folder = tracking_dir(self.tracking)
        if self.tracker == "tensorboard":
            safe = name.replace(":", "-")
            kwargs = {"purge_step": start_step + 1} if resumed else {}
            self.accelerator.init_trackers(f"tensorboard/{project}/{safe}/{ident['id']}", config=None,
                                           init_kwargs={"tensorboard": kwargs})
        elif self.tracker == "wandb":
            folder.mkdir(parents=True, exist_ok=True)
            self.accelerator.init_trackers(project, init_kwargs={"wandb": {
                "name": name, "id": ident["id"], "resume": "allow", "dir": str(folder),
                "mode": os.environ.get("WANDB_MODE", "offline")}})
        else:
            import mlflow

            uri = os.environ.get("MLFLOW_TRACKING_URI")
            if not uri:
                # MLflow 3 keeps its file store "in maintenance mode" behind this switch; it is the backend
                # that needs no service and takes concurrent runs on a shared filesystem (sqlite does not)
                os.environ["MLFLOW_ALLOW_FILE_STORE"] = "true"
                uri = (folder / "mlruns").as_uri()
            mlflow.set_tracking_uri(uri)
            self.accelerator.init_trackers(project, init_kwargs={"mlflow": {
                "run_name": name, "run_id": ident["id"] if resumed else None}})
            if self.main:
                ident["id"] = self.accelerator.get_tracker("mlflow").tracker.info.run_id
        if self.main and not resumed:
            hyper = flat(self.config)
            if hyper:
                for tracker in self.accelerator.trackers:
                    if tracker.name == "tensorboard":  # add_hparams: scalars and strings, written once
                        tracker.writer.add_text("config", "```\n" + json.dumps(self.config, indent=1) + "\n```", 0)
                    else:
                        tracker.store_init_configuration(hyper)
            atomic.write_json(ident_path, ident)
        if self.main:
            print(f"[{self.stage}] {self.tracker} run {ident['name']} (id {ident['id']}"
                  f"{', resumed at step ' + str(start_step) if resumed else ''}) in {folder}", flush=True)

    def _log_preview(self, step):
        if self.preview is None or not self.main:
            return
        grid = image_grid.tile(self.preview())
        if grid.shape[2] == 1:
            grid = grid.repeat(3, axis=2)
        tracker = self.accelerator.get_tracker(self.tracker, unwrap=True)
        if self.tracker == "tensorboard":
            tracker.add_image("samples", grid, step, dataformats="HWC")
            tracker.flush()
        elif self.tracker == "wandb":
            import wandb

            tracker.log({"samples": wandb.Image(grid)}, step=step)
        else:
            import mlflow

            mlflow.log_image(grid, key="samples", step=step)

