"""Dataset readers of the paper rows: the CIFAR-10 python archive and 64x64 image folders."""

import numpy as np
import pytest
from PIL import Image

from stages.data import datasets


def test_cifar10_archive(tmp_path):
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(25, 3, 32, 32), dtype=np.uint8)
    labels = rng.integers(0, 10, size=25)
    path = tmp_path / "cifar-10-python.tar.gz"
    datasets.write_cifar10_archive(path, images, labels)
    got, got_labels = datasets.read_cifar10({"path": str(path)})
    assert np.array_equal(got, images) and np.array_equal(got_labels, labels)
    # channel-major rows: the first 1024 bytes of a row are the red plane
    assert np.array_equal(got[3, 0].ravel(), images[3].reshape(3072)[:1024])

    manifest = datasets.prepare({"source": "cifar10", "path": str(path)}, tmp_path / "prepared")
    assert manifest["count"] == 25 and manifest["shape"] == [3, 32, 32]


def test_cifar10_refuses_code_in_batches(tmp_path):
    import io
    import os
    import pickle
    import tarfile

    class Evil:
        def __reduce__(self):
            return os.system, ("true",)

    path = tmp_path / "evil.tar.gz"
    with tarfile.open(path, "w:gz") as tar:
        for name in datasets.CIFAR10_TRAIN:
            blob = pickle.dumps(Evil())
            info = tarfile.TarInfo(name)
            info.size = len(blob)
            tar.addfile(info, io.BytesIO(blob))
    with pytest.raises(Exception, match="refused global"):
        datasets.read_cifar10({"path": str(path)})


def test_image_folder_crops_and_resizes(tmp_path):
    (tmp_path / "imgs" / "sub").mkdir(parents=True)
    # a 96x64 image: left and right 16-px bands red, centre 64x64 square blue
    wide = np.zeros((64, 96, 3), np.uint8)
    wide[:, :16, 0] = wide[:, 80:, 0] = 255
    wide[:, 16:80, 2] = 200
    Image.fromarray(wide).save(tmp_path / "imgs" / "a.png")
    square = np.full((128, 128, 3), 77, np.uint8)
    Image.fromarray(square).save(tmp_path / "imgs" / "sub" / "b.png")
    images, labels = datasets.read_image_folder({"path": str(tmp_path / "imgs"), "resolution": 64})
    assert images.shape == (2, 3, 64, 64) and (labels == -1).all()
    assert (images[0, 0] == 0).all() and (images[0, 2] == 200).all()  # the centre crop, unresized
    assert (images[1] == 77).all()  # a flat image stays flat through Lanczos resizing

    with pytest.raises(FileNotFoundError, match="no images"):
        datasets.read_image_folder({"path": str(tmp_path / "imgs" / "none"), "resolution": 64})
