"""The team store (stages/files/store.py, stages/files/atomic.py): files a teammate can read, items
made once under a lock and reused from their record, receipts, and concurrent writers of one file."""

import copy
import hashlib
import json
import multiprocessing as mp
import os
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from stages import networks
from stages.data import shards
from stages.files import atomic, checkpoints, store
from stages.networks.precond import Precond
from stages.training import resume

REPO = Path(__file__).resolve().parents[1]


def samples(count=64):
    rng = np.random.default_rng(0)  # the same trajectories in every writer, as the same key implies
    sigmas = np.linspace(80.0, 0.002, 17)
    for i in range(count):
        yield i, rng.standard_normal((17, 3, 16, 16)).astype(np.float16), sigmas, {"index": i, "seed": 0}


def writer(path, barrier, rounds):
    for _ in range(rounds):
        barrier.wait()
        shards.write_shard(path, samples())


def test_two_processes_writing_one_shard_leave_one_whole_copy(tmp_path):
    expected = tmp_path / "alone.tar"
    shards.write_shard(expected, samples())
    path = tmp_path / "store" / "shard-000000.tar"
    ctx = mp.get_context("fork")
    barrier, rounds = ctx.Barrier(2), 5
    procs = [ctx.Process(target=writer, args=(path, barrier, rounds)) for _ in range(2)]
    for p in procs:
        p.start()
    # read while they write: every time the final name exists, it is a complete shard
    seen = 0
    while any(p.is_alive() for p in procs):
        if path.exists():
            assert len(shards.read_shard(path)) == 64
            seen += 1
    for p in procs:
        p.join()
        assert p.exitcode == 0
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    assert digest == hashlib.sha256(expected.read_bytes()).hexdigest()
    assert [f.name for f in path.parent.iterdir()] == [path.name]  # no temporary left behind
    assert seen > 0


# ---- file modes -------------------------------------------------------------------------------

ARCH = {"kind": "small_unet", "channels": 8, "channel_mult": [1], "num_blocks": 1, "in_channels": 1,
        "resolution": 8, "dropout": 0.0}


def write_everything(root):
    """Every kind of file the stages write, through the code that writes it."""
    atomic.write_json(root / "store" / "datasets" / "k" / "manifest.json", {"a": 1})
    shards.write_shard(root / "store" / "trajectories" / "k" / "shard-000000.tar", samples(2))
    net = Precond(networks.build(ARCH), "edm", 0.5, 0.002)
    checkpoints.save(root / "store" / "teachers" / "k" / "model.safetensors", net=net, ema=copy.deepcopy(net),
                     meta={"role": "teacher"})
    opt = torch.optim.Adam(net.parameters())
    net(torch.zeros(1, 1, 8, 8), torch.ones(1)).sum().backward()
    opt.step()
    resume.TrainState(root / "store" / "teachers" / "k-state", stage="t", identity={}).save(
        step=1, total_steps=2, batch=1, net=net, ema=copy.deepcopy(net), optimizer=opt)
    files = [root / "store" / "teachers" / "k" / "model.safetensors", root / "store" / "teachers" / "k" / "model.json"]
    with store.ItemLock(files):
        store.write_record(files, "k")
    store.write_receipt(root / "results" / "receipts" / "teacher.json", files, store.read_record(files), True)


@pytest.mark.parametrize("umask", [0o022, 0o002])
def test_files_and_folders_get_the_mode_of_the_users_umask(tmp_path, umask):
    """mkstemp's 0600 (and safetensors' own temporary file) would lock teammates out of the store."""
    old = os.umask(umask)
    try:
        write_everything(tmp_path)
    finally:
        os.umask(old)
    paths = list(tmp_path.rglob("*"))
    assert {p.name for p in paths} >= {"manifest.json", "shard-000000.tar", "model.safetensors", "model.json",
                                      "model.safetensors.record.json", ".model.safetensors.lock", "teacher.json",
                                      "state.safetensors", "state.json", "step-000000001"}
    for p in paths:
        mode = stat.S_IMODE(p.stat().st_mode)
        want = (0o777 if p.is_dir() else 0o666) & ~umask
        assert mode == want, f"{p.relative_to(tmp_path)}: {oct(mode)}, want {oct(want)} under umask {oct(umask)}"


# ---- items: make once, reuse from the record, remake on request --------------------------------

MAKER = """
import os, sys, time
from pathlib import Path
sys.path.insert(0, {repo!r})
from stages.files import atomic
out, count, delay = Path(sys.argv[1]), Path(sys.argv[2]), float(sys.argv[3])
with open(count, "a") as f:
    f.write("run\\n")
time.sleep(delay)
atomic.write_bytes(out, b"made by " + str(os.getpid()).encode())
atomic.write_json(out.with_suffix(".json"), {{"sha256": atomic.sha256_file(out)}})
sys.exit(int(os.environ.get("MAKER_EXIT", "0")))
"""


