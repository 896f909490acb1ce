"""Read an official EDM2 pickle (the post-hoc EMA reconstructions, `edm2-img64-s-1073741-0.075.pkl`
and the like) into our EDM2Precond, its architecture dict and its encoder's settings.

Layout of these files (EDM2's training loop and reconstruct_phema write them): a dict (dnnlib
EasyDict) with `ema` (a `Precond` persistence record wrapping a `UNet` record, tensors in float16),
`encoder` (a `StandardRGBEncoder` for pixel models or a `StabilityVAEEncoder` for latent ones),
`loss_fn` (`EDM2Loss`) and `dataset_kwargs`. It is read by stages/files/unpickle.py, so none of the
code embedded in it runs. The architecture comes from the init kwargs the records carry (the
official signatures' defaults where a kwarg was not passed); every tensor must fit our EDM2 network
of that architecture by name and shape, one to one. The encoder is kept as data (a dict): its
class, and for the VAE its model name and the latent normalisation (raw_mean/raw_std ->
final_mean/final_std, and the scale and bias these give, as stored).
"""

import math
from typing import NamedTuple

import numpy as np
import torch
from torch import nn

from stages import networks
from stages.files import checkpoints, unpickle
from stages.networks import edm2

# Defaults of the official signatures (Precond, UNet, Block), for kwargs a pickle did not record,
# and the name each has in our architecture dict (None: not part of it).
PRECOND_DEFAULTS = {"use_fp16": True, "sigma_data": 0.5, "logvar_channels": 128}
UNET_DEFAULTS = {"model_channels": 192, "channel_mult": [1, 2, 3, 4], "channel_mult_noise": None,
                 "channel_mult_emb": None, "num_blocks": 3, "attn_resolutions": [16, 8], "label_balance": 0.5,
                 "concat_balance": 0.5}
BLOCK_DEFAULTS = {"resample_filter": [1, 1], "channels_per_head": 64, "dropout": 0.0, "res_balance": 0.3,
                  "attn_balance": 0.3, "clip_act": 256}
INTERFACE = ("img_resolution", "img_channels", "label_dim")
OUR_NAMES = {"img_resolution": "resolution", "img_channels": "in_channels", "model_channels": "channels",
             "use_fp16": None, "sigma_data": None, "resample_filter": None}
# What stages/networks/edm2.py implements; anything else is refused rather than approximated.
REQUIRED = {"resample_filter": [1, 1]}

# The official encoders' settings and their defaults.
ENCODERS = {
    "StandardRGBEncoder": {},  # uint8 pixels x -> x / 127.5 - 1
    "StabilityVAEEncoder": {"vae_name": "stabilityai/sd-vae-ft-mse", "raw_mean": [5.81, 3.25, 0.12, -2.15],
                            "raw_std": [4.17, 4.62, 3.71, 3.28], "final_mean": 0.0, "final_std": 0.5,
                            "batch_size": 8},
}


class EDM2Import(NamedTuple):
    net: nn.Module  # EDM2Precond (EDM preconditioning) with the EMA weights, in eval mode
    architecture: dict  # for networks.build / model.json
    sigma_data: float
    encoder: dict  # the encoder's settings as data
    info: dict  # provenance: record class, module source digest, counts, stored dtype, loss settings


def _record(obj, class_name, what, path):
    if not isinstance(obj, unpickle.PersistentRecord) or obj.class_name != class_name:
        found = getattr(obj, "class_name", type(obj).__name__)
        hint = (" (an EDM1 snapshot: use stages/files/edm_import.py)" if found == "EDMPrecond" else "")
        raise ValueError(f"{path}: {what} is {found}, expected EDM2's {class_name}{hint}")
    if obj.state.get("_init_args"):
        raise ValueError(f"{path}: {what} was built with positional arguments; only keyword ones are read")
    return {k: unpickle.plain(v) for k, v in obj.init_kwargs.items()}


