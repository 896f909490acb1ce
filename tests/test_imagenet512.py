"""The ImageNet-512 rows (latent space): the E-LatentLPIPS distance wired into mid-training, EDM2's
reference statistics read without running the pickle's code, the config checks of latent rows, the
rows' dry runs (every job, in seconds) and the smoke overlay through Snakemake (heavy)."""

import json
import pickle
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file
from workflow_runs import REPO, ROWS, finished_run, planned_jobs, snakemake

from stages.data import features
from stages.files import unpickle
from stages.method import losses
from stages.method.elatentlpips import ELatentLPIPS, LatentVGG16

ARCH = {"in_channels": 4, "num_classes": 10, "width": 0.125, "groups": 4, "hidden": 16, "pool": 1, "dropout": 0.0}


def write_latent_vgg(folder, seed=0):
    torch.manual_seed(seed)
    vgg = LatentVGG16(**ARCH)
    path = Path(folder) / "model.safetensors"
    save_file({k: v.contiguous() for k, v in vgg.state_dict().items()}, str(path))
    path.with_suffix(".json").write_text(json.dumps({"architecture": ARCH}))
    return path, vgg


def test_midtrain_distance_elatentlpips_is_the_latent_vgg_distance(tmp_path):
    path, vgg = write_latent_vgg(tmp_path)
    distance = losses.make_distance("elatentlpips", latent_vgg=str(path))
    reference = ELatentLPIPS(vgg)
    x, y = torch.randn(3, 4, 32, 32), torch.randn(3, 4, 32, 32)
    torch.manual_seed(5)
    got = distance(x, y)
    torch.manual_seed(5)  # the same augmentation draw (loop.fit seeds the global RNG per step and part)
    torch.testing.assert_close(got, reference(x, y))
    assert got.shape == (3,) and (got > 0).all() and distance(x, x).abs().max() == 0
    # the backbone is frozen: gradients reach the inputs only
    x.requires_grad_(True)
    distance(x, y).sum().backward()
    assert x.grad is not None and all(p.grad is None for p in distance.parameters())
    path.with_suffix(".json").unlink()
    with pytest.raises(FileNotFoundError, match="rerun train_latent_vgg"):
        losses.make_distance("elatentlpips", latent_vgg=str(path))
    with pytest.raises(ValueError, match="needs the latent VGG16"):
        losses.make_distance("elatentlpips")


def official_refs(path, mu, sigma):
    """A reference-statistics pickle laid out as EDM2's dataset-refs/img512.pkl: pickle.dump of a
    dict of metric name -> {mu, sigma} numpy arrays."""
    with open(path, "wb") as f:
        pickle.dump({"fid": {"mu": mu, "sigma": sigma}, "fd_dinov2": {"mu": mu[:3], "sigma": sigma[:3, :3]}}, f)


def test_edm2_reference_statistics_are_read_without_code(tmp_path):
    g = np.random.default_rng(0)
    mu, a = g.normal(size=8), g.normal(size=(8, 8))
    sigma = a @ a.T
    official_refs(tmp_path / "img512.pkl", mu, sigma)
    got_mu, got_sigma = features.edm2_reference(tmp_path / "img512.pkl")
    np.testing.assert_array_equal(got_mu, mu)
    np.testing.assert_array_equal(got_sigma, sigma)
    # through the stage: the same statistics in the pipeline's format
    cmd = [sys.executable, "-m", "stages.fid_reference", "--config",
           json.dumps({"kind": "inception", "reference": str(tmp_path / "img512.pkl")}),
           "--dataset", str(tmp_path / "unused.npz"), "--out", str(tmp_path / "ref.npz")]
    result = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO)
    assert result.returncode == 0, result.stderr[-2000:]
    stats = features.load_statistics(tmp_path / "ref.npz")
    np.testing.assert_array_equal(stats[0], mu) and np.testing.assert_array_equal(stats[1], sigma)
    # a pickle that would run code is refused before anything runs
    (tmp_path / "evil.pkl").write_bytes(pickle.dumps({"fid": Evil()}))
    with pytest.raises(unpickle.UnsafePickleError):
        features.edm2_reference(tmp_path / "evil.pkl")
    assert not (tmp_path / "pwned").exists()
    # the wrong layout is named
    with open(tmp_path / "other.pkl", "wb") as f:
        pickle.dump({"kid": {"mu": mu}}, f)
    with pytest.raises(ValueError, match="not EDM2 reference statistics"):
        features.edm2_reference(tmp_path / "other.pkl")


class Evil:
    def __reduce__(self):
        return (subprocess.call, (["touch", "pwned"],))


