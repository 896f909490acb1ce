"""Inputs and a runner for tests that run whole training stages in a subprocess (tiny sizes)."""

import copy
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file

from stages import networks
from stages.config import resolve, stage_configs
from stages.data import datasets, shards
from stages.files import atomic, checkpoints
from stages.method import solvers
from stages.networks.precond import Precond

REPO = Path(__file__).resolve().parents[1]
ARCH = {"kind": "small_unet", "channels": 8, "channel_mult": [1], "num_blocks": 1, "in_channels": 1,
        "resolution": 8, "dropout": 0.0}
NFE = 4


def config(**overrides):
    """The workflow's config of the digits default with `overrides` given as `--config` would give
    them (assembled, validated, defaults filled: stages.config.resolve)."""
    return resolve(command_line=copy.deepcopy(overrides))


def stage_config(rule, init=None, **overrides):
    """What the workflow passes to `rule`'s stage (stages/config/stage_configs.py) under `overrides`."""
    return stage_configs.stage_config(rule, config(**overrides), init)


def midtrain_config(**midtrain):
    return stage_config("midtrain", trajectories={"nfe": NFE}, midtrain={
        "steps": 12, "batch": 2 * NFE, "shuffle_buffer": 4, "optimizer": {"name": "radam", "lr": 1e-3,
        "betas": [0.9, 0.99]}, "ema": {"beta": 0.9, "rampup": 0.1}, **midtrain})


def posttrain_config(init="teacher", **posttrain):
    return stage_config("posttrain", init, posttrain={
        "steps": 12, "batch": 8, "q": 4, "double_every": 4, "snapshots": [0, 0.5, 1.0],
        "optimizer": {"name": "adam", "lr": 1e-3}, "ema": {"beta": 0.9, "rampup": 0.1}, **posttrain})


def make_teacher(path):
    torch.manual_seed(0)
    net = Precond(networks.build(ARCH), "edm", 0.5, 0.002)
    checkpoints.save(path, net=net, ema=copy.deepcopy(net), meta={
        "role": "teacher", "key": "test", "architecture": ARCH, "precond": "edm", "sigma_data": 0.5,
        "sigma_min": 0.002, "sigma_max": 80.0, "time": "sigma"})
    return path


def make_dataset(folder):
    datasets.prepare({"name": "digits", "source": "digits"}, folder)
    return Path(folder) / "dataset.npz"


def make_trajectories(folder, num_shards=2, per_shard=5, nan_index=None):
    """Shards of made-up trajectories (smooth in sigma, so the loss is finite) and their manifest."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    sigmas = solvers.logsnr_grid(NFE).numpy()
    rng = np.random.default_rng(0)
    entries = []
    for k in range(num_shards):
        samples = []
        for i in range(k * per_shard, (k + 1) * per_shard):
            final = rng.uniform(-1, 1, (1, 1, 8, 8))
            noise = rng.standard_normal((1, 1, 8, 8))
            states = (final + sigmas[:, None, None, None] * noise).astype(np.float16)
            if i == nan_index:
                states[0, 0, 0, 0] = np.nan
            samples.append((i, states, sigmas, {"index": i, "seed": 0}))
        path = folder / f"shard-{k:06d}.tar"
        shards.write_shard(path, samples)
        entries.append({"path": str(path), "count": per_shard, "bytes": path.stat().st_size,
                        "sha256": atomic.sha256_file(path), "receipt": str(folder / "receipts" / f"{k:06d}.json")})
    manifest = {"spec": {"nfe": NFE, "per_shard": per_shard, "sigma_max": 80.0},
                "teacher": {"path": "-", "sha256": "-"},
                "total": num_shards * per_shard, "shards": entries}
    atomic.write_json(folder / "manifest.json", manifest)
    return folder / "manifest.json"


def run(module, args, *, faults=(), cwd=None, timeout=300):
    """`python -m module args` through tests/run_stage.py, with faults injected; one torch thread."""
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    cmd = [sys.executable, str(REPO / "tests" / "run_stage.py"), *map(str, faults), "--", module,
           *map(str, args), "--threads", "1"]
    result = subprocess.run(cmd, capture_output=True, text=True, cwd=cwd, env=env, timeout=timeout)
    result.log = result.stdout + result.stderr
    return result


def state_args(state_dir, every_steps=None, slice_kimg=None):
    return ["--state-dir", state_dir, "--checkpoint",
            json.dumps({"every_steps": every_steps, "every_minutes": None, "slice_kimg": slice_kimg})]


def load_state(folder):
    """(tensors, json) of a saved state folder step-*/."""
    folder = Path(folder)
    return load_file(str(folder / "state.safetensors")), json.loads((folder / "state.json").read_text())


def assert_same_tensors(a, b, prefixes=("net.", "ema.", "optimizer.")):
    for prefix in prefixes:
        keys = sorted(k for k in a if k.startswith(prefix))
        assert keys and keys == sorted(k for k in b if k.startswith(prefix)), prefix
        for k in keys:
            assert torch.equal(a[k], b[k]), k


def run_in_process(module, args, keep_state=False):
    """Run a stage in this process (no SIGKILL needed): its errors reach pytest as exceptions.
    keep_state=True leaves the final training state in place for comparison."""
    import runpy

    import pytest

    from stages.training import resume

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(sys, "argv", [module, *map(str, args), "--threads", "1"])
        if keep_state:
            patch.setattr(resume.TrainState, "finish", lambda self: None)
        runpy.run_module(module, run_name="__main__")


# ---- trajectory samples for shard tests

K1 = 17  # 16 NFE -> 17 states


def make_samples(first, count, seed=0):
    """`count` trajectory samples from index `first` as the shard writer takes them: random float16
    states of 17 points (16 NFE) of 1x8x8, the EDM grid's sigmas, metadata."""
    rng = np.random.default_rng(seed + first)
    sigmas = 80.0 * (0.002 / 80.0) ** (np.arange(K1) / 16)
    out = []
    for i in range(first, first + count):
        states = rng.standard_normal((K1, 1, 8, 8)).astype(np.float16)
        meta = {"index": i, "seed": 123, "data_index": int(rng.integers(1797))}
        out.append((i, states, sigmas.astype(np.float64), meta))
    return out
