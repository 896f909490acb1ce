"""stages.launch: how many processes a job gets, which GPUs, and that concurrent local jobs get
distinct devices; one real 2-process run through `accelerate launch` on CPU."""

import argparse
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from stages import launch
from stages.core import cli

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
    """--gpus 2 in a SLURM job with two devices starts two ranks that all-reduce (gloo on CPU here);
    both are told the launcher's start, the job's (stages.core.cli.started)."""
    (tmp_path / "probe.py").write_text(
        "import sys, torch\ntorch.set_num_threads(1)\nfrom accelerate import Accelerator\n"
        "from stages.core import cli\n"
        "a = Accelerator(cpu=not torch.cuda.is_available())\n"
        "s = a.reduce(torch.tensor([a.process_index + 1.0]), 'sum').item()\n"
        "print(f'rank {a.process_index} of {a.num_processes} sum {s} args {sys.argv[1:]}', flush=True)\n"
        "print(f'launched at {cli.launched_at()!r}', flush=True)\n"
        "a.end_training()\n")
    env = {**os.environ, "SLURM_JOB_ID": "1", "CUDA_VISIBLE_DEVICES": "0,1", "OMP_NUM_THREADS": "1",
           "PYTHONPATH": f"{REPO}:{tmp_path}"}
    before = time.time()
    run = subprocess.run([sys.executable, "-m", "stages.launch", "--gpus", "2", "probe", "--x", "1"],
                         cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    after = time.time()
    assert run.returncode == 0, run.stderr[-3000:]
    launched = re.findall(r"launched at ([\d.]+)", run.stdout)
    assert len(launched) == 2 and launched[0] == launched[1] and before <= float(launched[0]) <= after, run.stdout
    # the two ranks share one pipe: their lines may interleave
    lines = sorted(re.findall(r"rank \d of \d sum [\d.]+ args \[[^\]]*\]", run.stdout))
    assert lines == ["rank 0 of 2 sum 3.0 args ['--x', '1']", "rank 1 of 2 sum 3.0 args ['--x', '1']"], run.stdout


def test_a_stage_times_its_job_from_the_launcher_else_from_its_start(monkeypatch):
    args = argparse.Namespace(config={}, threads=1)
    monkeypatch.setenv(cli.STARTED_ENV, "1700000000.25")
    cli.start(args, "test")
    assert cli.started() == 1700000000.25
    monkeypatch.delenv(cli.STARTED_ENV)
    before = time.time()
    cli.start(args, "test")
    assert before <= cli.started() <= time.time()
    monkeypatch.setenv(cli.STARTED_ENV, "yesterday")
    with pytest.raises(ValueError, match="CMT_JOB_STARTED='yesterday': not seconds since the epoch"):
        cli.start(args, "test")


def test_one_process_stages_claim_their_devices_too(tmp_path):
    """trajectory_shard, sample, fid, fid_teacher, fid_reference: one process on the devices the job
    claimed (its first one is the stage's cuda:0), never a device another job holds."""
    env = {"CUDA_VISIBLE_DEVICES": "0,1,2"}
    n1, first, fds1 = launch.plan(2, env, tmp_path, one_process=True)
    n2, second, fds2 = launch.plan(1, env, tmp_path, one_process=True)
    assert (n1, n2, len(fds1), len(fds2)) == (1, 1, 2, 1)
    assert sorted(first.split(",") + [second]) == ["0", "1", "2"]
    # under SLURM the job's allocation stands
    slurm = {"SLURM_JOB_ID": "7", "CUDA_VISIBLE_DEVICES": "4,5"}
    assert launch.plan(2, slurm, tmp_path, one_process=True) == (1, None, [])


PROBE = ("import os, sys, time\n"
         "print('visible', os.environ['CUDA_VISIBLE_DEVICES'], flush=True)\n"
         "time.sleep(float(sys.argv[1]))\n")


def launch_probe(tmp_path, *options, hold=0.0, env=None):
    (tmp_path / "probe.py").write_text(PROBE)
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "0,1", "PYTHONPATH": f"{REPO}:{tmp_path}", **(env or {})}
    env.pop("SLURM_JOB_ID", None)
    return subprocess.Popen([sys.executable, "-m", "stages.launch", "--gpus", "1", "--one-process",
                             "--lock-folder", str(tmp_path / "locks"), *options, "probe", str(hold), "--out", "x.npz"],
                            cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_concurrent_one_process_jobs_run_on_distinct_devices(tmp_path):
    jobs = [launch_probe(tmp_path, hold=3.0) for _ in range(2)]
    outs = [job.communicate(timeout=60) for job in jobs]
    assert [job.returncode for job in jobs] == [0, 0], outs
    seen = sorted(re.search(r"visible (\S+)", out).group(1) for out, _ in outs)
    assert seen == ["0", "1"], outs


def test_a_claim_that_cannot_be_had_stops_after_the_timeout_naming_the_holder(tmp_path):
    held = launch.claim(["0", "1"], 2, tmp_path / "locks",
                        holder="stages.midtrain results/r/midtrain/model.safetensors")
    start = time.monotonic()
    for job in (launch_probe(tmp_path, "--claim-timeout", "1"), launch_probe(tmp_path, env={"CMT_CLAIM_TIMEOUT": "1"})):
        out, err = job.communicate(timeout=60)  # before: it waited forever
        assert job.returncode != 0 and "visible" not in out
        assert "[launch] waiting for 1 free GPU(s) of ['0', '1']" in err
        assert f"GPU 0: pid {os.getpid()} stages.midtrain results/r/midtrain/model.safetensors" in err
        assert "free after 1 s" in err and "--resources gpu=2" in err and "CMT_CLAIM_TIMEOUT" in err
    assert time.monotonic() - start < 30
    for _, fd in held:
        os.close(fd)
    job = launch_probe(tmp_path, "--claim-timeout", "1")  # freed: the claim succeeds at once
    assert job.communicate(timeout=60)[0].startswith("visible ") and job.returncode == 0
