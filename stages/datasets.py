"""The project's dataset format and the readers that produce it.

A prepared dataset is a folder with `dataset.npz` (`images`: uint8 [N, C, H, W], `labels`: int64 [N],
-1 where unlabelled) and `manifest.json` (count, shape, source, sha256 of the npz). Pixels map to
[-1, 1] as x / 127.5 - 1, the convention of EDM and the CMT code.

A reader turns one kind of source into (images, labels); new sources (image folders, CIFAR-style
archives) register one function in READERS and need nothing else.
"""

import io
import json
from pathlib import Path

import numpy as np

from . import atomic

FORMAT = "cmt-dataset/1"


def read_digits(spec):
    """scikit-learn's bundled 8x8 digits: 1797 images with 17 grey levels (0..16)."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    if spec.get("resolution", 8) != 8:
        raise ValueError("dataset.resolution: the digits images are 8x8; set resolution: 8")
    levels = digits.images.astype(np.float64)  # [N, 8, 8], values 0..16
    images = np.rint(levels * (255.0 / 16.0)).astype(np.uint8)[:, None]
    return images, digits.target.astype(np.int64)


READERS = {"digits": read_digits}


def prepare(spec, out_dir):
    """Read the source named by `spec` and write the dataset folder atomically."""
    source = spec["source"]
    if source not in READERS:
        raise ValueError(f"dataset.source: unknown source {source!r}; known: {sorted(READERS)}")
    images, labels = READERS[source](spec)
    if images.dtype != np.uint8 or images.ndim != 4:
        raise ValueError(f"reader {source!r} returned {images.dtype} {images.shape}, want uint8 NCHW")
    out_dir = Path(out_dir)
    buf = io.BytesIO()
    np.savez(buf, images=images, labels=labels)
    atomic.write_bytes(out_dir / "dataset.npz", buf.getvalue())
    manifest = {
        "format": FORMAT,
        "spec": spec,
        "count": int(images.shape[0]),
        "shape": list(images.shape[1:]),
        "labelled": bool((labels >= 0).any()),
        "sha256": atomic.sha256_file(out_dir / "dataset.npz"),
    }
    atomic.write_json(out_dir / "manifest.json", manifest)
    return manifest


def load(path):
    """Load a prepared dataset (`dataset.npz`, with `manifest.json` beside it), checked."""
    path = Path(path)
    manifest_path = path.parent / "manifest.json"
    if not path.exists():
        raise FileNotFoundError(f"{path}: no prepared dataset here; run the prepare_dataset rule")
    if manifest_path.exists():
        manifest = json.loads(manifest_path.read_text())
        digest = atomic.sha256_file(path)
        if digest != manifest["sha256"]:
            raise ValueError(
                f"{path}: sha256 {digest[:12]}... does not match {manifest_path} "
                f"({manifest['sha256'][:12]}...); the file is damaged: delete the folder and rerun "
                "prepare_dataset"
            )
    with np.load(path) as data:
        images, labels = data["images"], data["labels"]
    return images, labels


def to_model_range(images_uint8):
    """uint8 [0, 255] -> float32 [-1, 1]."""
    return images_uint8.astype(np.float32) / 127.5 - 1.0


def to_uint8(x):
    """Model output in [-1, 1] -> uint8, the conversion of the official samplers (x * 127.5 + 128)."""
    import torch

    return (x * 127.5 + 128).clamp(0, 255).to(torch.uint8)
