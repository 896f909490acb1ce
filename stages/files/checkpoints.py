"""Model artifacts: `model.safetensors` (tensors under `net.` and, where it exists, `ema.`) plus
`model.json` (architecture, preconditioning, sigma range, time convention, config, provenance).
No pickles are written; a model loads from these two files alone.
"""

import json
from pathlib import Path

from safetensors.torch import load_file, save_file

from stages import networks
from stages.core import precision
from stages.files import atomic

FORMAT = "cmt-model/1"


def json_path(weights_path):
    return Path(weights_path).with_suffix(".json")


def save(path, *, net=None, ema=None, meta):
    """Write `path` (.safetensors) and its .json atomically. `net`/`ema` are Precond modules."""
    tensors = {}
    for prefix, module in (("net.", net), ("ema.", ema)):
        if module is not None:
            for name, value in module.state_dict().items():
                tensors[prefix + name] = value.detach().to("cpu").contiguous()
    if not tensors:
        raise ValueError("save: nothing to save (no net and no ema)")
    # the TF32 flags of the process that computed the weights (docs/method.md#precision)
    meta = {"format": FORMAT, "tf32": precision.flags(), **meta}
    with atomic.atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata={"format": FORMAT})
    meta["sha256"] = atomic.sha256_file(path)
    atomic.write_json(json_path(path), meta)


def read_meta(path):
    jpath = json_path(path)
    if not jpath.exists():
        raise FileNotFoundError(f"{jpath}: model description missing beside {path}; rerun the rule that made it")
    meta = json.loads(jpath.read_text())
    if meta.get("format") != FORMAT:
        raise ValueError(f"{jpath}: format {meta.get('format')!r}, expected {FORMAT!r}")
    return meta


def boundary(meta):
    """The consistency function's boundary a model file records: `sigma_boundary`; a student's file
    written before the key existed kept it under `sigma_min` (which means the solver grid's end in
    every other file)."""
    return meta.get("sigma_boundary", meta["sigma_min"])


def build(meta, kind=None, dropout=None, sigma_boundary=None):
    """A fresh model as `meta` (a model.json) describes it (networks.build_precond), with random
    weights; optionally another preconditioning `kind`, dropout or boundary (a teacher becomes a
    consistency student with the config's sigma_boundary)."""
    arch = dict(meta["architecture"])
    if dropout is not None:
        arch["dropout"] = dropout
    return networks.build_precond(arch, kind=kind or meta["precond"], sigma_data=meta["sigma_data"],
                                  sigma_boundary=boundary(meta) if sigma_boundary is None else sigma_boundary)


def load_weights(path, which):
    """The state dict stored under `which` ('net' or 'ema') in `path`."""
    tensors = load_file(str(path))
    prefix = which + "."
    state = {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}
    if not state:
        have = sorted({k.split(".", 1)[0] for k in tensors})
        raise KeyError(f"{path}: no '{which}' weights (file holds {have})")
    return state


def check_fits(own, saved, what, where):
    """Refuse `saved` tensors that do not fit the `own` state dict, listing the differing keys."""
    missing = sorted(set(own) - set(saved))
    unexpected = sorted(set(saved) - set(own))
    wrong = sorted(k for k in set(own) & set(saved) if own[k].shape != saved[k].shape)
    if missing or unexpected or wrong:
        lines = [f"{where}: {what} do not fit this model"]
        for title, keys in (("missing", missing), ("unexpected", unexpected), ("wrong shape", wrong)):
            if keys:
                lines.append(f"  {title}: {', '.join(keys[:10])}{' ...' if len(keys) > 10 else ''}")
        raise ValueError("\n".join(lines))


def load_into(module, path, which="ema"):
    """Load weights into `module`, refusing any mismatch with the differing keys listed."""
    state = load_weights(path, which)
    check_fits(module.state_dict(), state, f"the '{which}' weights", path)
    module.load_state_dict(state)
    return module


def load(path, which="ema", kind=None, dropout=None, sigma_boundary=None):
    """Build the model described beside `path` and load its `which` weights; returns (module, meta)."""
    meta = read_meta(path)
    module = build(meta, kind=kind, dropout=dropout, sigma_boundary=sigma_boundary)
    load_into(module, path, which)
    return module, meta
