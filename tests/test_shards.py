"""Trajectory shards: round trip, determinism, the reproducible stream, manifest checks, damage."""

import io
import itertools
import json
import os
import tarfile

import numpy as np
import pytest
import webdataset as wds
from stagekit import K1, make_samples

from stages.data import shards
from stages.files import atomic


def test_round_trip(tmp_path):
    samples = make_samples(0, 5)
    path = tmp_path / "shard-000000.tar"
    assert shards.write_shard(path, iter(samples)) == 5
    assert sorted(os.listdir(tmp_path)) == ["shard-000000.tar"]  # no temporary left behind
    back = shards.read_shard(path)
    assert len(back) == 5
    for (index, states, sigmas, meta), got in zip(samples, back, strict=True):
        assert got["index"] == index
        assert got["states"].dtype == np.float16 and got["states"].shape == (K1, 1, 8, 8)
        np.testing.assert_array_equal(got["states"], states)
        assert got["sigmas"].dtype == np.float64
        np.testing.assert_array_equal(got["sigmas"], sigmas)
        assert got["meta"] == meta


def test_members_are_fixed_metadata_tar_entries(tmp_path):
    path = tmp_path / "s.tar"
    shards.write_shard(path, make_samples(3, 2))
    with tarfile.open(path) as tar:
        members = tar.getmembers()
    assert sorted(m.name for m in members) == sorted(
        f"{i:09d}.{ext}" for i in (3, 4) for ext in ("states.npy", "sigmas.npy", "meta.json"))
    assert all(m.mtime == 0 and m.uname == "cmt" and m.gname == "cmt" for m in members)


def test_failed_write_leaves_nothing(tmp_path):
    def broken():
        yield from make_samples(0, 2)
        raise RuntimeError("teacher died")

    path = tmp_path / "shard.tar"
    with pytest.raises(RuntimeError, match="teacher died"):
        shards.write_shard(path, broken())
    assert os.listdir(tmp_path) == []


def test_same_samples_give_identical_bytes(tmp_path):
    a, b = tmp_path / "a" / "x.tar", tmp_path / "b" / "x.tar"
    shards.write_shard(a, make_samples(10, 4))
    shards.write_shard(b, make_samples(10, 4))
    assert atomic.sha256_file(a) == atomic.sha256_file(b)
    assert a.read_bytes() == b.read_bytes()
    # and different content gives a different file (the check above can fail)
    c = tmp_path / "c.tar"
    shards.write_shard(c, make_samples(10, 4, seed=1))
    assert atomic.sha256_file(c) != atomic.sha256_file(a)


@pytest.fixture()
def two_shards(tmp_path):
    paths = [tmp_path / "shard-000000.tar", tmp_path / "shard-000001.tar"]
    shards.write_shard(paths[0], make_samples(0, 6))
    shards.write_shard(paths[1], make_samples(6, 5))
    return paths


def _indices(paths, seed, n, **kw):
    return [s["index"] for s in itertools.islice(shards.trajectory_stream(paths, seed, **kw), n)]


def test_trajectory_stream_is_reproducible_and_covers_each_epoch(two_shards):
    total = 11
    a = _indices(two_shards, 5, 3 * total)
    b = _indices(two_shards, 5, 3 * total)
    assert a == b
    for epoch in range(3):
        assert sorted(a[epoch * total:(epoch + 1) * total]) == list(range(total)), epoch
    assert a[:total] != a[total:2 * total]  # epochs are reshuffled
    assert _indices(two_shards, 6, 3 * total) != a
    assert a[:total] != list(range(total))  # actually shuffled


def test_trajectory_stream_small_buffer_still_visits_each_once(two_shards):
    a = _indices(two_shards, 1, 22, shuffle_buffer=3)
    assert sorted(a[:11]) == list(range(11)) and sorted(a[11:]) == list(range(11))
    assert a == _indices(two_shards, 1, 22, shuffle_buffer=3)


def test_trajectory_stream_start_epoch_resumes(two_shards):
    a = _indices(two_shards, 9, 33)
    assert _indices(two_shards, 9, 22, start_epoch=1) == a[11:]


def test_trajectory_stream_decodes_the_states(two_shards):
    expected = {i: s for i, s, _, _ in make_samples(0, 6) + make_samples(6, 5)}
    for sample in itertools.islice(shards.trajectory_stream(two_shards, 0), 11):
        np.testing.assert_array_equal(sample["states"], expected[sample["index"]])


# ----------------------------------------------------------------------------------------------
# Manifest


