"""Start a stage over the GPUs its job was given: one process per GPU through `accelerate launch`
(one node, a free port) when there are several; plainly when there is one GPU or none, or with
--one-process (the stages that are not data-parallel: trajectory shards, samples, features).

    python -m stages.launch --gpus N [--one-process] -- stages.midtrain --config ...

Which GPUs: inside a SLURM job, the ones SLURM gave the job (its CUDA_VISIBLE_DEVICES). Outside
SLURM (a workstation with several GPUs, `snakemake --resources gpu=4`), Snakemake caps how many GPUs
its running jobs ask for but does not say which, so each job claims N free devices itself with one
lock file per device (flock, released when the job's processes end, whatever way they end), and
concurrent jobs get distinct CUDA_VISIBLE_DEVICES. A job that finds too few free devices waits for
them, up to --claim-timeout seconds (CMT_CLAIM_TIMEOUT, default 600), then stops naming the
holders: with --resources gpu=N at most N GPUs are asked for at once, so a wait is only for a job
that is ending, and a long one means Snakemake was not told how many GPUs there are.

The launcher replaces itself with the stage (exec), so signals from SLURM or Snakemake reach it.
It passes its start time to the stage's processes (CMT_JOB_STARTED): a training stage times each
of its jobs from there (stages/training/job_log.py).
"""

import argparse
import fcntl
import glob
import os
import re
import socket
import sys
import tempfile
import time

from stages.core.cli import STARTED_ENV


def visible_devices(env):
    """The GPU ids this process may use: CUDA_VISIBLE_DEVICES if set, else the /dev/nvidiaN files."""
    if "CUDA_VISIBLE_DEVICES" in env:
        return [d for d in env["CUDA_VISIBLE_DEVICES"].split(",") if d.strip() != ""]
    return sorted((m.group(1) for p in glob.glob("/dev/nvidia*")
                   if (m := re.fullmatch(r"/dev/nvidia(\d+)", p))), key=int)


CLAIM_TIMEOUT = 600.0


def claim(devices, want, folder, timeout=None, holder="", wait_message=None):
    """Lock `want` of `devices` (one lock file each in `folder`); returns [(device, fd)].

    Waits while fewer are free, up to `timeout` seconds (None: no limit), then raises TimeoutError
    naming the holders. `holder` is written into each lock this job takes (who holds a GPU);
    `wait_message(holders)` is called once when the job has to wait."""
    os.makedirs(folder, exist_ok=True)
    start = time.monotonic()
    told = False
    while True:
        held, busy = [], []
        for dev in devices:
            path = os.path.join(folder, f"gpu{dev}.lock")
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                busy.append(dev)
                continue
            held.append((dev, fd))
            if len(held) == want:
                for _, f in held:
                    os.ftruncate(f, 0)
                    os.pwrite(f, f"{os.getpid()} {holder}\n".encode(), 0)
                return held
        for _, fd in held:
            os.close(fd)
        holders = {dev: holder_of(folder, dev) for dev in busy}
        if timeout is not None and time.monotonic() - start > timeout:
            raise TimeoutError(f"fewer than {want} of GPUs {devices} free after {timeout:g} s (locks in {folder}; "
                               f"held by {describe(holders)})")
        if not told and wait_message is not None:
            wait_message(holders)
            told = True
        time.sleep(1.0)


def holder_of(folder, dev):
    """What the job holding a device's lock wrote into it: 'pid what'."""
    try:
        with open(os.path.join(folder, f"gpu{dev}.lock")) as f:
            return f.read().strip() or "?"
    except OSError:
        return "?"


def describe(holders):
    return "; ".join(f"GPU {dev}: pid {who}" for dev, who in holders.items()) or "nobody (all were just freed)"


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def command(module, args, processes, port):
    """The argv that runs `module` with `processes` processes on one node."""
    if processes <= 1:
        return [sys.executable, "-m", module, *args]
    return [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu",
            "--num_processes", str(processes), "--num_machines", "1", "--machine_rank", "0",
            "--main_process_port", str(port), "--mixed_precision", "no", "--dynamo_backend", "no",
            "--module", module, *args]


