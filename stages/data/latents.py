"""Encoded datasets: every image's posterior under the latent codec (stages/networks/latent_codec.py)
in WebDataset shards, and the reader that turns them into the training stages' batches.

The pool holds the source's images in a fixed random order (encoding_order), shard k the
positions k * per_shard ...: every shard is a uniform sample of the classes, where the source's
order (ImageNet's class folders) would give shards of four classes each, batches of a few classes
through a stream's shuffle buffer, and a held-out shard of one class. Sample `<position:09d>`:
`latents.npy` the stored form, [2C, h, w], the posterior's mean (channels 0..C-1) and std (C..2C-1)
as EDM2's `img512-sd.zip` holds them; `meta.json` {"source_index", "label", "source_count"} (the
image's index in the source, datasets.read_selection; label -1 where unlabelled; source_count = the
images of the whole source, so the manifest can tell a pool that misses some of them).

float32 by default, as EDM2's npy files: the raw means reach tens (channel 0's is 5.81 +- 4.17)
where float16's spacing is 0.004-0.016, coarser than a small posterior std, so float16 would round
the mean by more than the noise each draw adds. It costs 8 x 64 x 64 x 4 B = 128 KiB per 512 px
image (168 GB for ImageNet's 1,281,167), float16 half that (`latents.dtype`).

The stored form keeps the posterior, so every use draws a fresh mean + std * eps and whitens it
with the codec's scale and bias (latent_codec.posterior_draw), as EDM2 does at each use of an
image; the draw is folded from (seed, step, rank), so resumed runs draw the same latents.
"""

import json

import numpy as np
import torch
import webdataset as wds

from stages.core import rng
from stages.data import shards
from stages.files import store
from stages.networks import latent_codec

FORMAT = "cmt-latents/1"


def encoding_order(count):
    """The pool's order of a source of `count` images: a permutation fixed by the count alone."""
    return np.random.default_rng(rng.fold("encoding-order", count)).permutation(count)


def write_shard(path, samples):
    """Write (position, source_index, stored [2C, h, w], label, source_count) tuples to `path`
    atomically; returns the count."""
    def member(position, source_index, stored, label, source_count):
        meta = {"source_index": int(source_index), "label": int(label), "source_count": int(source_count)}
        return {"__key__": f"{position:09d}", "latents.npy": shards.encode_npy(stored),
                "meta.json": json.dumps(meta, sort_keys=True).encode()}

    return shards.write_tar(path, (member(*sample) for sample in samples))


def decode_sample(sample, source="?"):
    """Raw WebDataset sample -> {"index" (pool position), "latents", "label", "meta"}. A malformed member
    raises, naming it."""
    key = sample.get("__key__", "?")
    url = sample.get("__url__", source)
    try:
        meta = json.loads(sample["meta.json"])
        stored = shards.decode_npy(sample["latents.npy"])
        if stored.ndim != 3 or stored.shape[0] % 2:
            raise ValueError(f"latents of shape {stored.shape}, want [2C, h, w]")
        return {"index": int(key), "latents": stored, "label": int(meta["label"]), "meta": meta}
    except Exception as e:  # a damaged member must stop the job, not be skipped
        raise ValueError(
            f"{url}: encoded sample {key!r} cannot be decoded ({type(e).__name__}: {e}); the shard is "
            "damaged: " + store.remake_command("<results>/<row>/receipts/latents/<shard>.json")) from e


def read_shard(path):
    """All samples of one shard, in order."""
    pipeline = wds.DataPipeline(wds.SimpleShardList([str(path)]),
                                wds.tarfile_to_samples(handler=wds.reraise_exception))
    return [decode_sample(s, str(path)) for s in pipeline]


class LatentStream(shards.RankTrajectoryStream):
    """The endless, reproducible, resumable stream of encoded images of `paths` that rank `rank` of
    `world` reads (shards.RankTrajectoryStream: shard order and shuffling folded from the seed and
    epoch, a position to save and restore)."""

    decode = staticmethod(decode_sample)
    what = "encoded images"
    shards_key = "latents.num_shards"


