"""The DiT/SiT transformer (Peebles & Xie 2023; Ma et al. 2024) with MeanFlow's two time inputs
(Geng et al. 2025): the MF-B/4 ... MF-XL/2 networks of MeanFlow and of the CMT paper's ImageNet-256 row.

    tokens  = PatchEmbed(x) + fixed 2-D sin-cos position embedding
    c       = T(t) + H(t - r) + Y(label)          two timestep embedders, summed with the class
    block   = adaLN-Zero: shift, scale, gate of LayerNorm -> Attention and LayerNorm -> Mlp from c
    output  = adaLN final layer -> linear -> unpatchify (C channels: no learned sigma)

The blocks are timm's `Attention` (qkv bias) and `Mlp` (tanh-GELU, 4x), as DiT itself uses them,
and timm's `PatchEmbed`. The class table has `num_classes + 1` rows: the last is the null class of
classifier-free guidance; labels are dropped to it by the loss (meanflow.drop_labels), which has to
know which rows were dropped, not inside the network as DiT's LabelEmbedder does.

Initialisation is DiT's: xavier-uniform linears with zero bias (the patch projection flattened),
N(0, 0.02) timestep MLPs and class table, and zero adaLN modulations and final linear, so every
block starts as the identity and the network's output starts at exactly zero.

The network takes the state and the flow times as they are (MeanFlow's DiT: z_t, t and t - r in
[0, 1]) and returns u; `meanflow_inputs = "direct"` tells networks/average_velocity.py so.

Parameter counts (no position table: it is a non-persistent buffer recomputed from the config):
MF-XL/2 676,440,592 and MF-B/4 131,165,248, against DiT-XL/2 675,129,632 and DiT-B/4 130,475,648:
a second timestep embedder (+1,624,320 at XL, +787,968 at B), no learned-sigma half of the final
linear (-18,448 at XL, -49,216 at B), and the fixed position table that DiT stores as a frozen
parameter (-294,912 at XL, -49,152 at B). MeanFlow's paper lists 676M and 131M.
"""

import functools
import math

import numpy as np
import torch
from timm.layers import Mlp, PatchEmbed
from timm.models.vision_transformer import Attention
from torch import nn

# name -> (depth, hidden_size, patch_size, num_heads); DiT's table, MeanFlow's names
PRESETS = {
    "MF-B/4": (12, 768, 4, 12),
    "MF-B/2": (12, 768, 2, 12),
    "MF-L/2": (24, 1024, 2, 16),
    "MF-XL/2": (28, 1152, 2, 16),
    "MF-XL/4": (28, 1152, 4, 16),
}
SIZE_KEYS = ("depth", "hidden_size", "patch_size", "num_heads")


def modulate(x, shift, scale):
    return x * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)


class TimestepEmbedder(nn.Module):
    """Sinusoidal features of a scalar time (GLIDE/DiT: [cos, sin], frequencies 10000^(-i/half)),
    then Linear SiLU Linear."""

    def __init__(self, hidden_size, frequency_size=256, max_period=10000):
        super().__init__()
        half = frequency_size // 2
        freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32) / half)
        self.register_buffer("freqs", freqs, persistent=False)
        self.mlp = nn.Sequential(nn.Linear(frequency_size, hidden_size), nn.SiLU(),
                                 nn.Linear(hidden_size, hidden_size))

    def forward(self, t):
        args = t.to(self.freqs.dtype)[:, None] * self.freqs[None]
        return self.mlp(torch.cat([torch.cos(args), torch.sin(args)], dim=-1))


class DiTBlock(nn.Module):
    """adaLN-Zero: x + gate_msa * Attn(mod(LN(x))) then x + gate_mlp * Mlp(mod(LN(x)))."""

    def __init__(self, hidden_size, num_heads, mlp_ratio, fused_attn):
        super().__init__()
        self.norm1 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.attn = Attention(hidden_size, num_heads=num_heads, qkv_bias=True)
        # timm picks fused SDPA from the environment; forward-mode AD (MeanFlow's JVP) needs the
        # explicit softmax path on every backend, so the choice is the config's, not timm's.
        self.attn.fused_attn = bool(fused_attn)
        self.norm2 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.mlp = Mlp(hidden_size, int(hidden_size * mlp_ratio),
                       act_layer=functools.partial(nn.GELU, approximate="tanh"))
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 6 * hidden_size))

    def forward(self, x, c):
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = self.adaLN_modulation(c).chunk(6, dim=1)
        x = x + gate_msa.unsqueeze(1) * self.attn(modulate(self.norm1(x), shift_msa, scale_msa))
        return x + gate_mlp.unsqueeze(1) * self.mlp(modulate(self.norm2(x), shift_mlp, scale_mlp))


class FinalLayer(nn.Module):
    def __init__(self, hidden_size, patch_size, out_channels):
        super().__init__()
        self.norm_final = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(hidden_size, patch_size * patch_size * out_channels)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 2 * hidden_size))

    def forward(self, x, c):
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=1)
        return self.linear(modulate(self.norm_final(x), shift, scale))


