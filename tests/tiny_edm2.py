"""Tiny EDM2 networks shared by the EDM2, import, label and ECD tests."""

import math

import torch
import torch.nn.functional as F

from stages import networks
from stages.networks import edm2

# A tiny conditional EDM2 that still has every kind of block: 3 levels (16, 8, 4), attention at 8 and 4
# with 8 channels per head, width changes (conv_skip) in both encoder and decoder.
TINY = {"kind": "edm2", "in_channels": 3, "resolution": 16, "label_dim": 10, "channels": 16,
        "channel_mult": [1, 2, 2], "num_blocks": 2, "attn_resolutions": [8, 4], "channels_per_head": 8,
        "dropout": 0.0, "logvar_channels": 16}


def tiny_net(seed=1, **override):
    """TINY with every tensor random (the gains are zero at init and would hide the network):
    weights N(0, s^2) with a random scale s in [1e-3, 1] per tensor (small ones make the eps of the
    normalisation matter, so train mode, which normalises twice, differs visibly from eval mode),
    gains in [0.3, 0.8], Fourier buffers drawn as at init. Filled in state_dict order."""
    net = networks.build_precond({**TINY, **override})
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, t in net.state_dict().items():
            if t.ndim == 0:
                t.copy_(0.3 + 0.5 * torch.rand([], generator=g))
            elif name.endswith("freqs"):
                t.copy_(2 * math.pi * torch.randn(t.shape, generator=g))
            elif name.endswith("phases"):
                t.copy_(2 * math.pi * torch.rand(t.shape, generator=g))
            else:
                t.copy_(torch.randn(t.shape, generator=g) * 10 ** (-3 + 3 * torch.rand([], generator=g)))
    return net


def tiny_inputs():
    g = torch.Generator().manual_seed(2)
    sigma = torch.tensor([0.002, 0.5, 2.0, 80.0])
    x = torch.randn(4, 3, 16, 16, generator=g) * (sigma**2 + 0.25).sqrt().reshape(-1, 1, 1, 1)
    labels = F.one_hot(torch.tensor([3, 7, 0, 9]), 10).float()
    return x, sigma, labels


# what TINY sets beyond the interface, width and dropout that train_edm2.py records
TINY_EXTRA = {"channel_mult": [1, 2, 2], "num_blocks": 2, "attn_resolutions": [8, 4], "channels_per_head": 8,
              "logvar_channels": 16}


# A class-conditional tiny EDM2 whose output depends on the label (test_labels, test_ecd_posttrain).
CLASSES = 10
CONDITIONAL = edm2.preset("edm2-img64-s", label_dim=CLASSES, in_channels=1, resolution=8, channels=8,
                   channel_mult=[1, 2], num_blocks=1, attn_resolutions=[4], channels_per_head=8,
                   logvar_channels=8)


def conditional_net():
    torch.manual_seed(0)
    net = networks.build_precond(CONDITIONAL, "edm")
    with torch.no_grad():  # EDM2 zero-initialises its gains: open them so the label reaches the output
        for name, p in net.named_parameters():
            if "gain" in name:
                p.fill_(1.0)
    return net
