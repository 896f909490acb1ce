"""The MeanFlow training stages on a latent row (--latents): batches are posterior draws of the encoded
dataset (whitened by the row's latents section) with their labels, the network is built for the
latent shape, and a run killed after a save resumes bit-exactly (the latent stream's position is
part of the training state)."""

import json
import signal

import numpy as np
import pytest
import torch
from stagekit import assert_same_tensors, config, load_state, run, run_in_process, state_args

from stages.data import latents, training_data
from stages.files import atomic, checkpoints

SIGKILLED = -signal.SIGKILL
NET = {"kind": "dit", "depth": 1, "hidden_size": 32, "patch_size": 2, "num_heads": 2, "num_classes": 10}
LATENTS = {"raw_mean": [0.0] * 4, "raw_std": [1 / 0.18215] * 4, "final_mean": 0.0, "final_std": 1.0}


@pytest.fixture(scope="module")
def encoded(tmp_path_factory):
    """Two shards of 6 encoded 'images' (posterior mean and std, 4x4x4), labels 0..9, and their manifest."""
    folder = tmp_path_factory.mktemp("latents")
    rng = np.random.default_rng(0)
    entries = []
    for k in range(2):
        samples = [(6 * k + i, 6 * k + i, np.concatenate([5.49 * rng.standard_normal((4, 4, 4)),
                                                          np.full((4, 4, 4), 0.1)]).astype(np.float32),
                    (6 * k + i) % 10, 12) for i in range(6)]
        path = folder / f"shard-{k:06d}.tar"
        latents.write_shard(path, samples)
        entries.append({"path": str(path), "count": 6, "bytes": path.stat().st_size,
                        "sha256": atomic.sha256_file(path)})
    manifest = folder / "manifest.json"
    atomic.write_json(manifest, {"spec": {}, "total": 12, "shards": entries})
    return manifest


def test_latent_batches_are_whitened_posterior_draws_with_labels(encoded):
    class Acc:
        num_processes, process_index, device = 1, 0, torch.device("cpu")

    source = training_data.Latents(encoded, LATENTS, Acc(), 4, "teacher.batch", seed=0)
    assert source.shape == (4, 4) and source.micro_batches == 1
    x, y = source.batch(0, 0, None)
    assert x.shape == (4, 4, 4, 4) and y.dtype == torch.int64 and bool(((y >= 0) & (y < 10)).all())
    # mean ~ N(0, 5.49^2) scaled by 0.18215: about unit variance; std 0.1 x 0.18215 adds little
    assert 0.5 < float(x.std()) < 1.5
    with pytest.raises(ValueError, match="labels \\[10\\] outside 0..9"):
        training_data.check_labels(torch.tensor([3, 10]), 10, "x")
    # a network of fewer classes than the shards hold: the next batch is refused as it is read
    source.expect_classes(1)
    with pytest.raises(ValueError, match="outside 0..0 of this class-conditional network"):
        source.batch(1, 0, None)


def teacher_args(folder, manifest):
    cfg = config(teacher={"objective": "meanflow", "network": NET, "steps": 6, "batch": 4, "dropout": 0.0,
                          "meanflow": {"label_dropout": 0.1, "guidance": {"omega": 1.0, "kappa": 0.5}},
                          "optimizer": {"name": "adam", "lr": 1e-3, "betas": [0.9, 0.95]}, "ema": {"beta": 0.9}})
    stage = {"seed": 0, "network": cfg["network"], "teacher": cfg["teacher"], "sigma_data": 0.5,
             "sigma_min": 0.002, "sigma_max": 80.0, "latents": LATENTS}
    return ["--config", json.dumps(stage), "--latents", manifest, "--verify", "fast", "--key", "k-latent",
            "--out", folder / "model.safetensors", *state_args(folder / "state", every_steps=3)]


def test_latent_meanflow_teacher_resumes_bit_exactly_and_is_built_for_the_latents(encoded, tmp_path):
    run_in_process("stages.train_teacher", teacher_args(tmp_path / "straight", encoded), keep_state=True)
    first = run("stages.train_teacher", teacher_args(tmp_path / "killed", encoded), faults=["--kill-after-save", 3])
    assert first.returncode == SIGKILLED, first.log
    run_in_process("stages.train_teacher", teacher_args(tmp_path / "killed", encoded), keep_state=True)
    straight, straight_json = load_state(tmp_path / "straight" / "state" / f"step-{6:09d}")
    resumed, resumed_json = load_state(tmp_path / "killed" / "state" / f"step-{6:09d}")
    assert_same_tensors(resumed, straight)
    run_in_process("stages.train_teacher", teacher_args(tmp_path / "final", encoded))
    meta = checkpoints.read_meta(tmp_path / "final" / "model.safetensors")
    assert meta["architecture"]["in_channels"] == 4 and meta["architecture"]["resolution"] == 4
    assert meta["inputs"]["latents"]["path"] == str(encoded) and meta["precond"] == "meanflow"


def test_an_edm_teacher_trains_on_latents(encoded, tmp_path):
    """The EDM teacher of a latent row (the ImageNet-512 smoke runs' tiny EDM2) reads the encoded dataset
    too, and is built for the latent shape."""
    args = teacher_args(tmp_path, encoded)
    cfg = json.loads(args[1])
    cfg["teacher"]["objective"] = "edm"
    cfg["network"] = {"kind": "small_unet", "channels": 8, "channel_mult": [1], "num_blocks": 1}
    args[1] = json.dumps(cfg)
    run_in_process("stages.train_teacher", args)
    meta = checkpoints.read_meta(tmp_path / "model.safetensors")
    assert meta["precond"] == "edm" and meta["architecture"]["in_channels"] == 4
    assert meta["architecture"]["resolution"] == 4 and meta["inputs"]["latents"]["path"] == str(encoded)
