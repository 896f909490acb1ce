"""Networks, each built from a plain dict (`architecture` in model.json), so a model artifact
describes itself and loads without pickles:

- `small_unet`: the compact U-Net of the digits default (small_unet.py);
- `ddpmpp`: EDM's DDPM++ with the official checkpoint names (ddpmpp.py);
- `edm2`: EDM2's magnitude-preserving U-Net with the official pickle names, class-conditional
  (edm2.py; `edm2.preset(name)` gives the architecture of an EDM2 preset);
- `dit`: the DiT/SiT transformer with MeanFlow's two time inputs, presets MF-B/4 ... MF-XL/2 (dit.py).

Preconditioning wraps a raw network into a denoiser or consistency function (EDM, ECM: precond.py)
or MeanFlow's average velocity u(z, r, t) (average_velocity.py); `build_precond` picks the wrapper
whose tensor names match the network's official checkpoints.
"""

from torch import nn

from stages.networks.average_velocity import AverageVelocity
from stages.networks.ddpmpp import DDPMpp
from stages.networks.edm2 import EDM2Precond, EDM2UNet
from stages.networks.precond import Precond
from stages.networks.small_unet import SmallUNet


def dit(dual_time=True, **architecture):
    # imported on first use: timm takes seconds to import, which only the DiT rows should pay
    from stages.networks.dit import DiT

    return DiT(dual_time=dual_time, **architecture)


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


def architecture(network_cfg: dict, in_channels: int, resolution: int, dropout: float) -> dict:
    """The architecture dict of a row's `network` section for data of `in_channels` x `resolution`^2.
    For `edm2`, `preset` (default edm2-img64-s) gives every setting the section does not."""
    cfg = dict(network_cfg)
    data = {"in_channels": in_channels, "resolution": resolution, "dropout": dropout}
    if cfg["kind"] == "edm2":
        from stages.networks import edm2

        name = cfg.pop("preset", "edm2-img64-s")
        cfg.pop("kind")
        return edm2.preset(name, **{**cfg, **data})
    return {**cfg, **data}


def student_kind(arch: dict) -> str:
    """The preconditioning of a consistency student of this network: ECM (boundary-shifted in eval
    mode) for EDM-style networks, plain EDM in both modes for EDM2's, as the ImageNet code does."""
    return "edm" if arch.get("kind") == "edm2" else "ecm"


def freeze_unused_heads(net: nn.Module) -> nn.Module:
    """EDM2's uncertainty head (logvar_*) only weights EDM2's own diffusion loss: no loss here uses
    it, so it gets no gradient, and DDP (which refuses parameters that take no part) must not
    expect one."""
    for name in ("logvar_fourier", "logvar_linear"):
        head = getattr(net, name, None)
        if head is not None:
            head.requires_grad_(False)
    return net


def target_context(net: nn.Module):
    """For the no-grad target pass of a consistency loss, which runs after the prediction's pass
    (losses.prediction_then_target): EDM2's forced weight normalisation off, so the target sees the
    weights the prediction's pass normalised and leaves the ones its graph saved untouched; None
    for networks without it."""
    from stages.networks import edm2

    if not any(isinstance(m, edm2.MPConv) for m in net.modules()):
        return None
    return lambda: edm2.forced_weight_norm(net, False)


def build_precond(architecture: dict, kind="edm", sigma_data=0.5, sigma_boundary=0.002) -> nn.Module:
    """The network of `architecture` inside the preconditioning of `kind`: 'edm' or 'ecm' (a denoiser
    or a consistency function with boundary `sigma_boundary`, which ECM's eval mode alone reads), or
    'meanflow' (the average velocity u(z, r, t) of a network with two time inputs)."""
    if kind == "meanflow":
        return AverageVelocity(build({**architecture, "dual_time": True}), sigma_data=sigma_data)
    wrapper = PRECONDS.get(architecture.get("kind"), Precond)
    return wrapper(build(architecture), kind, sigma_data, sigma_boundary)
