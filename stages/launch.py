"""Start a stage over the GPUs its job was given: one process per GPU through `accelerate launch`
(one node, a free port) when there are several; plainly when there is one GPU or none.

    python -m stages.launch --gpus N -- stages.midtrain --config ...

Which GPUs: inside a SLURM job, the ones SLURM gave the job (its CUDA_VISIBLE_DEVICES). Outside
SLURM (a workstation with several GPUs, `snakemake --resources gpu=4`), Snakemake caps how many GPUs
its running jobs ask for but does not say which, so each job claims N free devices itself with one
lock file per device (flock, released when the job's processes end, whatever way they end), and
concurrent jobs get distinct CUDA_VISIBLE_DEVICES.

The launcher replaces itself with the stage (exec), so signals from SLURM or Snakemake reach it.
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


def visible_devices(env):
    """The GPU ids this process may use: CUDA_VISIBLE_DEVICES if set, else the /dev/nvidiaN files."""
    if "CUDA_VISIBLE_DEVICES" in env:
        return [d for d in env["CUDA_VISIBLE_DEVICES"].split(",") if d.strip() != ""]
    return sorted((m.group(1) for p in glob.glob("/dev/nvidia*")
                   if (m := re.fullmatch(r"/dev/nvidia(\d+)", p))), key=int)


def claim(devices, want, folder, timeout=None):
    """Lock `want` of `devices` (one lock file each in `folder`); returns [(device, fd)].

    Waits while fewer are free: Snakemake's --resources gpu=K keeps the sum of running jobs' GPUs
    within K, so a wait here is only for a job that is ending."""
    os.makedirs(folder, exist_ok=True)
    start = time.monotonic()
    while True:
        held = []
        for dev in devices:
            fd = os.open(os.path.join(folder, f"gpu{dev}.lock"), os.O_RDWR | os.O_CREAT, 0o666)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                continue
            held.append((dev, fd))
            if len(held) == want:
                return held
        for _, fd in held:
            os.close(fd)
        if timeout is not None and time.monotonic() - start > timeout:
            raise TimeoutError(f"fewer than {want} of GPUs {devices} free after {timeout} s (locks in {folder})")
        time.sleep(1.0)


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


def plan(want, env, lock_folder):
    """(number of processes, CUDA_VISIBLE_DEVICES or None, held lock fds) for a job asking `want` GPUs."""
    devices = visible_devices(env)
    if want <= 0 or not devices:
        return 1, None, []
    if env.get("SLURM_JOB_ID"):
        # SLURM already gave this job its own devices
        return len(devices), None, []
    if want > len(devices):
        raise SystemExit(f"stages.launch: the job asks for {want} GPUs but this machine shows "
                         f"{len(devices)} ({devices}); lower the rule's gpu resource "
                         f"(--set-resources RULE:gpu=N)")
    held = claim(devices, want, lock_folder)
    return want, ",".join(d for d, _ in held), [fd for _, fd in held]


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--gpus", type=int, default=0, help="GPUs the job asked for (its gpu resource)")
    p.add_argument("--lock-folder", default=os.environ.get(
        "CMT_GPU_LOCKS", os.path.join(tempfile.gettempdir(), f"cmt-gpu-locks-{os.getuid()}")))
    p.add_argument("module", help="the stage module, e.g. stages.midtrain")
    p.add_argument("args", nargs=argparse.REMAINDER)
    a = p.parse_args(argv)
    args = a.args[1:] if a.args[:1] == ["--"] else a.args
    processes, cuda_visible, fds = plan(a.gpus, os.environ, a.lock_folder)
    env = dict(os.environ)
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
