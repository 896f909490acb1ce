"""Sampling a class-conditional MeanFlow DiT (the ImageNet-256 row's students): classes folded from
(seed, index) reach every call, and latent samples are decoded by the latent codec into pixels."""

import copy
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch

from stages.data import labels as class_labels
from stages.files import checkpoints
from stages.method import flowmap
from stages.networks.latent_codec import LatentCodec
from stages.training import rng
from tests.test_latent_codec import tiny_vae

REPO = Path(__file__).resolve().parents[1]
ARCH = {"kind": "dit", "in_channels": 4, "resolution": 4, "depth": 1, "hidden_size": 32, "patch_size": 2,
        "num_heads": 2, "num_classes": 5, "dropout": 0.0, "dual_time": True}
SAMPLING = {"seed": 3, "steps": [1, 2], "t_mid": 0.5, "num_ranges": 1, "per_range": 3, "batch": 2}


def test_latent_samples_are_the_decoded_one_step_outputs_of_their_classes(tmp_path):
    torch.manual_seed(0)
    meta = {"architecture": ARCH, "precond": "meanflow", "sigma_data": 0.5, "sigma_min": 0.002, "sigma_max": 80.0,
            "time": "flow_t", "images_seen": 0, "steps": 0}
    net = checkpoints.build_precond(meta)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(0.05 * torch.randn_like(p))
    model = tmp_path / "model.safetensors"
    checkpoints.save(model, net=net, ema=copy.deepcopy(net), meta=meta)
    vae_dir = tmp_path / "vae"
    tiny_vae().save_pretrained(vae_dir, safe_serialization=True)
    out = tmp_path / "samples.npz"
    subprocess.run([sys.executable, "-m", "stages.sample", "--config", json.dumps(SAMPLING), "--threads", "1",
                    "--model", str(model), "--vae", str(vae_dir), "--out", str(out)],
                   check=True, capture_output=True, cwd=REPO)
    with np.load(out) as data:
        one, two, labels = data["images_1step_r0"], data["images_2step_r0"], data["labels_r0"]
    assert one.shape == two.shape == (3, 3, 32, 32) and one.dtype == np.uint8
    expected = [class_labels.random_label(3, i, 5) for i in range(3)]
    assert labels.tolist() == expected
    codec = LatentCodec.from_folder(vae_dir)
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
