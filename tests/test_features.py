"""Pixel features, their statistics and the Frechet distance (checked by hand); Inception features
through clean-fid with the TorchScript passed explicitly (a small random TorchScript stands in for
Inception), and LPIPS with a random trunk at 32x32."""

import numpy as np
import pytest
import torch
from torch import nn

from stages.data import features
from stages.method import losses

torch.set_num_threads(1)


class FakeInception(nn.Module):
    """The interface of inception-2015-12-05.pt: `layers` on [-1, 1] 299x299 input, and
    forward(uint8-valued images, return_features) that resizes inside."""

    def __init__(self):
        super().__init__()
        self.layers = nn.Sequential(nn.Conv2d(3, 4, 3), nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Linear(16, 2048))

    def forward(self, x, return_features: bool = False):
        x = torch.nn.functional.interpolate(x, size=(299, 299), mode="bilinear", align_corners=False)
        return self.layers((x - 128) / 128)


@pytest.fixture
def fake_inception(tmp_path):
    torch.manual_seed(0)
    module = torch.jit.script(FakeInception().eval())
    path = tmp_path / features.INCEPTION_FILE
    module.save(str(path))
    return module, path


def test_inception_features_come_from_the_given_torchscript(fake_inception):
    module, path = fake_inception
    images = np.random.default_rng(0).integers(0, 256, size=(5, 3, 32, 32), dtype=np.uint8)
    got = features.extract(images, {"kind": "inception", "model": str(path), "batch": 2})
    with torch.no_grad():
        want = module(torch.from_numpy(images).float(), True).double().numpy()
    assert got.shape == (5, 2048) and np.allclose(got, want, atol=1e-5)

    clean = features.extract(images, {"kind": "inception", "model": str(path), "resize": "clean"})
    assert clean.shape == (5, 2048) and not np.allclose(clean, got)  # PIL bicubic, not the bilinear inside


def test_inception_missing_file_is_named(tmp_path):
    missing = tmp_path / features.INCEPTION_FILE
    with pytest.raises(FileNotFoundError, match="fetch_assets"):
        features.extract(np.zeros((1, 3, 8, 8), np.uint8), {"kind": "inception", "model": str(missing)})


def test_pooled_pixels():
    images = np.arange(2 * 3 * 4 * 4, dtype=np.uint8).reshape(2, 3, 4, 4)
    got = features.extract(images, {"kind": "pixels", "pool": 2})
    want = (images.astype(np.float64) / 127.5 - 1).reshape(2, 3, 2, 2, 2, 2).mean(axis=(3, 5)).reshape(2, 12)
    assert got.shape == (2, 12) and np.allclose(got, want)
    assert np.isclose(got[0, 0], np.mean([0, 1, 4, 5]) / 127.5 - 1)


def test_lpips_random_trunk_32x32():
    torch.manual_seed(0)
    d = losses.LPIPSDistance(None)
    a = torch.rand(3, 3, 32, 32) * 2 - 1
    b = a.clone()
    b[1] += 0.3 * torch.randn_like(b[1])
    b[2] = -a[2]
    dist = d(a, b)
    assert dist.shape == (3,) and dist[0].abs() < 1e-6
    assert 0 < dist[1] < dist[2]
    assert torch.allclose(d(b, a), dist, atol=1e-5)  # symmetric


# ---- pixel features, statistics and the Frechet distance ----------------------------------------


def test_pixel_features():
    u = np.array([[[[0, 255], [128, 51]]]], dtype=np.uint8)
    f = features.extract(u, {"kind": "pixels"})
    assert f.shape == (1, 4) and f.dtype == np.float64
    np.testing.assert_allclose(f[0], [-1.0, 1.0, 128 / 127.5 - 1, 51 / 127.5 - 1])
    with pytest.raises(ValueError, match="unknown feature space"):
        features.extract(u, {"kind": "inception-v9"})


def test_frechet_of_identical_statistics_is_zero():
    x = np.random.default_rng(0).standard_normal((400, 5)) @ np.diag([1.0, 0.5, 2.0, 0.1, 1.0])
    stats = features.statistics(x)
    assert abs(features.frechet(stats, stats)) < 1e-6


def test_statistics_are_mean_and_unbiased_covariance():
    x = np.array([[0.0, 1.0], [2.0, 1.0], [4.0, 4.0]])
    mu, cov = features.statistics(x)
    np.testing.assert_allclose(mu, [2.0, 2.0])
    # unbiased (N - 1) covariance, by hand
    np.testing.assert_allclose(cov, [[4.0, 3.0], [3.0, 3.0]])


