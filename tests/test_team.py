"""Two workdirs on one store, as two teammates (or two overlapping runs) use it: started together,
both finish and each store file is made once; killed mid-way, the other run finishes; and no store
file is ever deleted or replaced while they run (Snakemake deletes outputs, and store files are
none: each rule that makes one outputs a receipt in its workdir)."""

import os
import re
import signal
import subprocess
import threading
import time
from pathlib import Path

import pytest
import yaml
from workflow_runs import REPO, command

from stages.data import shards

pytestmark = pytest.mark.slow
TARGET = "results/tiny/trajectories/manifest.json"
ITEMS = 5  # dataset, teacher, trajectory spec, two shards


@pytest.fixture
def team(tmp_path):
    """A smaller tiny row (the store only: dataset, teacher, spec, 2 shards, manifest) on a shared store."""
    config = yaml.safe_load((REPO / "tests" / "tiny.yaml").read_text())
    config.update(store=str(tmp_path / "store"), threads={"teacher": 1, "train": 1, "light": 1},
                  network={"kind": "small_unet", "channels": 8, "channel_mult": [1], "num_blocks": 1})
    config["teacher"].update(steps=10, batch=16)
    config["trajectories"].update(per_shard=8, batch=8)
    path = tmp_path / "team.yaml"
    path.write_text(yaml.safe_dump(config))
    workdirs = []
    for name in ("alice", "bob"):
        (tmp_path / name).mkdir()
        workdirs.append(tmp_path / name)
    return path, tmp_path / "store", workdirs


def snakemake(workdir, config, *args):
    """Its own process group, as a terminal or a batch job gives each run."""
    return subprocess.Popen(command(workdir, TARGET, *args, configs=[config], cores=1), cwd=workdir,
                            stdout=open(workdir / "snakemake.out", "a"), stderr=subprocess.STDOUT,
                            start_new_session=True)


