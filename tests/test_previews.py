"""The trackers' sample grids (stages/recipes/previews.py): one-step samples from noise folded from
(seed, i), the same draws at every snapshot, in eval mode without touching the training's state."""

import numpy as np
import torch

from stages.core import rng
from stages.data import datasets
from stages.recipes import previews


class Velocity(torch.nn.Module):
    """u(z, r, t | y) = a z + b (t - r) + c y, with dropout that eval mode must switch off."""

    def __init__(self):
        super().__init__()
        self.a = torch.nn.Parameter(torch.tensor(0.5))
        self.drop = torch.nn.Dropout(0.9)

    def forward(self, z, r, t, labels=None):
        shift = 0 if labels is None else labels.float().view(-1, 1, 1, 1) / 10
        return self.drop(self.a * z) + torch.as_tensor(t) - torch.as_tensor(r) + shift


class Consistency(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.tensor(0.01))
        self.drop = torch.nn.Dropout(0.9)

    def forward(self, x, sigma, labels=None):
        return self.drop(self.w * x) + (0 if labels is None else labels.argmax(1).float().view(-1, 1, 1, 1) / 10)


def test_average_velocity_preview_is_one_step_from_the_folded_noise_in_eval_mode():
    net = Velocity().train()
    grid = previews.average_velocity(7, (1, 4), 3)(net)
    assert net.training and net.drop.training  # the modes are given back
    z = torch.randn((1, 4, 4), generator=rng.generator(7, 5, "preview"))
    y = previews.class_labels.random_label(7, 5, 3, "preview-label")
    x = z - (0.5 * z + 1 + y / 10)  # x = z - u(z, 0, 1 | y), no dropout
    assert grid.dtype == np.uint8 and grid.shape == (previews.COUNT, 1, 4, 4)
    assert np.array_equal(grid[5], datasets.to_uint8(x).numpy())
    assert np.array_equal(grid, previews.average_velocity(7, (1, 4), 3)(net))  # the same draws each time


def test_consistency_preview_takes_the_classes_one_hot_and_leaves_the_global_rng_alone():
    net = Consistency()
    state = torch.get_rng_state()
    grid = previews.consistency(3, (1, 4), 80.0, 4)(net)
    assert torch.equal(torch.get_rng_state(), state)
    label = previews.class_labels.random_label(3, 0, 4, "preview-label")
    z = torch.randn((1, 4, 4), generator=rng.generator(3, 0, "preview"))
    assert np.array_equal(grid[0], datasets.to_uint8(0.01 * (80.0 * z) + label / 10).numpy())
