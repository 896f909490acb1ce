"""The latent codec against EDM2's StabilityVAEEncoder formulas, on a tiny random AutoencoderKL built from
a config (no download): pixels / 255 into the VAE, the 8-channel stored posterior, posterior draws
mean + std * eps whitened by scale = 0.5 / raw_std and bias = -raw_mean * scale, and the decoder's
inverse map, clamp to [0, 1] and truncation to uint8. Also: the SD-VAE folder through fetch_assets
(served from 127.0.0.1) loads as a codec."""

import diffusers
import pytest
import torch
from range_server import RangeHandler

from stages.files import assets
from stages.networks.latent_codec import LatentCodec, load_vae, whitening


def tiny_vae(seed=0):
    """Four blocks like the real VAE (8x downsampling), 8 channels wide."""
    torch.manual_seed(seed)
    return diffusers.AutoencoderKL(
        block_out_channels=(8, 8, 8, 8), layers_per_block=1, norm_num_groups=4, latent_channels=4,
        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4)


@pytest.fixture(scope="module")
def codec():
    return LatentCodec(tiny_vae(), batch_size=3)


@pytest.fixture(scope="module")
def pixels():
    return torch.randint(0, 256, (5, 3, 32, 32), generator=torch.Generator().manual_seed(1), dtype=torch.uint8)


def test_scale_and_bias_are_edm2s():
    scale, bias = whitening()
    # by hand: scale_c = 0.5 / raw_std_c, bias_c = 0 - raw_mean_c * scale_c
    assert scale.tolist() == pytest.approx([0.5 / 4.17, 0.5 / 4.62, 0.5 / 3.71, 0.5 / 3.28], rel=1e-6)
    assert scale.tolist() == pytest.approx([0.11990408, 0.10822511, 0.13477089, 0.15243902], abs=1e-7)
    assert bias.tolist() == pytest.approx([-0.69664269, -0.35173160, -0.01617251, 0.32774390], abs=1e-6)
    assert scale.dtype == bias.dtype == torch.float32


def test_stored_form_is_the_posterior_of_pixels_over_255(codec, pixels):
    stored = codec.encode_pixels(pixels)
    assert stored.shape == (5, 8, 4, 4) and stored.dtype == torch.float32 and stored.is_contiguous()
    posterior = codec.vae.encode(pixels.float() / 255).latent_dist  # [0, 1] in, not 2x - 1
    torch.testing.assert_close(stored[:, :4], posterior.mean)
    torch.testing.assert_close(stored[:, 4:], posterior.std)
    assert (stored[:, 4:] > 0).all()
    # a [-1, 1] input would give other latents: the test can tell the two conventions apart
    other = codec.vae.encode(pixels.float() / 127.5 - 1).latent_dist.mean
    assert (other - stored[:, :4]).abs().max() > 1e-2
    # batching through the VAE does not change the result
    torch.testing.assert_close(LatentCodec(codec.vae, batch_size=5).encode_pixels(pixels), stored)


def test_posterior_draw_and_whitening(codec):
    g = torch.Generator().manual_seed(3)
    mean, std = torch.randn(2, 4, 4, 4, generator=g), torch.rand(2, 4, 4, 4, generator=g) + 0.1
    stored = torch.cat([mean, std], dim=1)
    final = codec.encode_latents(stored, generator=torch.Generator().manual_seed(7))
    eps = torch.randn(2, 4, 4, 4, generator=torch.Generator().manual_seed(7))
    raw_mean = torch.tensor([5.81, 3.25, 0.12, -2.15]).reshape(1, 4, 1, 1)
    raw_std = torch.tensor([4.17, 4.62, 3.71, 3.28]).reshape(1, 4, 1, 1)
    torch.testing.assert_close(final, (mean + std * eps - raw_mean) * 0.5 / raw_std)
    # another seed draws another sample; std 0 leaves the whitened mean
    assert (codec.encode_latents(stored, generator=torch.Generator().manual_seed(8)) - final).abs().max() > 0.1
    zero_std = torch.cat([mean, torch.zeros_like(std)], dim=1)
    torch.testing.assert_close(codec.encode_latents(zero_std), (mean - raw_mean) * 0.5 / raw_std)
    torch.testing.assert_close(codec.to_raw(final), mean + std * eps)


