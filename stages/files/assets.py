"""Files the paper rows need from the internet, and the one place that downloads them.

Compute nodes may have no internet: the `fetch_assets` rule runs on the login node, resumes
partial downloads (HTTP Range), checks each file and moves it into the assets folder atomically.
Nothing else in the pipeline opens a network connection. Offline, it fails at once and lists which
URL to place at which path.

Checks: the publisher's md5 where one is published (CIFAR-10), torchvision's sha256 prefix in the
file name (VGG16), the sha256 the Hugging Face hub publishes for a large file (the SD-VAE weights),
a sha256 pinned in config `assets.sha256` where given. Files without a published checksum (the EDM
and EDM2 pickles, the Inception TorchScript, the SD-VAE config) get their sha256 recorded beside
them on first download (`<file>.sha256`) and checked against that record afterwards; pin it in the config
to check the first download too.

Some assets are folders of several files (a diffusers model: config.json and the weights): FOLDERS
names them, `fetch` takes a folder name for all its files, and each file is still its own catalog
entry (one fetch_assets job per file).
"""

import dataclasses
import hashlib
import os
import urllib.error
import urllib.request
from pathlib import Path

from stages.files import atomic


@dataclasses.dataclass(frozen=True)
class Asset:
    url: str
    filename: str
    md5: str | None = None
    sha256_prefix: str | None = None
    sha256: str | None = None
    note: str | None = None  # said beside the file when it must be placed by hand


EDM = "https://nvlabs-fi-cdn.nvidia.com/edm/pretrained"
# The SD-VAE ft-MSE of EDM2's latent rows, at a pinned revision of its hub repository, as the diffusers
# folder that stages/networks/latent_codec.py loads.
SD_VAE = "https://huggingface.co/stabilityai/sd-vae-ft-mse/resolve/31f26fdeee1355a5c34592e401dd41e45d25a493"
SD_VAE_NOTE = ("one of the two files of the diffusers folder of stabilityai/sd-vae-ft-mse; keep their names "
               "(config.json, diffusion_pytorch_model.safetensors) in that one folder")
CATALOG = {
    "cifar10-python": Asset("https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz", "cifar-10-python.tar.gz",
                            md5="c58f30108f718f92721af3b95e74349a"),  # the md5 torchvision checks
    "edm-cifar10-32x32-uncond-vp": Asset(f"{EDM}/edm-cifar10-32x32-uncond-vp.pkl", "edm-cifar10-32x32-uncond-vp.pkl"),
    "edm-ffhq-64x64-uncond-vp": Asset(f"{EDM}/edm-ffhq-64x64-uncond-vp.pkl", "edm-ffhq-64x64-uncond-vp.pkl"),
    "edm-afhqv2-64x64-uncond-vp": Asset(f"{EDM}/edm-afhqv2-64x64-uncond-vp.pkl", "edm-afhqv2-64x64-uncond-vp.pkl"),
    "inception-2015-12-05": Asset(
        "https://nvlabs-fi-cdn.nvidia.com/stylegan2-ada-pytorch/pretrained/metrics/inception-2015-12-05.pt",
        "inception-2015-12-05.pt"),
    "vgg16": Asset("https://download.pytorch.org/models/vgg16-397923af.pth", "vgg16-397923af.pth",
                   sha256_prefix="397923af"),
    "sd-vae-ft-mse-config": Asset(f"{SD_VAE}/config.json", "sd-vae-ft-mse/config.json", note=SD_VAE_NOTE),
    "sd-vae-ft-mse-weights": Asset(
        f"{SD_VAE}/diffusion_pytorch_model.safetensors", "sd-vae-ft-mse/diffusion_pytorch_model.safetensors",
        sha256="a1d993488569e928462932c8c38a0760b874d166399b14414135bd9c42df5815", note=SD_VAE_NOTE),
}
# EDM2's post-hoc EMA reconstructions, named <preset>-<training kimg>-<EMA length sigma_rel>:
# ImageNet-64 teachers (S as in ECT's recipe, XL), ImageNet-512 CMT teacher (XXL 0.070), ECD teacher
# (XXL 0.075) and autoguidance guide (M 0.155), and the 512 eval decoder / latent-VGG encoder pickles.
EDM2 = "https://nvlabs-fi-cdn.nvidia.com/edm2"
for _name in ("edm2-img64-s-1073741-0.075", "edm2-img64-xl-0671088-0.040", "edm2-img512-xxl-0939524-0.070",
              "edm2-img512-xxl-0939524-0.075", "edm2-img512-m-0268435-0.155", "edm2-img512-m-2147483-0.100",
              "edm2-img512-s-2147483-0.130"):
    CATALOG[_name] = Asset(f"{EDM2}/posthoc-reconstructions/{_name}.pkl", f"{_name}.pkl")
# EDM2's FID reference statistics (a pickle of numpy arrays, key `fid`: mu, sigma) of its datasets.
for _name in ("img512", "img64"):
    CATALOG[f"edm2-dataset-refs-{_name}"] = Asset(f"{EDM2}/dataset-refs/{_name}.pkl",
                                                  f"edm2-dataset-refs-{_name}.pkl")
# The ADM evaluation suite's ImageNet-256 reference batch (mu, sigma of TF-Inception pool features
# over the training set): the reference of MeanFlow's FIDs, read by numpy (features.load_adm_reference).
CATALOG["adm-imagenet256-reference"] = Asset(
    "https://openaipublic.blob.core.windows.net/diffusion/jul-2021/ref_batches/imagenet/256/VIRTUAL_imagenet256_labeled.npz",
    "VIRTUAL_imagenet256_labeled.npz")
