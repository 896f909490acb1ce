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

from stages.files import atomic, store

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


CIFAR10_TRAIN = [f"cifar-10-batches-py/data_batch_{i}" for i in range(1, 6)]


def write_cifar10_archive(path, images, labels):
    """A tar.gz in the layout of the CIFAR-10 python archive (the images split over five batch
    pickles of `data` uint8 [n, 3072], channel-major, and `labels`). For synthetic smoke data."""
    import pickle
    import tarfile

    with tarfile.open(path, "w:gz") as tar:
        parts = zip(np.array_split(images, 5), np.array_split(np.asarray(labels), 5), strict=True)
        for i, (name, (imgs, labs)) in enumerate(zip(CIFAR10_TRAIN, parts, strict=True)):
            batch = {"batch_label": f"training batch {i + 1} of 5",
                     "data": np.ascontiguousarray(imgs.reshape(-1, 3072)),
                     "labels": [int(v) for v in labs], "filenames": []}
            blob = pickle.dumps(batch, protocol=2)
            info = tarfile.TarInfo(name)
            info.size = len(blob)
            tar.addfile(info, io.BytesIO(blob))


def synthetic_images(count, channels, resolution, seed):
    """Smooth random colour fields (not noise, so FD and LPIPS see structure) for smoke runs."""
    rng = np.random.default_rng(seed)
    coarse = rng.integers(0, 256, size=(count, channels, 4, 4)).astype(np.float64)
    up = np.kron(coarse, np.ones((1, 1, resolution // 4, resolution // 4)))
    return np.clip(up + rng.normal(0, 8, up.shape), 0, 255).astype(np.uint8)


def read_cifar10(spec):
    """The CIFAR-10 python archive (cifar-10-python.tar.gz): the 50,000 training images, as EDM's
    dataset_tool takes them. `synthetic: N` writes and reads a N-image archive in that format
    instead (smoke runs: the real file cannot be downloaded everywhere)."""
    import tarfile
    import tempfile

    from stages.files import unpickle

    if spec.get("resolution", 32) != 32:
        raise ValueError("dataset.resolution: CIFAR-10 images are 32x32; set resolution: 32")
    if spec.get("synthetic"):
        count = spec["synthetic"]
        if count < 5:
            raise ValueError("dataset.synthetic: the CIFAR-10 layout has five batches; use at least 5 images")
        tmp = tempfile.TemporaryDirectory()
        path = Path(tmp.name) / "cifar-10-python.tar.gz"
        write_cifar10_archive(path, synthetic_images(count, 3, 32, seed=0), np.arange(count) % 10)
    else:
        path = Path(spec["path"])
    if not path.exists():
        raise FileNotFoundError(f"{path}: CIFAR-10 archive missing; run the fetch_assets rule or place "
                                "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz there")
    images, labels = [], []
    with tarfile.open(path, "r:gz") as tar:
        names = set(tar.getnames())
        for name in CIFAR10_TRAIN:
            if name not in names:
                raise ValueError(f"{path}: {name} missing; not the CIFAR-10 python archive")
            batch = unpickle.loads(tar.extractfile(name).read(), source=f"{path}:{name}", encoding="latin1")
            images.append(np.asarray(batch["data"], dtype=np.uint8).reshape(-1, 3, 32, 32))
            labels.append(np.asarray(batch["labels"], dtype=np.int64))
    return np.concatenate(images), np.concatenate(labels)


IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".webp", ".bmp"}


def read_image_folder(spec):
    """Every image under `path` (recursive, sorted by relative path) as RGB at `resolution`:
    centre-cropped to a square, then resized with Lanczos where the size differs (the FFHQ and
    AFHQv2 sources are square, so this is EDM dataset_tool's Lanczos scaling). Unlabelled.
    `synthetic: N` writes N PNGs in a temporary folder and reads those (smoke runs)."""
    import tempfile

    from PIL import Image

    res = spec["resolution"]
    if spec.get("synthetic"):
        tmp = tempfile.TemporaryDirectory()
        root = Path(tmp.name)
        for i, img in enumerate(synthetic_images(spec["synthetic"], 3, 2 * res, seed=0)):
            Image.fromarray(img.transpose(1, 2, 0)).save(root / f"{i:05d}.png")
    else:
        root = Path(spec["path"])
    files = sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise FileNotFoundError(f"{root}: no images ({', '.join(sorted(IMAGE_SUFFIXES))}) found; set "
                                "dataset.path to the folder of the downloaded FFHQ / AFHQv2 images")
    out = np.empty((len(files), 3, res, res), dtype=np.uint8)
    for i, file in enumerate(files):
        with Image.open(file) as img:
            img = img.convert("RGB")
            w, h = img.size
            side = min(w, h)
            left, top = (w - side) // 2, (h - side) // 2
            img = img.crop((left, top, left + side, top + side))
            if side != res:
                img = img.resize((res, res), Image.LANCZOS)
            out[i] = np.asarray(img).transpose(2, 0, 1)
    return out, np.full(len(files), -1, dtype=np.int64)


def center_crop_adm(img, resolution):
    """The ADM crop (EDM2's `center-crop-dhariwal`, from guided-diffusion's ImageNet loader): while
    the short side is at least twice the target, halve the image with a box filter; then scale
    with bicubic so the short side is `resolution`; then cut the centre square. Returns HWC uint8."""
    from PIL import Image

    while min(img.size) >= 2 * resolution:
        img = img.resize(tuple(side // 2 for side in img.size), resample=Image.BOX)
    scale = resolution / min(img.size)
    img = img.resize(tuple(round(side * scale) for side in img.size), resample=Image.BICUBIC)
    arr = np.asarray(img)
    top, left = (arr.shape[0] - resolution) // 2, (arr.shape[1] - resolution) // 2
    return arr[top:top + resolution, left:left + resolution]


def write_class_folders(root, count, classes, resolution, seed=0):
    """`count` PNGs of non-square sizes in `classes` class folders (n00000000, ...) in the
    ILSVRC2012 train layout, image i in class i % classes. For smoke runs and tests."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    base = synthetic_images(count, 3, 4 * resolution, seed)
    for i, img in enumerate(base):
        folder = Path(root) / f"n{i % classes:08d}"
        folder.mkdir(parents=True, exist_ok=True)
        w = int(rng.integers(3 * resolution, 4 * resolution + 1))
        Image.fromarray(img.transpose(1, 2, 0)).resize((w, 3 * resolution)).save(folder / f"img_{i:05d}.png")


def imagenet_files(spec):
    """The (label, file) list of an ImageNet folder (ILSVRC2012 train layout, `path`/<wnid>/<image>),
    class folders in sorted order as labels 0..999, files sorted within each; and what keeps a
    synthetic folder alive (`synthetic: N` writes N images in 10 class folders: smoke runs)."""
    import tempfile

    tmp = None
    if spec.get("synthetic"):
        tmp = tempfile.TemporaryDirectory()
        root = Path(tmp.name)
        write_class_folders(root, spec["synthetic"], 10, spec["resolution"])
    else:
        root = Path(spec["path"])
    if not root.is_dir():
        raise FileNotFoundError(f"{root}: ImageNet folder missing; set dataset.path to the extracted ILSVRC2012 "
                                "train folder (one sub-folder per class, e.g. n01440764/*.JPEG)")
    classes = sorted(p.name for p in root.iterdir() if p.is_dir())
    files = [(label, f) for label, name in enumerate(classes)
             for f in sorted((root / name).iterdir()) if f.suffix.lower() in IMAGE_SUFFIXES]
    if not files:
        raise FileNotFoundError(f"{root}: no class folders with images; expected the ILSVRC2012 train layout "
                                "<path>/<wnid>/<image>.JPEG")
    stray = [p.name for p in root.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES]
    if stray:
        raise ValueError(f"{root}: images outside the class folders ({stray[:3]}); an unlabelled image has no "
                         "class here: move them into their class folder or remove them")
    return files, tmp


def read_adm_cropped(files, resolution):
    """(label, file) pairs -> uint8 [N, 3, res, res] through the ADM crop, and int64 labels [N]."""
    from PIL import Image

    out = np.empty((len(files), 3, resolution, resolution), dtype=np.uint8)
    for i, (_, file) in enumerate(files):
        with Image.open(file) as img:
            out[i] = center_crop_adm(img.convert("RGB"), resolution).transpose(2, 0, 1)
    return out, np.array([label for label, _ in files], dtype=np.int64)


def read_imagenet_folder(spec):
    """ImageNet in the ILSVRC2012 train layout (imagenet_files), each image RGB through the ADM crop
    (center_crop_adm) at `resolution`."""
    files, _tmp = imagenet_files(spec)
    return read_adm_cropped(files, spec["resolution"])


READERS = {"digits": read_digits, "cifar10": read_cifar10, "image_folder": read_image_folder,
           "imagenet_folder": read_imagenet_folder}


def read_selection(spec, select):
    """Some images of the source as `prepare` would store them: `select(count)` gets the source's
    image count and returns the indices to read. Returns (images, labels, indices, count). An
    ImageNet folder decodes only the selected files (a shard of the 1.28M images reads its own few
    thousand, never the whole set); other sources are read whole and indexed."""
    if spec["source"] == "imagenet_folder":
        files, _tmp = imagenet_files(spec)
        indices = np.asarray(select(len(files)), dtype=np.int64)
        images, labels = read_adm_cropped([files[i] for i in indices], spec["resolution"])
        return images, labels, indices, len(files)
    if spec["source"] not in READERS:
        raise ValueError(f"dataset.source: unknown source {spec['source']!r}; known: {sorted(READERS)}")
    images, labels = READERS[spec["source"]](spec)
    indices = np.asarray(select(len(images)), dtype=np.int64)
    return images[indices], labels[indices], indices, len(images)


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
                f"({manifest['sha256'][:12]}...); the file is damaged: "
                + store.remake_command("<results>/<row>/receipts/dataset.json")
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