def test_latents_of_the_raw_statistics_are_whitened(codec):
    """Raw latents with EDM2's assumed per-channel mean and std come out with mean 0 and std 0.5."""
    g = torch.Generator().manual_seed(0)
    raw_mean = torch.tensor([5.81, 3.25, 0.12, -2.15]).reshape(1, 4, 1, 1)
    raw_std = torch.tensor([4.17, 4.62, 3.71, 3.28]).reshape(1, 4, 1, 1)
    stored = torch.cat([raw_mean.expand(64, 4, 16, 16), raw_std.expand(64, 4, 16, 16)], dim=1)
    final = codec.encode_latents(stored, generator=g)
    assert final.mean((0, 2, 3)).abs().max() < 0.01
    assert final.std((0, 2, 3)).tolist() == pytest.approx([0.5] * 4, abs=0.01)


def test_encode_decode_round_trip(codec, pixels):
    final = codec.encode(pixels, generator=torch.Generator().manual_seed(0))
    assert final.shape == (5, 4, 4, 4) and torch.isfinite(final).all()
    whole = LatentCodec(codec.vae, batch_size=8)  # one VAE batch, so the manual decode below is bitwise the same
    decoded = whole.decode(final)
    assert decoded.shape == pixels.shape and decoded.dtype == torch.uint8
    # the decoder sees the raw latents; its output is clamped to [0, 1] and truncated (not rounded) to uint8
    out = codec.vae.decode(codec.to_raw(final)).sample.clamp(0, 1) * 255
    assert torch.equal(decoded, out.floor().to(torch.uint8))
    assert not torch.equal(decoded, out.round().to(torch.uint8))
    assert (decoded.float() - codec.decode(final).float()).abs().max() <= 1  # VAE batches of 3: fp noise only


def test_decode_clamps_to_the_unit_range():
    codec = LatentCodec(tiny_vae(seed=1))
    for layer in codec.vae.decoder.conv_out, codec.vae.post_quant_conv:  # a decoder that outputs bias only
        layer.weight.data.zero_()
    codec.vae.decoder.conv_out.bias.data = torch.tensor([-0.3, 0.5, 1.7])
    decoded = codec.decode(torch.randn(1, 4, 2, 2))
    assert decoded[0, 0].unique().tolist() == [0]
    assert decoded[0, 1].unique().tolist() == [127]  # 0.5 * 255 = 127.5, truncated
    assert decoded[0, 2].unique().tolist() == [255]


def test_signed_pixels_are_the_vaes_own_range_in_and_out(pixels):
    """latents.pixels: signed (the ImageNet-256 MeanFlow row): x / 127.5 - 1 into the VAE, and out
    floor(127.5 y + 128) clamped to [0, 255]."""
    codec = LatentCodec(tiny_vae(seed=1), pixels="signed")
    posterior = codec.vae.encode(pixels.float() / 127.5 - 1).latent_dist
    stored = codec.encode_pixels(pixels)
    torch.testing.assert_close(stored[:, :4], posterior.mean)
    torch.testing.assert_close(stored[:, 4:], posterior.std)
    for layer in codec.vae.decoder.conv_out, codec.vae.post_quant_conv:  # a decoder that outputs bias only
        layer.weight.data.zero_()
    codec.vae.decoder.conv_out.bias.data = torch.tensor([-1.2, 0.1, 0.999])
    decoded = codec.decode(torch.randn(1, 4, 2, 2))
    # by hand: 127.5 * -1.2 + 128 = -25 -> 0; 127.5 * 0.1 + 128 = 140.75 -> 140; 255.37 -> 255
    assert [decoded[0, c].unique().tolist() for c in range(3)] == [[0], [140], [255]]
    with pytest.raises(ValueError, match="latents.pixels"):
        LatentCodec(codec.vae, pixels="minus_one_to_one")


