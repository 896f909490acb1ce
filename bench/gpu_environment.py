"""The machine a GPU session ran on, for its summary and for bench/RESULTS.md: the card(s) as nvidia-smi
shows them, Python, torch with its CUDA and cuDNN, the versions of the packages the pipeline imports,
CPU cores and memory. Prints it and writes it as JSON.

    python bench/gpu_environment.py --out environment.json
"""

import argparse
import importlib.metadata
import json
import os
import platform
import subprocess
import sys
from pathlib import Path

PACKAGES = ["torch", "torchvision", "numpy", "scipy", "snakemake", "webdataset", "diffusers", "huggingface-hub",
            "kornia", "lpips", "clean-fid", "jsonschema", "accelerate", "timm", "safetensors", "pulp"]


def command(*argv):
    try:
        return subprocess.run(argv, capture_output=True, text=True, timeout=30).stdout.strip()
    except (OSError, subprocess.TimeoutExpired) as e:
        return f"({argv[0]}: {e})"


def environment():
    env = {"python": sys.version.split()[0], "executable": sys.executable, "platform": platform.platform(),
           "cpus": os.cpu_count()}
    try:
        pages = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        env["memory_gib"] = round(pages / 2**30, 1)
    except (ValueError, OSError):
        pass
    env["nvidia_smi_L"] = command("nvidia-smi", "-L")
    env["nvidia_smi"] = command("nvidia-smi", "--query-gpu=name,memory.total,driver_version,clocks.max.sm,"
                                "power.limit", "--format=csv")
    env["packages"] = {}
    for name in PACKAGES:
        try:
            env["packages"][name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            env["packages"][name] = None
    try:
        import torch
    except Exception as e:  # noqa: BLE001 - the record says what broke instead of stopping
        env["error"] = f"torch does not import: {type(e).__name__}: {e}"
        return env
    env["torch_cuda"] = torch.version.cuda
    env["cuda_available"] = torch.cuda.is_available()
    env["device"] = f"CPU ({platform.processor() or platform.machine()}), torch {torch.__version__}"
    if env["cuda_available"]:
        try:
            props = torch.cuda.get_device_properties(0)
            env["device_count"] = torch.cuda.device_count()
            env["cudnn"] = torch.backends.cudnn.version()
            env["device"] = (f"{props.name}, {props.total_memory / 2**30:.0f} GiB, capability "
                             f"{props.major}.{props.minor}, torch {torch.__version__}, CUDA {torch.version.cuda}, "
                             f"cuDNN {env['cudnn']}")
        except Exception as e:  # noqa: BLE001
            env["error"] = f"torch sees a CUDA device but cannot read it: {type(e).__name__}: {e}"
    return env


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, required=True)
    a = p.parse_args(argv)
    env = environment()
    a.out.write_text(json.dumps(env, indent=1) + "\n")
    # the short form here (the log's first error line must be the real one), all of it in the file
    print(f"{env.get('device', 'no torch')}; Python {env['python']}, {env['cpus']} CPUs, {env.get('memory_gib')} GiB")
    print(env["nvidia_smi"])
    print("packages: " + ", ".join(f"{k} {v}" for k, v in env["packages"].items()))
    if "error" in env:
        sys.exit(env["error"])

if __name__ == "__main__":
    main()
