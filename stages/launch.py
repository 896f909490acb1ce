"""Start a stage over the GPUs its job was given: one process per GPU through `accelerate launch`
(one node, a free port) when there are several; plainly when there is one GPU or none, or with
--one-process (the stages that are not data-parallel: trajectory shards, samples, features).

    python -m stages.launch --gpus N [--one-process] -- stages.midtrain --config ...
    python -m stages.launch --gpus N --nodes M -- stages.midtrain --config ...    (M nodes x N GPUs)

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
of its jobs from there (stages/training/job_log.py), and the number of nodes (CMT_NODES), which the
job's record keeps for the cost ledger. Before it becomes `accelerate launch` it ignores SIGUSR1,
which SLURM sends to every process of the job step before the time limit (the profile's
--signal=USR1@300): left at its default, the signal would end torchrun's agent, and with it the
node's share of the step, while the stage's processes (which catch it: stages/training/resume.py)
save their state.

Several nodes (--nodes M, a training rule's `nodes` resource): one launcher per node, each starting
its node's processes (one per GPU) through Accelerate's multi-machine launch, M x GPUs processes in
all, with the machine rank, the main process's address and a port:
- in a SLURM job, the rule's command runs in the allocation's batch step (stages/config/multinode.py)
  and this launcher starts the others: `srun --nodes=M --ntasks-per-node=1` runs it once per node
  (--slurm-task), each taking its machine rank from SLURM_NODEID. Node 0, the allocation's first,
  names the main address (its SLURM node name, or CMT_MAIN_ADDRESS where the nodes reach each other
  by another name) and takes a free port on its host (or CMT_MAIN_PORT), and writes both into a file
  of the job step in the state folder (`.launch-<job id>.<step id>`, else beside --out), where the
  other nodes read them: two jobs on the same nodes never share a port. srun ends every node's
  launcher when one fails (--kill-on-bad-exit), so a node that stops does not leave the others
  waiting in a collective;
- outside SLURM (a user's own machines), start it on each machine with --node-rank R (0 on the
  machine of the main process) and --main-address HOST, or CMT_NODE_RANK and CMT_MAIN_ADDRESS, and
  the same --main-port (CMT_MAIN_PORT, default 29500); a machine without GPUs runs --processes
  processes (default 1). Nothing ends the other machines' processes when one machine fails: they stop
  when their next collective times out.
"""

import argparse
import fcntl
import glob
import os
import re
import shutil
import signal
import socket
import sys
import tempfile
import time
from pathlib import Path

from stages.core.cli import NODES_ENV, STARTED_ENV, launched_at

# Outside SLURM, where each machine's launcher learns its place in a job of several nodes
NODE_RANK_ENV, MAIN_ADDRESS_ENV, MAIN_PORT_ENV = "CMT_NODE_RANK", "CMT_MAIN_ADDRESS", "CMT_MAIN_PORT"
MAIN_PORT = 29500  # torchrun's own default
# How long a node waits for node 0's address and port: the nodes of a step start within seconds of
# each other, and a shared filesystem may show a new file to another node tens of seconds late.
RENDEZVOUS_TIMEOUT = 300.0


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


def free_port(host="127.0.0.1"):
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def command(module, args, processes, port, nodes=1, node_rank=0, main_address=None):
    """The argv that runs `module` with `processes` processes on this node, one of `nodes` (this one
    `node_rank`, the main process on `main_address`)."""
    if processes <= 1 and nodes <= 1:
        return [sys.executable, "-m", module, *args]
    where = ["--main_process_ip", main_address] if nodes > 1 else []
    return [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu",
            "--num_processes", str(processes * nodes), "--num_machines", str(nodes),
            "--machine_rank", str(node_rank), *where,
            "--main_process_port", str(port), "--mixed_precision", "no", "--dynamo_backend", "no",
            "--module", module, *args]


# ---- several nodes -----------------------------------------------------------------------------

def slurm_step(nodes, launcher_argv):
    """The argv that runs this launcher once on each of the job's `nodes` nodes, as one job step:
    every node's output in the job's log, each line led by its node's number; one node's failure
    ends the others; --overlap lets the step start where the command that runs it holds a step
    itself (a job step run through `srun -n1`)."""
    srun = shutil.which("srun")
    if srun is None:
        raise SystemExit(f"stages.launch: --nodes {nodes} in SLURM job but no srun on PATH; run the job "
                         "where SLURM's commands are")
    return [srun, f"--nodes={nodes}", f"--ntasks={nodes}", "--ntasks-per-node=1", "--kill-on-bad-exit=1",
            "--overlap", "--label", *launcher_argv]


