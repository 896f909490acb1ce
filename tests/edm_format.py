"""Write pickles in the layout of NVlabs EDM's and EDM2's `torch_utils.persistence` without the
official code.

Each module of a network becomes a call `torch_utils.persistence._reconstruct_persistent_obj(meta)`
with meta = {type: 'class', version: 6, module_src, class_name, state: the module's __dict__ (with
`_init_args`/`_init_kwargs`)}; torch.nn containers stay plain torch.nn classes; the top level is
the dict EDM's training loop writes (ema, loss_fn, augment_pipe, dataset_kwargs), or EDM2's
EasyDict (encoder, dataset_kwargs, loss_fn, ema) with the network in float16.

The stand-in `torch_utils.persistence` and `dnnlib.util` modules exist only while a pickle is
written (pickle looks globals up by name). Their functions, and the embedded module source, write a
marker file if anything ever executes them: tests assert that the marker never appears.
"""

import collections
import contextlib
import copy
import os
import pickle
import sys
import types
from pathlib import Path

import numpy as np
import torch
from torch import nn

CONTAINERS = (nn.ModuleDict, nn.ModuleList, nn.Sequential)


def marker_source(marker):
    return f"import pathlib\npathlib.Path({str(marker)!r}).write_text('module source executed')\n"


@contextlib.contextmanager
def stand_in_modules(marker):
    def _reconstruct_persistent_obj(meta):
        Path(marker).write_text("persistence hook called")

    _reconstruct_persistent_obj.__module__ = "torch_utils.persistence"
    _reconstruct_persistent_obj.__qualname__ = "_reconstruct_persistent_obj"

    class EasyDict(dict):
        def __getattr__(self, name):
            Path(marker).write_text("EasyDict code ran")
            return self[name]

    EasyDict.__module__, EasyDict.__qualname__ = "dnnlib.util", "EasyDict"
    torch_utils, persistence = types.ModuleType("torch_utils"), types.ModuleType("torch_utils.persistence")
    dnnlib, util = types.ModuleType("dnnlib"), types.ModuleType("dnnlib.util")
    persistence._reconstruct_persistent_obj = _reconstruct_persistent_obj
    torch_utils.persistence = persistence
    util.EasyDict = EasyDict
    dnnlib.util = util
    added = {"torch_utils": torch_utils, "torch_utils.persistence": persistence, "dnnlib": dnnlib,
             "dnnlib.util": util}
    clash = [name for name in added if name in sys.modules]
    assert not clash, f"modules already imported: {clash}"
    sys.modules.update(added)
    try:
        yield _reconstruct_persistent_obj, EasyDict
    finally:
        for name in added:
            sys.modules.pop(name, None)


class Persistent:
    def __init__(self, hook, class_name, source, state):
        self.hook, self.class_name, self.source, self.state = hook, class_name, source, state

    def __reduce__(self):
        meta = {"type": "class", "version": 6, "module_src": self.source, "class_name": self.class_name,
                "state": self.state}
        return self.hook, (meta,)


def as_persistent(module, hook, source, class_names=None, init_kwargs=None, path=""):
    """Our module tree in the persistence layout (class names optionally renamed; `init_kwargs`
    maps a module path, "" for the root, to the init kwargs recorded with it)."""
    children = collections.OrderedDict(
        (name, None if child is None else
         as_persistent(child, hook, source, class_names, init_kwargs, f"{path}.{name}".lstrip(".")))
        for name, child in module._modules.items())
    if isinstance(module, CONTAINERS):
        clone = module.__class__.__new__(module.__class__)
        clone.__dict__.update(module.__dict__)
        clone.__dict__["_modules"] = children
        return clone
    state = dict(module.__dict__)
    state["_modules"] = children
    state["_init_args"] = ()
    state["_init_kwargs"] = dict((init_kwargs or {}).get(path, {}))
    name = type(module).__name__
    return Persistent(hook, (class_names or {}).get(name, name), source, state)


OFFICIAL_NAMES = {"Precond": "EDMPrecond", "DDPMpp": "SongUNet", "NoiseEmbedding": "PositionalEmbedding"}


def write_edm_pickle(path, ema, marker, init_kwargs, class_names=OFFICIAL_NAMES, extra=None):
    """Write `path` as EDM's training loop does: dict(ema=..., loss_fn=..., augment_pipe=...,
    dataset_kwargs=...), each network a persistence record."""
    with stand_in_modules(marker) as (hook, EasyDict):
        source = marker_source(marker)
        data = {
            "ema": as_persistent(ema, hook, source, class_names, init_kwargs),
            "loss_fn": Persistent(hook, "EDMLoss", source, {"P_mean": -1.2, "P_std": 1.2, "sigma_data": 0.5,
                                                            "_init_args": (), "_init_kwargs": {}}),
            "augment_pipe": None,
            "dataset_kwargs": EasyDict(class_name="loop.dataset.ImageFolderDataset", path="x.zip",
                                       use_labels=False, xflip=False, cache=True, resolution=32,
                                       max_size=50000),
            **(extra or {}),
        }
        Path(path).write_bytes(pickle.dumps(data))
    return data


