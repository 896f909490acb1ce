"""Run a stage module as `python -m` would, with one fault injected at a chosen step (tests only).

    python tests/run_stage.py [--kill-after-save STEP] [--kill-while-saving STEP]
                              [--signal-at STEP:SIGNAME] -- stages.<stage> ARGS...

The faults are real: the process SIGKILLs or signals itself, so nothing in it gets to clean up
(beyond what a signal handler of the stage does).
"""

import argparse
import os
import runpy
import signal
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from stages.training import loop, resume  # noqa: E402


def main():
    split = sys.argv.index("--")
    p = argparse.ArgumentParser()
    p.add_argument("--kill-after-save", type=int, default=None, help="SIGKILL once the state of STEP is saved")
    p.add_argument("--kill-while-saving", type=int, default=None,
                   help="SIGKILL halfway through writing the state tensors of STEP")
    p.add_argument("--signal-at", default=None, help="STEP:SIGNAME, sent at the start of STEP")
    opts = p.parse_args(sys.argv[1:split])
    module, *rest = sys.argv[split + 1:]

    if opts.kill_after_save is not None:
        save = resume.TrainState.save

        def save_then_die(self, *, step, **kw):
            out = save(self, step=step, **kw)
            if step == opts.kill_after_save:
                os.kill(os.getpid(), signal.SIGKILL)
            return out

        resume.TrainState.save = save_then_die

    if opts.kill_while_saving is not None:
        write = resume.write_tensors

        def write_half_then_die(path, tensors):
            write(path, tensors)
            if f"step-{opts.kill_while_saving:09d}" in str(path):
                data = Path(path).read_bytes()
                Path(path).write_bytes(data[: len(data) // 2])
                os.kill(os.getpid(), signal.SIGKILL)

        resume.write_tensors = write_half_then_die

    if opts.signal_at is not None:
        at, name = opts.signal_at.split(":")
        lr_at = loop.lr_at

        def lr_at_and_signal(step, total_steps, cfg):
            if step == int(at):
                os.kill(os.getpid(), getattr(signal, name))
            return lr_at(step, total_steps, cfg)

        loop.lr_at = lr_at_and_signal

    sys.argv = [module, *rest]
    runpy.run_module(module, run_name="__main__", alter_sys=True)


if __name__ == "__main__":
    main()
