"""Trajectory generation: trajectory i is a pure function of (teacher, spec, seed, i). Its start
point, index, sigmas and metadata are exact; its solver states are equal to within floating point
across thread counts and instruction sets (CPU convolutions pick other kernels for each), so the
same shard made in another setting matches within the spot check's tolerance, and in the same
setting (same machine, threads and spec) it is the same bytes however the jobs are split."""

import copy
import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from stages import networks
from stages.core import rng
from stages.data import shards
from stages.files import checkpoints
from stages.networks.precond import Precond

REPO = Path(__file__).resolve().parents[1]
ARCH = {"kind": "small_unet", "in_channels": 1, "resolution": 8, "channels": 8, "channel_mult": [1, 2],
        "num_blocks": 1, "dropout": 0.0}
SPEC = {"solver": "dpm_solver_pp", "order": 3, "lower_order_final": True, "nfe": 16, "x_T": "noise",
        "seed": 5, "per_shard": 6, "batch": 3, "dtype": "float16", "sigma_max": 80.0, "sigma_min": 0.002,
        "teacher_key": "k-test", "code": 1}


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
    torch.manual_seed(0)
    net = Precond(networks.build(ARCH), "edm")
    with torch.no_grad():  # a non-trivial denoiser: perturb the zero-initialised output layer
        net.model.conv_out.weight.normal_(0, 0.1)
    path = tmp_path_factory.mktemp("teacher") / "model.safetensors"
    checkpoints.save(path, net=net, ema=copy.deepcopy(net), meta={
        "key": "k-test", "architecture": ARCH, "precond": "edm",
                                                   "sigma_data": 0.5, "sigma_min": 0.002, "sigma_max": 80.0})
    return path


def make_shard(teacher, out, shard, threads=1, spec=SPEC, env=None):
    cmd = [sys.executable, "-m", "stages.trajectory_shard", "--config", json.dumps(spec),
           "--threads", str(threads), "--teacher", str(teacher), "--shard", str(shard), "--out", str(out)]
    subprocess.run(cmd, check=True, capture_output=True, cwd=REPO, env={**os.environ, **(env or {})})
    return hashlib.sha256(Path(out).read_bytes()).hexdigest()


# The spot check's tolerance (stages/midtrain.py): the largest |difference| / (|stored| + 1).
SPOT_CHECK_TOLERANCE = 1e-2


def assert_same_trajectories(path_a, path_b):
    """Exact where the contract says exact, within the spot check's tolerance for solver states."""
    a, b = shards.read_shard(path_a), shards.read_shard(path_b)
    assert [s["index"] for s in a] == [s["index"] for s in b]
    worst = 0.0
    for x, y in zip(a, b, strict=True):
        assert x["meta"] == y["meta"]
        np.testing.assert_array_equal(x["sigmas"], y["sigmas"])
        np.testing.assert_array_equal(x["states"][0], y["states"][0])  # x_T: noise from the seed
        sx, sy = x["states"].astype(np.float32), y["states"].astype(np.float32)
        worst = max(worst, float((np.abs(sx - sy) / (np.abs(sx) + 1)).max()))
    assert worst <= SPOT_CHECK_TOLERANCE, worst
    return worst


@pytest.mark.heavy
def test_same_bytes_however_the_jobs_are_split(teacher, tmp_path):
    """Same setting: shard 1 made in a two-shard run and alone in another process is the same file."""
    a = [make_shard(teacher, tmp_path / f"a-{k}.tar", k) for k in (0, 1)]
    b = make_shard(teacher, tmp_path / "b-1.tar", 1)
    assert a[1] == b
    assert a[0] != a[1]


@pytest.mark.parametrize("threads, env", [(2, {}), (1, {"ONEDNN_MAX_CPU_ISA": "AVX2"})], ids=["2-threads", "avx2"])
def test_other_threads_or_instruction_sets_agree_within_the_spot_check_tolerance(teacher, tmp_path, threads, env):
    """Another thread count or instruction set may change the last bits of the solver states (the
    bytes of the shard), never which trajectory it is: exact start, sigmas and metadata, states
    within the spot check's tolerance. The manifest records whichever bytes are present."""
    make_shard(teacher, tmp_path / "ref.tar", 1)
    make_shard(teacher, tmp_path / "other.tar", 1, threads=threads, env=env)
    assert_same_trajectories(tmp_path / "ref.tar", tmp_path / "other.tar")


def test_trajectory_is_a_function_of_seed_and_index(teacher, tmp_path):
    make_shard(teacher, tmp_path / "s.tar", 1)
    samples = shards.read_shard(tmp_path / "s.tar")
    assert [s["index"] for s in samples] == list(range(6, 12))
    for s in samples:
        z = torch.randn((1, 8, 8), generator=rng.generator(SPEC["seed"], s["index"], "x_T"))
        np.testing.assert_array_equal(s["states"][0], (80.0 * z).numpy().astype(np.float16))
        assert s["states"].shape == (17, 1, 8, 8) and s["states"].dtype == np.float16
        np.testing.assert_allclose(s["sigmas"][[0, 7, 16]], [80.0, 0.77569, 0.002], rtol=1e-4)
        assert np.isfinite(s["states"].astype(np.float32)).all()


def test_stored_states_are_the_solver_states(teacher, tmp_path):
    """The stored trajectory equals a direct solve with the same teacher (up to fp16 storage)."""
    from stages.method import solvers

    make_shard(teacher, tmp_path / "s.tar", 0)
    first = shards.read_shard(tmp_path / "s.tar")[0]
    net, _ = checkpoints.load(teacher, which="ema")
    net.eval()
    x = torch.from_numpy(first["states"][0].astype(np.float32))[None]
    with torch.no_grad():
        states = solvers.dpm_solver_pp(lambda x, s: net(x, torch.full((x.shape[0],), s)), x,
                                       solvers.logsnr_grid(16), order=3)
    np.testing.assert_allclose(first["states"].astype(np.float32), states[0].numpy(), rtol=2e-3, atol=2e-3)


def test_wrong_teacher_is_refused(teacher, tmp_path):
    spec = {**SPEC, "teacher_key": "another"}
    cmd = [sys.executable, "-m", "stages.trajectory_shard", "--config", json.dumps(spec), "--teacher",
           str(teacher), "--shard", "0", "--out", str(tmp_path / "x.tar")]
    result = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO)
    assert result.returncode != 0 and "stale" in result.stderr
    assert not (tmp_path / "x.tar").exists()