def tensors_of(module):
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def randomize(module, seed, std=0.2):
    """Every parameter random (zero-initialised output layers would hide mistakes)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * std)
    return module


def official_kwargs(arch, **override):
    """The init kwargs EDM's train.py records for --arch=ddpmpp --precond=edm (numpy scalars too)."""
    precond = {"img_resolution": arch["resolution"], "img_channels": arch["in_channels"], "label_dim": 0,
               "use_fp16": False, "sigma_min": 0, "sigma_max": float("inf"), "sigma_data": np.float64(0.5),
               "model_type": "SongUNet", "embedding_type": "positional", "encoder_type": "standard",
               "decoder_type": "standard", "channel_mult_noise": 1, "resample_filter": [1, 1],
               "model_channels": arch["channels"], "channel_mult": arch["channel_mult"],
               "augment_dim": arch["augment_dim"], "dropout": arch["dropout"]}
    model = {k: v for k, v in precond.items() if k not in ("img_channels", "use_fp16", "sigma_min", "sigma_max",
                                                           "sigma_data", "model_type")}
    model.update(in_channels=arch["in_channels"], out_channels=arch["in_channels"],
                 num_blocks=arch["num_blocks"], attn_resolutions=arch["attn_resolutions"])
    precond.update(num_blocks=arch["num_blocks"], attn_resolutions=arch["attn_resolutions"])
    for key, value in override.items():
        precond[key] = model[key] = value
    return {"": precond, "model": model}


# ---- EDM2 ----------------------------------------------------------------------------------------

EDM2_NAMES = {"EDM2Precond": "Precond", "EDM2UNet": "UNet", "Block": "Block", "MPConv": "MPConv",
              "MPFourier": "MPFourier"}


def edm2_encoder_state(kind):
    """The state EDM2's encoders pickle: nothing for pixels; for the SD-VAE its name, batch size and
    the latent normalisation as float32 numpy arrays (scale = final_std / raw_std, bias = final_mean -
    raw_mean * scale, with the default raw statistics), the VAE itself dropped (None)."""
    if kind == "rgb":
        return "StandardRGBEncoder", {"_init_args": (), "_init_kwargs": {}}
    scale = np.float32(0.5) / np.float32([4.17, 4.62, 3.71, 3.28])
    bias = np.float32(0) - np.float32([5.81, 3.25, 0.12, -2.15]) * scale
    return "StabilityVAEEncoder", {"vae_name": "stabilityai/sd-vae-ft-mse", "scale": scale, "bias": bias,
                                   "batch_size": 8, "_vae": None, "_init_args": (), "_init_kwargs": {}}


def edm2_kwargs(arch, **extra):
    """The init kwargs EDM2's train_edm2.py records on the Precond and the UNet: the dataset's
    interface and the preset's width and dropout (plus `extra`, settings passed explicitly)."""
    kw = {"img_resolution": arch["resolution"], "img_channels": arch["in_channels"],
          "label_dim": arch["label_dim"], "model_channels": arch["channels"], "dropout": arch["dropout"], **extra}
    return {"": dict(kw), "unet": dict(kw)}


def write_edm2_pickle(path, ema, marker, init_kwargs, encoder="vae", encoder_state=None, class_names=EDM2_NAMES):
    """Write `path` as EDM2's training loop / reconstruct_phema do: EasyDict(encoder, dataset_kwargs,
    loss_fn, ema), the network in float16, each module and the encoder a persistence record."""
    ema = copy.deepcopy(ema).eval().requires_grad_(False).to(torch.float16)
    with stand_in_modules(marker) as (hook, EasyDict):
        source = marker_source(marker)
        name, state = edm2_encoder_state(encoder)
        data = EasyDict(
            encoder=Persistent(hook, name, source, encoder_state or state),
            dataset_kwargs=EasyDict(class_name="training.dataset.ImageFolderDataset", path="img64.zip",
                                    use_labels=True),
            loss_fn=Persistent(hook, "EDM2Loss", source, {"P_mean": -0.8, "P_std": 1.6, "sigma_data": 0.5,
                                                          "_init_args": (), "_init_kwargs": {}}),
            ema=as_persistent(ema, hook, source, class_names, init_kwargs))
        Path(path).write_bytes(pickle.dumps(data))
    return data


class RunsShell:
    """A pickle payload that runs a shell command (touching `marker`) when unpickled: what a
    tampered snapshot could hold. The readers must refuse it unrun."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)
