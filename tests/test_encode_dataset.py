"""The encoded dataset of the latent rows: encode_dataset's shards against the codec applied directly to
the ADM-cropped images (tiny random AutoencoderKL, synthetic ImageNet folder), shard boundaries and a
pool that misses images, the manifest, the reader's posterior draws against their analytic mean and
std, its determinism and resume, and the rules: keys, receipts through the store, the SD-VAE folder
fetched by fetch_assets."""

import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import webdataset as wds
import yaml

from stages.data import datasets, latents
from stages.files import store
from stages.networks import latent_codec

REPO = Path(__file__).resolve().parents[1]
TINY_VAE = {"config": {"block_out_channels": [8, 8, 8, 8], "layers_per_block": 1, "norm_num_groups": 4,
                       "latent_channels": 4, "down_block_types": ["DownEncoderBlock2D"] * 4,
                       "up_block_types": ["UpDecoderBlock2D"] * 4}, "seed": 3}
RES = 32  # 4x4 latents


@pytest.fixture(scope="module")
def imagenet(tmp_path_factory):
    root = tmp_path_factory.mktemp("imagenet")
    datasets.write_class_folders(root, 7, 3, RES, seed=1)
    return {"name": "tiny-in", "source": "imagenet_folder", "path": str(root), "resolution": RES}


def stage_cfg(dataset, per_shard=3, dtype="float32"):
    return {"dataset": dataset, "vae": TINY_VAE, "per_shard": per_shard, "dtype": dtype, "spec": {"what": "test"}}


def encode(cfg, shard, out):
    cmd = [sys.executable, "-m", "stages.encode_dataset", "--config", json.dumps(cfg), "--threads", "1",
           "--vae-batch", "2", "--shard", str(shard), "--out", str(out)]
    return subprocess.run(cmd, capture_output=True, text=True, cwd=REPO)


@pytest.mark.heavy
def test_shards_hold_the_codec_posterior_of_the_adm_crop(imagenet, tmp_path):
    files, _ = datasets.imagenet_files(imagenet)
    codec = latent_codec.LatentCodec(latent_codec.random_vae(TINY_VAE))
    pixels, labels = datasets.read_adm_cropped(files, RES)
    direct = codec.encode_pixels(torch.from_numpy(pixels)).numpy()
    assert direct.shape == (7, 8, 4, 4)
    got = []
    for k in range(3):  # 7 images at 3 per shard: 3, 3, 1
        result = encode(stage_cfg(imagenet), k, tmp_path / f"shard-{k}.tar")
        assert result.returncode == 0, result.stderr[-2000:]
        got += latents.read_shard(tmp_path / f"shard-{k}.tar")
    assert [s["index"] for s in got] == list(range(7))  # pool positions
    # the pool's order is a permutation of the source, fixed by its size: each image once
    order = [s["meta"]["source_index"] for s in got]
    assert order == latents.encoding_order(7).tolist() and sorted(order) == list(range(7)) and order != list(range(7))
    assert [s["label"] for s in got] == labels[order].tolist() and labels.tolist() == [0, 0, 0, 1, 1, 2, 2]
    assert all(s["meta"]["source_count"] == 7 for s in got)
    stored = np.stack([s["latents"] for s in got])
    assert stored.dtype == np.float32
    np.testing.assert_allclose(stored, direct[order], rtol=1e-4, atol=1e-5)  # another process, maybe other kernels
    assert (stored[:, 4:] > 0).all()  # channels 4-7 are the posterior's std
    assert json.loads((tmp_path / "spec.json").read_text()) == {"what": "test"}
    # float16 shards round the same posterior
    assert encode(stage_cfg(imagenet, dtype="float16"), 2, tmp_path / "h.tar").returncode == 0
    half = latents.read_shard(tmp_path / "h.tar")[0]["latents"]
    assert half.dtype == np.float16
    np.testing.assert_allclose(half.astype(np.float32), direct[order[6]], rtol=2e-3, atol=1e-4)
    # pixels: signed (the VAE's own [-1, 1], the ImageNet-256 row) encodes with that range
    signed = latent_codec.LatentCodec(latent_codec.random_vae(TINY_VAE), pixels="signed")
    assert encode({**stage_cfg(imagenet), "pixels": "signed"}, 2, tmp_path / "s.tar").returncode == 0
    want = signed.encode_pixels(torch.from_numpy(pixels[order[6:]])).numpy()[0]
    np.testing.assert_allclose(latents.read_shard(tmp_path / "s.tar")[0]["latents"], want, rtol=1e-4, atol=1e-5)


