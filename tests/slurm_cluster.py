"""A real single-node SLURM cluster for tests: munged, mariadb, slurmdbd, slurmctld and slurmd from
Debian's packages, started in a temporary folder and stopped by the PIDs this module started.

Pitfalls found on this machine, and what this module does about them:
- the plugin's job step drops SLURM_CONF, so the config goes to /etc/slurm/slurm.conf (any file
  there is put back afterwards);
- munged needs its socket folder world-executable;
- the plugin asks sacct for job states, so accounting (slurmdbd over mariadb) runs too;
- the node declares its real CPU count and memory, and two GPUs with no device files (gres without
  File), so GPU rules are scheduled as GPU jobs on a CPU-only machine;
- munged's socket and /etc/slurm are the host's, so one cluster runs at a time: `cluster()` holds a
  lock on the host (tests spread over processes by pytest-xdist wait for each other there).
"""

import contextlib
import fcntl
import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

PACKAGES = ["slurm-wlm", "munge", "slurmdbd", "mariadb-server"]
DAEMONS = ["munged", "mariadbd", "slurmdbd", "slurmctld", "slurmd"]
ETC = Path("/etc/slurm")
CLUSTER = "cmttest"
SOCKET = Path("/run/munge/munge.socket.2")
HOST_LOCK = Path("/tmp/cmt-test-slurm.lock")


def missing_daemons():
    return [d for d in DAEMONS if not (shutil.which(d) or Path("/usr/sbin", d).exists())]


def install():
    """apt-get install the packages when a daemon is missing; returns why it cannot, or None."""
    if not missing_daemons():
        return None
    if os.geteuid() != 0 or not shutil.which("apt-get"):
        return f"missing {missing_daemons()} and no root apt-get to install {PACKAGES}"
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    run = subprocess.run(["apt-get", "install", "-y", "-q", *PACKAGES], env=env,
                         capture_output=True, text=True)
    if run.returncode != 0 or missing_daemons():
        return f"apt-get install {' '.join(PACKAGES)} failed: {run.stderr[-500:]}"
    return None


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def sbin(name):
    return shutil.which(name) or f"/usr/sbin/{name}"


def wait_for(check, what, timeout=60):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return
        time.sleep(0.3)
    raise TimeoutError(f"{what} did not come up within {timeout} s")


def quiet(cmd, **kw):
    return subprocess.run(cmd, capture_output=True, text=True, **kw)