def test_bad_input_is_named(codec, tmp_path):
    with pytest.raises(ValueError, match="uint8"):
        codec.encode_pixels(torch.zeros(1, 3, 32, 32))
    with pytest.raises(ValueError, match=r"\[N, 8, h, w\]"):
        codec.encode_latents(torch.zeros(1, 4, 4, 4))
    with pytest.raises(ValueError, match=r"\[N, 4, h, w\]"):
        codec.decode(torch.zeros(1, 8, 4, 4))
    with pytest.raises(FileNotFoundError, match="sd-vae-ft-mse"):
        load_vae(tmp_path)


def test_fetched_folder_loads_as_the_codec(server, tmp_path, monkeypatch):
    """fetch_assets fills assets/sd-vae-ft-mse/ file by file; LatentCodec.from_folder loads it offline."""
    saved = tmp_path / "saved"
    vae = tiny_vae(seed=2)
    vae.save_pretrained(saved, safe_serialization=True)
    files = {"config.json": (saved / "config.json").read_bytes(),
             "diffusion_pytorch_model.safetensors": (saved / "diffusion_pytorch_model.safetensors").read_bytes()}
    served = {}
    monkeypatch.setattr(RangeHandler, "do_GET", lambda self: _serve(self, served))
    served.update({f"/{name}": body for name, body in files.items()})
    # the tiny weights are not the published ones: drop the catalog's pinned sha256 for this test
    weights = assets.CATALOG["sd-vae-ft-mse-weights"]
    monkeypatch.setitem(assets.CATALOG, "sd-vae-ft-mse-weights",
                        assets.Asset(weights.url, weights.filename, note=weights.note))
    cfg = {"dir": str(tmp_path / "assets"),
           "urls": {"sd-vae-ft-mse-config": f"{server}/config.json",
                    "sd-vae-ft-mse-weights": f"{server}/diffusion_pytorch_model.safetensors"}}
    assets.fetch(["sd-vae-ft-mse"], cfg, log=lambda m: None)
    folder = assets.folder_path("sd-vae-ft-mse", cfg)
    assert folder == tmp_path / "assets" / "sd-vae-ft-mse"
    for name, body in files.items():
        assert (folder / name).read_bytes() == body
    loaded = LatentCodec.from_folder(folder)
    x = torch.randn(1, 4, 2, 2)
    torch.testing.assert_close(loaded.vae.decode(x).sample, vae.eval().decode(x).sample)


def test_published_weights_checksum_is_checked(server, tmp_path, monkeypatch):
    served = {"/w.safetensors": b"not the sd-vae weights"}
    monkeypatch.setattr(RangeHandler, "do_GET", lambda self: _serve(self, served))
    cfg = {"dir": str(tmp_path), "urls": {"sd-vae-ft-mse-weights": f"{server}/w.safetensors"}}
    with pytest.raises(ValueError, match="is not the published a1d99348"):
        assets.fetch(["sd-vae-ft-mse-weights"], cfg, log=lambda m: None)
    assert not (tmp_path / "sd-vae-ft-mse" / "diffusion_pytorch_model.safetensors").exists()


def test_offline_message_says_what_to_place_where(tmp_path):
    cfg = {"dir": str(tmp_path / "assets"), "urls": {"sd-vae-ft-mse-config": "http://127.0.0.1:9/config.json",
                                                      "sd-vae-ft-mse-weights": "http://127.0.0.1:9/w.safetensors"}}
    with pytest.raises(assets.OfflineError) as err:
        assets.fetch(["sd-vae-ft-mse"], cfg, log=lambda m: None)
    msg = str(err.value)
    assert f"-> {tmp_path / 'assets' / 'sd-vae-ft-mse' / 'config.json'}" in msg
    assert f"-> {tmp_path / 'assets' / 'sd-vae-ft-mse' / 'diffusion_pytorch_model.safetensors'}" in msg
    assert msg.count("diffusers folder of stabilityai/sd-vae-ft-mse") == 2


def _serve(handler, served):
    body = served[handler.path]
    handler.send_response(200)
    handler.send_header("Content-Length", str(len(body)))
    handler.end_headers()
    handler.wfile.write(body)