def test_a_shard_past_the_dataset_is_refused(imagenet, tmp_path):
    result = encode(stage_cfg(imagenet), 3, tmp_path / "x.tar")
    assert result.returncode != 0
    assert "has 7 images; set latents.num_shards to ceil(7 / 3) = 3" in result.stderr
    assert not (tmp_path / "x.tar").exists()


def manifest(receipts, out, per_shard=3):
    cmd = [sys.executable, "-m", "stages.latent_manifest", "--spec", json.dumps({"per_shard": per_shard}),
           "--shards", *map(str, receipts), "--out", str(out)]
    return subprocess.run(cmd, capture_output=True, text=True, cwd=REPO)


@pytest.mark.heavy
def test_store_receipts_and_a_manifest_that_refuses_missing_images(imagenet, tmp_path):
    receipts = []
    for k in range(3):
        shard, receipt = tmp_path / "store" / f"shard-{k:06d}.tar", tmp_path / "receipts" / f"{k:06d}.json"
        cmd = [sys.executable, "-m", "stages.files.store", "--mode", "make", "--key", "K", "--files", str(shard),
               "--receipt", str(receipt), "--", sys.executable, "-m", "stages.encode_dataset",
               "--config", json.dumps(stage_cfg(imagenet)), "--threads", "1", "--shard", str(k), "--out", str(shard)]
        result = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO)
        assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
        assert store.complete([shard])
        receipts.append(receipt)
    # two of three shards leave an image out: refused, naming the fix
    result = manifest(receipts[:2], tmp_path / "m.json")
    assert result.returncode != 0 and "hold 6 of the source's 7 images; set latents.num_shards to 3" in result.stderr
    result = manifest(receipts, tmp_path / "m.json")
    assert result.returncode == 0, result.stderr[-2000:]
    man, paths, counts = latents.manifest_shards(tmp_path / "m.json")
    assert man["total"] == 7 and counts == [3, 3, 1] and len(paths) == 3
    # a damaged shard is caught by the check training runs
    data = bytearray(paths[1].read_bytes())
    data[2000] ^= 1
    paths[1].write_bytes(bytes(data))
    with pytest.raises(ValueError, match="sha256 differs"):
        latents.manifest_shards(tmp_path / "m.json")


