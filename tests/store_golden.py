"""Small golden outputs of the stages that make store items, for tests/test_store_golden.py and its
recorder (tests/golden/record_store_items.py): each kind of item (CODE_VERSION's kinds in
stages/config/store_keys.py) made by its stage from a tiny config (the tiny row with a teacher of 6
steps and shards of 4 trajectories of 4 steps; the ImageNet-512 smoke row's tiny random VAE), its
files summed up as numbers and structure, and its store key.

A summary keeps what an item holds, not its bytes: arrays as dtype, shape, their first values, mean,
std, mean absolute value and the mean of each leading slice; JSON files as parsed, without the sha256
of other files and the paths of this run's folders (a folder name is no part of what an item holds);
WebDataset shards sample by sample, member by member. Two summaries compare within a tolerance: the
last bits of a float differ between machines, thread counts and library builds.
"""

import io
import json
import math
import runpy
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.numpy import load_file
from stagekit import run_in_process

from stages.config import resolve, stage_configs, store_keys
from stages.files import checkpoints

REPO = Path(__file__).resolve().parents[1]
KINDS = ("dataset", "teacher", "trajectories", "latents")
HEAD = 8  # first values kept of each array
SLICES = 16  # leading slices summed up
# (rtol, atol) of the numbers in a summary: uint8 images; a teacher after 6 Adam steps in float32; fp16
# trajectory states solved by that teacher; float32 latents of a random VAE
TOLERANCE = {"dataset": (0.0, 1e-6), "teacher": (1e-3, 1e-5), "trajectories": (1e-2, 2e-3), "latents": (1e-3, 1e-5)}


def pixel_config():
    """The tiny row with a teacher of 6 steps at its full learning rate (no warm-up: its weights move
    well beyond the tolerance) and shards of 4 trajectories of 4 steps."""
    return resolve([REPO / "tests" / "tiny.yaml"], command_line={
        "teacher": {"steps": 6, "optimizer": {"warmup_steps": 0}},
        "trajectories": {"nfe": 4, "per_shard": 4, "batch": 4, "num_shards": 4}})


def latent_config():
    rows = REPO / "config" / "rows"
    return resolve([rows / "imagenet512-cmt-ect.yaml", rows / "smoke" / "imagenet512.yaml"])


# ---- summaries -----------------------------------------------------------------------------------

def array_summary(a, head=HEAD, slices=True):
    """dtype, shape, the first values, mean and mean absolute value; and those of each leading slice
    (a trajectory's states one by one: the first is the start noise, the others the teacher's doing)."""
    a = np.asarray(a)
    flat = a.astype(np.float64).ravel()
    out = {"dtype": str(a.dtype), "shape": list(a.shape)}
    if flat.size <= head:
        return {**out, "values": flat.tolist()}
    out.update(mean=float(flat.mean()), abs_mean=float(np.abs(flat).mean()))
    if head:
        out["head"] = flat[:head].tolist()
    if slices and a.ndim > 1 and a.shape[0] > 1:
        out["slices"] = [{"head": s.ravel()[:4].tolist(), "mean": float(s.mean()), "abs_mean": float(np.abs(s).mean())}
                         for s in a[:SLICES].astype(np.float64)]
    return out


def json_summary(obj, folders):
    """`obj` without the sha256 of files (their content is summed up on its own), how long a job took
    and what it ran on (a job record's device, processes, GPUs, nodes: the machine, not the item),
    and with this run's folders named by their role."""
    if isinstance(obj, dict):
        if "jobs" in obj and isinstance(obj["jobs"], list):
            obj = {**obj, "jobs": [{k: r[k] for k in ("steps", "ended") if k in r} for r in obj["jobs"]]}
        return {k: json_summary(v, folders) for k, v in obj.items() if k != "sha256" and not k.endswith("seconds")}
    if isinstance(obj, list):
        return [json_summary(v, folders) for v in obj]
    if isinstance(obj, str):
        for folder, role in folders.items():
            obj = obj.replace(folder, role)
    return obj


def file_summary(path, folders):
    path = Path(path)
    if path.suffix == ".json":
        return json_summary(json.loads(path.read_text()), folders)
    if path.suffix == ".npz":
        with np.load(path) as arrays:
            return {name: array_summary(arrays[name]) for name in sorted(arrays.files)}
    if path.suffix == ".safetensors":
        # a network's weights tensor by tensor (what the network does: the teacher's probe)
        return {name: array_summary(t, head=0, slices=False) for name, t in sorted(load_file(str(path)).items())}
    if path.suffix == ".tar":
        samples = {}
        with tarfile.open(path) as tar:
            for member in tar.getmembers():
                key, _, field = member.name.partition(".")
                data = tar.extractfile(member).read()
                samples.setdefault(key, {})[field] = (
                    array_summary(np.load(io.BytesIO(data))) if field.endswith("npy")
                    else json_summary(json.loads(data), folders) if field.endswith("json") else len(data))
        return samples
    raise ValueError(f"{path}: no summary for {path.suffix} files")


