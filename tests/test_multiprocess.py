"""Training under 2 processes: mid-training ranks read disjoint shards (or, online, solve disjoint
trajectories) and resume at the right place; a pool with fewer shards than ranks stops with a clear
error; mid- and post-training run to the end through stages.launch (accelerate launch, gloo on CPU)
with the global batch of 1 process."""

import json
import os
import re
import subprocess
import sys

import pytest
from stagekit import REPO, make_dataset, make_teacher, make_trajectories, midtrain_config, posttrain_config

from stages.data import shards
from stages.files import checkpoints


def indices(stream, n):
    return [next(stream)["index"] for _ in range(n)]


def test_ranks_read_disjoint_shards_and_share_one_position(tmp_path):
    manifest = json.loads(make_trajectories(tmp_path, num_shards=5, per_shard=3).read_text())
    paths = [e["path"] for e in manifest["shards"]]
    counts = [e["count"] for e in manifest["shards"]]
    ranks = [shards.RankTrajectoryStream(paths, counts, 0, 4, r, 2) for r in range(2)]
    assert set(ranks[0].paths).isdisjoint(ranks[1].paths) and sorted(ranks[0].paths + ranks[1].paths) == paths
    # one epoch of each rank: every trajectory of its own shards once (rank 0: 3 shards, rank 1: 2)
    firsts = [indices(ranks[0], 9), indices(ranks[1], 6)]
    assert sorted(firsts[0] + firsts[1]) == list(range(15))
    # both ranks took 7 samples; rank 0's saved position restores each rank where it was
    for r in range(2):
        ranks[r] = shards.RankTrajectoryStream(paths, counts, 0, 4, r, 2)
        indices(ranks[r], 7)
    saved = ranks[0].state_dict()
    for r in range(2):
        expected = indices(ranks[r], 5)
        resumed = shards.RankTrajectoryStream(paths, counts, 0, 4, r, 2)
        resumed.load_state_dict(saved)
        assert indices(resumed, 5) == expected, r
    # one process is the plain stream
    single = shards.RankTrajectoryStream(paths, counts, 0, 4, 0, 1)
    assert indices(single, 15) == indices(shards.TrajectoryStream(paths, 0, 4), 15)


def test_fewer_shards_than_ranks_is_a_clear_error(tmp_path):
    manifest = json.loads(make_trajectories(tmp_path, num_shards=1, per_shard=3).read_text())
    with pytest.raises(ValueError, match="1 shards of trajectories cannot be split over 2 training processes"):
        shards.RankTrajectoryStream([manifest["shards"][0]["path"]], [3], 0, 4, 0, 2)


