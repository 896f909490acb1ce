"""The environment that made a store item (torch, CUDA, GPU model, python, host), which its record
keeps as provenance beside who made it and when. It is no part of any store key: another GPU model
or torch build changes the last bits of what a stage writes, not what the item is.

Two sides, as the store runs a stage as a subprocess (stages/files/store.py):

- the store wrapper knows the host and the installed packages without importing torch (`host`);
- the stage knows its device: `cli.start` calls `leave_for_store`, and when the wrapper asked for it
  (the CMT_STORE_ENV variable names a sidecar file) the stage's first process writes its torch, CUDA
  and cuDNN versions and the names of the GPUs it used there when it exits. The wrapper folds the
  sidecar over its own view into the record (`of_job`) and removes it.

Only the standard library at import: the store wrapper imports this.
"""

import atexit
import importlib.metadata
import json
import os
import platform
import socket
import sys
from pathlib import Path

SIDECAR_ENV = "CMT_STORE_ENV"


def host():
    """What the store wrapper can say without importing torch."""
    env = {"python": platform.python_version(), "hostname": socket.gethostname(), "platform": platform.platform()}
    try:
        env["torch"] = importlib.metadata.version("torch")
    except importlib.metadata.PackageNotFoundError:
        pass
    if os.environ.get("SLURM_JOB_ID"):
        env["slurm_job"] = os.environ["SLURM_JOB_ID"]
    return env


def of_stage():
    """What the stage process knows at its end: the torch build and the device it computed on
    (the GPUs only if it initialised CUDA: a CPU stage on a GPU node ran on the CPU). A stage that
    never imported torch computed on the CPU."""
    torch = sys.modules.get("torch")
    if torch is None:
        return {"device": "cpu"}
    env = {"torch": torch.__version__, "cuda": torch.version.cuda, "device": "cpu"}
    if torch.backends.cudnn.is_available():
        env["cudnn"] = torch.backends.cudnn.version()
    if torch.cuda.is_initialized():
        env["device"] = "cuda"
        env["gpus"] = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    return env


def write_sidecar(path):
    Path(path).write_text(json.dumps(of_stage(), sort_keys=True) + "\n")


def leave_for_store():
    """When the store wrapper runs this stage, write the sidecar as the process exits (by then it
    knows whether it used a GPU). In a multi-process stage the first rank speaks for all."""
    path = os.environ.get(SIDECAR_ENV)
    if path and int(os.environ.get("RANK", "0")) == 0:
        atexit.register(write_sidecar, path)


def of_job(sidecar):
    """The record's environment: the wrapper's view with the stage's sidecar over it, if it left one
    (stages that never call cli.start, and stages killed before their end, leave none)."""
    env = host()
    try:
        env.update(json.loads(Path(sidecar).read_text()))
    except (FileNotFoundError, json.JSONDecodeError):
        pass
    return env
