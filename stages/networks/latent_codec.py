"""The latent codec of the ImageNet-512 rows: Stability AI's SD-VAE ft-MSE (`stabilityai/sd-vae-ft-mse`,
diffusers' AutoencoderKL) wrapped the way EDM2's `StabilityVAEEncoder` wraps it, because the EDM2
teachers were trained on exactly those latents.

Three forms of an image:
- pixels: uint8 [N, 3, H, W];
- stored latents: float32 [N, 8, H/8, W/8], the VAE posterior's mean and std side by side (channels
  0-3 mean, 4-7 std), as in EDM2's `img512-sd.zip`; encoding the dataset once keeps the posterior, so
  every epoch can draw a fresh sample from it;
- final latents: float32 [N, 4, H/8, W/8], a posterior draw mean + std * eps whitened per channel by
  scale = final_std / raw_std and bias = final_mean - raw_mean * scale (EDM2's constants: std 0.5,
  mean 0), the networks' input and output.

Two quirks of EDM2 kept on purpose (the teachers and their FIDs depend on them):
- pixels go into the VAE as x / 255 in [0, 1], not 2x - 1 in the [-1, 1] the VAE was trained on, and
  the decoder's output is read as [0, 1] (clamped there), not mapped back from [-1, 1];
- decoded pixels are truncated to uint8 (`mul(255).to(uint8)`), not rounded.
Rows that train their own networks on the latents (the ImageNet-256 MeanFlow row, as DiT, SiT and
MeanFlow do) take the VAE's own range instead, `pixels: signed`: x / 127.5 - 1 in, and out
floor(127.5 y + 128) clamped to [0, 255] (DiT's sampling script; within half a level of rounding).

The VAE is loaded from a local diffusers folder (config.json + diffusion_pytorch_model.safetensors),
which `fetch_assets` fills (catalog folder `sd-vae-ft-mse`); nothing here touches the network.
"""

from pathlib import Path

import numpy as np
import torch
from torch import nn

# EDM2's assumed statistics of the raw SD-VAE ft-MSE latents of ImageNet-512, per channel.
RAW_MEAN = (5.81, 3.25, 0.12, -2.15)
RAW_STD = (4.17, 4.62, 3.71, 3.28)
FINAL_MEAN = 0.0
FINAL_STD = 0.5
VAE_FILES = ("config.json", "diffusion_pytorch_model.safetensors")
PIXEL_RANGES = ("unit", "signed")  # [0, 1] (EDM2) or [-1, 1] (the VAE's training range; DiT, MeanFlow)


def whitening(raw_mean=RAW_MEAN, raw_std=RAW_STD, final_mean=FINAL_MEAN, final_std=FINAL_STD):
    """(scale, bias) per channel, computed in float32 like EDM2 so the latents match to the bit."""
    scale = np.float32(final_std) / np.asarray(raw_std, dtype=np.float32)
    bias = np.float32(final_mean) - np.asarray(raw_mean, dtype=np.float32) * scale
    return torch.from_numpy(scale), torch.from_numpy(bias)


def load_vae(folder):
    """AutoencoderKL from a local diffusers folder, frozen, in eval mode; never from the hub."""
    folder = Path(folder)
    missing = [name for name in VAE_FILES if not (folder / name).is_file()]
    if missing:
        raise FileNotFoundError(
            f"{folder}: no SD-VAE here (missing {', '.join(missing)}). Run the fetch_assets rule for "
            f"the asset folder `sd-vae-ft-mse`, or place config.json and diffusion_pytorch_model.safetensors "
            f"of stabilityai/sd-vae-ft-mse in {folder}")
    from diffusers import AutoencoderKL

    vae = AutoencoderKL.from_pretrained(folder, local_files_only=True, use_safetensors=True)
    return vae.eval().requires_grad_(False)


def random_vae(spec):
    """An AutoencoderKL with random weights from `spec` = {"config": AutoencoderKL's arguments, "seed"}:
    smoke runs and tests, offline (the same spec gives the same weights on every CPU)."""
    from diffusers import AutoencoderKL

    generator_state = torch.random.get_rng_state()
    torch.manual_seed(int(spec.get("seed", 0)))
    try:
        vae = AutoencoderKL(**spec["config"])
    finally:
        torch.random.set_rng_state(generator_state)
    return vae.eval().requires_grad_(False)


def posterior_draw(stored, scale, bias, generator=None):
    """Stored latents [N, 2C, h, w] (posterior mean, std) -> final latents [N, C, h, w]:
    (mean + std * eps) * scale + bias with eps ~ N(0, I), as EDM2 does at every use of an image.
    `scale` and `bias` are [1, C, 1, 1] (whitening()); eps is drawn on the generator's device."""
    mean, std = stored.to(torch.float32).chunk(2, dim=1)
    eps = torch.randn(mean.shape, generator=generator,
                      device=generator.device if generator is not None else mean.device).to(mean.device)
    return (mean + std * eps) * scale.to(mean.device) + bias.to(mean.device)