def run(workdir, config, *args):
    """snakemake ARGS (default target: the manifest) in the workdir, to the end."""
    if not any(a.startswith("results/") for a in args):
        args = (TARGET, *args)
    return subprocess.run(command(workdir, *args, configs=[config], cores=1), cwd=workdir,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def finish(proc, workdir, timeout=600):
    rc = proc.wait(timeout)
    assert rc == 0, (workdir / "snakemake.out").read_text()[-6000:]


class StoreWatch(threading.Thread):
    """Polls the store: every file once seen must stay, with the same inode and mtime. Temporary
    files, lock files (each holder writes its name into it), use logs (replaced whole at each use),
    the environment a stage leaves for its record (removed once recorded) and training states
    (deleted by design when the teacher is written) are not store files."""

    def __init__(self, root):
        super().__init__(daemon=True)
        self.root, self.seen, self.changes, self.done = root, {}, [], threading.Event()

    def files(self):
        out = {}
        # os.walk skips a folder that goes between listing and reading it (a training state removed
        # once the teacher is written, a temporary folder): those hold no store files
        for folder, dirs, names in os.walk(self.root):
            dirs[:] = [d for d in dirs if not d.endswith(("-state", ".tmp"))]
            for name in names:
                if name.endswith((".tmp", ".lock", ".uses.json", ".env.json")):
                    continue
                p = Path(folder) / name
                try:
                    st = p.stat()
                except FileNotFoundError:
                    continue  # a temporary file gone between listing and stat
                out[p] = (st.st_ino, st.st_mtime_ns)
        return out

    def run(self):
        while not self.done.is_set():
            now = self.files()
            for p, sig in self.seen.items():
                if now.get(p) != sig:
                    self.changes.append((p, sig, now.get(p)))
            self.seen.update(now)
            time.sleep(0.1)

    def stop(self):
        self.done.set()
        self.join()
        assert not self.changes, f"store files deleted or replaced: {self.changes}"
        assert len([p for p in self.seen if p.name.endswith(".record.json")]) == ITEMS


def store_lines(workdir, word):
    """{item file: count} of the `[store] <word> <file>` lines in the workdir's job logs."""
    found = {}
    for log in (workdir / "results" / "tiny" / "logs").rglob("*.log"):
        for m in re.finditer(rf"^\[store\] {word} (\S+)", log.read_text(), re.M):
            found[m.group(1)] = found.get(m.group(1), 0) + 1
    return found


def made(workdirs):
    total = {}
    for w in workdirs:
        for item, n in store_lines(w, "made").items():
            total[item] = total.get(item, 0) + n
    return total


def wait_for_text(path, text, timeout=300):
    end = time.monotonic() + timeout
    while not (path.exists() and text in path.read_text()):
        if time.monotonic() > end:
            raise TimeoutError(f"{path}: no {text!r} after {timeout} s")
        time.sleep(0.05)


@pytest.mark.heavy
def test_two_workdirs_started_together_both_finish_and_make_each_item_once(team):
    config, store, (alice, bob) = team
    watch = StoreWatch(store)
    watch.start()
    runs = [snakemake(w, config) for w in (alice, bob)]
    for proc, w in zip(runs, (alice, bob), strict=True):
        finish(proc, w)
    watch.stop()
    counts = made([alice, bob])
    assert len(counts) == ITEMS and set(counts.values()) == {1}, counts
    # both manifests list the same shards, sizes and sha256 (from the records)
    manifests = [(w / TARGET).read_text() for w in (alice, bob)]
    assert manifests[0] == manifests[1]
    for w in (alice, bob):
        assert "Nothing to be done" in run(w, config, "-n").stdout

    # a damaged shard (same size, one byte flipped): the check names the one command that remakes it
    shard = Path(next(iter(p for p in counts if p.endswith("shard-000001.tar"))))
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 1
    shard.write_bytes(bytes(data))
    with pytest.raises(ValueError, match="sha256 differs") as err:
        shards.check_manifest(alice / TARGET)
    command = re.search(r"`snakemake (--force \S+ --config store_remake=True)`", str(err.value)).group(1).split()
    result = run(alice, config, *command)
    assert result.returncode == 0, result.stdout[-3000:]
    assert re.findall(r"^(?:local)?rule (\w+):", result.stdout, re.M) == ["trajectory_shard"]
    for w in (alice, bob):  # the same bytes again: both workdirs' manifests hold
        shards.check_manifest(w / TARGET)


@pytest.mark.heavy
def test_killing_one_run_mid_teacher_leaves_the_other_to_finish(team):
    config, store, (alice, bob) = team
    teacher_log = Path("results/tiny/logs/train_teacher.log")
    watch = StoreWatch(store)
    watch.start()
    first = snakemake(alice, config)
    wait_for_text(alice / teacher_log, "[store] making")
    os.killpg(first.pid, signal.SIGSTOP)  # alice's run holds the teacher's lock and stays mid-way
    second = snakemake(bob, config)
    wait_for_text(bob / teacher_log, "waiting for it")
    os.killpg(first.pid, signal.SIGKILL)  # the whole run: Snakemake and its jobs
    first.wait(30)
    finish(second, bob)
    teacher = str(next(store.glob("teachers/*/model.safetensors")))
    assert "[store] made" not in (alice / teacher_log).read_text()
    assert store_lines(bob, "made").get(teacher) == 1  # bob took over the teacher
    # alice's run again, once Snakemake's lock of the killed run is lifted: it takes the rest from
    # the store, in local jobs that only read the records
    assert run(alice, config, "--unlock").returncode == 0
    finish(snakemake(alice, config), alice)
    assert f"[store] {teacher}: complete in the store" in (alice / teacher_log).read_text()
    assert "rule train_teacher_from_store:" in (alice / "snakemake.out").read_text()
    watch.stop()
    counts = made([alice, bob])
    assert len(counts) == ITEMS and set(counts.values()) == {1}, counts
    assert (alice / TARGET).read_text() == (bob / TARGET).read_text()