class Cluster:
    """`nodes` > 1: that many SLURM nodes on this host (NodeName cmt1..cmtN, each its own slurmd
    started with -N on its own port), which needs a slurmd built with --enable-multiple-slurmd;
    `multiple_slurmd()` says whether this one is."""

    def __init__(self, root, nodes=1):
        self.root = Path(root)
        self.nodes = nodes
        self.procs = []  # (name, Popen) in start order
        self.saved = {}  # /etc/slurm files we replaced -> their old bytes (None: there was none)
        self.env = dict(os.environ)

    # -- files ---------------------------------------------------------------------------------
    def put_etc(self, name, text, mode=0o644):
        path = ETC / name
        if path not in self.saved:
            self.saved[path] = path.read_bytes() if path.exists() else None
        path.write_text(text)
        os.chmod(path, mode)

    def restore_etc(self):
        for path, old in self.saved.items():
            if old is None:
                path.unlink(missing_ok=True)
            else:
                path.write_bytes(old)

    # -- daemons -------------------------------------------------------------------------------
    def spawn(self, name, cmd):
        log = open(self.root / f"{name}.out", "w")
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=self.env,
                                start_new_session=True)
        self.procs.append((name, proc))
        time.sleep(0.2)
        if proc.poll() is not None:
            raise RuntimeError(f"{name} exited at once: {(self.root / f'{name}.out').read_text()[-2000:]}")
        return proc

    def start(self):
        r = self.root
        ETC.mkdir(parents=True, exist_ok=True)
        host = socket.gethostname().split(".")[0]
        cpus = os.cpu_count()
        mem_mb = int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**20) - 1024
        ports = {k: free_port() for k in ("db", "dbd", "ctld", "d")}
        node_ports = [free_port() for _ in range(self.nodes)]

        # munge: own key, the default socket (Slurm's commands and job steps look there); the
        # socket folder must be world-executable
        if SOCKET.exists():
            if quiet(["munge", "-n"]).returncode == 0:
                raise RuntimeError(f"a munged already answers on {SOCKET}; stop it to run this test")
            SOCKET.unlink()  # left by a munged that was killed
        SOCKET.parent.mkdir(parents=True, exist_ok=True)
        os.chmod(SOCKET.parent, 0o755)
        os.chmod(r, 0o755)
        sock = SOCKET
        quiet([sbin("mungekey"), "--create", "--keyfile", str(r / "munge.key")], check=True)
        os.chmod(r / "munge.key", 0o600)
        self.spawn("munged", [sbin("munged"), "--foreground", "--force", f"--socket={sock}",
                              f"--key-file={r / 'munge.key'}", f"--pid-file={r / 'munged.pid'}",
                              f"--log-file={r / 'munged.log'}", f"--seed-file={r / 'munge.seed'}"])
        wait_for(sock.exists, "munged")

        # mariadb on a private port and socket
        db = r / "db"
        quiet(["mariadb-install-db", "--no-defaults", f"--datadir={db}", "--user=root",
               "--auth-root-authentication-method=normal", "--skip-test-db"], check=True)
        dbsock = r / "mysql.sock"
        self.spawn("mariadbd", [sbin("mariadbd"), "--no-defaults", f"--datadir={db}", "--user=root",
                                f"--socket={dbsock}", f"--port={ports['db']}", "--bind-address=127.0.0.1",
                                f"--pid-file={r / 'mariadb.pid'}", "--innodb-buffer-pool-size=64M",
                                "--skip-log-bin"])
        wait_for(lambda: quiet(["mariadb", f"--socket={dbsock}", "-uroot", "-e", "select 1"]).returncode == 0,
                 "mariadb")
        quiet(["mariadb", f"--socket={dbsock}", "-uroot", "-e",
               "CREATE USER IF NOT EXISTS 'slurm'@'127.0.0.1' IDENTIFIED BY 'slurm';"
               "GRANT ALL ON *.* TO 'slurm'@'127.0.0.1'; FLUSH PRIVILEGES;"], check=True)

        auth = "AuthType=auth/munge\n"
        self.put_etc("slurmdbd.conf", f"""{auth}DbdHost=localhost
DbdPort={ports['dbd']}
SlurmUser=root
StorageType=accounting_storage/mysql
StorageHost=127.0.0.1
StoragePort={ports['db']}
StorageUser=slurm
StoragePass=slurm
StorageLoc=slurm_acct_db
PidFile={r / 'slurmdbd.pid'}
LogFile={r / 'slurmdbd.log'}
DebugLevel=info
""", mode=0o600)
        self.put_etc("slurm.conf", f"""ClusterName={CLUSTER}
SlurmctldHost={host}
SlurmUser=root
SlurmctldPort={ports['ctld']}
SlurmdPort={ports['d']}
{auth}StateSaveLocation={r / 'state'}
SlurmdSpoolDir={r / ('spool-%n' if self.nodes > 1 else 'spool')}
SlurmctldPidFile={r / 'slurmctld.pid'}
SlurmdPidFile={r / ('slurmd-%n.pid' if self.nodes > 1 else 'slurmd.pid')}
SlurmctldLogFile={r / 'slurmctld.log'}
SlurmdLogFile={r / ('slurmd-%n.log' if self.nodes > 1 else 'slurmd.log')}
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
MpiDefault=none
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU_Memory
GresTypes=gpu
ReturnToService=2
MinJobAge=300
SchedulerParameters=defer_batch
AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=localhost
AccountingStoragePort={ports['dbd']}
AccountingStorageTRES=gres/gpu
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/none
AccountingStoreFlags=job_comment
{self.node_lines(host, cpus, mem_mb, node_ports)}
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP
""")
        self.put_etc("gres.conf", "".join(f"NodeName={n} Name=gpu File=/dev/null\nNodeName={n} Name=gpu "
                                          "File=/dev/zero\n" for n in self.node_names(host)))
        (r / "state").mkdir()
        for n in self.node_names(host):
            (r / ("spool" if self.nodes == 1 else f"spool-{n}")).mkdir()

        self.spawn("slurmdbd", [sbin("slurmdbd"), "-D"])
        wait_for(lambda: quiet(["sacctmgr", "-n", "list", "cluster"]).returncode == 0, "slurmdbd")
        quiet(["sacctmgr", "-i", "add", "cluster", CLUSTER])
        self.spawn("slurmctld", [sbin("slurmctld"), "-D", "-i"])
        if self.nodes == 1:
            self.spawn("slurmd", [sbin("slurmd"), "-D"])
        else:
            for n in self.node_names(host):
                self.spawn(f"slurmd-{n}", [sbin("slurmd"), "-D", "-N", n])
        wait_for(lambda: quiet(["sinfo", "-h", "-N", "-o", "%T"]).stdout.split().count("idle") == self.nodes,
                 f"the {self.nodes} node(s) (sinfo idle)")

    def node_names(self, host):
        return [host] if self.nodes == 1 else [f"cmt{i}" for i in range(1, self.nodes + 1)]

    def node_lines(self, host, cpus, mem_mb, ports):
        """One node: this host as it is. Several: each declares this host's CPUs and a share of its
        memory, and listens on its own port on 127.0.0.1."""
        if self.nodes == 1:
            return f"NodeName={host} CPUs={cpus} RealMemory={mem_mb} Gres=gpu:2 State=UNKNOWN"
        return "\n".join(f"NodeName={n} NodeHostname={host} NodeAddr=127.0.0.1 Port={port} CPUs={cpus} "
                         f"RealMemory={mem_mb // self.nodes} Gres=gpu:2 State=UNKNOWN"
                         for n, port in zip(self.node_names(host), ports, strict=True))

    def stop(self):
        """SIGTERM each daemon this cluster started, newest first, by its PID; SIGKILL stragglers."""
        for _name, proc in reversed(self.procs):
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(timeout=20)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
        self.restore_etc()

    def logs(self):
        out = []
        for f in sorted(self.root.glob("*.log")) + sorted(self.root.glob("*.out")):
            out.append(f"--- {f.name}\n{f.read_text(errors='replace')[-3000:]}")
        return "\n".join(out)


@contextlib.contextmanager
def host_lock(timeout=1800):
    """The host's one test cluster: wait (at most `timeout` seconds) for another test's to stop."""
    with open(HOST_LOCK, "a") as f:
        deadline = time.monotonic() + timeout
        while True:
            try:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"another test's SLURM cluster held {HOST_LOCK} for {timeout} s") from None
                time.sleep(1)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


@contextlib.contextmanager
def cluster(root, nodes=1):
    with host_lock():
        c = Cluster(root, nodes)
        try:
            c.start()
            yield c
        finally:
            c.stop()