def whitening(cfg):
    """(scale, bias) [1, C, 1, 1] of the `latents` config section (EDM2's constants by default)."""
    scale, bias = latent_codec.whitening(cfg.get("raw_mean", latent_codec.RAW_MEAN),
                                         cfg.get("raw_std", latent_codec.RAW_STD),
                                         cfg.get("final_mean", latent_codec.FINAL_MEAN),
                                         cfg.get("final_std", latent_codec.FINAL_STD))
    return scale.reshape(1, -1, 1, 1), bias.reshape(1, -1, 1, 1)


class LatentBatches:
    """A training stage's batches of final latents and labels from an encoded dataset.

    Each step takes the next `batch` encoded images of this rank's stream and draws one posterior
    sample of each with a generator folded from (seed, step, part, "posterior"): the same step of a
    resumed or uninterrupted run gives the same latents. `state_dict` is the stream's position.
    """

    def __init__(self, paths, counts, seed, batch, latents_cfg, rank=0, world=1, shuffle_buffer=1000,
                 device="cpu"):
        self.stream = LatentStream(paths, counts, seed, shuffle_buffer, rank, world)
        self.seed, self.batch, self.rank = seed, int(batch), rank
        self.scale, self.bias = (t.to(device) for t in whitening(latents_cfg))
        self.device = torch.device(device)
        self.label_check = None  # set by the stage that knows its network's classes (training_data)

    def state_dict(self):
        return self.stream.state_dict()

    def load_state_dict(self, position):
        self.stream.load_state_dict(position)

    def stored(self):
        """The next batch in its stored form: float32 [B, 2C, h, w] and int64 labels [B], on the device."""
        items = [next(self.stream) for _ in range(self.batch)]
        stored = torch.from_numpy(np.stack([it["latents"] for it in items]).astype(np.float32))
        labels = torch.tensor([it["label"] for it in items], dtype=torch.int64)
        if self.label_check is not None:
            self.label_check(labels)
        return stored.to(self.device), labels.to(self.device)

    def next(self, step, part=None):
        """Final latents [B, C, h, w] (one fresh posterior draw each) and labels [B] for part `part`
        of `step` (loop.fit's parts: rank x micro-batches + micro; default the rank)."""
        stored, labels = self.stored()
        generator = rng.generator(self.seed, step, self.rank if part is None else part, "posterior")
        return latent_codec.posterior_draw(stored, self.scale, self.bias, generator), labels


def read_first(path):
    """The stored latents of a shard's first sample, without reading the rest."""
    pipeline = wds.DataPipeline(wds.SimpleShardList([str(path)]),
                                wds.tarfile_to_samples(handler=wds.reraise_exception))
    for sample in pipeline:
        return decode_sample(sample, str(path))["latents"]
    raise ValueError(f"{path}: no encoded images in the shard")


def manifest_shards(manifest_path, fast=False):
    """The checked shard paths and their counts of an encoded-dataset manifest (latent_manifest)."""
    manifest, paths = shards.check_manifest(manifest_path, fast=fast)
    return manifest, paths, [e["count"] for e in manifest["shards"]]


def encoded_dtype(name):
    if name not in ("float32", "float16"):
        raise ValueError(f"latents.dtype: {name!r}; use float32 or float16")
    return np.dtype(name)


def stored_array(stored, dtype):
    """A codec's stored latents (torch, [N, 2C, h, w]) -> numpy in the shard dtype, refusing non-finite values."""
    array = stored.detach().to("cpu", torch.float32).numpy()
    if not np.isfinite(array).all():
        raise ValueError("the codec returned non-finite latents; check the VAE's weights (assets folder) and input")
    out = array.astype(dtype)
    if not np.isfinite(out).all():
        raise ValueError(f"latents overflow {dtype}; store them as float32 (latents.dtype)")
    return out

