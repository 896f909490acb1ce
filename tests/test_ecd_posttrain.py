"""ECD and the 512 code's ECT as post-training methods of the posttrain stage: the teacher (and the
guide of autoguidance) come in as model files, frozen; the loss gets the guided denoiser
g + w (D_ref - g), the batch's classes, the row's q, c, P_mean, P_std and the data's sigma_data.
The losses themselves are checked by hand in tests/test_losses.py."""

import copy
import json

import pytest
import torch

from stages import networks
from stages.data import labels
from stages.files import checkpoints
from stages.method import losses
from tests.stagekit import make_dataset, posttrain_config, run_in_process
from tests.tiny_edm2 import CONDITIONAL as ARCH
from tests.tiny_edm2 import conditional_net


def save_model(path, seed):
    torch.manual_seed(seed)
    net = conditional_net() if seed == 0 else networks.build_precond(ARCH)
    if seed:
        with torch.no_grad():
            for p in net.parameters():
                p.add_(0.1 * torch.randn_like(p))
    checkpoints.save(path, net=net, ema=copy.deepcopy(net), meta={
        "role": "teacher", "key": f"k{seed}", "architecture": ARCH, "precond": "edm", "sigma_data": 0.5,
        "sigma_min": 0.002, "sigma_max": 80.0, "time": "sigma"})
    return path


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("ecd")
    return (make_dataset(tmp / "data"), save_model(tmp / "teacher.safetensors", 0),
            save_model(tmp / "guide.safetensors", 1))


def run(tmp_path, method, extra=(), **post):
    dataset, teacher, _ = post.pop("inputs")
    cfg = posttrain_config(steps=2, batch=4, snapshots=[0, 1], method=method, q=1024, c=0.06, P_mean=-0.8,
                           P_std=1.6, **post)
    run_in_process("stages.posttrain", ["--config", json.dumps(cfg), "--init", "teacher", "--init-model", teacher,
                                        "--dataset", dataset, "--out", tmp_path / "post.safetensors",
                                        "--snapshots", tmp_path / "snaps", *extra])
    return checkpoints.read_meta(tmp_path / "post.safetensors")


def test_ecd_gets_the_autoguided_teacher(inputs, tmp_path, monkeypatch):
    dataset, teacher, guide = inputs
    calls = []
    ecd = losses.ecd_loss
    monkeypatch.setattr(losses, "ecd_loss", lambda net, y, g, denoise, **k: calls.append((denoise, k)) or
                        ecd(net, y, g, denoise, **k))
    meta = run(tmp_path, "ecd", ["--teacher", teacher, "--guide", guide], inputs=inputs,
               guidance={"weight": 2.05, "guide": "teacher"})
    assert len(calls) == 2 and meta["precond"] == "edm"
    denoise, kwargs = calls[0]
    assert (kwargs["q"], kwargs["c"], kwargs["P_mean"], kwargs["P_std"], kwargs["sigma_data"]) == (1024, 0.06, -0.8,
                                                                                                  1.6, 0.5)
    assert kwargs["labels"].shape == (4, 10) and kwargs["target_context"] is not None
    d_ref, d_guide = checkpoints.load(teacher)[0].eval(), checkpoints.load(guide)[0].eval()
    x, sigma, onehot = torch.randn(3, 1, 8, 8), torch.tensor([0.3, 2.0, 20.0]), labels.one_hot([1, 5, 9], 10)
    with torch.no_grad():
        want = d_guide(x, sigma, onehot) + 2.05 * (d_ref(x, sigma, onehot) - d_guide(x, sigma, onehot))
        torch.testing.assert_close(denoise(x, sigma, onehot), want)
        assert (want - d_ref(x, sigma, onehot)).abs().max() > 1e-3  # the guide matters


def test_ect_snr_and_refusals(inputs, tmp_path, monkeypatch):
    dataset, teacher, guide = inputs
    calls = []
    snr = losses.ect_snr_loss
    monkeypatch.setattr(losses, "ect_snr_loss", lambda *a, **k: calls.append(k) or snr(*a, **k))
    run(tmp_path / "snr", "ect_snr", inputs=inputs)
    assert len(calls) == 2 and calls[0]["c"] == 0.06 and calls[0]["sigma_data"] == 0.5
    with pytest.raises(ValueError, match="autoguidance needs both"):
        run(tmp_path / "a", "ecd", ["--teacher", teacher], inputs=inputs, guidance={"weight": 2.0})
    with pytest.raises(ValueError, match="pass --teacher"):
        run(tmp_path / "b", "ecd", inputs=inputs)
    with pytest.raises(ValueError, match="uses no teacher"):
        run(tmp_path / "c", "ect_snr", ["--teacher", teacher], inputs=inputs)