def test_frechet_diagonal_gaussians_by_hand():
    mu1, mu2 = np.array([0.0, 1.0, -2.0]), np.array([0.5, -1.0, -2.0])
    s1, s2 = np.array([1.0, 4.0, 0.25]), np.array([9.0, 1.0, 0.25])
    want = np.sum((mu1 - mu2) ** 2) + np.sum(s1 + s2 - 2 * np.sqrt(s1 * s2))
    # by hand: 0.25 + 4 + 0 + (1 + 9 - 6) + (4 + 1 - 4) + 0 = 9.25
    assert want == pytest.approx(9.25)
    got = features.frechet((mu1, np.diag(s1)), (mu2, np.diag(s2)))
    assert got == pytest.approx(9.25, rel=1e-6)
    assert features.frechet((mu2, np.diag(s2)), (mu1, np.diag(s1))) == pytest.approx(9.25, rel=1e-6)


def test_statistics_round_trip(tmp_path):
    mu, sigma = np.arange(3.0), np.eye(3) * 2
    path = tmp_path / "stats.npz"
    features.save_statistics(path, mu, sigma, n=10, space="pixels")
    m2, s2 = features.load_statistics(path)
    np.testing.assert_array_equal(m2, mu)
    np.testing.assert_array_equal(s2, sigma)


# ---- the ADM evaluation suite's reference batch (VIRTUAL_imagenet256_labeled.npz): mu and sigma of
# the 2048-d pool features beside the spatial statistics and 10k images, read without pickles


def _adm_batch(path, **arrays):
    np.savez(path, **arrays)
    return path


@pytest.mark.heavy
def test_adm_reference_reads_mu_and_sigma_and_scores_against_them(tmp_path):
    from stages.data import features

    rng = np.random.default_rng(0)
    mu = rng.standard_normal(2048)
    a = rng.standard_normal((2048, 16))
    sigma = a @ a.T / 16 + np.eye(2048)
    path = _adm_batch(tmp_path / "VIRTUAL_imagenet256_labeled.npz", arr_0=np.zeros((2, 8, 8, 3), np.uint8),
                      mu=mu.astype(np.float32), sigma=sigma, mu_s=np.zeros(2023), sigma_s=np.eye(4))
    got_mu, got_sigma = features.load_adm_reference(path)
    assert got_mu.dtype == np.float64 and np.array_equal(got_mu, mu.astype(np.float32).astype(np.float64))
    assert np.array_equal(got_sigma, sigma)
    # the Frechet distance of the same Gaussian shifted by d in the mean is |d|^2
    shift = np.zeros(2048)
    shift[:4] = 0.5
    assert features.frechet((got_mu + shift, got_sigma), (got_mu, got_sigma)) == pytest.approx(1.0, abs=1e-6)


def test_adm_reference_refuses_pickles_missing_keys_and_wrong_shapes(tmp_path):
    from stages.data import features

    pickled = _adm_batch(tmp_path / "p.npz", mu=np.array([{"a": 1}], dtype=object), sigma=np.eye(2))
    with pytest.raises(ValueError):
        features.load_adm_reference(pickled)
    with pytest.raises(ValueError, match="no sigma"):
        features.load_adm_reference(_adm_batch(tmp_path / "m.npz", mu=np.zeros(2048), arr_0=np.zeros(1)))
    with pytest.raises(ValueError, match=r"\(2048,\) and \(2048, 2048\)"):
        features.load_adm_reference(_adm_batch(tmp_path / "s.npz", mu=np.zeros(64), sigma=np.eye(64)))
    with pytest.raises(ValueError, match="not a numpy"):
        (tmp_path / "x.npz").write_bytes(b"<html>not found</html>")
        features.load_adm_reference(tmp_path / "x.npz")


def test_fid_reference_stage_writes_the_adm_statistics(tmp_path):
    import json
    import subprocess
    import sys
    from pathlib import Path

    from stages.data import features

    mu, sigma = np.arange(2048.0), np.eye(2048) * 2
    path = _adm_batch(tmp_path / "ref.npz", mu=mu, sigma=sigma)
    cfg = {"kind": "inception", "model": "unused.pt", "reference": str(path)}
    subprocess.run([sys.executable, "-m", "stages.fid_reference", "--config", json.dumps(cfg), "--dataset", "-",
                    "--out", str(tmp_path / "out.npz")], check=True, capture_output=True,
                   cwd=Path(__file__).resolve().parents[1])
    got = features.load_statistics(tmp_path / "out.npz")
    assert np.array_equal(got[0], mu) and np.array_equal(got[1], sigma)
