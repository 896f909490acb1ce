"""Networks, each built from a plain dict (`architecture` in model.json), so a model artifact
describes itself and loads without pickles:

- `small_unet`: the compact U-Net of the digits default (small_unet.py);
- `ddpmpp`: EDM's DDPM++ with the official checkpoint names (ddpmpp.py);
- `edm2`: EDM2's magnitude-preserving U-Net with the official pickle names, class-conditional
  (edm2.py; `edm2.preset(name)` gives the architecture of an EDM2 preset);
- `dit`: the DiT/SiT transformer with MeanFlow's two time inputs, presets MF-B/4 ... MF-XL/2 (dit.py).

Preconditioning (EDM, ECM) wraps a raw network into a denoiser or consistency function (precond.py);
`build_precond` picks the wrapper whose tensor names match the network's official checkpoints.
"""

from torch import nn

from stages.networks.ddpmpp import DDPMpp
from stages.networks.edm2 import EDM2Precond, EDM2UNet
from stages.networks.precond import Precond
from stages.networks.small_unet import SmallUNet


def dit(**architecture):
    # imported on first use: timm takes seconds to import, which only the DiT rows should pay
    from stages.networks.dit import DiT

    return DiT(**architecture)


ARCHITECTURES = {"small_unet": SmallUNet, "ddpmpp": DDPMpp, "edm2": EDM2UNet, "dit": dit}
# EDM2's pickles hold the raw network under `unet.` beside an uncertainty head; the others use Precond.
PRECONDS = {"edm2": EDM2Precond}


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


def build_precond(architecture: dict, kind="edm", sigma_data=0.5, sigma_min=0.002) -> Precond:
    """The network of `architecture` inside the preconditioning of `kind` ('edm' or 'ecm')."""
    wrapper = PRECONDS.get(architecture.get("kind"), Precond)
    return wrapper(build(architecture), kind, sigma_data, sigma_min)
