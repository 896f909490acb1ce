"""Dataset preparation (digits, ImageNet folders and the ADM crop), integrity checks, pixel conversions."""

import json

import numpy as np
import pytest
import torch

from stages.data import datasets
from stages.files import atomic


@pytest.fixture(scope="module")
def digits(tmp_path_factory):
    out = tmp_path_factory.mktemp("digits")
    manifest = datasets.prepare({"name": "digits", "source": "digits", "resolution": 8}, out)
    return out, manifest


def test_prepare_digits(digits):
    out, manifest = digits
    images, labels = datasets.load(out / "dataset.npz")
    assert images.dtype == np.uint8 and images.shape == (1797, 1, 8, 8)
    assert images.min() == 0 and images.max() == 255
    # 17 grey levels 0..16 mapped to round(level * 255 / 16)
    assert set(np.unique(images).tolist()) <= {int(np.rint(k * 255 / 16)) for k in range(17)}
    assert len(np.unique(images)) == 17
    assert labels.dtype == np.int64 and labels.shape == (1797,)
    assert set(labels.tolist()) == set(range(10))
    assert manifest["count"] == 1797 and manifest["shape"] == [1, 8, 8] and manifest["labelled"]
    assert manifest["sha256"] == atomic.sha256_file(out / "dataset.npz")
    assert json.loads((out / "manifest.json").read_text()) == manifest


def test_prepare_digits_matches_sklearn(digits):
    from sklearn.datasets import load_digits

    out, _ = digits
    images, labels = datasets.load(out / "dataset.npz")
    ref = load_digits()
    np.testing.assert_array_equal(images[:, 0], np.rint(ref.images * 255 / 16).astype(np.uint8))
    np.testing.assert_array_equal(labels, ref.target)


def test_prepare_is_deterministic(digits, tmp_path):
    _, manifest = digits
    again = datasets.prepare({"name": "digits", "source": "digits", "resolution": 8}, tmp_path)
    assert again["sha256"] == manifest["sha256"]


def test_prepare_rejects_bad_specs(tmp_path):
    with pytest.raises(ValueError, match="resolution"):
        datasets.prepare({"name": "d", "source": "digits", "resolution": 32}, tmp_path)
    with pytest.raises(ValueError, match="unknown source"):
        datasets.prepare({"name": "d", "source": "cifar"}, tmp_path)


def test_load_detects_modified_dataset(digits, tmp_path):
    out, manifest = digits
    copy = tmp_path / "copy"
    copy.mkdir()
    (copy / "manifest.json").write_text((out / "manifest.json").read_text())
    with np.load(out / "dataset.npz") as data:
        images, labels = data["images"].copy(), data["labels"]
    images[5, 0, 3, 3] ^= 1
    np.savez(copy / "dataset.npz", images=images, labels=labels)
    with pytest.raises(ValueError) as err:
        datasets.load(copy / "dataset.npz")
    assert str(copy / "dataset.npz") in str(err.value) and "sha256" in str(err.value)


def test_load_missing_dataset(tmp_path):
    with pytest.raises(FileNotFoundError, match="prepare_dataset"):
        datasets.load(tmp_path / "dataset.npz")


def test_uint8_round_trip_all_values():
    u = np.arange(256, dtype=np.uint8)
    x = datasets.to_model_range(u)
    assert x.dtype == np.float32
    assert x[0] == -1.0 and x[255] == 1.0
    back = datasets.to_uint8(torch.from_numpy(x))
    assert back.dtype == torch.uint8
    np.testing.assert_array_equal(back.numpy(), u)


def test_to_uint8_clamps_and_follows_official_rounding():
    x = torch.tensor([-3.0, -1.0, 0.0, 1.0, 5.0, 127.4 / 127.5 - 1, -1 + 0.6 / 127.5])
    # x * 127.5 + 128, clamped to [0, 255], truncated: 0.0 -> 128
    assert datasets.to_uint8(x).tolist() == [0, 0, 128, 255, 255, 127, 1]


# ---- ImageNet folder and the ADM centre crop ---------------------------------------------------


def test_adm_crop_halves_with_box_then_bicubic_then_centre():
    """1024x768 to 64: 768 -> 384 -> 192 -> 96 by three box halvings (96 < 128 stops), then bicubic
    to 85x64 (round(128 x 64 / 96) = 85, short side 64), then the centre 64 columns from 10."""
    from PIL import Image

    rng = np.random.default_rng(0)
    img = Image.fromarray(rng.integers(0, 256, (768, 1024, 3), dtype=np.uint8))
    by_hand = img
    for _ in range(3):
        by_hand = by_hand.resize((by_hand.size[0] // 2, by_hand.size[1] // 2), resample=Image.BOX)
    assert by_hand.size == (128, 96)
    by_hand = np.asarray(by_hand.resize((85, 64), resample=Image.BICUBIC))[:, 10:74]
    np.testing.assert_array_equal(datasets.center_crop_adm(img, 64), by_hand)


def test_adm_crop_keeps_the_centre_of_a_wide_image():
    from PIL import Image

    stripes = np.zeros((200, 600, 3), dtype=np.uint8)
    stripes[:, :200, 0] = 255
    stripes[:, 200:400, 1] = 255
    stripes[:, 400:, 2] = 255
    out = datasets.center_crop_adm(Image.fromarray(stripes), 32)
    assert out.shape == (32, 32, 3)
    # the middle third only (bicubic rings a little at its borders: the outer two columns)
    inner = out[:, 2:-2].astype(int)
    assert (inner[..., 1] == 255).all() and (inner[..., [0, 2]] == 0).all()
    assert (out[..., 1] >= 200).all() and (out[..., [0, 2]] <= 40).all()


def test_imagenet_folder_labels_are_sorted_class_folders(tmp_path):
    datasets.write_class_folders(tmp_path / "train", 12, 3, 8)
    (tmp_path / "train" / "n00000001" / "notes.txt").write_text("not an image")
    images, labels = datasets.read_imagenet_folder({"path": str(tmp_path / "train"), "resolution": 8})
    assert images.shape == (12, 3, 8, 8) and images.dtype == np.uint8
    # folders n00000000 < n00000001 < n00000002; image i is in class i % 3, files sorted in each
    np.testing.assert_array_equal(labels, [0] * 4 + [1] * 4 + [2] * 4)
    synthetic, syn_labels = datasets.read_imagenet_folder({"synthetic": 20, "resolution": 8})
    assert synthetic.shape == (20, 3, 8, 8) and sorted(set(syn_labels.tolist())) == list(range(10))
    from PIL import Image

    Image.fromarray(images[0].transpose(1, 2, 0)).save(tmp_path / "train" / "stray.png")
    with pytest.raises(ValueError, match="outside the class folders"):
        datasets.read_imagenet_folder({"path": str(tmp_path / "train"), "resolution": 8})
    with pytest.raises(FileNotFoundError, match="ILSVRC2012"):
        datasets.read_imagenet_folder({"path": str(tmp_path / "missing"), "resolution": 8})
