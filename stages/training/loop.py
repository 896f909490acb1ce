"""The one training loop every training stage shares; the stage passes its loss in.

Schedules are pure functions of the step, randomness is folded from (seed, step, rank, purpose),
and every stage prints the same status line (step, kimg, loss, images/s, sec/kimg, ETA).
"""

import contextlib
import math
import signal
import sys
import time

import torch

from stages.core import progress, rng
from stages.training import resume

# ----------------------------------------------------------------------------------------------
# Optimiser and learning-rate schedule


def radam_unrectified_steps(beta2):
    """Number of leading RAdam steps whose variance is not rectified (rho_t <= 5).

    On those steps torch's RAdam applies lr * (bias-corrected momentum) with no normalisation, i.e.
    a raw-gradient step. ECT's gradient norm grows with q (hundreds to thousands), and such steps
    wreck a good initialisation, so the schedule gives them lr 0: the moments still warm up.
    """
    rho_inf = 2 / (1 - beta2) - 1
    t = 0
    while True:
        t += 1
        rho_t = rho_inf - 2 * t * beta2**t / (1 - beta2**t)
        if rho_t > 5:
            return t - 1


def build_optimizer(params, cfg):
    name = cfg["name"]
    if name == "sgd":  # the latent VGG16 classifier (torchvision's ImageNet recipe): L2 weight decay in the gradient
        return torch.optim.SGD(params, lr=cfg["lr"], momentum=cfg.get("momentum", 0.0),
                               weight_decay=cfg.get("weight_decay", 0.0))
    kwargs = dict(lr=cfg["lr"], betas=tuple(cfg["betas"]), eps=cfg["eps"],
                  weight_decay=cfg.get("weight_decay", 0.0))
    if name == "radam":
        return torch.optim.RAdam(params, **kwargs)
    if name == "adam":
        return torch.optim.Adam(params, **kwargs)
    raise ValueError(f"optimizer.name: unknown optimizer {name!r}")


