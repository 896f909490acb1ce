"""One function that trains any recipe (stages/recipes/): the optimizer, the process group, the
resumable state, the EMA snapshots, the loop and the model file, the same for every training stage.

A recipe says what is trained and on what; `run` says how:

    recipe = recipes.posttrain.build(cfg, inputs, accelerator)
    run(recipe, args, cfg, accelerator, started=cli.started())
"""

import dataclasses
from typing import Any, Callable

import torch

from stages.training import loop, metrics
from stages.training.ema import EMA, PowerEMA
from stages.training.job import TrainingJob
from stages.training.posthoc_ema import ProfileSnapshots


@dataclasses.dataclass
class Recipe:
    """What a training stage trains, built from its config and inputs (stages/recipes/).

    `loss(net, step, part)` returns the per-sample losses of part `part` of step `step`'s global
    batch on the prepared network `net` (the DDP wrapper where there is one), or (those, {name:
    per-sample values}) with the parts of the loss for the metrics log, drawing its randomness from
    generators folded from (seed, step, part). `data` is what the training state saves beside
    the model (a stream position: state_dict / load_state_dict), or None. `meta` is what the model
    file says besides the config, the images seen and the jobs. `snapshots` maps fractions of the
    budget to the names of the EMA snapshots kept (none: no snapshots). `finish(model)` writes what
    the stage makes beside the model file (the main process, after the model); an `evaluation` entry
    of what it returns ({name: number}) becomes an evaluation line of the metrics log, not part of the
    model file. `preview(module)`: uint8 samples of the EMA `module` for the tracker at each snapshot
    (None: no images, as on the latent rows, whose samples need decoding)."""

    stage: str
    seed: int
    net: torch.nn.Module
    ema: EMA
    optimizer: dict
    total_steps: int
    batch: int
    micro_batches: int
    loss: Callable
    identity: dict
    meta: dict
    data: Any = None
    snapshots: dict = dataclasses.field(default_factory=dict)
    images_before: int | None = None
    describe: str = ""
    finish: Callable | None = None
    preview: Callable | None = None


def run(recipe, args, cfg, accelerator, started=None):
    """Train `recipe` to its last step and write the model file (--out) and snapshots (--snapshots);
    with --state-dir the run resumes, saves and stops on signals and slices (loop.fit)."""
    r = recipe
    optimizer = loop.build_optimizer(r.net.parameters(), r.optimizer)
    net, optimizer = accelerator.prepare(r.net, optimizer)
    job = TrainingJob(args, cfg, stage=r.stage, accelerator=accelerator, identity=r.identity,
                      images_before=r.images_before, started=started)
    snapshots = None
    if r.snapshots:
        snapshots = job.snapshots(r.snapshots, total_steps=r.total_steps, batch=r.batch, ema=r.ema, meta=r.meta)
    print(f"[{r.stage}] {r.describe}batch {r.batch}, {r.total_steps} steps"
          + (f", snapshots at steps {sorted(snapshots.steps)}" if snapshots else ""), flush=True)
    if snapshots:
        snapshots.save(0)
    monitor = metrics.Monitor(
        r.stage, accelerator, job.kept, metrics=args.metrics, tracking=args.tracking, batch=r.batch,
        total_steps=r.total_steps, config=cfg, images_before=r.images_before,
        preview=r.preview and (lambda: r.preview(r.ema.module)), preview_steps=snapshots.steps if snapshots else ())
    # the power-function profiles' snapshots (ema.kind power), for post-hoc reconstruction
    profiles = ProfileSnapshots(job, r.ema, r.batch, r.meta) if isinstance(r.ema, PowerEMA) else None
    hooks = [h.save for h in (snapshots, profiles) if h]

    def on_step_end(steps_done):
        for save in hooks:
            save(steps_done)

    elapsed = loop.fit(stage=r.stage, accelerator=accelerator, net=net, ema=r.ema, optimizer=optimizer,
                       opt_cfg=r.optimizer, total_steps=r.total_steps, batch=r.batch, seed=r.seed,
                       loss_fn=lambda step, part: r.loss(net, step, part),
                       on_step_end=on_step_end if hooks else None, state=job.state, data=r.data,
                       micro_batches=r.micro_batches, monitor=monitor)
    if r.finish is not None and accelerator.is_main_process:
        extra = dict(r.finish(accelerator.unwrap_model(net)) or {})
        monitor.evaluation(r.total_steps, extra.pop("evaluation", {}))
        r.meta = {**r.meta, **extra}
    job.finish(net, r.ema, meta=r.meta, steps=r.total_steps, batch=r.batch, train_seconds=elapsed)
    return elapsed