@pytest.fixture
def item(tmp_path):
    folder = tmp_path / "store" / "k"
    files = [folder / "thing.bin", folder / "thing.json"]
    maker = tmp_path / "maker.py"
    maker.write_text(MAKER.format(repo=str(REPO)))
    count = tmp_path / "runs.txt"

    def command(delay=0.0):
        return [sys.executable, str(maker), str(files[0]), str(count), str(delay)]

    def runs():
        return len(count.read_text().splitlines()) if count.exists() else 0

    return files, command, runs, tmp_path


def test_an_item_is_made_once_then_reused_from_its_record(item, capsys):
    files, command, runs, tmp = item
    assert store.provide(files, "k", tmp / "r1.json", "make", command()) == 0
    assert runs() == 1 and store.complete(files)
    record = json.loads(store.record_path(files).read_text())
    assert [e["name"] for e in record["files"]] == ["thing.bin", "thing.json"]
    assert record["files"][0]["sha256"] == atomic.sha256_file(files[0])
    receipt = store.read_receipt(tmp / "r1.json")
    assert receipt["made_by_this_job"] and receipt["files"][0] == {
        "path": str(files[0]), "bytes": files[0].stat().st_size, "sha256": record["files"][0]["sha256"]}
    inode = files[0].stat().st_ino
    # a second maker and a `reuse` job: the stage does not run again and nothing is rewritten
    assert store.provide(files, "k", tmp / "r2.json", "make", command()) == 0
    assert store.provide(files, "k", tmp / "r3.json", "reuse", ["false"]) == 0
    assert runs() == 1 and files[0].stat().st_ino == inode
    assert not store.read_receipt(tmp / "r2.json")["made_by_this_job"]
    assert "reusing it" in capsys.readouterr().out


def test_reuse_is_a_stat_not_a_hash(item, monkeypatch):
    files, command, runs, tmp = item
    store.provide(files, "k", tmp / "r1.json", "make", command())
    monkeypatch.setattr(atomic, "sha256_file", lambda *a: pytest.fail("reuse hashed a file"))
    assert store.provide(files, "k", tmp / "r2.json", "make", command()) == 0


def test_a_truncated_or_missing_file_makes_the_item_incomplete(item):
    files, command, runs, tmp = item
    store.provide(files, "k", tmp / "r1.json", "make", command())
    files[0].write_bytes(files[0].read_bytes()[:-1])
    assert not store.complete(files)
    with pytest.raises(SystemExit, match="was complete when this run was planned and is not now"):
        store.provide(files, "k", tmp / "r2.json", "reuse", command())
    # a file that differs from its record is damaged, not adopted: the item is made again
    assert store.provide(files, "k", tmp / "r2.json", "make", command()) == 0
    assert runs() == 2 and store.complete(files)
    files[1].unlink()
    assert store.provide(files, "k", tmp / "r3.json", "make", command()) == 0
    assert runs() == 3 and store.complete(files)


def test_remake_makes_it_again_and_a_failed_stage_records_nothing(item, monkeypatch):
    files, command, runs, tmp = item
    store.provide(files, "k", tmp / "r1.json", "make", command())
    first = files[0].read_bytes()
    assert store.provide(files, "k", tmp / "r2.json", "remake", command()) == 0
    assert runs() == 2 and files[0].read_bytes() != first and store.complete(files)
    monkeypatch.setenv("MAKER_EXIT", "3")
    assert store.provide(files, "k", tmp / "r3.json", "remake", command()) == 3
    assert not store.complete(files) and not (tmp / "r3.json").exists()
    # the files stay in place (replaced whole): nothing the store does deletes them
    assert files[0].exists() and files[1].exists()
    # and the next maker makes the item: files a failed remake left are not adopted as they are
    monkeypatch.delenv("MAKER_EXIT")
    assert store.provide(files, "k", tmp / "r4.json", "make", command()) == 0
    assert runs() == 4 and store.read_receipt(tmp / "r4.json")["made_by_this_job"]
    assert not store.remaking_path(files).exists()


def test_files_without_a_record_are_adopted_if_they_belong_together(item):
    """A store made before records existed, or a job killed between its stage and its record."""
    files, command, runs, tmp = item
    store.provide(files, "k", tmp / "r1.json", "make", command())
    store.record_path(files).unlink()
    assert store.provide(files, "k", tmp / "r2.json", "make", command()) == 0
    assert runs() == 1 and json.loads(store.record_path(files).read_text())["made"]["adopted"]
    # a pair whose JSON names another sha256 (half replaced) is made again instead
    store.record_path(files).unlink()
    atomic.write_json(files[1], {"sha256": "0" * 64})
    assert store.provide(files, "k", tmp / "r3.json", "make", command()) == 0
    assert runs() == 2 and json.loads(files[1].read_text())["sha256"] == atomic.sha256_file(files[0])


