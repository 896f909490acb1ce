"""train_latent_vgg: a tiny latent VGG16 learns classes that are separable in the encoded latents
(held-out top-1 far above chance, the held-out loss far below the initial network's), a run killed
after a saved state and rerun ends with the weights of an uninterrupted run, and its weights load
as the E-LatentLPIPS backbone. Also the SGD optimizer and the StepLR schedule of loop.lr_at."""

import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file
from torch.nn import functional as F

from stages.core import rng
from stages.data import latents
from stages.files import atomic, checkpoints
from stages.method.elatentlpips import ELatentLPIPS, LatentVGG16
from stages.training import loop
from tests.stagekit import run, state_args

CLASSES = 4
ARCH = {"width": 0.125, "groups": 4, "hidden": 32, "pool": 1, "dropout": 0.0}


def make_encoded(folder, num_shards=4, per_shard=24, hw=8):
    """Shards of stored latents whose posterior mean carries the class (a fixed random pattern per
    class plus noise), and their manifest."""
    g = np.random.default_rng(0)
    patterns = g.normal(0, 3, (CLASSES, 4, hw, hw))
    entries, count = [], num_shards * per_shard
    for k in range(num_shards):
        samples = []
        for i in range(k * per_shard, (k + 1) * per_shard):
            label = int(g.integers(CLASSES))
            mean = patterns[label] + g.normal(0, 2, (4, hw, hw)) + np.array([5.81, 3.25, 0.12, -2.15])[:, None, None]
            std = np.full((4, hw, hw), 0.5)
            samples.append((i, i, np.concatenate([mean, std]).astype(np.float32), label, count))
        path = folder / f"shard-{k:06d}.tar"
        latents.write_shard(path, samples)
        entries.append({"path": str(path), "count": per_shard, "bytes": path.stat().st_size,
                        "sha256": atomic.sha256_file(path)})
    atomic.write_json(folder / "manifest.json", {"spec": {}, "total": count, "shards": entries})
    return folder / "manifest.json"


def vgg_cfg(steps=40, **extra):
    return {"seed": 0, "latents": {}, "latent_vgg": {
        "epochs": 1, "steps": steps, "batch": 16, "lr": 0.02, "momentum": 0.9, "weight_decay": 1e-4, "step_epochs": 30,
        "gamma": 0.1, "num_classes": CLASSES, "holdout_shards": 1, "hflip": False, "shuffle_buffer": 16,
        "eval_batch": 32, "architecture": ARCH, **extra}}


def train(tmp_path, name, manifest, cfg, faults=(), every_steps=None):
    out = tmp_path / name
    out.mkdir(exist_ok=True)
    args = ["--config", json.dumps(cfg), "--manifest", manifest, "--out", out / "model.safetensors",
            "--accuracy", out / "accuracy.json", "--metrics", out / "metrics.jsonl",
            "--tracking", json.dumps({"log_every": 10}), *state_args(out / "state", every_steps=every_steps)]
    return run("stages.train_latent_vgg", args, faults=faults), out


@pytest.fixture(scope="module")
def manifest(tmp_path_factory):
    return make_encoded(tmp_path_factory.mktemp("encoded"))


def held_out_loss(model, manifest):
    shard = json.loads(open(manifest).read())["shards"][-1]["path"]
    samples = latents.read_shard(shard)
    scale, bias = latents.whitening({})
    x = torch.from_numpy(np.stack([s["latents"][:4] for s in samples])) * scale + bias
    y = torch.tensor([s["label"] for s in samples])
    with torch.no_grad():
        return F.cross_entropy(model.eval()(x), y).item()


