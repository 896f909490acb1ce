"""EDM2's magnitude-preserving U-Net (Karras et al. 2024, "Analyzing and Improving the Training
Dynamics of Diffusion Models", config G), written from the paper's equations (numbers below are the
paper's). Module, parameter and buffer names and shapes follow the official pickles' `ema` network,
so its tensors load one to one: the raw U-Net under `unet.`, the uncertainty head under
`logvar_fourier.` and `logvar_linear.`.

Magnitude preservation: every layer maps activations of unit second moment to unit second moment.
- normalize(x): x / (eps + ||x|| / sqrt(n)) over the given dims (n elements), i.e. unit RMS; with
  eps = 1e-4 as the official code (it only matters near zero).
- MPConv (eqs. 47, 66): weight w of shape [out, in, k, k] (or [out, in] for a linear layer). Forward:
  each output channel's weight scaled to unit norm, w_i / ||w_i|| (via normalize, then 1/sqrt(fan_in))
  times an optional gain, so unit-variance inputs give unit-variance outputs. Forced weight
  normalisation: in training mode each forward first overwrites the stored weight, in place and
  outside autograd, with normalize(w), i.e. each output channel with norm sqrt(fan_in) (unit
  variance per element), up to the eps. The forward then normalises that weight again (standard
  weight normalisation), which is where the gradient flows.
- mp_silu (eq. 81): silu(x) / 0.596, 0.596 = sqrt(E[silu(x)^2]) for x ~ N(0, 1).
- mp_sum(a, b, t) (eq. 88): ((1 - t) a + t b) / sqrt((1 - t)^2 + t^2).
- mp_cat(a, b, t) (eq. 103): [w_a a, w_b b] with C = sqrt((N_a + N_b) / ((1 - t)^2 + t^2)),
  w_a = C (1 - t) / sqrt(N_a), w_b = C t / sqrt(N_b) (N_a, N_b the channel counts).
- MPFourier (eq. 75): sqrt(2) cos(f c + phi) with fixed random f ~ N(0, (2 pi)^2), phi ~ U(0, 2 pi);
  the stored buffers `freqs` and `phases` hold f and phi with the 2 pi already applied.

The U-Net (paper fig. 21): embedding mp_silu(mp_sum(Linear(Fourier(c_noise)), Linear(sqrt(L) y),
label_balance)) for one-hot labels y of L classes; the input gets a constant ones channel;
encoder blocks resample, apply a 1x1 conv where the width changes and pixel-normalise the main
path first; decoder blocks take the mp_cat of the main path and the skip. Each block: residual
branch mp_silu -> conv3x3 -> x (1 + Linear(emb) x emb_gain) -> mp_silu -> dropout -> conv3x3,
joined by mp_sum(res_balance); cosine self-attention (pixel-normalised q, k, v per head) joined by
mp_sum(attn_balance); activations clipped to +-clip_act. The output conv has a learned gain
`out_gain` (zero at init). Resampling by the [1, 1] filter: 2x2 box average down, nearest up.
"""

import contextlib
import math

import torch
import torch.nn.functional as F
from torch import nn

from stages.networks.precond import Precond

EPS = 1e-4
SILU_RMS = 0.596  # sqrt(E[silu(x)^2]) for x ~ N(0, 1), rounded as in the paper (eq. 81)


def normalize(x, dim=None, eps=EPS):
    """x / (eps + RMS of x over `dim`); `dim` None: every dim but the first (per output channel)."""
    dims = list(range(1, x.ndim)) if dim is None else ([dim] if isinstance(dim, int) else list(dim))
    n = math.prod(x.shape[d] for d in dims)
    norm = torch.linalg.vector_norm(x, dim=dims, keepdim=True, dtype=torch.float32)
    return x / (eps + norm / math.sqrt(n)).to(x.dtype)


def mp_silu(x):
    return F.silu(x) / SILU_RMS


def mp_sum(a, b, t=0.5):
    return a.lerp(b, t) / math.sqrt((1 - t) ** 2 + t**2)


def mp_cat(a, b, t=0.5, dim=1):
    na, nb = a.shape[dim], b.shape[dim]
    c = math.sqrt((na + nb) / ((1 - t) ** 2 + t**2))
    return torch.cat([a * (c * (1 - t) / math.sqrt(na)), b * (c * t / math.sqrt(nb))], dim=dim)