def launch(module, args, tmp_path):
    """Two processes, as in a SLURM job given two GPUs (none here: accelerate falls back to gloo)."""
    env = {**os.environ, "SLURM_JOB_ID": "1", "CUDA_VISIBLE_DEVICES": "0,1", "OMP_NUM_THREADS": "1",
           "PYTHONPATH": str(REPO)}
    return subprocess.run([sys.executable, "-m", "stages.launch", "--gpus", "2", module, *map(str, args),
                           "--threads", "1"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)


@pytest.mark.heavy
def test_midtrain_and_posttrain_under_two_processes(tmp_path):
    teacher = make_teacher(tmp_path / "teacher.safetensors")
    manifest = make_trajectories(tmp_path / "traj", num_shards=3, per_shard=4)
    mid = launch("stages.midtrain", ["--config", json.dumps(midtrain_config(steps=4)), "--teacher", teacher,
                                     "--manifest", manifest, "--out", tmp_path / "mid.safetensors"], tmp_path)
    assert mid.returncode == 0, mid.stdout[-3000:] + mid.stderr[-3000:]
    reads = sorted(re.findall(r"rank (\d) of 2 reads shards \[([^\]]*)\]", mid.stdout))  # lines may interleave
    assert [r for r, _ in reads] == ["0", "1"], mid.stdout
    assert reads[0][1].count("shard-") == 2 and reads[1][1].count("shard-") == 1, reads
    meta = checkpoints.read_meta(tmp_path / "mid.safetensors")
    assert meta["images_seen"] == 4 * midtrain_config()["midtrain"]["batch"]  # the global batch
    # one job, timed from the launcher's start: accelerate's start-up and every rank's set-up included
    assert [(j["steps"], j["ended"]) for j in meta["jobs"]] == [([0, 4], "finished")]
    assert meta["jobs"][0]["wall_seconds"] > meta["train_seconds"]

    cfg = posttrain_config(steps=4, batch=8)
    post = launch("stages.posttrain", ["--config", json.dumps(cfg), "--init", "teacher", "--init-model", teacher,
                                       "--dataset", make_dataset(tmp_path / "data"),
                                       "--out", tmp_path / "post.safetensors", "--snapshots", tmp_path / "snaps"],
                  tmp_path)
    assert post.returncode == 0, post.stdout[-3000:] + post.stderr[-3000:]
    assert checkpoints.read_meta(tmp_path / "post.safetensors")["images_seen"] == 4 * 8


@pytest.mark.heavy
def test_accumulation_under_two_processes_equals_one_process(tmp_path):
    """Global batch 8 in micro-batches of 2: two processes x two micro-batches (DDP synchronising
    on the second only) train what one process with four micro-batches trains, as the parts 0..3
    draw the same samples and dropout masks."""
    import torch
    from safetensors.torch import load_file

    teacher = make_teacher(tmp_path / "teacher.safetensors")
    dataset = make_dataset(tmp_path / "data")
    cfg = posttrain_config(steps=3, batch=8, batch_per_gpu=2)
    args = ["--config", json.dumps(cfg), "--init", "teacher", "--init-model", teacher, "--dataset", dataset]
    two = launch("stages.posttrain", [*args, "--out", tmp_path / "two.safetensors", "--snapshots", tmp_path / "s2"],
                 tmp_path)
    assert two.returncode == 0, two.stdout[-3000:] + two.stderr[-3000:]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    one = subprocess.run([sys.executable, "-m", "stages.posttrain", *map(str, args),
                          "--out", tmp_path / "one.safetensors",
                          "--snapshots", tmp_path / "s1", "--threads", "1"], cwd=tmp_path, env=env,
                         capture_output=True, text=True, timeout=300)
    assert one.returncode == 0, one.stdout[-3000:] + one.stderr[-3000:]
    a, b = load_file(str(tmp_path / "two.safetensors")), load_file(str(tmp_path / "one.safetensors"))
    init = load_file(str(teacher))
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-4, atol=1e-6)
    assert any(not torch.equal(a[k], init["ema." + k.split(".", 1)[1]]) for k in a if k.startswith("net."))


@pytest.mark.heavy
def test_midtrain_mf_ranks_read_disjoint_shards(tmp_path):
    """CMT-MF mid-training splits the pool by rank as midtrain does: each rank reads its own
    shards and takes its share of the global batch from them."""
    from stagekit import config

    teacher = make_teacher(tmp_path / "teacher.safetensors")
    manifest = make_trajectories(tmp_path / "traj", num_shards=3, per_shard=4)
    cfg = config(midtrain_mf={"steps": 3, "batch": 8, "pairs_per_trajectory": 4, "shuffle_buffer": 4,
                              "optimizer": {"name": "adam", "lr": 1e-3}, "ema": {"beta": 0.9}})
    mid = launch("stages.midtrain_mf", ["--config", json.dumps({"seed": 0, "midtrain_mf": cfg["midtrain_mf"]}),
                                        "--teacher", teacher, "--manifest", manifest,
                                        "--out", tmp_path / "mid.safetensors"], tmp_path)
    assert mid.returncode == 0, mid.stdout[-3000:] + mid.stderr[-3000:]
    reads = sorted(re.findall(r"rank (\d) of 2 reads shards \[([^\]]*)\]", mid.stdout))
    assert [r for r, _ in reads] == ["0", "1"], mid.stdout
    assert reads[0][1].count("shard-") == 2 and reads[1][1].count("shard-") == 1, reads
    meta = checkpoints.read_meta(tmp_path / "mid.safetensors")
    assert meta["images_seen"] == 3 * 8 and meta["trajectories_seen"] == 3 * 2  # the global batch


