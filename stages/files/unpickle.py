"""Read the official EDM and EDM2 `persistence` pickles (.pkl) without executing any of their code.

An EDM pickle stores each network object as a call `torch_utils.persistence._reconstruct_persistent_obj
(meta)`, where `meta` holds the *source code of the Python module* that defined the class, the class
name and the object's state (its `__dict__`: `_parameters`, `_buffers`, `_modules`, `_init_kwargs`,
...). Unpickling it the usual way executes that source (and, like any pickle, may call any global).

`RestrictedUnpickler` instead resolves globals from an explicit allow-list only:
- tensor rebuilds (`torch._utils._rebuild_tensor_v2`, `_rebuild_parameter`), whose storages are
  themselves read by `torch.load(weights_only=True)` (torch's own restricted loader);
- plain containers (`collections.OrderedDict`, `set`, `frozenset`) and numpy scalars/arrays of
  non-object dtype (EDM keeps `np.sqrt(0.5)` and the like in its init kwargs);
- the persistence hook and dnnlib's `EasyDict`, `torch.nn` containers (`ModuleDict`, `ModuleList`,
  `Sequential`): these become inert records (`PersistentRecord`, `InertObject`, `InertDict`) that
  keep the data (class name, module source as a string, state) and run nothing.
Any other global is refused with `UnsafePickleError` naming it; nothing after it is evaluated.
EDM2's pickles need nothing more: their top level is an EasyDict, their networks and encoders are
persistence records, the networks' tensors float16, the SD-VAE encoder's scale and bias float32
numpy arrays (checked on pickles written by the official code).
"""

import collections
import hashlib
import io
import pickle

import numpy as np
import torch


class UnsafePickleError(pickle.UnpicklingError):
    pass


class PersistentRecord:
    """An object of a dnnlib/torch_utils persistent class, as data: its module source is kept as a
    string (never executed), its state as unpickled (nested records, tensors, plain values)."""

    def __init__(self, meta):
        if not isinstance(meta, dict) or meta.get("type") != "class":
            raise UnsafePickleError(f"persistent object with unexpected meta {type(meta).__name__} "
                                    f"(type {meta.get('type') if isinstance(meta, dict) else None!r})")
        for key, kind in (("module_src", str), ("class_name", str), ("state", dict)):
            if not isinstance(meta.get(key), kind):
                raise UnsafePickleError(f"persistent object: meta[{key!r}] is not a {kind.__name__}")
        self.version = meta.get("version")
        self.module_src = meta["module_src"]
        self.class_name = meta["class_name"]
        self.state = meta["state"]

    @property
    def init_kwargs(self):
        return dict(self.state.get("_init_kwargs") or {})

    @property
    def source_sha256(self):
        return hashlib.sha256(self.module_src.encode()).hexdigest()

    def __repr__(self):
        return f"PersistentRecord({self.class_name}, source sha256 {self.source_sha256[:12]})"


class InertObject:
    """An object of an allowed plain class (e.g. torch.nn.ModuleDict), kept as its state."""

    qualname = "?"

    def __setstate__(self, state):
        self.state = state

    def __repr__(self):
        return f"InertObject({self.qualname})"


class InertDict(dict):
    """dnnlib.util.EasyDict as a plain dict (its attribute access is not needed to read data)."""

    def __setstate__(self, state):
        if state:
            raise UnsafePickleError(f"EasyDict with unexpected instance state {type(state).__name__}")


def _inert_class(module, name):
    return type(name, (InertObject,), {"qualname": f"{module}.{name}"})


def _load_storage(data):
    if not isinstance(data, (bytes, bytearray)):
        raise UnsafePickleError(f"storage payload is {type(data).__name__}, expected bytes")
    return torch.load(io.BytesIO(bytes(data)), weights_only=True, map_location="cpu")


def _check_tensor_args(name, storage, *rest):
    if not isinstance(storage, (torch.TypedStorage, torch.UntypedStorage)):
        raise UnsafePickleError(f"{name}: storage argument is {type(storage).__name__}")


def _rebuild_tensor_v2(storage, offset, size, stride, requires_grad=False, hooks=None, metadata=None):
    _check_tensor_args("_rebuild_tensor_v2", storage)
    return torch._utils._rebuild_tensor_v2(storage, offset, size, stride, False, collections.OrderedDict())


def _rebuild_tensor(storage, offset, size, stride):
    _check_tensor_args("_rebuild_tensor", storage)
    return torch._utils._rebuild_tensor(storage, offset, size, stride)


def _rebuild_parameter(data, requires_grad=False, hooks=None, state=None):
    """A parameter becomes its plain tensor: we want the numbers, not an autograd leaf."""
    if not isinstance(data, torch.Tensor):
        raise UnsafePickleError(f"_rebuild_parameter: data is {type(data).__name__}")
    if state:
        raise UnsafePickleError("_rebuild_parameter_with_state: parameters with Python state are not expected")
    return data