def resample(x, mode):
    """The [1, 1] filter: 2x2 box average ('down'), each pixel to a 2x2 patch ('up'), or 'keep'."""
    if mode == "down":
        return F.avg_pool2d(x, 2)
    if mode == "up":
        return x.repeat_interleave(2, dim=2).repeat_interleave(2, dim=3)
    return x


class MPFourier(nn.Module):
    def __init__(self, channels, bandwidth=1.0):
        super().__init__()
        self.register_buffer("freqs", 2 * math.pi * bandwidth * torch.randn(channels))
        self.register_buffer("phases", 2 * math.pi * torch.rand(channels))

    def forward(self, c):
        y = c.to(torch.float32).outer(self.freqs.to(torch.float32)) + self.phases.to(torch.float32)
        return (y.cos() * math.sqrt(2)).to(c.dtype)


class MPConv(nn.Module):
    """Magnitude-preserving conv (kernel (k, k)) or linear layer (kernel ()), no bias."""

    def __init__(self, cin, cout, kernel):
        super().__init__()
        self.out_channels = cout
        self.weight = nn.Parameter(torch.randn(cout, cin, *kernel))
        # Forced weight normalisation in training mode. The consistency losses run the prediction
        # pass first, which normalises the stored weights here, then the no-grad target pass with it
        # turned off (forced_weight_norm(net, False)): a second in-place update would change a
        # weight that the prediction's graph saved for backward (losses.prediction_then_target).
        self.force_weight_norm = True

    def forward(self, x, gain=1.0):
        if self.training and self.force_weight_norm:
            with torch.no_grad():
                self.weight.copy_(normalize(self.weight.to(torch.float32)))
        w = normalize(self.weight.to(torch.float32))
        fan_in = w[0].numel()
        w = (w * (gain / math.sqrt(fan_in))).to(x.dtype)
        if w.ndim == 2:
            return x @ w.t()
        return F.conv2d(x, w, padding=w.shape[-1] // 2)


@contextlib.contextmanager
def forced_weight_norm(module, enabled):
    """Switch forced weight normalisation of every MPConv in `module` on or off for a block of code."""
    convs = [m for m in module.modules() if isinstance(m, MPConv)]
    before = [m.force_weight_norm for m in convs]
    for m in convs:
        m.force_weight_norm = enabled
    try:
        yield module
    finally:
        for m, flag in zip(convs, before, strict=True):
            m.force_weight_norm = flag


class Block(nn.Module):
    """An encoder ('enc') or decoder ('dec') block (paper fig. 21)."""

    def __init__(self, cin, cout, emb_channels, flavor, resample_mode="keep", attention=False,
                 channels_per_head=64, dropout=0.0, res_balance=0.3, attn_balance=0.3, clip_act=256):
        super().__init__()
        self.out_channels, self.flavor, self.resample_mode = cout, flavor, resample_mode
        self.num_heads = cout // channels_per_head if attention else 0
        self.dropout, self.clip_act = dropout, clip_act
        self.res_balance, self.attn_balance = res_balance, attn_balance
        self.emb_gain = nn.Parameter(torch.zeros([]))
        # encoder blocks project the main path to the new width before the residual branch reads it
        self.conv_res0 = MPConv(cout if flavor == "enc" else cin, cout, (3, 3))
        self.emb_linear = MPConv(emb_channels, cout, ())
        self.conv_res1 = MPConv(cout, cout, (3, 3))
        self.conv_skip = MPConv(cin, cout, (1, 1)) if cin != cout else None
        self.attn_qkv = MPConv(cout, 3 * cout, (1, 1)) if self.num_heads else None
        self.attn_proj = MPConv(cout, cout, (1, 1)) if self.num_heads else None

    def forward(self, x, emb):
        x = resample(x, self.resample_mode)
        if self.flavor == "enc":
            if self.conv_skip is not None:
                x = self.conv_skip(x)
            x = normalize(x, dim=1)  # pixel norm
        y = self.conv_res0(mp_silu(x))
        scale = self.emb_linear(emb, gain=self.emb_gain) + 1
        y = mp_silu(y * scale[:, :, None, None].to(y.dtype))
        if self.training and self.dropout:
            y = F.dropout(y, p=self.dropout)
        y = self.conv_res1(y)
        if self.flavor == "dec" and self.conv_skip is not None:
            x = self.conv_skip(x)
        x = mp_sum(x, y, self.res_balance)
        if self.num_heads:
            x = mp_sum(x, self.attention(x), self.attn_balance)
        if self.clip_act is not None:
            x = x.clamp(-self.clip_act, self.clip_act)
        return x

    def attention(self, x):
        """Cosine attention: q, k, v pixel-normalised per head. The qkv conv's output channels are
        ordered (head, channel, q/k/v), as in the official weights."""
        b, c, h, w = x.shape
        qkv = self.attn_qkv(x).reshape(b, self.num_heads, c // self.num_heads, 3, h * w)
        q, k, v = normalize(qkv, dim=2).permute(3, 0, 1, 4, 2).unbind(0)  # each [b, heads, hw, c/heads]
        y = F.scaled_dot_product_attention(q, k, v)  # softmax(q k^T / sqrt(c/heads)) v
        return self.attn_proj(y.transpose(2, 3).reshape(b, c, h, w))


class EDM2UNet(nn.Module):
    """The raw network F(x, c_noise, labels) of EDM2; `labels` one-hot [B, label_dim] (label_dim > 0).

    `logvar_channels` is the width of the uncertainty head that EDM2Precond attaches beside this
    network; it is kept here so that one architecture dict describes every tensor."""

    def __init__(self, in_channels, resolution, label_dim=0, channels=192, channel_mult=(1, 2, 3, 4),
                 channel_mult_noise=None, channel_mult_emb=None, num_blocks=3, attn_resolutions=(16, 8),
                 label_balance=0.5, concat_balance=0.5, channels_per_head=64, dropout=0.0,
                 res_balance=0.3, attn_balance=0.3, clip_act=256, logvar_channels=128):
        super().__init__()
        if resolution % 2 ** (len(channel_mult) - 1):
            raise ValueError(f"resolution {resolution} is not divisible by 2^{len(channel_mult) - 1}")
        widths = [channels * m for m in channel_mult]
        noise_channels = channels * channel_mult_noise if channel_mult_noise is not None else widths[0]
        emb = channels * channel_mult_emb if channel_mult_emb is not None else max(widths)
        self.label_dim, self.logvar_channels = int(label_dim), int(logvar_channels)
        self.label_balance, self.concat_balance = label_balance, concat_balance
        block = dict(emb_channels=emb, channels_per_head=channels_per_head, dropout=dropout,
                     res_balance=res_balance, attn_balance=attn_balance, clip_act=clip_act)

        self.out_gain = nn.Parameter(torch.zeros([]))
        self.emb_fourier = MPFourier(noise_channels)
        self.emb_noise = MPConv(noise_channels, emb, ())
        self.emb_label = MPConv(label_dim, emb, ()) if label_dim else None

        self.enc = nn.ModuleDict()
        c = in_channels + 1  # the constant ones channel
        for level, width in enumerate(widths):
            res = resolution >> level
            if level == 0:
                self.enc[f"{res}x{res}_conv"] = MPConv(c, width, (3, 3))
                c = width
            else:
                self.enc[f"{res}x{res}_down"] = Block(c, c, flavor="enc", resample_mode="down", **block)
            for i in range(num_blocks):
                self.enc[f"{res}x{res}_block{i}"] = Block(c, width, flavor="enc",
                                                          attention=res in attn_resolutions, **block)
                c = width
        skips = [m.out_channels for m in self.enc.values()]

        self.dec = nn.ModuleDict()
        for level in reversed(range(len(widths))):
            res, width = resolution >> level, widths[level]
            if level == len(widths) - 1:
                self.dec[f"{res}x{res}_in0"] = Block(c, c, flavor="dec", attention=True, **block)
                self.dec[f"{res}x{res}_in1"] = Block(c, c, flavor="dec", **block)
            else:
                self.dec[f"{res}x{res}_up"] = Block(c, c, flavor="dec", resample_mode="up", **block)
            for i in range(num_blocks + 1):
                self.dec[f"{res}x{res}_block{i}"] = Block(c + skips.pop(), width, flavor="dec",
                                                          attention=res in attn_resolutions, **block)
                c = width
        self.out_conv = MPConv(c, in_channels, (3, 3))

    def forward(self, x, c_noise, labels=None):
        emb = self.emb_noise(self.emb_fourier(c_noise))
        if self.emb_label is not None:
            if labels is None:
                raise ValueError(f"this EDM2 network is class-conditional (label_dim {self.label_dim}): "
                                 "pass one-hot labels")
            # one-hot labels have norm 1; sqrt(L) gives them unit RMS like every other input
            emb = mp_sum(emb, self.emb_label(labels * math.sqrt(labels.shape[1])), self.label_balance)
        elif labels is not None:
            raise ValueError("this EDM2 network is unconditional (label_dim 0) but labels were given")
        emb = mp_silu(emb)

        x = torch.cat([x, torch.ones_like(x[:, :1])], dim=1)
        skips = []
        for block in self.enc.values():
            x = block(x) if isinstance(block, MPConv) else block(x, emb)
            skips.append(x)
        for name, block in self.dec.items():
            if "_block" in name:
                x = mp_cat(x, skips.pop(), self.concat_balance)
            x = block(x, emb)
        return self.out_conv(x, gain=self.out_gain)


class EDM2Precond(Precond):
    """EDM preconditioning around an EDM2UNet, with EDM2's uncertainty head u(sigma) (paper eq. 21)
    so that the official `ema` tensors load with their names: `unet.*`, `logvar_fourier.*`,
    `logvar_linear.*`. Call as `net(x, sigma, labels)`; `net.logvar(sigma)` gives u(sigma)."""

    network_name = "unet"

    def __init__(self, unet, kind="edm", sigma_data=0.5, sigma_boundary=0.002):
        super().__init__(unet, kind, sigma_data, sigma_boundary)
        self.logvar_fourier = MPFourier(unet.logvar_channels)
        self.logvar_linear = MPConv(unet.logvar_channels, 1, ())

    def logvar(self, sigma):
        sigma = torch.as_tensor(sigma, dtype=torch.float32, device=self.logvar_fourier.freqs.device)
        c_noise = sigma.reshape(-1).log() / 4
        return self.logvar_linear(self.logvar_fourier(c_noise)).reshape(-1, 1, 1, 1)


# EDM2's presets (train_edm2.py `config_presets`): base width and dropout per name. img512 models
# run on 4x64x64 SD-VAE latents, img64 ones on 3x64x64 pixels; every other setting is the default.
PRESETS = {
    "edm2-img512-xxs": (64, 0.0), "edm2-img512-xs": (128, 0.0), "edm2-img512-s": (192, 0.0),
    "edm2-img512-m": (256, 0.1), "edm2-img512-l": (320, 0.1), "edm2-img512-xl": (384, 0.1),
    "edm2-img512-xxl": (448, 0.1),
    "edm2-img64-xs": (128, 0.0), "edm2-img64-s": (192, 0.0), "edm2-img64-m": (256, 0.1),
    "edm2-img64-l": (320, 0.1), "edm2-img64-xl": (384, 0.1),
}
DEFAULTS = {"channel_mult": [1, 2, 3, 4], "channel_mult_noise": None, "channel_mult_emb": None, "num_blocks": 3,
            "attn_resolutions": [16, 8], "label_balance": 0.5, "concat_balance": 0.5, "channels_per_head": 64,
            "res_balance": 0.3, "attn_balance": 0.3, "clip_act": 256, "logvar_channels": 128}


def preset(name, label_dim=1000, **override):
    """The architecture dict (for networks.build) of an EDM2 preset, e.g. preset("edm2-img64-s")."""
    if name not in PRESETS:
        raise ValueError(f"unknown EDM2 preset {name!r}; known: {sorted(PRESETS)}")
    channels, dropout = PRESETS[name]
    in_channels = 4 if name.startswith("edm2-img512") else 3
    arch = {"kind": "edm2", "in_channels": in_channels, "resolution": 64, "label_dim": label_dim,
            "channels": channels, "dropout": dropout, **DEFAULTS}
    unknown = sorted(set(override) - set(arch))
    if unknown:
        raise ValueError(f"preset {name}: unknown settings {unknown}")
    return {**arch, **override}
