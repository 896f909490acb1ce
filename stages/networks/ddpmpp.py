"""DDPM++ (Song et al. 2021, "Score-Based Generative Modeling through SDEs") in the form EDM
(Karras et al. 2022) trained its CIFAR-10, FFHQ-64 and AFHQv2-64 teachers with.

Written from the papers' description; the module and parameter names follow the official EDM
checkpoints (`model.enc.32x32_block0.conv0.weight`, ...) so their EMA tensors load one to one into
`Precond.model`. The architecture:

- noise embedding: sinusoidal features of c_noise (channels C, frequencies (1/10000)^(i/(C/2-1)),
  ordered [sin, cos]), then Linear(C, 4C) SiLU Linear(4C, 4C) SiLU;
- encoder per resolution level: a 3x3 input conv at the first level, a down-sampling residual
  block at the others, then `num_blocks` residual blocks (self-attention at `attn_resolutions`);
- decoder per level, coarsest first: two blocks (the first with attention) at the coarsest level,
  an up-sampling block at the others, then `num_blocks + 1` blocks that take the concatenated
  skip (attention after the last one at `attn_resolutions`); GroupNorm SiLU 3x3 conv out;
- residual block: GroupNorm SiLU conv3x3, + Linear(emb) (additive, no scale), GroupNorm SiLU
  dropout conv3x3, + skip (1x1 conv where channels or resolution change), x sqrt(1/2);
  single-head self-attention with a 1x1 qkv conv (channels interleaved q, k, v per channel);
- resampling by the [1, 1] filter: 2x2 box average down, nearest-neighbour up, before the conv.
- `augment_dim` > 0 adds EDM's augmentation-label embedding `map_augment` (bias-free); the
  official teachers carry it (augment_dim 9). CMT and ECT train with augment 0, so it always sees
  a zero label and contributes exactly 0; it exists to load those weights one to one.
"""

import math

import torch
import torch.nn.functional as F
from torch import nn

SKIP_SCALE = math.sqrt(0.5)


def _xavier_uniform(shape, fan_in, fan_out, gain=1.0):
    bound = gain * math.sqrt(6 / (fan_in + fan_out))
    return (torch.rand(shape) * 2 - 1) * bound


class Linear(nn.Module):
    def __init__(self, cin, cout, bias=True, gain=1.0):
        super().__init__()
        self.weight = nn.Parameter(_xavier_uniform((cout, cin), cin, cout, gain))
        self.bias = nn.Parameter(torch.zeros(cout)) if bias else None

    def forward(self, x):
        return F.linear(x, self.weight.to(x.dtype), None if self.bias is None else self.bias.to(x.dtype))