class LatentCodec(nn.Module):
    """Pixels <-> stored latents <-> final latents through a frozen AutoencoderKL (see module doc).

    `batch_size` bounds how many images go through the VAE at once (EDM2 runs 8), so a large batch
    of 512x512 images never holds all the VAE's activations at once.
    """

    def __init__(self, vae, raw_mean=RAW_MEAN, raw_std=RAW_STD, final_mean=FINAL_MEAN, final_std=FINAL_STD,
                 batch_size=8, pixels="unit"):
        super().__init__()
        if pixels not in PIXEL_RANGES:
            raise ValueError(f"latents.pixels: {pixels!r} is none of {PIXEL_RANGES}")
        self.pixels = pixels
        latent_channels = vae.config.latent_channels
        if not len(raw_mean) == len(raw_std) == latent_channels:
            raise ValueError(f"raw_mean and raw_std need {latent_channels} values (the VAE's latent channels), "
                             f"got {len(raw_mean)} and {len(raw_std)}")
        self.vae = vae.eval().requires_grad_(False)
        scale, bias = whitening(raw_mean, raw_std, final_mean, final_std)
        self.register_buffer("scale", scale.reshape(1, -1, 1, 1), persistent=False)
        self.register_buffer("bias", bias.reshape(1, -1, 1, 1), persistent=False)
        self.latent_channels = latent_channels
        self.batch_size = int(batch_size)

    @classmethod
    def from_folder(cls, folder, **kwargs):
        return cls(load_vae(folder), **kwargs)

    def train(self, mode=True):  # the VAE is frozen: never let a training loop switch it to train mode
        return super().train(False)

    @torch.no_grad()
    def encode_pixels(self, pixels):
        """uint8 [N, 3, H, W] -> stored latents float32 [N, 8, H/8, W/8] (posterior mean, std)."""
        if pixels.dtype != torch.uint8 or pixels.ndim != 4 or pixels.shape[1] != 3:
            raise ValueError(f"encode_pixels takes uint8 images [N, 3, H, W], got {pixels.dtype} "
                             f"{tuple(pixels.shape)}")
        x = pixels.to(self.scale.device, torch.float32)
        x = x / 255 if self.pixels == "unit" else x / 127.5 - 1  # see the module doc
        out = []
        for batch in x.split(self.batch_size):
            posterior = self.vae.encode(batch).latent_dist
            out.append(torch.cat([posterior.mean, posterior.std], dim=1))
        return torch.cat(out).contiguous()  # the VAE may hand back channels-last tensors

    def encode_latents(self, stored, generator=None):
        """Stored latents [N, 8, h, w] -> final latents [N, 4, h, w]: one posterior draw, whitened."""
        if stored.ndim != 4 or stored.shape[1] != 2 * self.latent_channels:
            raise ValueError(f"stored latents are [N, {2 * self.latent_channels}, h, w] (mean and std), "
                             f"got {tuple(stored.shape)}")
        return posterior_draw(stored.to(self.scale.device), self.scale, self.bias, generator)

    def encode(self, pixels, generator=None):
        return self.encode_latents(self.encode_pixels(pixels), generator)

    def to_final(self, raw):
        return raw * self.scale + self.bias

    def to_raw(self, final):
        return (final - self.bias) / self.scale

    @torch.no_grad()
    def decode(self, final):
        """Final latents [N, 4, h, w] -> uint8 pixels [N, 3, 8h, 8w]."""
        if final.ndim != 4 or final.shape[1] != self.latent_channels:
            raise ValueError(f"decode takes final latents [N, {self.latent_channels}, h, w], got {tuple(final.shape)}")
        raw = self.to_raw(final.to(self.scale.device, torch.float32))
        images = torch.cat([self.vae.decode(batch).sample for batch in raw.split(self.batch_size)])
        if self.pixels == "unit":
            return images.clamp(0, 1).mul(255).to(torch.uint8)  # truncation, as EDM2 (see module doc)
        return images.mul(127.5).add(128).clamp(0, 255).to(torch.uint8)


def from_config(latents_cfg, folder=None, batch_size=8):
    """The codec of a latent row: its `latents` section's whitening, the VAE from `folder` (the
    asset folder the rule resolved) or, with latents.vae a {config, seed} spec, a random one."""
    vae = load_vae(folder) if folder else random_vae(latents_cfg["vae"])
    return LatentCodec(vae, raw_mean=latents_cfg.get("raw_mean", RAW_MEAN), raw_std=latents_cfg.get("raw_std", RAW_STD),
                       final_mean=latents_cfg.get("final_mean", FINAL_MEAN),
                       final_std=latents_cfg.get("final_std", FINAL_STD), batch_size=batch_size,
                       pixels=latents_cfg.get("pixels", "unit"))