def _numpy_dtype(*args):
    dtype = np.dtype(*args)
    if dtype.hasobject:
        raise UnsafePickleError("numpy dtype with Python objects refused")
    return dtype


def _numpy_global(name):
    """numpy moved `core` to `_core` in 2.0; both spellings resolve to the installed one."""
    core = getattr(np, "_core", None) or np.core
    return getattr(core.multiarray, name)


def _latin1_bytes(text, encoding="latin1"):
    """Protocol-2 pickles written by Python 3 spell bytes as _codecs.encode(text, 'latin1')."""
    if not isinstance(text, str) or encoding != "latin1":
        raise UnsafePickleError(f"_codecs.encode({type(text).__name__}, {encoding!r}) refused")
    return text.encode("latin1")


def _allowed():
    allow = {
        ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor_v2,
        ("torch._utils", "_rebuild_tensor"): _rebuild_tensor,
        ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
        ("torch._utils", "_rebuild_parameter_with_state"): _rebuild_parameter,
        ("torch.storage", "_load_from_bytes"): _load_storage,
        ("collections", "OrderedDict"): collections.OrderedDict,
        ("builtins", "set"): set,
        ("builtins", "frozenset"): frozenset,
        ("torch_utils.persistence", "_reconstruct_persistent_obj"): PersistentRecord,
        ("dnnlib.util", "EasyDict"): InertDict,
        ("dnnlib", "EasyDict"): InertDict,
        ("numpy", "dtype"): _numpy_dtype,
        ("torch", "device"): torch.device,
        ("_codecs", "encode"): _latin1_bytes,
    }
    for core in ("numpy.core.multiarray", "numpy._core.multiarray"):
        allow[(core, "scalar")] = _numpy_global("scalar")
        allow[(core, "_reconstruct")] = _numpy_global("_reconstruct")
    allow[("numpy", "ndarray")] = np.ndarray
    for container in ("ModuleDict", "ModuleList", "Sequential"):
        allow[("torch.nn.modules.container", container)] = _inert_class("torch.nn.modules.container", container)
    for dtype in ("float16", "bfloat16", "float32", "float64", "int64", "int32", "uint8", "bool"):
        allow[("torch", dtype)] = getattr(torch, dtype)
    return allow


ALLOWED = _allowed()


class RestrictedUnpickler(pickle.Unpickler):
    def __init__(self, file, source, encoding="ASCII"):
        super().__init__(file, encoding=encoding)  # latin1 reads Python 2 pickles (CIFAR-10)
        self.source = source

    def find_class(self, module, name):
        try:
            return ALLOWED[(module, name)]
        except KeyError:
            raise UnsafePickleError(
                f"{self.source}: refused global {module}.{name}: it is not on the allow-list of "
                "stages/files/unpickle.py (tensor rebuilds, plain containers, EDM persistence records). "
                "This file is not an EDM network pickle as expected, or it tries to run code; "
                "check where it came from (its sha256 is in fetch_assets' list)."
            ) from None

    def persistent_load(self, pid):
        raise UnsafePickleError(f"{self.source}: persistent id {pid!r} refused (not an EDM pickle)")


def loads(data: bytes, source="<bytes>", encoding="ASCII"):
    return RestrictedUnpickler(io.BytesIO(data), source, encoding).load()


def load(path):
    with open(path, "rb") as f:
        return RestrictedUnpickler(f, str(path)).load()


def plain(value):
    """Numpy scalars and arrays, tuples and lists from a pickle as JSON-friendly Python values."""
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, (list, tuple)):
        return [plain(v) for v in value]
    if isinstance(value, np.generic):
        return value.item()
    return value


def _module_state(obj, where):
    if isinstance(obj, (PersistentRecord, InertObject)) and isinstance(getattr(obj, "state", None), dict):
        return obj.state
    raise ValueError(f"{where}: expected a network module, found {type(obj).__name__}")


def state_dict(module, prefix=""):
    """The `torch.nn.Module.state_dict()` of an inert module tree: parameters, persistent buffers,
    recursively through `_modules`, named exactly as torch names them."""
    state = _module_state(module, prefix or "<root>")
    out = {}
    skip = set(state.get("_non_persistent_buffers_set") or ())
    for group in ("_parameters", "_buffers"):
        for name, value in (state.get(group) or {}).items():
            if value is None or (group == "_buffers" and name in skip):
                continue
            if not isinstance(value, torch.Tensor):
                raise ValueError(f"{prefix}{name}: {group} entry is {type(value).__name__}, not a tensor")
            out[prefix + name] = value
    for name, child in (state.get("_modules") or {}).items():
        if child is not None:
            out.update(state_dict(child, f"{prefix}{name}."))
    return out
