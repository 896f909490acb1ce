"""What every training job does around loop.fit, in one place: the resumable state its rule asked
for (--state-dir, --checkpoint), EMA snapshots at fractions of the budget, the model file it writes
(with the config and the images it saw), and the teardown once the outputs are written.

The model file records every job that trained the run (`jobs`, stages/training/job_log.py): a run
sliced or resumed over several jobs is costed from them (stages/reporting/ledger.py).
"""

from pathlib import Path

from stages.files import checkpoints
from stages.training import job_log, resume
from stages.training.job_log import JobLog
from stages.training.kept import Kept


class TrainingJob:
    """One job of a training stage (a job may be one slice of a longer run).

    `identity` is what a resumed run must share with the one that saved the state, besides the
    stage's config (the digests of its inputs, ...). `images_before` is what the initialisation has
    already seen (the MeanFlow rows compare inits at equal total images): given, the model files
    also record `images_seen_total`. `started`: the job's start in seconds since the epoch
    (stages.core.cli.started()), from which its wall time is counted.
    """

    def __init__(self, args, cfg, *, stage, accelerator, identity, images_before=None, started=None):
        self.args, self.cfg, self.stage, self.accelerator = args, cfg, stage, accelerator
        self.images_before = images_before
        self.state = resume.TrainState.from_args(args.state_dir, args.checkpoint, stage=stage,
                                                 identity={"config": cfg, **identity}, started=started)
        # the jobs before this one come with the state (loop.fit restores it); without one this job is all
        self.log = self.state.log if self.state is not None else JobLog(started)
        self.log.device = job_log.device_of(accelerator)
        # what the run keeps past its state (kept.py): in the state folder, which the state rolls back
        # to the step it resumes from; without one in a folder of this job's beside the model file
        if self.state is not None:
            self.kept = self.state.kept = Kept(self.state.dir)
        else:
            out = Path(args.out)
            self.kept = Kept(out.parent / f".{out.stem}.kept")
            if accelerator.is_main_process:
                self.kept.remove()
        self.snapshot_set = None

    def images(self, steps, batch):
        seen = {"steps": steps, "images_seen": steps * batch}
        if self.images_before is not None:
            seen["images_seen_total"] = self.images_before + steps * batch
        return seen

    def jobs(self, steps):
        """Every job's record for the model file, this one's finishing the run at `steps`."""
        return self.log.through(steps, "finished")

    def snapshots(self, names, *, total_steps, batch, ema, meta):
        """EMA snapshots (`names`: fraction of the budget -> file name), kept past the state and
        published to the rule's --snapshots folder; pass the result's `save` to loop.fit as on_step_end."""
        folder = self.kept.keep("snapshots", self.args.snapshots, folder=True)
        self.snapshot_set = Snapshots(self, names, total_steps, batch, ema, meta, folder)
        return self.snapshot_set

    def finish(self, net, ema, *, meta, steps, batch, train_seconds):
        """Every rank calls it after loop.fit: the main process writes --out (network and EMA) with
        `meta` plus the config and the images seen, publishes what the run kept (snapshots, logs)
        and deletes the state."""
        if self.accelerator.is_main_process:
            checkpoints.save(self.args.out, net=self.accelerator.unwrap_model(net), ema=ema.module, meta={
                **meta, "config": self.cfg, **self.images(steps, batch), "train_seconds": train_seconds,
                "jobs": self.jobs(steps)})
            self.kept.publish()  # the kept files become outputs now that the job will succeed
            print(f"[{self.stage}] wrote {self.args.out} after {train_seconds:.0f}s", flush=True)
            if self.state is not None:
                self.state.finish()
            else:
                self.kept.remove()
        # Every rank ends its process group: left to interpreter exit, gloo aborted a 2-process run
        # ("terminate called without an active exception") after the outputs were written.
        self.accelerator.end_training()


class Snapshots:
    """The EMA at fixed fractions of the budget (step 0 included: the initialisation itself), what
    the FD curve is drawn from. `steps` maps each snapshot's step to its name."""

    def __init__(self, job, names, total_steps, batch, ema, meta, folder):
        self.job, self.total, self.batch, self.ema, self.meta = job, total_steps, batch, ema, meta
        self.folder = folder
        self.steps = {round(f * total_steps): name for f, name in names.items()}

    def save(self, steps_done):
        name = self.steps.get(steps_done)
        if name is not None and self.job.accelerator.is_main_process:
            checkpoints.save(self.folder / f"{name}.safetensors", ema=self.ema.module, meta={
                **self.meta, "config": self.job.cfg, "role": "posttrain-snapshot",
                **self.job.images(steps_done, self.batch), "fraction": steps_done / self.total})