def provide_in_subprocess(files, receipt, command, log):
    code = ("import sys; sys.path.insert(0, sys.argv[1]); from stages.files import store; "
            "store.main(sys.argv[2:])")
    return subprocess.Popen([sys.executable, "-c", code, str(REPO), "--files", *map(str, files), "--key", "k",
                             "--receipt", str(receipt), "--", *command],
                            stdout=open(log, "w"), stderr=subprocess.STDOUT, start_new_session=True)


def wait_for(predicate, timeout=60, what="condition"):
    end = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > end:
            raise TimeoutError(what)
        time.sleep(0.05)


def test_a_second_maker_waits_for_the_first_and_reuses_its_item(item):
    files, command, runs, tmp = item
    first = provide_in_subprocess(files, tmp / "r1.json", command(delay=1.5), tmp / "1.log")
    wait_for(lambda: runs() == 1, what="first maker started")
    second = provide_in_subprocess(files, tmp / "r2.json", command(), tmp / "2.log")
    assert first.wait(60) == 0 and second.wait(60) == 0
    assert runs() == 1
    assert "waiting for it" in (tmp / "2.log").read_text()
    assert "while this job waited; reusing it" in (tmp / "2.log").read_text()
    assert store.read_receipt(tmp / "r1.json")["made_by_this_job"]
    assert not store.read_receipt(tmp / "r2.json")["made_by_this_job"]


def test_a_waiting_maker_takes_over_when_the_first_is_killed(item):
    files, command, runs, tmp = item
    first = provide_in_subprocess(files, tmp / "r1.json", command(delay=60), tmp / "1.log")
    wait_for(lambda: runs() == 1, what="first maker started")
    second = provide_in_subprocess(files, tmp / "r2.json", command(), tmp / "2.log")
    wait_for(lambda: "waiting for it" in (tmp / "2.log").read_text(), what="second maker waiting")
    os.killpg(first.pid, signal.SIGKILL)  # the maker and its stage, as a cancelled job dies
    assert first.wait(10) == -signal.SIGKILL
    assert second.wait(60) == 0
    assert runs() == 2 and store.complete(files) and store.read_receipt(tmp / "r2.json")["made_by_this_job"]
    assert not (tmp / "r1.json").exists()


def test_a_signal_to_the_wrapper_alone_waits_for_the_stage(item):
    """SLURM and Snakemake signal the whole job; the stage decides what a signal means, and the
    wrapper records the item only if the stage finished."""
    files, command, runs, tmp = item
    proc = provide_in_subprocess(files, tmp / "r1.json", command(delay=1.0), tmp / "1.log")
    wait_for(lambda: runs() == 1, what="maker started")
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(30) == 0
    assert "received SIGTERM" in (tmp / "1.log").read_text() and store.complete(files)


def test_remake_command_names_the_receipt():
    assert store.remake_command("results/r/receipts/shards/000001.json") == (
        "remake it with `snakemake --force results/r/receipts/shards/000001.json --config store_remake=True` "
        "(add this run's --configfile, --config and --profile options), then rerun the workflow")


def test_check_manifest_tells_a_remade_shard_from_a_damaged_one(tmp_path):
    """A teammate remade the shard (on another GPU the bytes differ): take the new copy, do not
    remake it again (two workdirs would remake it in turn); a damaged shard is remade."""
    shard = tmp_path / "store" / "shard-000000.tar"
    shards.write_shard(shard, samples(4))
    with store.ItemLock([shard]):
        store.write_record([shard], "k")
    receipt = "results/r/receipts/shards/000000.json"
    entry = {"path": str(shard), "receipt": receipt, "count": 4, "bytes": shard.stat().st_size,
             "sha256": atomic.sha256_file(shard)}
    atomic.write_json(tmp_path / "manifest.json", {"shards": [entry]})
    shards.check_manifest(tmp_path / "manifest.json")

    shards.write_shard(shard, samples(5))  # made again, other bytes, with its record
    with store.ItemLock([shard]):
        store.write_record([shard], "k")
    for fast in (False, True):
        with pytest.raises(ValueError, match="the store's copy was made again") as err:
            shards.check_manifest(tmp_path / "manifest.json", fast=fast)
        assert f"take the new copy with `snakemake --force {receipt}`" in str(err.value)

    data = bytearray(shard.read_bytes())  # now damaged: it matches neither the manifest nor its record
    data[len(data) // 2] ^= 1
    shard.write_bytes(bytes(data))
    with pytest.raises(ValueError, match="bytes, manifest") as err:
        shards.check_manifest(tmp_path / "manifest.json")
    assert str(err.value).endswith(store.remake_command(receipt))