def write_known_shards(folder, mean, std, count=64, per_shard=16, hw=4):
    """Shards whose every image has the posterior mean `mean[c]` and std `std[c]` in every pixel."""
    stored = np.concatenate([np.broadcast_to(np.asarray(mean, np.float32)[:, None, None], (4, hw, hw)),
                             np.broadcast_to(np.asarray(std, np.float32)[:, None, None], (4, hw, hw))])
    paths = []
    for k in range(count // per_shard):
        path = folder / f"s{k}.tar"
        latents.write_shard(path, ((i, i, stored, i % 5, count) for i in range(k * per_shard, (k + 1) * per_shard)))
        paths.append(path)
    return paths, [per_shard] * len(paths)


def test_reader_draws_whitened_posterior_samples(tmp_path):
    """Final latents = (mean + std eps) * 0.5 / raw_std - raw_mean * 0.5 / raw_std: per channel, mean
    (mean - raw_mean) * 0.5 / raw_std and std std * 0.5 / raw_std (EDM2's constants)."""
    mean, std = [6.0, 1.0, -0.5, -3.0], [0.5, 2.0, 1.0, 0.25]
    paths, counts = write_known_shards(tmp_path, mean, std)
    cfg = {}  # EDM2's defaults
    batches = latents.LatentBatches(paths, counts, seed=0, batch=64, latents_cfg=cfg, shuffle_buffer=8)
    draws = torch.cat([batches.next(step)[0] for step in range(16)])  # 1024 images x 16 pixels per channel
    raw_mean, raw_std = np.array([5.81, 3.25, 0.12, -2.15]), np.array([4.17, 4.62, 3.71, 3.28])
    want_mean = (np.array(mean) - raw_mean) * 0.5 / raw_std
    want_std = np.array(std) * 0.5 / raw_std
    got_mean, got_std = draws.mean((0, 2, 3)).numpy(), draws.std((0, 2, 3)).numpy()
    n = draws.numel() // 4
    # sampling error of the mean is std / sqrt(n); allow 5 of them
    np.testing.assert_allclose(got_mean, want_mean, atol=5 * want_std.max() / np.sqrt(n))
    np.testing.assert_allclose(got_std, want_std, rtol=0.03)
    # labels travel with the images
    _, labels = latents.LatentBatches(paths, counts, 0, 8, cfg, shuffle_buffer=1).next(0)
    assert labels.dtype == torch.int64 and set(labels.tolist()) <= set(range(5))


def test_reader_is_a_function_of_the_step_and_resumes(tmp_path):
    g = np.random.default_rng(0)
    paths = []
    for k in range(3):
        path = tmp_path / f"s{k}.tar"
        latents.write_shard(path, ((i, i, np.abs(g.normal(size=(8, 2, 2))).astype(np.float32),
                                    i % 3, 15) for i in range(5 * k, 5 * k + 5)))
        paths.append(path)
    counts = [5, 5, 5]
    whole = latents.LatentBatches(paths, counts, 3, 4, {}, shuffle_buffer=4)
    steps = [whole.next(s) for s in range(6)]  # past one epoch of 15
    part = latents.LatentBatches(paths, counts, 3, 4, {}, shuffle_buffer=4)
    for s in range(2):
        part.next(s)
    saved = part.state_dict()
    resumed = latents.LatentBatches(paths, counts, 3, 4, {}, shuffle_buffer=4)
    resumed.load_state_dict(saved)
    for s in range(2, 6):
        x, y = resumed.next(s)
        torch.testing.assert_close(x, steps[s][0], rtol=0, atol=0)
        assert torch.equal(y, steps[s][1])
    # the posterior draw is folded from the step: the same images at another step give other latents
    again = latents.LatentBatches(paths, counts, 3, 4, {}, shuffle_buffer=4)
    x, _ = again.next(5)
    assert (x - steps[0][0]).abs().max() > 1e-3


def test_damaged_sample_names_the_shard(tmp_path):
    path = tmp_path / "bad.tar"
    with wds.TarWriter(str(path), encoder=False) as sink:
        sink.write({"__key__": "000000000", "latents.npy": b"not npy", "meta.json": b'{"label": 0}'})
    with pytest.raises(ValueError, match="bad.tar: encoded sample '000000000' cannot be decoded"):
        latents.read_shard(path)


def dry_run(tmp_path, latents_cfg, *extra):
    cfg = yaml.safe_load((REPO / "tests" / "tiny.yaml").read_text())
    cfg["dataset"] = {"name": "tiny-in", "source": "imagenet_folder", "path": "downloads/in", "resolution": 32}
    cfg["latents"] = latents_cfg
    (tmp_path / "row.yaml").write_text(yaml.safe_dump(cfg))
    cmd = [sys.executable, "-m", "snakemake", "--snakefile", str(REPO / "Snakefile"), "-d", str(tmp_path), "-c1",
           "--configfile", str(tmp_path / "row.yaml"), "-n", "-p", f"results/{cfg['row']}/latents/manifest.json",
           *extra]
    result = subprocess.run(cmd, capture_output=True, text=True, cwd=tmp_path)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result.stdout


@pytest.mark.heavy
def test_rules_plan_one_job_per_shard_and_fetch_the_vae_folder(tmp_path):
    out = dry_run(tmp_path, {"num_shards": 5, "per_shard": 1000})
    jobs = dict(re.findall(r"^(\w+)\s+(\d+)\s*$", out.split("Job stats:")[1].split("total")[0], re.M))
    assert jobs == {"fetch_assets": "2", "encode_dataset": "5", "latent_manifest": "1"}
    assert "assets/sd-vae-ft-mse/config.json" in out
    assert "assets/sd-vae-ft-mse/diffusion_pytorch_model.safetensors" in out
    assert "--vae assets/sd-vae-ft-mse" in out
    key = re.search(r"store/latents/tiny-in-([0-9a-f]{16})/shard-000004.tar", out).group(1)
    # the whitening and the VAE batch are no part of the key; the dtype and the shard size are
    assert key in dry_run(tmp_path, {"num_shards": 5, "per_shard": 1000, "batch": 32, "final_std": 1.0})
    assert key not in dry_run(tmp_path, {"num_shards": 5, "per_shard": 1000, "dtype": "float16"})
    assert key not in dry_run(tmp_path, {"num_shards": 5, "per_shard": 500})
    # a random VAE needs no asset
    out = dry_run(tmp_path, {"num_shards": 2, "per_shard": 4, "vae": TINY_VAE})
    assert "fetch_assets" not in out and "--vae assets" not in out and "--vae-batch 8" in out

