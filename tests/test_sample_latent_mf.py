"""Sampling a class-conditional MeanFlow DiT (the ImageNet-256 row's students): classes folded from
(seed, index) reach every call, and latent samples are decoded by the latent codec into pixels."""

import copy
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from stages.core import rng
from stages.data import labels as class_labels
from stages.files import checkpoints
from stages.method import flowmap
from stages.networks import latent_codec

REPO = Path(__file__).resolve().parents[1]
ARCH = {"kind": "dit", "in_channels": 4, "resolution": 4, "depth": 1, "hidden_size": 32, "patch_size": 2,
        "num_heads": 2, "num_classes": 5, "dropout": 0.0, "dual_time": True}
SAMPLING = {"seed": 3, "steps": [1, 2], "t_mid": 0.5, "num_ranges": 1, "per_range": 3, "batch": 2}
TINY_VAE = {"config": {"block_out_channels": [8, 8, 8, 8], "layers_per_block": 1, "norm_num_groups": 4,
                       "latent_channels": 4, "down_block_types": ["DownEncoderBlock2D"] * 4,
                       "up_block_types": ["UpDecoderBlock2D"] * 4}, "seed": 0}
# a latent row's section: MeanFlow's 0.18215 scaling of the raw latents
LATENTS = {"vae": TINY_VAE, "raw_mean": [0.0] * 4, "raw_std": [1 / 0.18215] * 4, "final_mean": 0.0, "final_std": 1.0}


@pytest.mark.heavy
def test_latent_samples_are_the_decoded_one_step_outputs_of_their_classes(tmp_path):
    torch.manual_seed(0)
    meta = {"architecture": ARCH, "precond": "meanflow", "sigma_data": 0.5, "sigma_min": 0.002, "sigma_max": 80.0,
            "time": "flow_t", "images_seen": 0, "steps": 0}
    net = checkpoints.build(meta)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(0.05 * torch.randn_like(p))
    model = tmp_path / "model.safetensors"
    checkpoints.save(model, net=net, ema=copy.deepcopy(net), meta=meta)
    vae_dir = tmp_path / "vae"
    latent_codec.random_vae(TINY_VAE).save_pretrained(vae_dir, safe_serialization=True)
    outputs = {}
    for name, extra in {"folder": ["--vae", str(vae_dir), "--latents", json.dumps(LATENTS)],
                        "random": ["--latents", json.dumps(LATENTS)]}.items():
        out = tmp_path / f"{name}.npz"
        subprocess.run([sys.executable, "-m", "stages.sample", "--config", json.dumps(SAMPLING), "--threads", "1",
                        "--model", str(model), *extra, "--out", str(out)], check=True, capture_output=True, cwd=REPO)
        with np.load(out) as data:
            outputs[name] = {k: data[k] for k in data.files}
    # the VAE from its folder and the same VAE built from the section's spec decode alike
    assert np.array_equal(outputs["folder"]["images_1step_r0"], outputs["random"]["images_1step_r0"])
    one, two, labels = (outputs["folder"][k] for k in ("images_1step_r0", "images_2step_r0", "labels_r0"))
    assert one.shape == two.shape == (3, 3, 32, 32) and one.dtype == np.uint8
    expected = [class_labels.random_label(3, i, 5) for i in range(3)]
    assert labels.tolist() == expected
    codec = latent_codec.from_config(LATENTS, vae_dir)
    assert torch.allclose(codec.scale.flatten(), torch.full((4,), 0.18215))
    z = torch.stack([torch.randn((4, 4, 4), generator=rng.generator(3, i, "z")) for i in range(3)])
    with torch.no_grad():
        x = flowmap.one_step(net.eval(), z, torch.tensor(expected))
    decoded = codec.decode(x).numpy()
    # uint8 truncation of the same latents: equal up to a last-bit flip at a truncation boundary
    assert np.abs(decoded.astype(int) - one.astype(int)).max() <= 1
    # the class matters: another class gives other latents
    with torch.no_grad():
        other = flowmap.one_step(net, z, (torch.tensor(expected) + 1) % 5)
    assert (other - x).abs().max() > 1e-4
