"""import_teacher: a snapshot in the official EDM format converts, and the converted teacher
reproduces the network it was made from; foreign or mismatched snapshots are refused."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from stages import networks
from stages.files import checkpoints, edm_import
from stages.networks.precond import Precond
from tests.edm_format import official_kwargs, randomize, write_edm_pickle

torch.set_num_threads(1)

ROOT = Path(__file__).resolve().parents[1]
# A small DDPM++ (CIFAR layout at 16 channels, one block per level) keeps the pickle small.
ARCH = {"kind": "ddpmpp", "in_channels": 3, "resolution": 32, "channels": 16, "channel_mult": [2, 2],
        "num_blocks": 1, "attn_resolutions": [16], "augment_dim": 9, "channel_mult_emb": 4, "dropout": 0.13}


def make_snapshot(tmp_path, arch=ARCH, **override):
    torch.manual_seed(0)
    original = randomize(Precond(networks.build(arch), "edm", 0.5), seed=3, std=0.05).eval()
    path = tmp_path / "edm-test.pkl"
    write_edm_pickle(path, original, tmp_path / "marker", official_kwargs(arch, **override))
    return original, path


def run_stage(pickle, out, network, latents=None):
    cfg = {"network": network, "sigma_data": 0.5, "sigma_min": 0.002, "sigma_max": 80.0,
           "teacher": {"source": "import", "asset": "test", "url": "file:///test.pkl"},
           **({"latents": latents} if latents else {})}
    return subprocess.run([sys.executable, "-m", "stages.import_teacher", "--config", json.dumps(cfg),
                           "--threads", "1", "--pickle", str(pickle), "--out", str(out), "--key", "k1"],
                          cwd=ROOT, capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(ROOT)})


def test_converted_teacher_reproduces_the_original(tmp_path):
    original, pkl = make_snapshot(tmp_path)
    out = tmp_path / "teacher" / "model.safetensors"
    network = {k: v for k, v in ARCH.items() if k not in ("in_channels", "resolution", "dropout")}
    result = run_stage(pkl, out, network)
    assert result.returncode == 0, result.stderr
    assert not (tmp_path / "marker").exists()

    teacher, meta = checkpoints.load(out, which="ema")
    assert meta["architecture"] == ARCH and meta["precond"] == "edm" and meta["sigma_data"] == 0.5
    assert meta["inputs"]["pickle"]["url"] == "file:///test.pkl" and meta["key"] == "k1"
    teacher.eval()
    g = torch.Generator().manual_seed(5)
    x = torch.randn(4, 3, 32, 32, generator=g) * 3
    sigma = torch.tensor([80.0, 2.5, 0.3, 0.002])
    with torch.no_grad():
        want, got = original(x, sigma), teacher(x, sigma)
    assert torch.equal(got, want)
    # and not trivially: the network's part of the denoiser matters (c_out is ~0 only at 0.002)
    assert ((want - x)[:3].flatten(1).abs().amax(1) > 1e-1).all()


def test_refuses_conditional_and_mismatched_snapshots(tmp_path):
    _, pkl = make_snapshot(tmp_path, label_dim=10)
    with pytest.raises(ValueError, match="label_dim=10"):
        edm_import.load_edm_teacher(pkl)

    _, pkl = make_snapshot(tmp_path, num_blocks=2)  # kwargs say 2 blocks, tensors hold 1
    with pytest.raises(ValueError, match="one to one"):
        edm_import.load_edm_teacher(pkl)

    _, pkl = make_snapshot(tmp_path)
    _, architecture, _, _ = edm_import.load_edm_teacher(pkl)
    with pytest.raises(ValueError, match="channels: config 128, snapshot 16"):
        edm_import.check_network_config(architecture, {"kind": "ddpmpp", "channels": 128}, pkl)


@pytest.mark.heavy
def test_edm2_pickle_imports_as_the_rows_preset(tmp_path):
    """An EDM2 post-hoc EMA pickle (pixel model, StandardRGBEncoder) becomes a teacher whose outputs
    are the pickle's network's (stored float16, as EDM2 stores them); the row names a preset with
    overrides, and a row that names another network or a latent model is refused."""
    from tests.edm_format import edm2_kwargs, write_edm2_pickle
    from tests.tiny_edm2 import TINY, TINY_EXTRA, tiny_inputs, tiny_net

    original = tiny_net()
    pkl = tmp_path / "edm2-tiny.pkl"
    write_edm2_pickle(pkl, original, tmp_path / "marker", edm2_kwargs(TINY, **TINY_EXTRA), encoder="rgb")
    network = {"kind": "edm2", "preset": "edm2-img64-s", "label_dim": 10, "channels": 16, **TINY_EXTRA}
    out = tmp_path / "teacher" / "model.safetensors"
    result = run_stage(pkl, out, network)
    assert result.returncode == 0, result.stderr
    teacher, meta = checkpoints.load(out, which="ema")
    assert meta["architecture"] == networks.architecture(network, 3, 16, 0.0)
    assert meta["precond"] == "edm" and meta["imported"]["encoder"] == {"class_name": "StandardRGBEncoder"}
    x, sigma, labels = tiny_inputs()
    stored = original.half().float().eval()
    with torch.no_grad():
        assert torch.equal(teacher.eval()(x, sigma, labels), stored(x, sigma, labels))

    wrong = run_stage(pkl, tmp_path / "w" / "model.safetensors", {**network, "channels": 32})
    assert wrong.returncode != 0 and "channels: config 32, snapshot 16" in wrong.stderr
    vae = tmp_path / "edm2-vae.pkl"
    write_edm2_pickle(vae, tiny_net(), tmp_path / "marker", edm2_kwargs(TINY, **TINY_EXTRA), encoder="vae")
    latent = run_stage(vae, tmp_path / "v" / "model.safetensors", network)
    assert latent.returncode != 0 and "latent-space model" in latent.stderr
    # a latent row takes it when its whitening is the pickle's (EDM2's constants), and no other
    edm2 = {"raw_mean": [5.81, 3.25, 0.12, -2.15], "raw_std": [4.17, 4.62, 3.71, 3.28], "final_mean": 0.0,
            "final_std": 0.5}
    ok = run_stage(vae, tmp_path / "l" / "model.safetensors", network, latents=edm2)
    assert ok.returncode == 0, ok.stderr
    assert checkpoints.read_meta(tmp_path / "l" / "model.safetensors")["imported"]["encoder"]["class_name"] == (
        "StabilityVAEEncoder")
    other = run_stage(vae, tmp_path / "o" / "model.safetensors", network, latents={**edm2, "final_std": 1.0})
    assert other.returncode != 0 and "final_std: row 1.0, pickle 0.5" in other.stderr
    pixels = run_stage(pkl, tmp_path / "p" / "model.safetensors", network, latents=edm2)
    assert pixels.returncode != 0 and "pixel-space model" in pixels.stderr
