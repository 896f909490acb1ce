"""What the metrics log and a tracker cost a training run: the digits default's teacher and
post-training (from the teacher's weights), each run three ways on the same inputs, interleaved and
repeated, and timed by the training loop itself (the model file's `train_seconds`):

- off: no metrics log, no tracker (what a stage did before the log existed);
- log: the metrics log at the default interval (tracking.log_every 100), what every run now writes;
- log+tensorboard: the log and TensorBoard, with the post-training's sample grids at its snapshots.

First, the hooks alone (what loop.fit calls of stages/training/metrics.py every step: a part's loss
and two terms of a batch of 128 summed on the device, the step's gradient norm, a line every 100
steps), timed over many calls: a figure that the machine's load barely moves.

Each run is a stage process of its own on `--threads` threads (default 1, the row's `threads.train`),
for `--steps` steps of the row's batch. The tracker's start and the sample grids count: they run
inside the timed loop. On a shared machine run it niced and read the spread of the repeats, not one
number.

    nice -n 10 python bench/metrics_overhead.py --steps 400 --repeats 3 --out bench/metrics-overhead.json
    python bench/metrics_overhead.py --repeats 0      # the hooks alone
"""

import argparse
import copy
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from stages import networks  # noqa: E402
from stages.config import resolve, stage_configs  # noqa: E402
from stages.data import datasets  # noqa: E402
from stages.files import checkpoints  # noqa: E402
from stages.networks.precond import Precond  # noqa: E402

VARIANTS = {"off": None, "log": "none", "log+tensorboard": "tensorboard"}


def teacher_file(config, path):
    """A teacher of the row's network with random weights (post-training only needs its shape)."""
    arch = networks.architecture(config["network"], 1, 8, 0.0)
    torch.manual_seed(0)
    net = Precond(networks.build(arch), "edm", config["sigma_data"], config["sigma_min"])
    checkpoints.save(path, net=net, ema=copy.deepcopy(net), meta={
        "role": "teacher", "key": "bench", "architecture": arch, "precond": "edm", "sigma_data": config["sigma_data"],
        "sigma_min": config["sigma_min"], "sigma_max": config["sigma_max"], "time": "sigma"})
    return path


def stage_runs(config, folder, steps, threads):
    """{stage: (module, arguments without --out/--metrics/--tracking, threads)}."""
    dataset = folder / "data" / "dataset.npz"
    datasets.prepare(config["dataset"], dataset.parent)
    teacher = teacher_file(config, folder / "teacher.safetensors")
    post_cfg = copy.deepcopy(config)
    post_cfg["posttrain"]["steps"] = steps
    teacher_cfg = copy.deepcopy(config)
    teacher_cfg["teacher"]["steps"] = steps
    return {
        "train_teacher": ("stages.train_teacher", ["--config", json.dumps(stage_configs.stage_config(
            "train_teacher", teacher_cfg)), "--dataset", dataset, "--key", "bench"], threads),
        "posttrain": ("stages.posttrain", ["--config", json.dumps(stage_configs.stage_config(
            "posttrain", post_cfg, "teacher")), "--init", "teacher", "--init-model", teacher, "--dataset", dataset,
            "--snapshots", folder / "snaps"], threads),
    }


def hook_seconds(steps=5000, batch=128):
    """Seconds per step of the metrics hooks alone (part, step; a line every 100 steps to a file)."""
    from stages.training import loop, metrics
    from stages.training.kept import Kept

    with tempfile.TemporaryDirectory() as tmp:
        monitor = metrics.Monitor("bench", loop.make_accelerator(), Kept(Path(tmp) / "kept"),
                                  metrics=Path(tmp) / "metrics.jsonl", tracking={"log_every": 100}, batch=batch,
                                  total_steps=steps)
        per_sample = torch.rand(batch)
        terms = {"distance": torch.rand(batch), "weight": torch.rand(batch)}
        loss = per_sample.mean()
        monitor.begin(0, 0.0)
        t0 = time.perf_counter()
        for done in range(1, steps + 1):
            monitor.part(loss, terms)
            monitor.step(done, lr=1e-4, grad_norm=1.0)
        return (time.perf_counter() - t0) / steps


def run_once(module, args, threads, out, log_with):
    extra = [] if log_with is None else [
        "--metrics", out / "metrics.jsonl",
        "--tracking", json.dumps({"log_with": log_with, "log_every": 100, "dir": str(out / "tracking"),
                                  "run": "bench"})]
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": str(threads)}
    result = subprocess.run([sys.executable, "-m", module, *map(str, args), "--out", out / "model.safetensors",
                             *map(str, extra), "--threads", str(threads)], env=env, capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(f"{module} {log_with}: exit {result.returncode}\n{result.stdout[-2000:]}"
                           f"{result.stderr[-2000:]}")
    return checkpoints.read_meta(out / "model.safetensors")["train_seconds"]


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=400)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", default=None, help="write the measurements here as JSON")
    args = p.parse_args()
    config = resolve()
    hooks = hook_seconds()
    print(f"the hooks alone: {1e6 * hooks:.1f} us a step", flush=True)
    seconds = {}
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        runs = stage_runs(config, folder, args.steps, args.threads)
        for repeat in range(args.repeats):
            for stage, (module, stage_args, threads) in runs.items():
                for variant, log_with in VARIANTS.items():
                    out = folder / f"{stage}-{variant}-{repeat}"
                    s = run_once(module, stage_args, threads, out, log_with)
                    seconds.setdefault(stage, {}).setdefault(variant, []).append(s)
                    print(f"{stage:14s} {variant:16s} repeat {repeat}: {s:.2f} s for {args.steps} steps", flush=True)
    summary = {}
    for stage, by_variant in seconds.items():
        base = statistics.median(by_variant["off"])
        print(f"{stage}: a step takes {1e3 * base / args.steps:.1f} ms without logging; the hooks "
              f"{100 * hooks / (base / args.steps):.3f} % of it")
        summary[stage] = {v: {"median_s": statistics.median(t), "all_s": t,
                              "vs_off": statistics.median(t) / base - 1} for v, t in by_variant.items()}
        print(f"{stage}: " + ", ".join(f"{v} {d['median_s']:.2f} s ({100 * d['vs_off']:+.1f} %)"
                                      for v, d in summary[stage].items()))
    if args.out:
        Path(args.out).write_text(json.dumps({
            "what": "digits default: training seconds of --steps steps, median of repeats, by logging variant",
            "steps": args.steps, "repeats": args.repeats, "threads": args.threads, "hook_seconds_per_step": hooks,
            "date": time.strftime("%Y-%m-%d"),
            "machine": {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
                        "torch": torch.__version__, "cuda": torch.cuda.is_available()},
            "stages": summary}, indent=1) + "\n")


if __name__ == "__main__":
    main()
