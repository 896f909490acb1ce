"""The compact U-Net of the digits default: positional noise embedding, residual blocks with
scale-shift conditioning, dropout, skip connections.

With `dual_time=True` the same U-Net takes a second scalar (MeanFlow's t - r), embedded the same way
and added to the first before the shared embedding MLP; off by default, so consistency models and
their stored weights are unchanged.
"""

import math

import torch
import torch.nn.functional as F
from torch import nn


class PositionalEmbedding(nn.Module):
    """Sinusoidal embedding of the scalar noise label (Transformer style, EDM's `endpoint=True`)."""

    def __init__(self, channels, max_positions=10000):
        super().__init__()
        half = channels // 2
        freqs = torch.arange(half, dtype=torch.float32) / max(half - 1, 1)
        self.register_buffer("freqs", (1 / max_positions) ** freqs, persistent=False)

    def forward(self, x):
        x = x.to(self.freqs.dtype).outer(self.freqs)  # float32 unless the module is cast (float64 tests)
        return torch.cat([x.cos(), x.sin()], dim=1)


def group_norm(channels):
    return nn.GroupNorm(num_groups=min(8, channels // 4), num_channels=channels, eps=1e-6)


class ResBlock(nn.Module):
    def __init__(self, cin, cout, emb_channels, dropout):
        super().__init__()
        self.norm0 = group_norm(cin)
        self.conv0 = nn.Conv2d(cin, cout, 3, padding=1)
        self.affine = nn.Linear(emb_channels, 2 * cout)
        self.norm1 = group_norm(cout)
        self.dropout = nn.Dropout(dropout)
        self.conv1 = nn.Conv2d(cout, cout, 3, padding=1)
        self.skip = nn.Conv2d(cin, cout, 1) if cin != cout else nn.Identity()
        nn.init.zeros_(self.conv1.weight)
        nn.init.zeros_(self.conv1.bias)

    def forward(self, x, emb):
        h = self.conv0(F.silu(self.norm0(x)))
        scale, shift = self.affine(emb)[:, :, None, None].chunk(2, dim=1)
        h = F.silu(self.norm1(h) * (1 + scale) + shift)
        h = self.conv1(self.dropout(h))
        return (h + self.skip(x)) / math.sqrt(2)


class SmallUNet(nn.Module):
    def __init__(self, in_channels, resolution, channels=32, channel_mult=(1, 2), num_blocks=1,
                 dropout=0.0, emb_mult=4, dual_time=False):
        super().__init__()
        self.dual_time = bool(dual_time)
        if resolution % 2 ** (len(channel_mult) - 1):
            raise ValueError(f"resolution {resolution} is not divisible by 2^{len(channel_mult) - 1}")
        emb = channels * emb_mult
        self.map_noise = PositionalEmbedding(channels)
        self.map_layer0 = nn.Linear(channels, emb)
        if self.dual_time:
            self.map_noise2 = PositionalEmbedding(channels)
            self.map_layer0_2 = nn.Linear(channels, emb)
        self.map_layer1 = nn.Linear(emb, emb)
        self.conv_in = nn.Conv2d(in_channels, channels, 3, padding=1)

        self.enc = nn.ModuleList()
        skips, cin = [channels], channels
        for level, mult in enumerate(channel_mult):
            cout = channels * mult
            for _ in range(num_blocks):
                self.enc.append(ResBlock(cin, cout, emb, dropout))
                cin = cout
                skips.append(cin)
            if level < len(channel_mult) - 1:
                self.enc.append(nn.Conv2d(cin, cin, 3, stride=2, padding=1))
                skips.append(cin)
        self.mid = nn.ModuleList([ResBlock(cin, cin, emb, dropout), ResBlock(cin, cin, emb, dropout)])
        self.dec = nn.ModuleList()
        for level, mult in reversed(list(enumerate(channel_mult))):
            cout = channels * mult
            for _ in range(num_blocks + 1):
                self.dec.append(ResBlock(cin + skips.pop(), cout, emb, dropout))
                cin = cout
            if level > 0:
                self.dec.append(nn.Upsample(scale_factor=2, mode="nearest"))
        self.norm_out = group_norm(cin)
        self.conv_out = nn.Conv2d(cin, in_channels, 3, padding=1)
        nn.init.zeros_(self.conv_out.weight)
        nn.init.zeros_(self.conv_out.bias)

    def forward(self, x, c_noise, c_noise2=None):
        if (c_noise2 is not None) != self.dual_time:
            raise ValueError(f"this network takes {2 if self.dual_time else 1} time input(s)")
        emb = self.map_layer0(self.map_noise(c_noise))
        if self.dual_time:
            emb = emb + self.map_layer0_2(self.map_noise2(c_noise2))
        emb = F.silu(emb)
        emb = F.silu(self.map_layer1(emb))
        h = self.conv_in(x)
        hs = [h]
        for layer in self.enc:
            h = layer(h, emb) if isinstance(layer, ResBlock) else layer(h)
            hs.append(h)
        for block in self.mid:
            h = block(h, emb)
        for layer in self.dec:
            if isinstance(layer, ResBlock):
                h = layer(torch.cat([h, hs.pop()], dim=1), emb)
            else:
                h = layer(h)
        return self.conv_out(F.silu(self.norm_out(h)))