def architecture_of(ema, path="<pickle>"):
    """(architecture dict for networks.build, sigma_data, use_fp16) of an EDM2 Precond record."""
    precond_kw = _record(ema, "Precond", "'ema'", path)
    unet_kw = _record((ema.state.get("_modules") or {}).get("unet"), "UNet", "the Precond's 'unet'", path)
    # Precond passes its kwargs through to the UNet: the two records must agree
    clash = [f"{k}: Precond {precond_kw[k]!r}, UNet {v!r}" for k, v in unet_kw.items()
             if k in precond_kw and precond_kw[k] != v]
    if clash:
        raise ValueError(f"{path}: the Precond and UNet records disagree: {'; '.join(clash)}")
    kw = {**PRECOND_DEFAULTS, **UNET_DEFAULTS, **BLOCK_DEFAULTS, **unet_kw, **precond_kw}
    missing = [k for k in INTERFACE if k not in kw]
    unknown = sorted(set(kw) - set(INTERFACE) - set(PRECOND_DEFAULTS) - set(UNET_DEFAULTS) - set(BLOCK_DEFAULTS))
    if missing or unknown:
        raise ValueError(f"{path}: EDM2 Precond kwargs: missing {missing}, not understood {unknown}")
    for key, want in REQUIRED.items():
        if kw[key] != want:
            raise ValueError(f"{path}: {key}={kw[key]!r}; only {want!r} is implemented by stages/networks/edm2.py")
    architecture = {"kind": "edm2"}
    for key, value in kw.items():
        ours = OUR_NAMES.get(key, key)
        if ours is not None:
            architecture[ours] = value
    for key in ("in_channels", "resolution", "label_dim", "channels", "num_blocks", "channels_per_head",
                "logvar_channels"):
        architecture[key] = int(architecture[key])
    for key in ("dropout", "label_balance", "concat_balance", "res_balance", "attn_balance"):
        architecture[key] = float(architecture[key])
    for key in ("channel_mult", "attn_resolutions"):
        architecture[key] = [int(v) for v in architecture[key]]
    order = list(edm2.preset("edm2-img64-s"))  # the keys in the order presets list them
    assert set(order) == set(architecture), sorted(set(order) ^ set(architecture))
    return {k: architecture[k] for k in order}, float(kw["sigma_data"]), bool(kw["use_fp16"])


def encoder_settings(encoder, path="<pickle>"):
    """The encoder record's settings as a plain dict; for the VAE the stored scale and bias must be
    the ones its raw/final mean and std give (scale = final_std / raw_std, bias = final_mean -
    raw_mean * scale), so the dict describes the normalisation that the model was trained with."""
    name = getattr(encoder, "class_name", None)
    if not isinstance(encoder, unpickle.PersistentRecord) or name not in ENCODERS:
        found = name or type(encoder).__name__
        raise ValueError(f"{path}: 'encoder' is {found}; expected one of EDM2's {sorted(ENCODERS)}")
    kwargs = {k: unpickle.plain(v) for k, v in encoder.init_kwargs.items()}
    unknown = sorted(set(kwargs) - set(ENCODERS[name]))
    if unknown:
        raise ValueError(f"{path}: {name} settings {unknown} are not understood")
    settings = {"class_name": name, **ENCODERS[name], **kwargs}
    if name == "StabilityVAEEncoder":
        state = encoder.state
        channels = len(settings["raw_mean"])
        scale = np.float32(settings["final_std"]) / np.broadcast_to(np.float32(settings["raw_std"]), channels)
        bias = np.float32(settings["final_mean"]) - np.float32(settings["raw_mean"]) * scale
        stored = {"scale": unpickle.plain(state.get("scale")), "bias": unpickle.plain(state.get("bias")),
                  "vae_name": state.get("vae_name"), "batch_size": state.get("batch_size")}
        shapes_ok = all(isinstance(stored[k], list) and len(stored[k]) == channels for k in ("scale", "bias"))
        if (stored["vae_name"] != settings["vae_name"] or stored["batch_size"] != settings["batch_size"]
                or not shapes_ok or not np.allclose(stored["scale"], scale, rtol=1e-6)
                or not np.allclose(stored["bias"], bias, atol=1e-6)):
            raise ValueError(f"{path}: the StabilityVAEEncoder's stored state {stored} does not follow from its "
                             f"settings {settings}; the pickle is inconsistent")
        settings.update(scale=stored["scale"], bias=stored["bias"])
    return settings


