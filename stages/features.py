"""Feature spaces for the Fréchet distance, and the statistics written for it.

`pixels`: the raw pixels in [-1, 1], flattened. It is the pinned space of the digits default: it
needs no download, is exactly reproducible, and at 64 dimensions its covariance is well estimated
from 1,797 images, whereas Inception features (2048-d) of 8x8 digits upsampled to 299x299 would
measure the upsampling more than the digits and need more samples than the data set holds.
Inception (clean-fid, the paper's protocol) registers here for the paper rows.

The distance itself is clean-fid's `frechet_distance`, not re-implemented.
"""

import numpy as np
from cleanfid.fid import frechet_distance


def pixel_features(images_uint8, cfg=None):
    return images_uint8.reshape(images_uint8.shape[0], -1).astype(np.float64) / 127.5 - 1.0


EXTRACTORS = {"pixels": pixel_features}


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


def save_statistics(path, mu, sigma, **meta):
    import io
    import json

    from . import atomic

    buf = io.BytesIO()
    np.savez(buf, mu=mu, sigma=sigma, meta=np.array(json.dumps(meta, sort_keys=True)))
    atomic.write_bytes(path, buf.getvalue())


def load_statistics(path):
    with np.load(path) as data:
        return data["mu"], data["sigma"]