def sincos_pos_embed_2d(dim, grid_size):
    """[grid_size^2, dim] (MAE/DiT): tokens row-major; the first dim/2 channels encode the column,
    the last dim/2 the row, each as [sin(p w_k), cos(p w_k)] with w_k = 10000^(-k / (dim/4))."""
    if dim % 4:
        raise ValueError(f"hidden_size {dim} must be divisible by 4 for the 2-D sin-cos position embedding")
    omega = 1.0 / 10000 ** (np.arange(dim // 4, dtype=np.float64) / (dim / 4))
    rows, cols = np.meshgrid(np.arange(grid_size, dtype=np.float64), np.arange(grid_size, dtype=np.float64),
                             indexing="ij")

    def one_axis(pos):
        out = np.outer(pos.reshape(-1), omega)
        return np.concatenate([np.sin(out), np.cos(out)], axis=1)

    return np.concatenate([one_axis(cols), one_axis(rows)], axis=1)


class DiT(nn.Module):
    """`preset` (a PRESETS name) or the four sizes; `resolution` and `in_channels` of the (latent)
    input; `num_classes` 0 for an unconditional network (then no class table and no labels)."""

    meanflow_inputs = "direct"

    def __init__(self, resolution=32, in_channels=4, num_classes=1000, preset=None, depth=None,
                 hidden_size=None, patch_size=None, num_heads=None, mlp_ratio=4.0, fused_attn=False,
                 dual_time=True, dropout=0.0):
        super().__init__()
        sizes = dict(zip(SIZE_KEYS, (depth, hidden_size, patch_size, num_heads), strict=True))
        if preset is not None:
            if preset not in PRESETS:
                raise ValueError(f"unknown DiT preset {preset!r}; known: {sorted(PRESETS)}")
            given = [k for k, v in sizes.items() if v is not None]
            if given:
                raise ValueError(f"DiT: give either preset {preset!r} or the sizes, not both (also got {given})")
            sizes = dict(zip(SIZE_KEYS, PRESETS[preset], strict=True))
        missing = [k for k, v in sizes.items() if v is None]
        if missing:
            raise ValueError(f"DiT: missing {missing}; give a preset ({sorted(PRESETS)}) "
                             f"or all of {list(SIZE_KEYS)}")
        if not dual_time:
            raise ValueError("the MeanFlow DiT always takes two times (t and t - r); dual_time must be true")
        if dropout:
            raise ValueError(f"the DiT has no dropout (DiT and MeanFlow train without it); "
                             f"got dropout {dropout}, set 0")
        depth, hidden, patch, heads = (sizes[k] for k in SIZE_KEYS)
        if resolution % patch:
            raise ValueError(f"DiT: resolution {resolution} is not divisible by patch_size {patch}")
        if hidden % heads:
            raise ValueError(f"DiT: hidden_size {hidden} is not divisible by num_heads {heads}")
        self.preset, self.dual_time = preset, True
        self.in_channels = self.out_channels = in_channels
        self.patch_size, self.num_classes = patch, int(num_classes)
        self.null_class = self.num_classes  # the extra row of the class table

        self.x_embedder = PatchEmbed(resolution, patch, in_channels, hidden, bias=True)
        grid = resolution // patch
        self.register_buffer("pos_embed", torch.from_numpy(sincos_pos_embed_2d(hidden, grid)).float()[None],
                             persistent=False)
        self.t_embedder = TimestepEmbedder(hidden)
        self.h_embedder = TimestepEmbedder(hidden)  # MeanFlow's second time, t - r
        self.y_embedder = nn.Embedding(self.num_classes + 1, hidden) if self.num_classes else None
        self.blocks = nn.ModuleList(DiTBlock(hidden, heads, mlp_ratio, fused_attn) for _ in range(depth))
        self.final_layer = FinalLayer(hidden, patch, in_channels)
        self.initialize_weights()

    def initialize_weights(self):
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                nn.init.zeros_(module.bias)
        w = self.x_embedder.proj.weight
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        nn.init.zeros_(self.x_embedder.proj.bias)
        if self.y_embedder is not None:
            nn.init.normal_(self.y_embedder.weight, std=0.02)
        for embedder in (self.t_embedder, self.h_embedder):
            nn.init.normal_(embedder.mlp[0].weight, std=0.02)
            nn.init.normal_(embedder.mlp[2].weight, std=0.02)
        for layer in [block.adaLN_modulation[-1] for block in self.blocks] + [
                self.final_layer.adaLN_modulation[-1], self.final_layer.linear]:
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)

    def unpatchify(self, x):
        """[N, T, p*p*C] -> [N, C, H, W]."""
        p, c = self.patch_size, self.out_channels
        g = int(round(x.shape[1] ** 0.5))
        x = x.reshape(x.shape[0], g, g, p, p, c)
        return torch.einsum("nhwpqc->nchpwq", x).reshape(x.shape[0], c, g * p, g * p)

    def condition(self, t, h, labels):
        c = self.t_embedder(t) + self.h_embedder(h)
        if self.y_embedder is None:
            if labels is not None:
                raise ValueError("this DiT is unconditional (num_classes 0); it takes no class labels")
            return c
        if labels is None:
            raise ValueError(f"this DiT is class-conditional: pass labels (0..{self.num_classes - 1}, "
                             f"or {self.null_class} for the null class)")
        return c + self.y_embedder(labels)

    def forward(self, x, t, h, labels=None):
        """x [N, C, H, W], t [N] and h = t - r [N] (as the wrapper scales them), labels [N] int64."""
        c = self.condition(t, h, labels)
        x = self.x_embedder(x) + self.pos_embed.to(x.dtype)
        for block in self.blocks:
            x = block(x, c)
        return self.unpatchify(self.final_layer(x, c))
