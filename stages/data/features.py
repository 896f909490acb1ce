"""Feature spaces for the Fréchet distance, and the statistics written for it.

`pixels`: the raw pixels in [-1, 1], flattened. It is the pinned space of the digits default: it
needs no download, is exactly reproducible, and at 64 dimensions its covariance is well estimated
from 1,797 images, whereas Inception features (2048-d) of 8x8 digits upsampled to 299x299 would
measure the upsampling more than the digits and need more samples than the data set holds.
`inception`: the StyleGAN/EDM Inception TorchScript through clean-fid (the paper rows). With
resize `inside` it is clean-fid's `legacy_tensorflow` mode (the same TorchScript, resizing inside):
the port of the TensorFlow Inception graph that the ADM evaluation suite, and so MeanFlow's FIDs,
run on.

Reference statistics are computed from the prepared dataset, or (features.reference) read from the
ADM suite's reference batch (`VIRTUAL_imagenet256_labeled.npz`: mu, sigma of the 2048-d pool
features, mu_s, sigma_s of its spatial features, arr_0 10k images), with numpy and no pickles.

The distance itself is clean-fid's `frechet_distance`, not re-implemented.
"""

import numpy as np
from cleanfid.fid import frechet_distance

from stages.core import progress


def pixel_features(images_uint8, cfg=None):
    """Pixels in [-1, 1], flattened; `pool` > 1 averages pool x pool blocks first (smoke runs of
    the paper rows: 3,072-d CIFAR pixels would make each matrix square root take minutes)."""
    x = images_uint8.astype(np.float64) / 127.5 - 1.0
    pool = (cfg or {}).get("pool", 1)
    if pool > 1:
        n, c, h, w = x.shape
        if h % pool or w % pool:
            raise ValueError(f"features.pool {pool} does not divide the {h}x{w} images")
        x = x.reshape(n, c, h // pool, pool, w // pool, pool).mean(axis=(3, 5))
    return x.reshape(x.shape[0], -1)


INCEPTION_FILE = "inception-2015-12-05.pt"


def inception_features(images_uint8, cfg):
    """2048-d pool features of the StyleGAN/EDM Inception TorchScript, through clean-fid's wrapper,
    loaded from `cfg['model']` (the assets folder; never clean-fid's own download to /tmp).

    resize `inside` (default) feeds uint8 images at native resolution and lets the TorchScript
    resize them, as EDM's and StyleGAN's FID does (the paper's numbers); `clean` resizes each image
    to 299x299 with clean-fid's PIL bicubic first (clean-fid's own protocol).
    """
    import os

    import torch
    from cleanfid.inception_torchscript import InceptionV3W
    from cleanfid.resize import build_resizer

    path = cfg["model"]
    if os.path.basename(path) != INCEPTION_FILE or not os.path.exists(path):
        raise FileNotFoundError(f"features.model: {path} must be an existing {INCEPTION_FILE} (run the "
                                "fetch_assets rule, which places it in the assets folder)")
    resize = cfg.get("resize", "inside")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model = InceptionV3W(os.path.dirname(path) or ".", download=False, resize_inside=resize == "inside")
    model = model.to(device).eval()
    resizer = build_resizer("clean") if resize == "clean" else None
    if images_uint8.shape[1] == 1:
        images_uint8 = np.repeat(images_uint8, 3, axis=1)
    out = []
    batch = cfg.get("batch", 250)
    shown = progress.Progress("[features] Inception", len(images_uint8), "images")
    for start in range(0, len(images_uint8), batch):
        chunk = images_uint8[start:start + batch]
        if resizer is not None:
            chunk = np.stack([resizer(img.transpose(1, 2, 0)).transpose(2, 0, 1) for img in chunk])
        x = torch.from_numpy(np.ascontiguousarray(chunk)).to(device=device, dtype=torch.float32)
        with torch.no_grad():
            out.append(model(x).double().cpu().numpy())
        shown.update(start + len(chunk))
    return np.concatenate(out)


EXTRACTORS = {"pixels": pixel_features, "inception": inception_features}


def extract(images_uint8, cfg):
    kind = cfg["kind"]
    if kind not in EXTRACTORS:
        raise ValueError(f"features.kind: unknown feature space {kind!r}; known: {sorted(EXTRACTORS)}")
    return EXTRACTORS[kind](images_uint8, cfg)


def statistics(features):
    return features.mean(axis=0), np.cov(features, rowvar=False)


def frechet(stats_a, stats_b):
    (mu_a, sigma_a), (mu_b, sigma_b) = stats_a, stats_b
    return float(frechet_distance(mu_a, sigma_a, mu_b, sigma_b))


def score(images_uint8, cfg, reference):
    """Fréchet distance of `images_uint8` against `reference` (mu, sigma) in the feature space `cfg`."""
    return frechet(statistics(extract(images_uint8, cfg)), reference)


def summary(values):
    """Scores over seed ranges: each one, their mean and their minimum (the paper reports one of them)."""
    return {"per_range": [float(v) for v in values], "mean": float(np.mean(values)), "min": float(np.min(values))}


def save_statistics(path, mu, sigma, **meta):
    import io
    import json

    from stages.files import atomic

    buf = io.BytesIO()
    np.savez(buf, mu=mu, sigma=sigma, meta=np.array(json.dumps(meta, sort_keys=True)))
    atomic.write_bytes(path, buf.getvalue())


ADM_FEATURES = 2048


def load_adm_reference(path):
    """(mu [2048], sigma [2048, 2048]) float64 from an ADM evaluation-suite reference batch (.npz),
    read with allow_pickle=False. A file without both keys, or of another shape, is refused."""
    try:
        data = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as e:
        raise ValueError(f"features.reference: {path} is not a numpy .npz file ({e}); download the ADM "
                         "reference batch again (the fetch_assets rule)") from e
    with data:
        missing = [k for k in ("mu", "sigma") if k not in data.files]
        if missing:
            raise ValueError(f"features.reference: {path} has no {' and '.join(missing)} (keys: {sorted(data.files)}); "
                             "an ADM reference batch such as VIRTUAL_imagenet256_labeled.npz holds mu and sigma")
        mu, sigma = data["mu"].astype(np.float64), data["sigma"].astype(np.float64)
    if mu.shape != (ADM_FEATURES,) or sigma.shape != (ADM_FEATURES, ADM_FEATURES):
        raise ValueError(f"features.reference: {path}: mu {mu.shape}, sigma {sigma.shape}; the Inception pool "
                         f"statistics are ({ADM_FEATURES},) and ({ADM_FEATURES}, {ADM_FEATURES})")
    if not (np.isfinite(mu).all() and np.isfinite(sigma).all()):
        raise ValueError(f"features.reference: {path}: mu or sigma is not finite; the file is damaged")
    return mu, sigma


def load_statistics(path):
    with np.load(path) as data:
        return data["mu"], data["sigma"]


def edm2_reference(path):
    """(mu, sigma) of an EDM2 reference-statistics pickle (`dataset-refs/img512.pkl`: a dict whose
    `fid` entry holds the Inception features' `mu` [2048] and `sigma` [2048, 2048]; a bare {mu, sigma}
    is taken too), read with the restricted unpickler: the pickle runs no code."""
    from stages.files import unpickle

    data = unpickle.load(path)
    stats = data.get("fid", data) if isinstance(data, dict) else None
    if not isinstance(stats, dict) or not {"mu", "sigma"} <= set(stats):
        keys = sorted(data) if isinstance(data, dict) else type(data).__name__
        raise ValueError(f"{path}: not EDM2 reference statistics (want a dict with fid: {{mu, sigma}}, found {keys})")
    mu, sigma = np.asarray(stats["mu"], dtype=np.float64), np.asarray(stats["sigma"], dtype=np.float64)
    if mu.ndim != 1 or sigma.shape != (len(mu), len(mu)):
        raise ValueError(f"{path}: mu {mu.shape} and sigma {sigma.shape} are not a mean and its covariance")
    if not (np.isfinite(mu).all() and np.isfinite(sigma).all()):
        raise ValueError(f"{path}: non-finite reference statistics")
    return mu, sigma