def rendezvous_file(args, env):
    """Where node 0 of a SLURM job step tells the others the main address and port: a file named for
    the step in the stage's state folder (--state-dir), else beside its --out."""
    folder = arg_value(args, "--state-dir") or os.path.dirname(arg_value(args, "--out") or "") or "."
    return Path(folder) / f".launch-{env['SLURM_JOB_ID']}.{env.get('SLURM_STEP_ID', '0')}"


def arg_value(args, option):
    return args[args.index(option) + 1] if option in args[:-1] else None


def meet(path, main, address=None, port=None, timeout=RENDEZVOUS_TIMEOUT):
    """(address, port) of the main process: `main` writes them into `path` (atomically), the others
    wait for the file."""
    path = Path(path)
    if main:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".tmp-{path.name}-{os.getpid()}")
        tmp.write_text(f"{address} {port}\n")
        os.replace(tmp, path)
        return address, port
    deadline = time.monotonic() + timeout
    while True:
        try:
            address, port = path.read_text().split()
            return address, int(port)
        except (FileNotFoundError, ValueError):
            if time.monotonic() > deadline:
                raise SystemExit(f"stages.launch: node 0 of this job step wrote no address and port into {path} "
                                 f"within {timeout:g} s; see node 0's lines in the job's log") from None
            time.sleep(0.5)


def slurm_place(args, env, nodes):
    """(node rank, main address, main port) of this launcher, one task of a SLURM job step over `nodes` nodes."""
    rank, count = int(env["SLURM_NODEID"]), int(env.get("SLURM_STEP_NUM_NODES") or env.get("SLURM_NNODES"))
    if count != nodes:
        raise SystemExit(f"stages.launch: --nodes {nodes}, but this job step runs on {count} nodes "
                         f"({env.get('SLURM_STEP_NODELIST', '?')}); the job must ask for {nodes} (resources nodes)")
    if rank == 0:
        address = env.get(MAIN_ADDRESS_ENV) or env.get("SLURMD_NODENAME") or socket.gethostname()
        port = int(env.get(MAIN_PORT_ENV) or free_port(""))
        return (rank, *meet(rendezvous_file(args, env), True, address, port))
    return (rank, *meet(rendezvous_file(args, env), False))


def given_place(a, env, nodes):
    """(node rank, main address, main port) from the command line or the environment (outside SLURM)."""
    rank = a.node_rank if a.node_rank is not None else env.get(NODE_RANK_ENV)
    address = a.main_address or env.get(MAIN_ADDRESS_ENV)
    if rank is None or not address:
        raise SystemExit(f"stages.launch: --nodes {nodes} outside a SLURM job: start one launcher on each machine "
                         f"with --node-rank R (0 to {nodes - 1}, 0 where the main process runs) and --main-address "
                         f"HOST (that machine's address), or {NODE_RANK_ENV} and {MAIN_ADDRESS_ENV}; "
                         "under SLURM run it inside the job (snakemake --profile slurm)")
    try:
        rank = int(rank)
        port = int(a.main_port or env.get(MAIN_PORT_ENV) or MAIN_PORT)
    except ValueError:
        raise SystemExit(f"stages.launch: node rank {rank!r} and main port "
                         f"{a.main_port or env.get(MAIN_PORT_ENV)!r} must be whole numbers") from None
    if not 0 <= rank < nodes:
        raise SystemExit(f"stages.launch: node rank {rank} of --nodes {nodes}: give 0 to {nodes - 1}")
    return rank, address, port


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
    return f"{module} {arg_value(args, '--out') or ''}".strip()


