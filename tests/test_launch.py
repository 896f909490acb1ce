"""stages.launch: how many processes a job gets, which GPUs, and that concurrent local jobs get
distinct devices; one real 2-process run through `accelerate launch` on CPU."""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from stages import launch

REPO = Path(__file__).resolve().parents[1]


def test_no_gpu_or_one_gpu_runs_plainly(tmp_path):
    assert launch.plan(0, {"CUDA_VISIBLE_DEVICES": "0,1"}, tmp_path)[:2] == (1, None)
    assert launch.plan(2, {"CUDA_VISIBLE_DEVICES": ""}, tmp_path)[:2] == (1, None)
    assert launch.command("stages.sample", ["--x", "1"], 1, 1234) == [sys.executable, "-m", "stages.sample", "--x", "1"]
    multi = launch.command("stages.midtrain", ["--x", "1"], 4, 1234)
    assert multi[multi.index("--num_processes") + 1] == "4" and "--multi_gpu" in multi
    assert multi[multi.index("--num_machines") + 1] == "1" and multi[-3:] == ["stages.midtrain", "--x", "1"]


def test_slurm_job_uses_the_devices_slurm_gave_it(tmp_path):
    n, visible, fds = launch.plan(2, {"SLURM_JOB_ID": "7", "CUDA_VISIBLE_DEVICES": "2,3"}, tmp_path)
    assert (n, visible, fds) == (2, None, [])  # SLURM's CUDA_VISIBLE_DEVICES is kept as it is


def test_concurrent_local_jobs_get_distinct_devices(tmp_path):
    env = {"CUDA_VISIBLE_DEVICES": "0,1,2,3"}
    n1, first, fds1 = launch.plan(2, env, tmp_path)
    n2, second, fds2 = launch.plan(2, env, tmp_path)
    assert n1 == n2 == 2
    assert set(first.split(",")).isdisjoint(second.split(",")), (first, second)
    # all four are held: a third job waits (here: times out) until one ends
    with pytest.raises(TimeoutError):
        launch.claim(["0", "1", "2", "3"], 1, tmp_path, timeout=0.5)
    for fd in fds1:
        os.close(fd)
    assert {d for d, _ in launch.claim(["0", "1", "2", "3"], 2, tmp_path, timeout=0.5)} == set(first.split(","))
    with pytest.raises(SystemExit, match="asks for 5 GPUs"):
        launch.plan(5, env, tmp_path)


def test_two_processes_through_accelerate_launch(tmp_path):
    """--gpus 2 in a SLURM job with two devices starts two ranks that all-reduce (gloo on CPU here)."""
    (tmp_path / "probe.py").write_text(
        "import sys, torch\ntorch.set_num_threads(1)\nfrom accelerate import Accelerator\n"
        "a = Accelerator(cpu=not torch.cuda.is_available())\n"
        "s = a.reduce(torch.tensor([a.process_index + 1.0]), 'sum').item()\n"
        "print(f'rank {a.process_index} of {a.num_processes} sum {s} args {sys.argv[1:]}', flush=True)\n"
        "a.end_training()\n")
    env = {**os.environ, "SLURM_JOB_ID": "1", "CUDA_VISIBLE_DEVICES": "0,1", "OMP_NUM_THREADS": "1",
           "PYTHONPATH": f"{REPO}:{tmp_path}"}
    run = subprocess.run([sys.executable, "-m", "stages.launch", "--gpus", "2", "probe", "--x", "1"],
                         cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr[-3000:]
    # the two ranks share one pipe: their lines may interleave
    lines = sorted(re.findall(r"rank \d of \d sum [\d.]+ args \[[^\]]*\]", run.stdout))
    assert lines == ["rank 0 of 2 sum 3.0 args ['--x', '1']", "rank 1 of 2 sum 3.0 args ['--x', '1']"], run.stdout