FOLDERS = {"sd-vae-ft-mse": ("sd-vae-ft-mse-config", "sd-vae-ft-mse-weights")}


class OfflineError(RuntimeError):
    pass


def expand(names):
    """Catalog names with each folder name replaced by the names of its files."""
    out = []
    for name in names:
        for member in FOLDERS.get(name, (name,)):
            if member not in out:
                out.append(member)
    return out


def folder_path(name, cfg):
    """The local folder that holds the files of folder asset `name`."""
    if name not in FOLDERS:
        raise ValueError(f"unknown asset folder {name!r}; known: {sorted(FOLDERS)}")
    return Path(cfg["dir"]) / Path(CATALOG[FOLDERS[name][0]].filename).parent


def resolve(name, cfg):
    """The catalog entry `name` with config overrides (`assets.urls` for mirrors)."""
    if name not in CATALOG:
        raise ValueError(f"unknown asset {name!r}; known: {sorted(CATALOG)}")
    asset = CATALOG[name]
    url = (cfg.get("urls") or {}).get(name, asset.url)
    return dataclasses.replace(asset, url=url)


def file_digest(path, algorithm):
    h = hashlib.new(algorithm)
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            h.update(block)
    return h.hexdigest()


def verify(path, asset, pinned_sha256=None):
    """Raise ValueError naming the file if a check fails; returns the file's sha256."""
    sha256 = file_digest(path, "sha256")
    record = Path(f"{path}.sha256")
    problems = []
    if asset.md5 and file_digest(path, "md5") != asset.md5:
        problems.append(f"md5 is not the published {asset.md5}")
    if asset.sha256_prefix and not sha256.startswith(asset.sha256_prefix):
        problems.append(f"sha256 {sha256[:12]}... does not start with {asset.sha256_prefix}")
    if asset.sha256 and sha256 != asset.sha256:
        problems.append(f"sha256 {sha256} is not the published {asset.sha256}")
    if pinned_sha256 and sha256 != pinned_sha256:
        problems.append(f"sha256 {sha256} is not the pinned {pinned_sha256} (config assets.sha256)")
    if record.exists() and record.read_text().split()[0] != sha256:
        problems.append(f"sha256 {sha256[:12]}... differs from the one recorded in {record}")
    if problems:
        raise ValueError(f"{path}: {'; '.join(problems)}. Delete it and fetch it again from {asset.url}")
    return sha256


def download(url, dest, timeout=20, chunk=1 << 20):
    """Download `url` to `dest`, resuming `dest.part` with an HTTP Range request where the server
    allows it; the final name appears only when the transfer is complete."""
    dest = Path(dest)
    part = dest.with_name(dest.name + ".part")
    have = part.stat().st_size if part.exists() else 0
    request = urllib.request.Request(url, headers={"Range": f"bytes={have}-"} if have else {})
    try:
        response = urllib.request.urlopen(request, timeout=timeout)
    except urllib.error.HTTPError as e:
        if e.code == 416 and have:  # the part file is already whole
            os.replace(part, dest)
            return
        raise
    with response:
        resumed = have and getattr(response, "status", 200) == 206
        total = response.headers.get("Content-Length")
        with open(part, "ab" if resumed else "wb") as f:
            while block := response.read(chunk):
                f.write(block)
    size = part.stat().st_size
    if total is not None and size != (have if resumed else 0) + int(total):
        raise IOError(f"{url}: transfer ended at {size} bytes of {int(total) + (have if resumed else 0)}; "
                      "rerun fetch_assets to resume")
    os.replace(part, dest)


def fetch(names, cfg, log=print, row_needs=()):
    """Fetch every asset in `names` (catalog or folder names) into cfg['dir'] that is not there yet, and
    check all of them. Offline, the error lists every missing file of `names` and `row_needs` (the row's
    other assets)."""
    names, row_needs = expand(names), expand(row_needs)
    folder = Path(cfg["dir"])
    folder.mkdir(parents=True, exist_ok=True)
    pins = cfg.get("sha256") or {}
    assets = {name: resolve(name, cfg) for name in names}
    missing = [n for n, a in assets.items() if not (folder / a.filename).exists()]
    others = {n: resolve(n, cfg) for n in row_needs if n not in assets}
    others = {n: a for n, a in others.items() if not (folder / a.filename).exists()}
    for i, name in enumerate(missing):
        asset = assets[name]
        dest = folder / asset.filename
        log(f"[fetch_assets] {asset.url} -> {dest}")
        dest.parent.mkdir(parents=True, exist_ok=True)
        try:
            download(asset.url, dest)
        except (urllib.error.URLError, TimeoutError, ConnectionError, OSError) as e:
            if isinstance(e, urllib.error.HTTPError):
                raise
            todo = {**{n: assets[n] for n in missing[i:]}, **others}
            todo = "\n".join(f"  {a.url}\n    -> {folder / a.filename}" + (f"\n    ({a.note})" if a.note else "")
                             for a in todo.values())
            raise OfflineError(
                f"cannot download {asset.url} ({e}). No internet here? Run fetch_assets on a machine "
                f"with access (the login node), or place these files by hand:\n{todo}") from None
    for name, asset in assets.items():
        path = folder / asset.filename
        try:
            sha256 = verify(path, asset, pins.get(name))
        except ValueError:
            if name in missing:  # downloaded just now: drop it so that a rerun fetches it afresh
                path.unlink()
            raise
        record = Path(f"{path}.sha256")
        if not record.exists():
            atomic.write_text(record, f"{sha256}  {asset.filename}\n")
            log(f"[fetch_assets] recorded sha256 {sha256} for {path}")
        log(f"[fetch_assets] ok {path} sha256 {sha256[:16]}")
