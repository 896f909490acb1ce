"""Damaged data and diverging training through the real midtrain stage, and a shard writer killed
mid-write: each stops with the file and the fix named, and nothing trains on bad data."""

import json
import re
import signal
import subprocess
import sys

import pytest
import torch
from stagekit import REPO, make_samples, make_teacher, make_trajectories, midtrain_config, run_in_process, state_args

from stages.data import shards
from stages.files import store
from stages.method import losses

torch.set_num_threads(1)


@pytest.fixture
def inputs(tmp_path):
    return tmp_path, make_teacher(tmp_path / "teacher.safetensors"), make_trajectories(tmp_path / "traj")


def midtrain_args(tmp_path, teacher, manifest, **checkpoint):
    return ["--config", json.dumps(midtrain_config()), "--teacher", teacher, "--manifest", manifest,
            "--out", tmp_path / "out" / "model.safetensors", *state_args(tmp_path / "state", **checkpoint)]


def truncate(path):
    path.write_bytes(path.read_bytes()[:-700])


def flip_byte(path):
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))


DAMAGE = {
    "truncated": (truncate, ValueError, "bytes, manifest"),
    "flipped byte": (flip_byte, ValueError, "sha256 differs"),
    "missing": (lambda p: p.unlink(), FileNotFoundError, "is missing"),
}


@pytest.mark.parametrize("kind", DAMAGE)
def test_damaged_shard_stops_midtrain_before_any_step(inputs, kind, monkeypatch):
    tmp_path, teacher, manifest = inputs
    damage, error, words = DAMAGE[kind]
    shard = tmp_path / "traj" / "shard-000001.tar"
    damage(shard)
    steps = []
    loss = losses.cmt_cm_loss
    monkeypatch.setattr(losses, "cmt_cm_loss", lambda *a, **k: steps.append(1) or loss(*a, **k))
    with pytest.raises(error) as err:
        run_in_process("stages.midtrain", midtrain_args(tmp_path, teacher, manifest, every_steps=1))
    message = str(err.value)
    assert message.startswith(f"{shard}:") and words in message
    receipt = json.loads(manifest.read_text())["shards"][1]["receipt"]
    assert message.endswith(store.remake_command(receipt)), message
    assert steps == [] and not (tmp_path / "state").exists() and not (tmp_path / "out").exists()


def test_nan_in_the_data_stops_midtrain_naming_stage_step_and_last_state(tmp_path):
    # the stream's order does not depend on the contents: find which trajectory step 3 reads
    clean = make_trajectories(tmp_path / "clean")
    paths = [e["path"] for e in json.loads(clean.read_text())["shards"]]
    cfg = midtrain_config()
    stream = shards.TrajectoryStream(paths, cfg["seed"], cfg["midtrain"]["shuffle_buffer"])
    order = [next(stream)["index"] for _ in range(8)]
    poisoned = make_trajectories(tmp_path / "poisoned", nan_index=order[7])  # 2 per step: step 3
    teacher = make_teacher(tmp_path / "teacher.safetensors")

    with pytest.raises(FloatingPointError) as err:
        run_in_process("stages.midtrain", midtrain_args(tmp_path, teacher, poisoned, every_steps=2))
    message = str(err.value)
    assert message.startswith("[midtrain] loss is nan at step 3;")
    last = tmp_path / "state" / "step-000000002"
    assert f"Last good state: {last} (step 2); a rerun resumes from it" in message and last.is_dir()
    assert not (tmp_path / "out").exists()


def test_shard_writer_killed_mid_write_leaves_no_shard_and_the_old_one_intact(tmp_path):
    path = tmp_path / "shard-000000.tar"
    shards.write_shard(path, make_samples(0, 3))
    before = path.read_bytes()
    code = f"""
import os, signal, sys
sys.path[:0] = [{str(REPO)!r}, {str(REPO / "tests")!r}]
from stages.data import shards
from stagekit import make_samples
def samples():
    yield from make_samples(10, 2)
    os.kill(os.getpid(), signal.SIGKILL)
shards.write_shard({str(path)!r}, samples())
"""
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == -signal.SIGKILL, result.stderr
    assert path.read_bytes() == before  # the previous shard, whole
    leftovers = [p for p in tmp_path.iterdir() if p != path]
    assert leftovers and all(re.fullmatch(r"\.shard-000000\.tar\..*\.tmp", p.name) for p in leftovers)
    assert [s["index"] for s in shards.read_shard(path)] == [0, 1, 2]