@pytest.mark.heavy
def test_online_midtrain_under_two_processes_trains_like_one(tmp_path):
    """Online, each rank solves its half of the step's trajectories (indices from the step and
    rank): with dropout off, 2 processes train the same weights as 1, to floating point."""
    import torch
    from safetensors.torch import load_file

    from stages.core.rng import fold

    teacher = make_teacher(tmp_path / "teacher.safetensors")
    spec = {"solver": "dpm_solver_pp", "order": 3, "lower_order_final": True, "nfe": 4, "x_T": "noise",
            "seed": fold("online-test"), "dtype": "float32", "sigma_max": 80.0, "sigma_min": 0.002,
            "teacher_key": "test", "code": 1}
    cfg = midtrain_config(steps=10, dropout=0.0, trajectories="online")  # RAdam: lr 0 for the first 5
    cfg["trajectory_spec"] = spec
    args = ["--config", json.dumps(cfg), "--teacher", teacher]
    two = launch("stages.midtrain", [*args, "--out", tmp_path / "two.safetensors"], tmp_path)
    assert two.returncode == 0, two.stdout[-3000:] + two.stderr[-3000:]
    one = subprocess.run([sys.executable, "-m", "stages.midtrain", *map(str, args),
                          "--out", tmp_path / "one.safetensors",
                          "--threads", "1"], cwd=tmp_path, capture_output=True, text=True, timeout=300,
                         env={**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"})
    assert one.returncode == 0, one.stdout[-3000:] + one.stderr[-3000:]
    a, b = load_file(str(tmp_path / "one.safetensors")), load_file(str(tmp_path / "two.safetensors"))
    init = load_file(str(teacher))
    assert any(not torch.equal(a[k], init[f"ema.{k[4:]}"]) for k in a if k.startswith("net."))  # it trained
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-5, msg=k)


@pytest.mark.heavy
def test_two_processes_write_one_metrics_log_equal_to_one_process_with_two_micro_batches(tmp_path):
    """Global batch 8: two processes of 4, or one process in two micro-batches of 4, train the same
    parts; the main process alone writes the log, whose losses, terms and gradient norms (each a mean
    over the parts of all processes) match the one-process log."""
    teacher = make_teacher(tmp_path / "teacher.safetensors")
    cfg = posttrain_config(steps=6, batch=8, batch_per_gpu=4)
    args = ["--config", json.dumps(cfg), "--init", "teacher", "--init-model", teacher,
            "--dataset", make_dataset(tmp_path / "data"), "--tracking", json.dumps({"log_every": 2})]
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    logs = {}
    for name in ("two", "one"):
        run_args = [*args, "--out", tmp_path / name / "model.safetensors", "--snapshots", tmp_path / name / "snaps",
                    "--metrics", tmp_path / name / "metrics.jsonl"]
        if name == "two":
            done = launch("stages.posttrain", run_args, tmp_path)
        else:
            done = subprocess.run([sys.executable, "-m", "stages.posttrain", *map(str, run_args), "--threads", "1"],
                                  cwd=tmp_path, capture_output=True, text=True, timeout=300, env=env)
        assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
        logs[name] = [json.loads(line) for line in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]
    assert [e["step"] for e in logs["two"]] == [e["step"] for e in logs["one"]] == [2, 4, 6]
    for a, b in zip(logs["two"], logs["one"], strict=True):
        for key in ("loss", "term/distance", "term/weight", "grad_norm", "lr", "images"):
            assert a[key] == pytest.approx(b[key], rel=1e-4), key