def item_summary(files, folders):
    return {Path(f).name: file_summary(f, folders) for f in files}


def denoiser_probe(model_file):
    """The teacher's denoiser D(x; sigma), EMA and raw weights, on fixed inputs at three noise levels:
    what it does, beyond its weights' statistics."""
    x = torch.randn(2, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    out = {}
    for which in ("ema", "net"):
        net = checkpoints.load(model_file, which=which)[0].eval()
        with torch.no_grad():
            out[which] = array_summary(torch.stack([net(x * s, torch.full((2,), s)) for s in (0.05, 1.0, 20.0)]))
    return out


# ---- making the items ----------------------------------------------------------------------------

def run_script(module, args):
    """A stage that takes no --threads (run_in_process gives it one), in this process."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(sys, "argv", [module, *map(str, args)])
        runpy.run_module(module, run_name="__main__")


def make(folder):
    """{kind: {"key", "code_version", "items": {item: summary}}} of items made under `folder` now."""
    folder = Path(folder)
    folders = {str(folder): "<folder>"}
    cfg = pixel_config()
    data = folder / "dataset"
    run_script("stages.prepare_dataset", ["--config", stage_configs.as_arg(
        stage_configs.stage_config("prepare_dataset", cfg, None)), "--out", data])
    teacher = folder / "teacher" / "model.safetensors"
    run_in_process("stages.train_teacher", [
        "--config", stage_configs.as_arg(stage_configs.stage_config("train_teacher", cfg, None)),
        "--dataset", data / "dataset.npz", "--key", store_keys.teacher(cfg).key, "--out", teacher])
    spec = folder / "trajectories" / "spec.json"
    shard_cfg = stage_configs.as_arg(stage_configs.stage_config("trajectory_shard", cfg, None))
    run_script("stages.trajectory_spec", ["--config", stage_configs.as_arg(
        stage_configs.stage_config("trajectory_spec", cfg, None)), "--out", spec])
    shard = folder / "trajectories" / "shard-000001.tar"
    run_in_process("stages.trajectory_shard", ["--config", shard_cfg, "--teacher", teacher, "--dataset",
                                               data / "dataset.npz", "--shard", 1, "--out", shard])
    lat = latent_config()
    latent_shard = folder / "latents" / "shard-000001.tar"
    run_in_process("stages.encode_dataset", ["--config", stage_configs.as_arg(
        stage_configs.stage_config("encode_dataset", lat, None)), "--vae-batch", 2, "--shard", 1,
        "--out", latent_shard])
    made = {
        "dataset": (store_keys.dataset(cfg), {"dataset": [data / "dataset.npz", data / "manifest.json"]}),
        "teacher": (store_keys.teacher(cfg), {"teacher": [teacher, teacher.with_suffix(".json")]}),
        "trajectories": (store_keys.trajectories(cfg), {"spec": [spec], "shard 1": [shard]}),
        "latents": (store_keys.latents(lat), {"shard 1": [latent_shard],
                                              "spec": [latent_shard.with_name("spec.json")]}),
    }
    out = {kind: {"key": item.key, "code_version": store_keys.CODE_VERSION[kind],
                  "items": {name: item_summary(files, folders) for name, files in items.items()}}
           for kind, (item, items) in made.items()}
    out["teacher"]["probe"] = denoiser_probe(teacher)
    return out


# ---- comparing -----------------------------------------------------------------------------------

def differences(golden, now, rtol, atol, where=""):
    """Where the summary `now` departs from `golden`: numbers beyond the tolerance, anything else unequal."""
    if isinstance(golden, dict) and isinstance(now, dict):
        if golden.keys() != now.keys():
            return [f"{where or '/'}: fields {sorted(golden)} in the golden, {sorted(now)} now"]
        return [d for k in golden for d in differences(golden[k], now[k], rtol, atol, f"{where}/{k}")]
    if isinstance(golden, list) and isinstance(now, list):
        if len(golden) != len(now):
            return [f"{where}: {len(golden)} entries in the golden, {len(now)} now"]
        return [d for i, (g, n) in enumerate(zip(golden, now, strict=True))
                for d in differences(g, n, rtol, atol, f"{where}[{i}]")]
    numbers = (int, float)
    if (isinstance(golden, numbers) and isinstance(now, numbers) and not isinstance(golden, bool)
            and not isinstance(now, bool)):
        if math.isclose(now, golden, rel_tol=rtol, abs_tol=atol):
            return []
        return [f"{where}: {golden!r} in the golden, {now!r} now"]
    return [] if golden == now else [f"{where}: {golden!r} in the golden, {now!r} now"]