def check_encoder(encoder, whitening, path):
    """A pixel row (`whitening` None) takes a pixel model (StandardRGBEncoder); a latent row takes the
    SD-VAE's latent model (StabilityVAEEncoder) trained on latents whitened as the row's `latents`
    section says (raw_mean, raw_std, final_mean, final_std)."""
    name = encoder["class_name"]
    if whitening is None:
        if name != "StandardRGBEncoder":
            raise ValueError(f"{path}: a latent-space model ({name}) for a pixel row; use a pixel (edm2-img64) "
                             "pickle, or give the row a `latents` section (the ImageNet-512 rows)")
        return
    if name != "StabilityVAEEncoder":
        raise ValueError(f"{path}: a pixel-space model ({name}) for a latent row; use a latent (edm2-img512) pickle")
    wrong = [f"{k}: row {whitening[k]}, pickle {encoder[k]}" for k in ("raw_mean", "raw_std", "final_mean", "final_std")
             if not np.allclose(np.float64(whitening[k]), np.float64(encoder[k]), rtol=1e-6, atol=1e-9)]
    if wrong:
        raise ValueError(f"{path}: the pickle's network was trained on latents whitened otherwise than the row's "
                         "`latents` section says:\n  " + "\n  ".join(wrong) + "\nset latents.raw_mean, raw_std, "
                         "final_mean and final_std to the pickle's")


def load_edm2(path):
    """Read `path`; returns EDM2Import(net, architecture, sigma_data, encoder, info)."""
    data = unpickle.load(path)
    if not isinstance(data, dict) or "ema" not in data or "encoder" not in data:
        have = sorted(data) if isinstance(data, dict) else type(data).__name__
        raise ValueError(f"{path}: expected EDM2's dict with 'ema' and 'encoder' (found {have})")
    architecture, sigma_data, use_fp16 = architecture_of(data["ema"], path)
    encoder = encoder_settings(data["encoder"], path)
    tensors = unpickle.state_dict(data["ema"])
    net = networks.build_precond(architecture, "edm", sigma_data)
    own = net.state_dict()
    checkpoints.check_fits(own, tensors, f"the 'ema' tensors (EDM2 {architecture})", path)
    bad = [k for k, t in tensors.items() if t.is_floating_point() and not torch.isfinite(t).all()]
    if bad:
        raise ValueError(f"{path}: non-finite values in {bad[:5]}; the pickle is damaged")
    net.load_state_dict({k: t.to(own[k].dtype) for k, t in tensors.items()})
    dtypes = sorted({str(t.dtype).removeprefix("torch.") for t in tensors.values()})
    info = {"class": data["ema"].class_name, "module_source_sha256": data["ema"].source_sha256,
            "tensors": len(tensors), "parameters": sum(p.numel() for p in net.parameters()),
            "stored_dtypes": dtypes, "use_fp16": use_fp16}
    loss = data.get("loss_fn")
    if isinstance(loss, unpickle.PersistentRecord):
        info["loss_fn"] = {"class": loss.class_name, **{k: unpickle.plain(v) for k, v in loss.state.items()
                                                        if k in ("P_mean", "P_std", "sigma_data")}}
    if not math.isclose(sigma_data, 0.5):
        info["note"] = f"sigma_data {sigma_data}"
    return EDM2Import(net.eval(), architecture, sigma_data, encoder, info)