def test_latent_row_config_checks():
    from stages.config import checks, layers

    cfg = layers.assemble(REPO / "config" / "default.yaml", [ROWS / "imagenet512-cmt-ecd.yaml"])
    from snakemake.utils import validate

    validate(cfg, str(REPO / "workflow" / "schemas" / "config.schema.yaml"))
    assert checks.problems(cfg) == []
    bad = json.loads(json.dumps(cfg))
    bad["trajectories"]["x_T"] = "data_plus_noise"
    bad["midtrain"]["distance"] = "lpips"
    bad["dataset"]["resolution"] = 500
    problems = checks.problems(bad)
    assert any(p.startswith("trajectories.x_T:") for p in problems)
    assert any(p.startswith("midtrain.distance: lpips compares pixels") for p in problems)
    assert any(p.startswith("dataset.resolution: 500") for p in problems)
    pixel = layers.assemble(REPO / "config" / "default.yaml", [])
    pixel["midtrain"]["distance"] = "elatentlpips"
    validate(pixel, str(REPO / "workflow" / "schemas" / "config.schema.yaml"))
    assert any("needs a `latents` section" in p for p in checks.problems(pixel))


ROW_JOBS = {"fetch_assets": 7, "encode_dataset": 257, "latent_manifest": 1, "train_latent_vgg": 1,
            "fid_reference": 1, "import_teacher": 1, "trajectory_spec": 1, "trajectory_shard": 160,
            "trajectory_manifest": 1, "fid_teacher": 1, "midtrain": 1, "posttrain": 1, "sample": 4,
            "fid": 2, "report": 1, "all": 1}


@pytest.mark.parametrize("row", ["imagenet512-cmt-ecd", "imagenet512-cmt-ect"])
def test_imagenet512_row_dry_run(row, tmp_path):
    """Every job of the row, planned in seconds, with no prepared pixel dataset (1 TB at 512 px)."""
    import time

    t0 = time.monotonic()
    result = snakemake(tmp_path, "-n", "-p", configs=[ROWS / f"{row}.yaml"])
    seconds = time.monotonic() - t0
    jobs = planned_jobs(result)
    ecd = row.endswith("ecd")
    expected = {**ROW_JOBS, **({"import_guide": 1, "import_ecd_teacher": 1} if ecd else {"fetch_assets": 5})}
    assert jobs == expected
    assert seconds < 30, seconds
    out = result.stdout
    assert "assets/sd-vae-ft-mse/diffusion_pytorch_model.safetensors" in out
    assert 'fetch_assets' in out and '"reference": "assets/edm2-dataset-refs-img512.pkl"' in out
    mid = [line for line in out.splitlines() if "stages.midtrain " in line][0]
    assert '"distance": "elatentlpips"' in mid and "--latent-vgg results/" in mid
    assert '"batch_per_gpu": 16' in mid and '"lr": 0.0002' in mid and '"beta": 0.999,' in mid
    post = [line for line in out.splitlines() if "stages.posttrain " in line][0]
    assert "--latents results/imagenet512" in post and "latents/manifest.json --verify full" in post
    assert ('"method": "ecd"' in post) == ecd and ('"method": "ect_snr"' in post) != ecd
    if ecd:
        assert '"weight": 2.05' in post and "--guide store/teachers/" in post
        # ECD distils the 0.075 XXL, not the 0.070 the trajectories come from
        teacher = post.split("--teacher ")[1].split()[0]
        shard = [line for line in out.splitlines() if "stages.trajectory_shard " in line][0]
        assert teacher not in shard
    sample = [line for line in out.splitlines() if "stages.sample " in line][0]
    assert '"sigma_mid": 1.526' in sample and "--latents '{" in sample and "--vae assets/sd-vae-ft-mse" in sample
    assert "gpu=8" in out  # the row's SLURM hints reach the jobs


def test_imagenet512_smoke_overlay_dry_run(tmp_path):
    configs = [ROWS / "imagenet512-cmt-ecd.yaml", ROWS / "smoke" / "imagenet512.yaml"]
    assert planned_jobs(snakemake(tmp_path, "-n", configs=configs)) == {
        "prepare_dataset": 1, "fid_reference": 1, "encode_dataset": 4, "latent_manifest": 1, "train_latent_vgg": 1,
        "train_teacher": 1, "trajectory_spec": 1, "trajectory_shard": 1, "trajectory_manifest": 1, "midtrain": 1,
        "posttrain": 1, "sample": 2, "fid": 2, "fid_teacher": 1, "report": 1, "all": 1}