def main(argv=None):
    started = time.time()  # the job's start, for the training stages' record of their jobs
    argv = sys.argv[1:] if argv is None else list(argv)
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--gpus", type=int, default=0, help="GPUs the job asked for (its gpu resource), on each node")
    p.add_argument("--one-process", action="store_true",
                   help="claim the job's GPUs but start one process (stages that are not data-parallel)")
    p.add_argument("--claim-timeout", type=float, default=float(os.environ.get("CMT_CLAIM_TIMEOUT", CLAIM_TIMEOUT)),
                   help="seconds to wait for free GPUs outside SLURM before stopping (env CMT_CLAIM_TIMEOUT)")
    p.add_argument("--lock-folder", default=os.environ.get(
        "CMT_GPU_LOCKS", os.path.join(tempfile.gettempdir(), f"cmt-gpu-locks-{os.getuid()}")))
    p.add_argument("--nodes", type=int, default=1, help="nodes of the job (its nodes resource): one launcher each")
    p.add_argument("--node-rank", type=int, default=None,
                   help=f"outside SLURM: this machine's place among --nodes, 0 for the main process's "
                        f"(env {NODE_RANK_ENV})")
    p.add_argument("--main-address", default=None,
                   help=f"outside SLURM: the address of the machine of node rank 0 (env {MAIN_ADDRESS_ENV})")
    p.add_argument("--main-port", type=int, default=None,
                   help=f"outside SLURM: a free port there, the same on every machine (env {MAIN_PORT_ENV}, "
                        f"default {MAIN_PORT})")
    p.add_argument("--processes", type=int, default=None,
                   help="processes on a machine without GPUs (default 1; with GPUs: one per GPU)")
    p.add_argument("--slurm-task", action="store_true",
                   help="(set by the launcher itself) one task of the job step that runs a launcher per node")
    p.add_argument("module", help="the stage module, e.g. stages.midtrain")
    p.add_argument("args", nargs=argparse.REMAINDER)
    a = p.parse_args(argv)
    args = a.args[1:] if a.args[:1] == ["--"] else a.args
    if a.nodes < 1:
        p.error(f"--nodes {a.nodes}: at least 1")
    if a.nodes > 1 and a.one_process:
        p.error(f"--one-process with --nodes {a.nodes}: a stage that runs one process runs on one node")
    env = dict(os.environ)
    slurm = bool(env.get("SLURM_JOB_ID"))
    if a.nodes > 1 and slurm and not a.slurm_task:
        # the rule's command in the allocation's batch step: a launcher on every node, as one job step
        env[STARTED_ENV] = repr(started)
        step = slurm_step(a.nodes, [sys.executable, "-m", "stages.launch", "--slurm-task", *argv])
        print(f"[launch] {a.nodes} nodes of SLURM job {env['SLURM_JOB_ID']}: {' '.join(step[:9])} ...",
              file=sys.stderr, flush=True)
        os.execve(step[0], step, env)
    if a.slurm_task:
        started = launched_at() or started  # the job's start: the launcher that ran srun
    processes, cuda_visible, fds = plan(a.gpus, env, a.lock_folder, a.one_process, a.claim_timeout,
                                        holder=job_name(a.module, args))
    without_gpus = a.gpus <= 0 or not visible_devices(env)
    if a.processes is not None and not without_gpus:
        p.error(f"--processes {a.processes} on a machine with GPUs: it starts one process per GPU (--gpus)")
    if without_gpus and not a.one_process:
        processes = a.processes or 1
    elif a.nodes > 1 and processes != a.gpus:
        raise SystemExit(f"stages.launch: this node shows {processes} GPUs ({visible_devices(env)}), the job asked "
                         f"for {a.gpus} on each of its {a.nodes} nodes")
    rank, address, port = 0, None, free_port()
    if a.nodes > 1:
        rank, address, port = slurm_place(args, env, a.nodes) if slurm else given_place(a, env, a.nodes)
    env[STARTED_ENV] = repr(started)
    env[NODES_ENV] = str(a.nodes)
    if cuda_visible is not None:
        env["CUDA_VISIBLE_DEVICES"] = cuda_visible
    for fd in fds:  # the locks live as long as the stage's processes
        os.set_inheritable(fd, True)
    argv = command(a.module, args, processes, port, a.nodes, rank, address)
    where = f" on node {rank} of {a.nodes}, main process at {address}:{port}" if a.nodes > 1 else ""
    print(f"[launch] {processes} process(es){where}, CUDA_VISIBLE_DEVICES={env.get('CUDA_VISIBLE_DEVICES', '')}: "
          f"{' '.join(argv[:12])} ...", file=sys.stderr, flush=True)
    if argv[1:3] == ["-m", "accelerate.commands.launch"]:
        signal.signal(signal.SIGUSR1, signal.SIG_IGN)  # torchrun's agent outlives the save (docstring)
    os.execve(argv[0], argv, env)


if __name__ == "__main__":
    main()
