"""Networks, each built from a plain dict (`architecture` in model.json), so a model artifact
describes itself and loads without pickles:

- `small_unet`: the compact U-Net of the digits default (small_unet.py);
- `ddpmpp`: EDM's DDPM++ with the official checkpoint names (ddpmpp.py);
- `dit`: the DiT/SiT transformer with MeanFlow's two time inputs, presets MF-B/4 ... MF-XL/2 (dit.py).

Preconditioning (EDM, ECM) wraps a raw network into a denoiser or consistency function (precond.py).
"""

from torch import nn

from stages.networks.ddpmpp import DDPMpp
from stages.networks.small_unet import SmallUNet


def dit(**architecture):
    # imported on first use: timm takes seconds to import, which only the DiT rows should pay
    from stages.networks.dit import DiT

    return DiT(**architecture)


ARCHITECTURES = {"small_unet": SmallUNet, "ddpmpp": DDPMpp, "dit": dit}


def build(architecture: dict) -> nn.Module:
    """Build a raw network from its description, e.g. {"kind": "small_unet", "channels": 32, ...}."""
    arch = dict(architecture)
    kind = arch.pop("kind")
    if kind not in ARCHITECTURES:
        raise ValueError(f"unknown network kind {kind!r}; known: {sorted(ARCHITECTURES)}")
    for key in ("channel_mult", "attn_resolutions"):
        if key in arch:
            arch[key] = tuple(arch[key])
    return ARCHITECTURES[kind](**arch)
