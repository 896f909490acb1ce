"""The team store under concurrent writers: two processes writing the same shard at once leave one
whole, readable copy (temporary name, then rename), never a mix or a partial file."""

import hashlib
import multiprocessing as mp

import numpy as np

from stages.data import shards


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
    assert [f.name for f in path.parent.iterdir()] == [path.name]  # no temporary file left behind
    assert seen > 0