def lr_at(step, total_steps, cfg):
    """Learning rate for step `step` (0-based) of `total_steps`."""
    if cfg["name"] == "radam" and cfg.get("skip_unrectified", True):
        if step < radam_unrectified_steps(cfg["betas"][1]):
            return 0.0
    lr = cfg["lr"]
    warmup = cfg.get("warmup_steps", 0)
    if warmup and step < warmup:
        lr *= (step + 1) / warmup
    if cfg["schedule"] == "linear_to_zero":
        lr *= max(0.0, 1 - step / total_steps)
    elif cfg["schedule"] == "step":  # StepLR: times gamma every step_every steps
        lr *= cfg["gamma"] ** (step // cfg["step_every"])
    elif cfg["schedule"] != "constant":
        raise ValueError(f"optimizer.schedule: unknown schedule {cfg['schedule']!r}")
    return lr


# ----------------------------------------------------------------------------------------------
# Status line


class Status:
    """Prints a status line every `every` steps or `seconds` seconds, whichever comes first."""

    def __init__(self, stage, total_steps, batch, every=100, seconds=10.0, extra_units=None):
        self.stage, self.total, self.batch = stage, total_steps, batch
        self.every, self.seconds = every, seconds
        self.extra_units = extra_units or {}
        self.t0 = self.t_last = time.perf_counter()
        self.step_last = 0
        self.losses = []

    def update(self, step, loss, **fields):
        self.losses.append(loss)
        now = time.perf_counter()
        done = step + 1
        if done % self.every and now - self.t_last < self.seconds and done != self.total:
            return
        rate = (done - self.step_last) * self.batch / max(now - self.t_last, 1e-9)
        eta = (self.total - done) * self.batch / max(rate, 1e-9)
        parts = [f"[{self.stage}] step {done}/{self.total} ({100 * done / self.total:.1f}%)",
                 f"kimg {done * self.batch / 1e3:.1f}",
                 f"loss {sum(self.losses) / len(self.losses):.4g}",
                 f"img/s {rate:.0f}", f"sec/kimg {1e3 / max(rate, 1e-9):.2f}"]
        for name, value in fields.items():
            parts.append(f"{name} {value:.3g}" if isinstance(value, float) else f"{name} {value}")
        for name, per_img in self.extra_units.items():
            parts.append(f"{name} {rate * per_img:.0f}")
        parts.append(f"eta {progress.duration(eta)}")
        if torch.cuda.is_available():
            parts.append(f"gpumem {torch.cuda.max_memory_allocated() / 2**30:.2f}GiB")
        print("  ".join(parts), flush=True)
        self.t_last, self.step_last, self.losses = now, done, []

    def elapsed(self):
        return time.perf_counter() - self.t0


# ----------------------------------------------------------------------------------------------
# The loop


def fit(*, stage, accelerator, net, ema, optimizer, opt_cfg, total_steps, batch, seed, loss_fn,
        on_step_end=None, status_every=100, state=None, data=None, micro_batches=1, monitor=None):
    """Run optimisation steps up to `total_steps`; returns the training seconds (all jobs).

    `loss_fn(step, part)` returns per-sample losses of part `part` of that step's global batch, or
    (those, {name: per-sample values of a part of the loss}); it must draw its randomness from
    generators folded from (step, part). `monitor` (metrics.Monitor) keeps the metrics log and the
    tracker: it sees each part's loss and terms, each step, and each save. Gradient accumulation: each
    process computes `micro_batches` parts one after the other (`split_batch`), part = rank x
    micro_batches + micro, and one optimizer step follows the last; the gradient of each part's
    mean loss counts 1 / micro_batches, so the step sees the mean over the process's whole share,
    and DDP all-reduces only on the last part (accelerator.no_sync before). With one micro-batch,
    part = rank. Dropout draws come from the global RNG, re-seeded
    for every part from (seed, step, part). `on_step_end(steps_done)` runs after the EMA update (snapshots).
    A non-finite loss or gradient stops the run naming the step: nothing is zeroed or skipped.

    With `state` (a resume.TrainState) the run is resumable: the newest saved state is
    restored first (network, EMA, optimizer, step and, through `data.state_dict()` /
    `data.load_state_dict()`, the data stream's position), the state is saved when it is due,
    and a signal (resume.SIGNALS: SIGTERM, SIGUSR1, SIGINT) or a finished slice saves it and raises resume.Interrupted.
    Each save records this job (`state.log`, stages/training/job_log.py): its wall time and steps so
    far, and how it ended where it stops; the job that finishes adds its own record to the model file.
    """
    # The EMA copy is made before accelerator.prepare moves the network to its device.
    ema.to(accelerator.device)
    start_step, seconds_before = 0, 0.0
    if state is not None:
        # The main process holds the folder; every rank, on whatever node, learns whether it does
        # before any rank reads or tidies the folder, which another job may be writing.
        held_elsewhere = None
        if accelerator.is_main_process:
            try:
                state.lock()
            except RuntimeError as e:
                held_elsewhere = e
        if any_rank(accelerator, held_elsewhere is not None)[0]:
            raise held_elsewhere or RuntimeError(f"{state.dir}: the main process found another job training "
                                                 "from this state folder; wait for it to finish")
        try:
            start_step, seconds_before = state.restore(net=accelerator.unwrap_model(net), ema=ema.module,
                                                       optimizer=optimizer, data=data, averages=ema.averages(),
                                                       tidy=accelerator.is_main_process)
        except BaseException:
            state.unlock()
            raise
        if start_step:
            print(f"[{stage}] resumed from {state.latest()[1]} at step {start_step}/{total_steps}",
                  flush=True)
    status = Status(stage, total_steps, batch, every=status_every)
    status.step_last = start_step
    if monitor is not None:
        monitor.begin(start_step, seconds_before)
    params = [p for p in net.parameters() if p.requires_grad]
    rank = accelerator.process_index

    def save(steps_done, **ended):
        if monitor is not None:
            monitor.saving(steps_done)
        if accelerator.is_main_process:
            state.save(step=steps_done, total_steps=total_steps, batch=batch,
                       net=accelerator.unwrap_model(net), ema=ema.module, optimizer=optimizer, data=data,
                       train_seconds=seconds_before + status.elapsed(), averages=ema.averages(), **ended)
        accelerator.wait_for_everyone()

    def stop(reason, code, steps_done, **ended):
        save(steps_done, **ended)
        print(f"[{stage}] {reason}; state saved at step {steps_done}/{total_steps} in {state.dir}; "
              "rerun the same command (Snakemake: --retries) to continue", flush=True)
        raise resume.Interrupted(code)

    def after_step(done):
        """Save the state when it is due; on a signal or a finished slice, save it and stop."""
        if done == total_steps:  # the outputs come next: a kill before they are written loses no step
            save(done)
            return
        # one collective per step for the three decisions, not one each
        signum, slice_done, due = any_rank(accelerator, state.signal_received,
                                           state.slice_done((done - start_step) * batch), state.due(done))
        if signum:
            name = signal.Signals(signum).name
            stop(f"stopped by {name}", 128 + signum, done, ended="signal", signal_name=name)
        if slice_done:
            stop(f"slice of {state.slice_images / 1e3:g} kimg done in this job", resume.EXIT_SLICE, done,
                 ended="slice")
        if due:
            save(done)

    def last_good():
        return "no state folder (run without --state-dir)" if state is None else state.describe_latest()

    net.train()
    if state is not None:
        state.catch_signals()
    try:
        for step in range(start_step, total_steps):
            lr = lr_at(step, total_steps, opt_cfg)
            for group in optimizer.param_groups:
                group["lr"] = lr
            optimizer.zero_grad(set_to_none=True)
            loss_sum = 0.0
            for micro in range(micro_batches):
                part = rank * micro_batches + micro
                torch.manual_seed(rng.fold(seed, step, part, "dropout"))
                last = micro == micro_batches - 1
                with contextlib.nullcontext() if last else accelerator.no_sync(net):
                    out = loss_fn(step, part)
                    per_sample, terms = out if isinstance(out, tuple) else (out, {})
                    loss = per_sample.mean()
                    if not torch.isfinite(loss):
                        raise FloatingPointError(f"[{stage}] loss is {loss.item()} at step {step}; stopping. "
                                                 f"Last good state: {last_good()}. "
                                                 "Lower the learning rate or check the inputs.")
                    accelerator.backward(loss / micro_batches if micro_batches > 1 else loss)
                loss_sum += loss.item()
                if monitor is not None:
                    monitor.part(loss, terms)
            grad_norm = accelerator.clip_grad_norm_(params, opt_cfg.get("clip_grad_norm") or math.inf)
            if not torch.isfinite(grad_norm):
                raise FloatingPointError(f"[{stage}] gradient norm is {float(grad_norm)} at step {step}; "
                                         f"stopping rather than zeroing it. Last good state: {last_good()}.")
            optimizer.step()
            done = step + 1
            ema.update(accelerator.unwrap_model(net), done)
            grad = float(grad_norm)
            status.update(step, loss_sum / micro_batches, lr=lr, grad=grad)
            if monitor is not None:
                monitor.step(done, lr=lr, grad_norm=grad)
            if on_step_end is not None:
                on_step_end(done)
            if state is not None:
                after_step(done)
    except BaseException:
        if state is not None:  # stopped or failed: the folder is free for the next job
            state.unlock()
        raise
    finally:
        if state is not None:
            state.release_signals()
    return seconds_before + status.elapsed()


def any_rank(accelerator, *values):
    """Each of `values` (ints or bools) as its maximum over all processes: stop and save decisions
    depend on signals and clocks, which differ between processes, and every process must take them."""
    local = [int(v or 0) for v in values]
    if accelerator.num_processes == 1:
        return local
    flags = torch.tensor([local], device=accelerator.device)
    return [int(v) for v in accelerator.gather(flags).max(dim=0).values.tolist()]


def make_accelerator(tracking=None):
    """The process group's Accelerator, with the tracker the tracking options name (metrics.py)."""
    from accelerate import Accelerator

    from stages.training import metrics

    return Accelerator(cpu=not torch.cuda.is_available(), **metrics.accelerator_options(tracking))


def log(*args):
    print(*args, file=sys.stdout, flush=True)
