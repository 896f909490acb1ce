"""What a snapshot looks like, for the tracker (stages/training/metrics.py): one-step samples of the
EMA from fixed noise and classes (sample i: noise and class folded from (seed, i, "preview")), so the
grids of one run's snapshots show the same draws as training goes on. Pixel rows only: a latent
row's samples would need the VAE's decoder."""

import contextlib

import torch

from stages.core import rng
from stages.data import datasets
from stages.data import labels as class_labels
from stages.method import flowmap, losses

COUNT = 64


def draws(seed, shape, classes, device, count=COUNT):
    """(noise [count, C, H, H], a list of count class indices or None) of the previews; `shape`: (C, H)."""
    channels, size = shape
    z = torch.stack([torch.randn((channels, size, size), generator=rng.generator(seed, i, "preview"))
                     for i in range(count)])
    y = [class_labels.random_label(seed, i, classes, "preview-label") for i in range(count)] if classes else None
    return z.to(device), y


@contextlib.contextmanager
def evaluating(module):
    """Eval mode (no dropout) for the previews, each submodule's own flag restored after."""
    flags = [(m, m.training) for m in module.modules()]
    module.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        for m, flag in flags:
            m.training = flag


def consistency(seed, shape, sigma_max, label_dim):
    """preview(module) of a consistency model: x = f(sigma_max z, sigma_max)."""

    def preview(module):
        device = next(module.parameters()).device
        z, y = draws(seed, shape, label_dim, device)
        with evaluating(module):
            x = losses.call(module, sigma_max * z, sigma_max, class_labels.one_hot(y, label_dim, device))
        return datasets.to_uint8(x).cpu().numpy()

    return preview


def average_velocity(seed, shape, num_classes):
    """preview(module) of an average-velocity model: x = z - u(z, 0, 1)."""

    def preview(module):
        device = next(module.parameters()).device
        z, y = draws(seed, shape, num_classes, device)
        with evaluating(module):
            x = flowmap.one_step(module, z, None if y is None else torch.tensor(y, device=device))
        return datasets.to_uint8(x).cpu().numpy()

    return preview