def write_manifest(tmp_path, paths, counts):
    manifest = {
        "shards": [{"path": str(p), "count": c, "bytes": p.stat().st_size, "sha256": atomic.sha256_file(p)}
                   for p, c in zip(paths, counts, strict=True)],
        "spec": {"nfe": 16, "solver": "dpm_solver_pp"},
    }
    path = tmp_path / "manifest.json"
    path.write_text(json.dumps(manifest))
    return path


def test_check_manifest_passes(tmp_path, two_shards):
    mpath = write_manifest(tmp_path, two_shards, [6, 5])
    for fast in (False, True):
        manifest, paths = shards.check_manifest(mpath, fast=fast)
        assert [str(p) for p in paths] == [str(p) for p in two_shards]
        assert manifest["spec"]["nfe"] == 16


def test_check_manifest_truncated_shard(tmp_path, two_shards):
    mpath = write_manifest(tmp_path, two_shards, [6, 5])
    data = two_shards[1].read_bytes()
    two_shards[1].write_bytes(data[:-512])
    for fast in (False, True):
        with pytest.raises(ValueError) as err:
            shards.check_manifest(mpath, fast=fast)
        assert str(two_shards[1]) in str(err.value)


def test_check_manifest_flipped_byte(tmp_path, two_shards):
    mpath = write_manifest(tmp_path, two_shards, [6, 5])
    data = bytearray(two_shards[0].read_bytes())
    data[700] ^= 0x01
    two_shards[0].write_bytes(bytes(data))
    shards.check_manifest(mpath, fast=True)  # same size: the fast check cannot see it
    with pytest.raises(ValueError) as err:
        shards.check_manifest(mpath, fast=False)
    assert str(two_shards[0]) in str(err.value) and "sha256" in str(err.value)


def test_check_manifest_missing_shard(tmp_path, two_shards):
    mpath = write_manifest(tmp_path, two_shards, [6, 5])
    two_shards[1].unlink()
    for fast in (False, True):
        with pytest.raises(FileNotFoundError) as err:
            shards.check_manifest(mpath, fast=fast)
        assert str(two_shards[1]) in str(err.value)


# ----------------------------------------------------------------------------------------------
# Damaged members


def test_decode_sample_raises_naming_the_key():
    good = make_samples(0, 1)[0]
    sample = {"__key__": "000000042", "__url__": "some/shard.tar",
              "states.npy": b"this is not an npy file",
              "sigmas.npy": shards.encode_npy(good[2]),
              "meta.json": b"{}"}
    with pytest.raises(ValueError) as err:
        shards.decode_sample(sample)
    assert "'000000042'" in str(err.value) and "some/shard.tar" in str(err.value)


def _write_raw_shard(path, members):
    with wds.TarWriter(str(path), encoder=False) as sink:
        for m in members:
            sink.write(m)


def test_damaged_member_in_shard_is_never_skipped(tmp_path):
    samples = make_samples(0, 3)
    members = []
    for index, states, sigmas, meta in samples:
        members.append({"__key__": f"{index:09d}", "states.npy": shards.encode_npy(states),
                        "sigmas.npy": shards.encode_npy(sigmas), "meta.json": json.dumps(meta).encode()})
    members[1]["states.npy"] = b"\x93NUMPY garbage garbage garbage"
    path = tmp_path / "bad.tar"
    _write_raw_shard(path, members)
    with pytest.raises(ValueError) as err:
        shards.read_shard(path)
    assert "'000000001'" in str(err.value) and str(path) in str(err.value)
    with pytest.raises(ValueError, match="000000001"):
        list(itertools.islice(shards.trajectory_stream([path], 0, shuffle_buffer=1), 10))


def test_tar_truncated_inside_a_member_raises_on_read(tmp_path):
    """(A cut exactly on a member boundary reads as a shorter, valid tar: only the manifest's size
    check catches that, see test_check_manifest_truncated_shard.)"""
    path = tmp_path / "s.tar"
    shards.write_shard(path, make_samples(0, 3))
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2 + 700])
    with pytest.raises(Exception, match="unexpected end of data"):
        shards.read_shard(path)


def test_npy_codec_round_trip():
    a = np.arange(12, dtype=np.float32).reshape(3, 4)[:, ::2]  # non-contiguous
    b = shards.decode_npy(shards.encode_npy(a))
    np.testing.assert_array_equal(a, b)
    assert b.dtype == np.float32
    buf = io.BytesIO(shards.encode_npy(np.array([1.5])))
    assert np.load(buf, allow_pickle=False).tolist() == [1.5]