def plan(want, env, lock_folder, one_process=False, timeout=None, holder=""):
    """(number of processes, CUDA_VISIBLE_DEVICES or None, held lock fds) for a job asking `want` GPUs;
    with `one_process` the job gets its devices but runs one process (the first device is its own)."""
    devices = visible_devices(env)
    if want <= 0 or not devices:
        return 1, None, []
    if env.get("SLURM_JOB_ID"):
        # SLURM already gave this job its own devices
        return (1 if one_process else len(devices)), None, []
    if want > len(devices):
        raise SystemExit(f"stages.launch: the job asks for {want} GPUs but this machine shows "
                         f"{len(devices)} ({devices}); lower the rule's gpu resource "
                         f"(--set-resources RULE:gpu=N)")

    def waiting(holders):
        limit = "" if timeout is None else f"; giving up after {timeout:g} s"
        print(f"[launch] waiting for {want} free GPU(s) of {devices}, held by {describe(holders)}{limit}",
              file=sys.stderr, flush=True)

    try:
        held = claim(devices, want, lock_folder, timeout, holder, waiting)
    except TimeoutError as e:
        raise SystemExit(
            f"stages.launch: {e}. Snakemake started more GPU jobs than this machine has free GPUs: run it "
            f"with --resources gpu={len(devices)} (the GPUs of this machine) so it starts no more than that, "
            "or wait longer with --claim-timeout / CMT_CLAIM_TIMEOUT (seconds) if another workflow holds "
            "them on purpose") from None
    return (1 if one_process else want), ",".join(d for d, _ in held), [fd for _, fd in held]


def job_name(module, args):
    """How a lock names its job: the stage and its output."""
    out = args[args.index("--out") + 1] if "--out" in args[:-1] else ""
    return f"{module} {out}".strip()


def main(argv=None):
    started = time.time()  # the job's start, for the training stages' record of their jobs
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--gpus", type=int, default=0, help="GPUs the job asked for (its gpu resource)")
    p.add_argument("--one-process", action="store_true",
                   help="claim the job's GPUs but start one process (stages that are not data-parallel)")
    p.add_argument("--claim-timeout", type=float, default=float(os.environ.get("CMT_CLAIM_TIMEOUT", CLAIM_TIMEOUT)),
                   help="seconds to wait for free GPUs outside SLURM before stopping (env CMT_CLAIM_TIMEOUT)")
    p.add_argument("--lock-folder", default=os.environ.get(
        "CMT_GPU_LOCKS", os.path.join(tempfile.gettempdir(), f"cmt-gpu-locks-{os.getuid()}")))
    p.add_argument("module", help="the stage module, e.g. stages.midtrain")
    p.add_argument("args", nargs=argparse.REMAINDER)
    a = p.parse_args(argv)
    args = a.args[1:] if a.args[:1] == ["--"] else a.args
    processes, cuda_visible, fds = plan(a.gpus, os.environ, a.lock_folder, a.one_process, a.claim_timeout,
                                        holder=job_name(a.module, args))
    env = dict(os.environ)
    env[STARTED_ENV] = repr(started)
    if cuda_visible is not None:
        env["CUDA_VISIBLE_DEVICES"] = cuda_visible
    for fd in fds:  # the locks live as long as the stage's processes
        os.set_inheritable(fd, True)
    argv = command(a.module, args, processes, free_port())
    print(f"[launch] {processes} process(es), CUDA_VISIBLE_DEVICES={env.get('CUDA_VISIBLE_DEVICES', '')}: "
          f"{' '.join(argv[:12])} ...", file=sys.stderr, flush=True)
    os.execve(argv[0], argv, env)


if __name__ == "__main__":
    main()