@pytest.mark.heavy
def test_imagenet512_ecd_smoke_through_snakemake(tmp_path):
    """Every stage of the ECD row on CPU, offline: synthetic labelled ImageNet folder encoded by a tiny
    random VAE, the latent VGG16 trained, a tiny EDM2 teacher trained on the latents, data-free
    labelled trajectories, CMT with E-LatentLPIPS, guided ECD on latents, samples decoded to images."""
    from stages.data import latents, shards

    configs = [ROWS / "imagenet512-cmt-ecd.yaml", ROWS / "smoke" / "imagenet512.yaml"]
    res = finished_run(tmp_path, "imagenet512-cmt-ecd-smoke", configs)
    report = (res / "report.md").read_text()
    assert "then ECD" in report and "| 1.84 | " in report and "E-LatentLPIPS with the latent VGG16" in report
    (encoded,) = (tmp_path / "store" / "latents").glob("*/shard-000000.tar")
    assert latents.read_shard(encoded)[0]["latents"].shape == (8, 32, 32)
    (shard,) = (tmp_path / "store" / "trajectories").glob("*/shard-000000.tar")
    traj = shards.read_shard(shard)
    assert traj[0]["states"].shape == (5, 4, 32, 32) and all(0 <= s["meta"]["label"] < 1000 for s in traj)
    assert "--latent-vgg" in (res / "logs" / "midtrain.log").read_text()
    with np.load(res / "samples" / "cmt" / "p100.npz") as samples:  # latents decoded by the row's VAE
        assert samples["images_2step_r0"].shape == (4, 3, 256, 256) and samples["images_2step_r0"].dtype == np.uint8
        assert samples["labels_r0"].shape == (4,)
    assert "Nothing to be done" in snakemake(tmp_path, "-n", configs=configs).stdout


def test_posttrain_on_latents_resumes_bit_exactly(tmp_path):
    """ECT post-training of a latent row reads the encoded dataset (--latents: posterior draws, the
    stream's position in the training state): a run killed after a save and rerun ends with the
    state of an uninterrupted run."""
    import copy
    import signal

    from stagekit import ARCH as PIXEL_ARCH
    from stagekit import assert_same_tensors, load_state, posttrain_config, run, run_in_process, state_args

    from stages import networks
    from stages.data import latents
    from stages.files import atomic, checkpoints
    from stages.networks.precond import Precond

    g = np.random.default_rng(0)
    entries = []
    for k in range(2):
        path = tmp_path / f"shard-{k}.tar"
        latents.write_shard(path, [(6 * k + i, 6 * k + i, np.concatenate(
            [4 * g.standard_normal((4, 8, 8)), np.full((4, 8, 8), 0.2)]).astype(np.float32), i % 3, 12)
            for i in range(6)])
        entries.append({"path": str(path), "count": 6, "bytes": path.stat().st_size,
                        "sha256": atomic.sha256_file(path)})
    atomic.write_json(tmp_path / "manifest.json", {"spec": {}, "total": 12, "shards": entries})
    arch = {**PIXEL_ARCH, "in_channels": 4}
    torch.manual_seed(0)
    net = Precond(networks.build(arch), "edm", 0.5, 0.002)
    checkpoints.save(tmp_path / "teacher.safetensors", net=net, ema=copy.deepcopy(net), meta={
        "role": "teacher", "key": "test", "architecture": arch, "precond": "edm", "sigma_data": 0.5,
        "sigma_min": 0.002, "sigma_max": 80.0, "time": "sigma"})
    cfg = {**posttrain_config(), "latents": {}}  # EDM2's whitening

    def args(name, **checkpoint):
        return ["--config", json.dumps(cfg), "--init", "teacher", "--init-model", tmp_path / "teacher.safetensors",
                "--dataset", tmp_path / "no-pixels.npz", "--latents", tmp_path / "manifest.json", "--verify", "fast",
                "--out", tmp_path / name / "model.safetensors", "--snapshots", tmp_path / name / "snapshots",
                *state_args(tmp_path / name / "state", **checkpoint)]

    run_in_process("stages.posttrain", args("straight", every_steps=6), keep_state=True)
    killed = run("stages.posttrain", args("killed", every_steps=6), faults=["--kill-after-save", 6])
    assert killed.returncode == -signal.SIGKILL, killed.log
    run_in_process("stages.posttrain", args("killed", every_steps=6), keep_state=True)
    straight, info = load_state(tmp_path / "straight" / "state" / f"step-{12:09d}")
    resumed, _ = load_state(tmp_path / "killed" / "state" / f"step-{12:09d}")
    assert_same_tensors(resumed, straight)
    assert info["data"]["epoch"] >= 1  # 12 steps x 8 draws went through the 12 encoded images several times
