"""Turn an official EDM training snapshot (.pkl) into our Precond(DDPM++) teacher.

The pickle is read by stages/files/unpickle.py (no embedded code runs). Its `ema` entry must be an
`EDMPrecond` around a `SongUNet` of the DDPM++ configuration (positional embedding, standard
encoder/decoder, [1, 1] resampling, unconditional); the architecture comes from the init kwargs the
persistence records carry (the SongUNet defaults where a kwarg was not passed), and every tensor
must match our DDPM++ of that architecture by name and shape, one to one.
"""

import math

import torch

from stages import networks
from stages.files import unpickle
from stages.networks.precond import Precond

# Defaults of the official SongUNet / EDMPrecond signatures, for kwargs a snapshot did not record.
SONGUNET_DEFAULTS = {"model_channels": 128, "channel_mult": [1, 2, 2, 2], "channel_mult_emb": 4,
                     "num_blocks": 4, "attn_resolutions": [16], "dropout": 0.10, "augment_dim": 0,
                     "label_dim": 0, "embedding_type": "positional", "channel_mult_noise": 1,
                     "encoder_type": "standard", "decoder_type": "standard", "resample_filter": [1, 1]}
# What our DDPM++ implements; anything else in a snapshot is refused rather than approximated.
REQUIRED = {"embedding_type": "positional", "channel_mult_noise": 1, "encoder_type": "standard",
            "decoder_type": "standard", "resample_filter": [1, 1], "label_dim": 0}


def architecture_of(ema, path="<pickle>"):
    """(architecture dict for networks.build, sigma_data) of an EDMPrecond record."""
    if not isinstance(ema, unpickle.PersistentRecord) or ema.class_name != "EDMPrecond":
        found = getattr(ema, "class_name", type(ema).__name__)
        raise ValueError(f"{path}: 'ema' is {found}, expected EDMPrecond (the edm-*-uncond-vp teachers); "
                         "VP/VE/iDDPM-preconditioned baselines are not supported")
    model = (ema.state.get("_modules") or {}).get("model")
    if not isinstance(model, unpickle.PersistentRecord) or model.class_name != "SongUNet":
        found = getattr(model, "class_name", type(model).__name__)
        raise ValueError(f"{path}: the EDMPrecond wraps {found}, expected SongUNet (DDPM++)")
    precond_kw = {k: unpickle.plain(v) for k, v in ema.init_kwargs.items()}
    model_kw = {k: unpickle.plain(v) for k, v in model.init_kwargs.items()}
    kw = {**SONGUNET_DEFAULTS, **precond_kw, **model_kw}
    for key, want in REQUIRED.items():
        if kw[key] != want:
            raise ValueError(f"{path}: SongUNet {key}={kw[key]!r}; only {want!r} (DDPM++, unconditional) "
                             "is implemented by stages/networks/ddpmpp.py")
    if kw.get("use_fp16"):
        print(f"[import_teacher] note: {path} was trained with use_fp16; the import runs it in fp32")
    resolution = kw.get("img_resolution")
    channels_in = kw.get("in_channels", kw.get("img_channels"))
    if resolution is None or channels_in is None:
        raise ValueError(f"{path}: the snapshot records no img_resolution / img_channels")
    architecture = {
        "kind": "ddpmpp", "in_channels": int(channels_in), "resolution": int(resolution),
        "channels": int(kw["model_channels"]), "channel_mult": [int(m) for m in kw["channel_mult"]],
        "num_blocks": int(kw["num_blocks"]), "attn_resolutions": [int(r) for r in kw["attn_resolutions"]],
        "augment_dim": int(kw["augment_dim"]), "channel_mult_emb": int(kw["channel_mult_emb"]),
        "dropout": float(kw["dropout"]),
    }
    return architecture, float(kw.get("sigma_data", 0.5))


def check_network_config(architecture, network_cfg, path):
    """The row's `network` section must describe the same network as the snapshot."""
    wrong = [f"{key}: config {value!r}, snapshot {architecture.get(key)!r}"
             for key, value in network_cfg.items() if architecture.get(key) != value]
    if wrong:
        raise ValueError(f"{path}: the teacher snapshot does not match config `network`:\n  "
                         + "\n  ".join(wrong) + "\nfix the row's network section (or use the right pickle)")


def load_edm_teacher(path):
    """Read `path`; returns (Precond in EDM mode with the EMA weights, architecture, sigma_data, info)."""
    data = unpickle.load(path)
    if not isinstance(data, dict) or "ema" not in data:
        have = sorted(data) if isinstance(data, dict) else type(data).__name__
        raise ValueError(f"{path}: no 'ema' entry (found {have}); not an EDM training snapshot")
    architecture, sigma_data = architecture_of(data["ema"], path)
    tensors = unpickle.state_dict(data["ema"])
    net = Precond(networks.build(architecture), "edm", sigma_data)
    own = net.state_dict()
    missing, unexpected = sorted(set(own) - set(tensors)), sorted(set(tensors) - set(own))
    wrong = sorted(k for k in set(own) & set(tensors) if own[k].shape != tensors[k].shape)
    if missing or unexpected or wrong:
        raise ValueError(f"{path}: tensors do not match DDPM++ {architecture} one to one: "
                         f"missing {missing[:5]}, unexpected {unexpected[:5]}, wrong shape {wrong[:5]}")
    bad = [k for k, t in tensors.items() if t.is_floating_point() and not torch.isfinite(t).all()]
    if bad:
        raise ValueError(f"{path}: non-finite values in {bad[:5]}; the snapshot is damaged")
    net.load_state_dict({k: t.to(own[k].dtype) for k, t in tensors.items()})
    info = {"class": data["ema"].class_name, "module_source_sha256": data["ema"].source_sha256,
            "tensors": len(tensors), "parameters": sum(p.numel() for p in net.parameters())}
    if not math.isclose(sigma_data, 0.5):
        info["note"] = f"sigma_data {sigma_data}"
    return net.eval(), architecture, sigma_data, info