class Conv2d(nn.Module):
    """k x k convolution (k = 0: resampling only), optionally after 2x up- or down-sampling."""

    def __init__(self, cin, cout, kernel, resample=None, gain=1.0):
        super().__init__()
        self.cin, self.resample = cin, resample
        if kernel:
            fan_in, fan_out = cin * kernel * kernel, cout * kernel * kernel
            self.weight = nn.Parameter(_xavier_uniform((cout, cin, kernel, kernel), fan_in, fan_out, gain))
            self.bias = nn.Parameter(torch.zeros(cout))
        else:
            self.weight = self.bias = None
        # the [1, 1] filter as a normalised 2x2 kernel, stored as in the official checkpoints
        self.register_buffer("resample_filter", torch.full((1, 1, 2, 2), 0.25) if resample else None)

    def forward(self, x):
        if self.resample == "down":  # 2x2 mean
            kernel = self.resample_filter.to(x.dtype).expand(x.shape[1], 1, 2, 2)
            x = F.conv2d(x, kernel, stride=2, groups=x.shape[1])
        elif self.resample == "up":  # each pixel copied to a 2x2 patch
            kernel = (4 * self.resample_filter).to(x.dtype).expand(x.shape[1], 1, 2, 2)
            x = F.conv_transpose2d(x, kernel, stride=2, groups=x.shape[1])
        if self.weight is not None:
            w = self.weight.to(x.dtype)
            x = F.conv2d(x, w, self.bias.to(x.dtype), padding=w.shape[-1] // 2)
        return x


class GroupNorm(nn.Module):
    def __init__(self, channels, eps=1e-6):
        super().__init__()
        self.groups, self.eps = min(32, channels // 4), eps
        self.weight = nn.Parameter(torch.ones(channels))
        self.bias = nn.Parameter(torch.zeros(channels))

    def forward(self, x):
        return F.group_norm(x, self.groups, self.weight.to(x.dtype), self.bias.to(x.dtype), self.eps)


class UNetBlock(nn.Module):
    def __init__(self, cin, cout, emb_channels, resample=None, attention=False, dropout=0.0):
        super().__init__()
        self.in_channels, self.out_channels, self.dropout = cin, cout, dropout
        self.norm0 = GroupNorm(cin)
        self.conv0 = Conv2d(cin, cout, 3, resample=resample)
        self.affine = Linear(emb_channels, cout)
        self.norm1 = GroupNorm(cout)
        self.conv1 = Conv2d(cout, cout, 3, gain=1e-5)
        self.skip = Conv2d(cin, cout, 1, resample=resample) if cin != cout or resample else None
        self.attention = attention
        if attention:
            self.norm2 = GroupNorm(cout)
            self.qkv = Conv2d(cout, 3 * cout, 1, gain=math.sqrt(0.2))
            self.proj = Conv2d(cout, cout, 1, gain=1e-5)

    def forward(self, x, emb):
        h = self.conv0(F.silu(self.norm0(x)))
        h = F.silu(self.norm1(h + self.affine(emb)[:, :, None, None].to(h.dtype)))
        h = self.conv1(F.dropout(h, p=self.dropout, training=self.training))
        h = (h + (x if self.skip is None else self.skip(x))) * SKIP_SCALE
        if self.attention:
            b, c, height, width = h.shape
            q, k, v = self.qkv(self.norm2(h)).reshape(b, c, 3, height * width).unbind(2)
            # softmax over keys of q.k / sqrt(c): scaled_dot_product_attention on [b, positions, c]
            a = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
            h = (self.proj(a.transpose(1, 2).reshape(b, c, height, width)) + h) * SKIP_SCALE
        return h


class NoiseEmbedding(nn.Module):
    """[sin, cos] of c_noise times (1/10000)^(i / (C/2 - 1)), i = 0..C/2-1. No tensors."""

    def __init__(self, channels, max_positions=10000):
        super().__init__()
        self.channels, self.max_positions = channels, max_positions

    def forward(self, c_noise):
        half = self.channels // 2
        exponents = torch.arange(half, dtype=torch.float32, device=c_noise.device) / (half - 1)
        angles = c_noise.to(torch.float32).outer((1 / self.max_positions) ** exponents)
        return torch.cat([angles.sin(), angles.cos()], dim=1)


class DDPMpp(nn.Module):
    def __init__(self, in_channels, resolution, channels=128, channel_mult=(2, 2, 2), num_blocks=4,
                 attn_resolutions=(16,), dropout=0.1, augment_dim=0, channel_mult_emb=4):
        super().__init__()
        if resolution % 2 ** (len(channel_mult) - 1):
            raise ValueError(f"resolution {resolution} is not divisible by 2^{len(channel_mult) - 1}")
        emb = channels * channel_mult_emb
        block = dict(emb_channels=emb, dropout=dropout)
        self.map_noise = NoiseEmbedding(channels)
        self.map_augment = Linear(augment_dim, channels, bias=False) if augment_dim else None
        self.map_layer0 = Linear(channels, emb)
        self.map_layer1 = Linear(emb, emb)

        self.enc = nn.ModuleDict()
        skips, c = [], in_channels
        for level, mult in enumerate(channel_mult):
            res = resolution >> level
            if level == 0:
                self.enc[f"{res}x{res}_conv"] = Conv2d(c, channels, 3)
                c = channels
            else:
                self.enc[f"{res}x{res}_down"] = UNetBlock(c, c, resample="down", **block)
            skips.append(c)
            for i in range(num_blocks):
                self.enc[f"{res}x{res}_block{i}"] = UNetBlock(c, channels * mult,
                                                              attention=res in attn_resolutions, **block)
                c = channels * mult
                skips.append(c)

        self.dec = nn.ModuleDict()
        for level in reversed(range(len(channel_mult))):
            res, mult = resolution >> level, channel_mult[level]
            if level == len(channel_mult) - 1:
                self.dec[f"{res}x{res}_in0"] = UNetBlock(c, c, attention=True, **block)
                self.dec[f"{res}x{res}_in1"] = UNetBlock(c, c, **block)
            else:
                self.dec[f"{res}x{res}_up"] = UNetBlock(c, c, resample="up", **block)
            for i in range(num_blocks + 1):
                attention = i == num_blocks and res in attn_resolutions
                self.dec[f"{res}x{res}_block{i}"] = UNetBlock(c + skips.pop(), channels * mult,
                                                              attention=attention, **block)
                c = channels * mult
        self.dec[f"{resolution}x{resolution}_aux_norm"] = GroupNorm(c)
        self.dec[f"{resolution}x{resolution}_aux_conv"] = Conv2d(c, in_channels, 3, gain=1e-5)

    def forward(self, x, c_noise):
        emb = self.map_noise(c_noise)
        if self.map_augment is not None:
            # No augmentation labels (augment 0): the embedding of a zero label adds exactly 0,
            # and keeps the layer in the graph so that multi-GPU DDP sees no unused parameter.
            emb = emb + self.map_augment(emb.new_zeros(emb.shape[0], self.map_augment.weight.shape[1]))
        emb = F.silu(self.map_layer0(emb))
        emb = F.silu(self.map_layer1(emb))
        skips = []
        for layer in self.enc.values():
            x = layer(x, emb) if isinstance(layer, UNetBlock) else layer(x)
            skips.append(x)
        for name, layer in self.dec.items():
            if name.endswith("aux_norm"):
                x = F.silu(layer(x))
            elif name.endswith("aux_conv"):
                x = layer(x)
            else:
                if "_block" in name:  # every decoder block but in0/in1/up takes a skip
                    x = torch.cat([x, skips.pop()], dim=1)
                x = layer(x, emb)
        return x