@pytest.mark.heavy
def test_latent_vgg_learns_the_classes(tmp_path, manifest):
    result, out = train(tmp_path, "run", manifest, vgg_cfg())
    assert result.returncode == 0, result.log[-3000:]
    accuracy = json.loads((out / "accuracy.json").read_text())
    assert accuracy["held_out_images"] == 24 and accuracy["steps"] == 40
    assert accuracy["top1"] >= 0.75 and accuracy["top4"] == 1.0  # chance: 0.25
    assert "held-out accuracy: top-1" in result.log
    meta = json.loads((out / "model.json").read_text())
    assert meta["architecture"] == {"in_channels": 4, "num_classes": CLASSES, **ARCH}
    assert meta["accuracy"]["top1"] == accuracy["top1"]
    # the metrics log: the training lines (cross-entropy and the batch's top-1), then the evaluation's
    log = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [(e["kind"], e["step"]) for e in log] == [("train", s) for s in (10, 20, 30, 40)] + [("eval", 40)]
    assert 0 <= log[0]["term/top1"] <= 1 and log[-1]["eval/top1"] == accuracy["top1"]
    assert log[-1]["eval/top4"] == accuracy["top4"] and "loss" not in log[-1]
    trained = LatentVGG16(**meta["architecture"])
    trained.load_state_dict(checkpoints.load_weights(out / "model.safetensors", "net"))
    torch.manual_seed(rng.fold(0, "latent-vgg-init"))
    initial = LatentVGG16(**meta["architecture"])
    assert held_out_loss(trained, manifest) < 0.5 * held_out_loss(initial, manifest)
    # the backbone E-LatentLPIPS reads: its features, zero distance between identical inputs
    lpips = ELatentLPIPS.from_file(out / "model.safetensors", meta["architecture"], augment=None)
    x = torch.randn(2, 4, 8, 8)
    assert lpips(x, x).abs().max() == 0 and (lpips(x, x + 0.5) > 0).all()
    # a file of the format train_latent_vgg wrote before its model file went through checkpoints
    # (the state dict under its own names) gives the same backbone
    save_file({k: v.contiguous() for k, v in trained.state_dict().items()}, str(tmp_path / "old.safetensors"))
    old = ELatentLPIPS.from_file(tmp_path / "old.safetensors", meta["architecture"], augment=None)
    assert all(torch.equal(a, b) for a, b in zip(old.state_dict().values(), lpips.state_dict().values(), strict=True))
    assert not (tmp_path / "run" / "state").exists()  # the state is removed once the outputs are written


@pytest.mark.heavy
def test_killed_run_resumes_to_the_uninterrupted_weights(tmp_path, manifest):
    cfg = vgg_cfg(steps=12)
    whole, whole_out = train(tmp_path, "whole", manifest, cfg)
    assert whole.returncode == 0, whole.log[-3000:]
    killed, out = train(tmp_path, "killed", manifest, cfg, faults=["--kill-after-save", 6], every_steps=3)
    assert killed.returncode != 0 and (out / "state").is_dir()
    resumed, out = train(tmp_path, "killed", manifest, cfg, every_steps=3)
    assert resumed.returncode == 0, resumed.log[-3000:]
    assert "resumed from" in resumed.log and "at step 6/12" in resumed.log
    a, b = load_file(str(whole_out / "model.safetensors")), load_file(str(out / "model.safetensors"))
    assert a.keys() == b.keys()
    for k in a:  # same process settings: equal up to float noise
        torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-6)


def test_too_many_held_out_shards_is_refused(tmp_path, manifest):
    result, _ = train(tmp_path, "x", manifest, vgg_cfg(holdout_shards=4))
    assert result.returncode != 0 and "latent_vgg.holdout_shards 4: the encoded pool has 4 shards" in result.log


def test_sgd_and_step_schedule():
    cfg = {"name": "sgd", "lr": 0.1, "momentum": 0.9, "weight_decay": 1e-4, "schedule": "step", "step_every": 30,
           "gamma": 0.1}
    # torch's StepLR(30, 0.1) over 100 epochs, one step an epoch
    assert [loop.lr_at(s, 100, cfg) for s in (0, 29, 30, 59, 60, 89, 90, 99)] == pytest.approx(
        [0.1, 0.1, 0.01, 0.01, 0.001, 0.001, 1e-4, 1e-4])
    p = torch.nn.Parameter(torch.tensor([1.0]))
    opt = loop.build_optimizer([p], cfg)
    assert isinstance(opt, torch.optim.SGD) and opt.defaults["momentum"] == 0.9
    # one step by hand: g = 2p + wd p, v = g, p <- p - lr v
    (p ** 2).sum().backward()
    opt.step()
    assert p.item() == pytest.approx(1 - 0.1 * (2 + 1e-4))
