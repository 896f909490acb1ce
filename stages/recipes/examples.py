"""Batches of random values of the shapes each recipe's data gives, for benchmarks and tests that
time or check a loss without input files."""

import torch

from stages.data import labels as class_labels


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
