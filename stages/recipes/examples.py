"""Batches of random values of the shapes each recipe's data gives, for benchmarks and tests that
time or check a loss without input files."""

import torch

from stages.data import labels as class_labels


def data_shape(cfg):
    """(channels, resolution) of what a row's networks see: its pixels, or on a latent row the VAE's
    latents (the SD-VAE's 4 channels at 1/8 the resolution; a smoke row's random VAE from its config)."""
    if "latents" not in cfg:
        return (1 if cfg["dataset"]["source"] == "digits" else 3, cfg["dataset"]["resolution"])
    vae = cfg["latents"]["vae"]
    if isinstance(vae, dict):
        factor = 2 ** (len(vae["config"]["block_out_channels"]) - 1)
        return vae["config"].get("latent_channels", 4), cfg["dataset"]["resolution"] // factor
    return 4, cfg["dataset"]["resolution"] // 8


def images(n, shape, num_classes, device, scale=0.5, generator=None):
    """(x [n, C, H, H] float32 with std `scale`, class indices [n] int64) as an image source gives them."""
    channels, resolution = shape
    x = torch.randn(n, channels, resolution, resolution, generator=generator) * scale
    classes = torch.randint(max(num_classes, 1), (n,), generator=generator)
    return x.to(device), classes.to(device)


def one_hot(n, label_dim, device, generator=None):
    """One-hot float32 [n, label_dim] of random classes, or None for an unconditional network."""
    if not label_dim:
        return None
    return class_labels.one_hot(torch.randint(label_dim, (n,), generator=generator).tolist(), label_dim, device)
