"""stages.launch: how many processes a job gets, which GPUs, and that concurrent local jobs get
distinct devices; one real 2-process run through `accelerate launch` on CPU; a job on several nodes:
the srun step, the meeting of the nodes, and (heavy) a 2-node SLURM job's chain through a fake srun."""

import argparse
import os
import re
import subprocess
import sys
import threading
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


@pytest.mark.heavy
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


# ---- several nodes ---------------------------------------------------------------------------

def test_a_job_on_several_nodes_launches_every_node_s_share_of_the_processes():
    argv = launch.command("stages.posttrain", ["--x", "1"], 4, 29555, nodes=3, node_rank=2, main_address="gpu007")
    value = {k: argv[argv.index(k) + 1] for k in ("--num_processes", "--num_machines", "--machine_rank",
                                                   "--main_process_ip", "--main_process_port")}
    assert value == {"--num_processes": "12", "--num_machines": "3", "--machine_rank": "2",
                     "--main_process_ip": "gpu007", "--main_process_port": "29555"}
    # one process per node still goes through the multi-machine launch; one node keeps no address
    one = launch.command("stages.posttrain", [], 1, 29555, nodes=2, node_rank=0, main_address="h")
    assert one[one.index("--num_processes") + 1] == "2" and "accelerate.commands.launch" in one
    assert "--main_process_ip" not in launch.command("stages.posttrain", [], 2, 29555)


def test_in_a_slurm_job_the_command_runs_one_launcher_per_node(monkeypatch, tmp_path):
    (tmp_path / "srun").write_text("#!/bin/sh\n")
    (tmp_path / "srun").chmod(0o755)
    monkeypatch.setenv("PATH", f"{tmp_path}:{os.environ['PATH']}")
    step = launch.slurm_step(4, ["python", "-m", "stages.launch", "--slurm-task", "--gpus", "8", "--nodes", "4"])
    assert step[:6] == [str(tmp_path / "srun"), "--nodes=4", "--ntasks=4", "--ntasks-per-node=1",
                        "--kill-on-bad-exit=1", "--overlap"]
    assert step[step.index("python"):] == ["python", "-m", "stages.launch", "--slurm-task", "--gpus", "8",
                                           "--nodes", "4"]
    monkeypatch.setenv("PATH", str(tmp_path / "none"))
    with pytest.raises(SystemExit, match="--nodes 4 in SLURM job but no srun on PATH"):
        launch.slurm_step(4, ["python"])


def slurm_task_env(node, state_job=7, step=0, nodes=2):
    return {"SLURM_JOB_ID": str(state_job), "SLURM_STEP_ID": str(step), "SLURM_NODEID": str(node),
            "SLURM_STEP_NUM_NODES": str(nodes), "SLURMD_NODENAME": f"gpu{node + 1:03d}",
            "SLURM_STEP_NODELIST": "gpu[001-002]"}


def test_node_0_tells_the_others_its_address_and_a_free_port_through_the_state_folder(tmp_path):
    """Node 0 names itself (its SLURM node name) and picks a free port; node 1 waits for the file of
    the job step in the state folder; another job step (another job on the same nodes, or the next
    attempt) has a file of its own."""
    args = ["--config", "{}", "--state-dir", str(tmp_path / "state"), "--out", str(tmp_path / "m.safetensors")]
    got = {}
    waiting = threading.Thread(target=lambda: got.update(one=launch.slurm_place(args, slurm_task_env(1), 2)))
    waiting.start()
    time.sleep(0.3)  # node 1 is waiting before node 0 writes
    rank, address, port = launch.slurm_place(args, slurm_task_env(0), 2)
    waiting.join(timeout=10)
    assert (rank, address) == (0, "gpu001") and 1024 < port < 65536
    assert got["one"] == (1, "gpu001", port)
    assert (tmp_path / "state" / ".launch-7.0").read_text() == f"gpu001 {port}\n"
    other = launch.slurm_place(args, {**slurm_task_env(0, state_job=8), "CMT_MAIN_ADDRESS": "10.0.0.1",
                                      "CMT_MAIN_PORT": "29999"}, 2)
    assert other == (0, "10.0.0.1", 29999) and (tmp_path / "state" / ".launch-8.0").exists()
    # without a state folder: beside the model
    assert launch.rendezvous_file(["--out", "r/m.safetensors"], slurm_task_env(1)) == Path("r/.launch-7.0")
    with pytest.raises(SystemExit, match="node 0 of this job step wrote no address and port into .*within 0.5 s"):
        launch.meet(tmp_path / "nobody", False, timeout=0.5)
    with pytest.raises(SystemExit, match="--nodes 3, but this job step runs on 2 nodes"):
        launch.slurm_place(args, slurm_task_env(0), 3)


def test_outside_slurm_each_machine_is_told_its_rank_and_the_main_address():
    def place(*argv, env=None):
        a = argparse.Namespace(node_rank=None, main_address=None, main_port=None)
        for k, v in zip(argv[::2], argv[1::2], strict=True):
            setattr(a, k, v)
        return launch.given_place(a, env or {}, 2)

    assert place("node_rank", 1, "main_address", "ws1") == (1, "ws1", 29500)
    assert place(env={"CMT_NODE_RANK": "0", "CMT_MAIN_ADDRESS": "ws1", "CMT_MAIN_PORT": "1234"}) == (0, "ws1", 1234)
    with pytest.raises(SystemExit, match="--nodes 2 outside a SLURM job: start one launcher on each machine"):
        place("node_rank", 0)
    with pytest.raises(SystemExit, match="node rank 2 of --nodes 2: give 0 to 1"):
        place("node_rank", 2, "main_address", "ws1")


def test_options_a_job_on_several_nodes_cannot_take_are_refused(tmp_path, capsys):
    for argv, message in ((["--nodes", "2", "--one-process", "--gpus", "1", "probe"], "--one-process with --nodes 2"),
                          (["--nodes", "0", "probe"], "--nodes 0: at least 1")):
        with pytest.raises(SystemExit):
            launch.main(argv)
        assert message in capsys.readouterr().err


FAKE_SRUN = '''#!/usr/bin/env python3
"""srun for tests: records its arguments and runs the command once per node, as SLURM would."""
import os, subprocess, sys
args = sys.argv[1:]
with open(os.environ["SRUN_RECORD"], "w") as f:
    f.write("\\n".join(args))
nodes = int(next(a for a in args if a.startswith("--nodes=")).split("=")[1])
cmd = args[next(i for i, a in enumerate(args) if not a.startswith("--")):]
procs = [subprocess.Popen(cmd, env={**os.environ, "SLURM_NODEID": str(i), "SLURM_STEP_NUM_NODES": str(nodes),
                                    "SLURM_STEP_ID": "0", "SLURMD_NODENAME": "localhost"})
         for i in range(nodes)]
sys.exit(max(p.wait() for p in procs))
'''


@pytest.mark.heavy
def test_a_slurm_job_on_two_nodes_runs_a_launcher_on_each(tmp_path):
    """The rule's command in a SLURM job of two nodes (one GPU each) runs srun, which runs a launcher on
    each node (a fake srun here, both on this machine): they meet through the file in the stage's
    folder and start one process each, ranks 0 and 1 of 2, told the job's start and its two nodes."""
    (tmp_path / "bin").mkdir()
    (tmp_path / "bin" / "srun").write_text(FAKE_SRUN)
    (tmp_path / "bin" / "srun").chmod(0o755)
    (tmp_path / "probe.py").write_text(
        "import os, torch\ntorch.set_num_threads(1)\nfrom accelerate import Accelerator\n"
        "from stages.core import cli\n"
        "a = Accelerator(cpu=not torch.cuda.is_available())\n"
        "s = a.reduce(torch.tensor([a.process_index + 1.0]), 'sum').item()\n"
        "print(f'rank {a.process_index} of {a.num_processes} sum {s} nodes {cli.launched_nodes()} '\n"
        "      f'launched at {cli.launched_at()!r}', flush=True)\n"
        "a.end_training()\n")
    env = {**os.environ, "SLURM_JOB_ID": "5", "CUDA_VISIBLE_DEVICES": "0", "OMP_NUM_THREADS": "1",
           "PYTHONPATH": f"{REPO}:{tmp_path}", "PATH": f"{tmp_path / 'bin'}:{os.environ['PATH']}",
           "SRUN_RECORD": str(tmp_path / "srun.txt")}
    before = time.time()
    run = subprocess.run([sys.executable, "-m", "stages.launch", "--gpus", "1", "--nodes", "2", "probe",
                          "--out", str(tmp_path / "out" / "model.safetensors")],
                         cwd=tmp_path, env=env, capture_output=True, text=True, timeout=180)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert "[launch] 2 nodes of SLURM job 5" in run.stderr
    srun = (tmp_path / "srun.txt").read_text().split("\n")
    assert "--nodes=2" in srun and "--ntasks-per-node=1" in srun and "--kill-on-bad-exit=1" in srun
    assert srun[srun.index("stages.launch"):][:6] == ["stages.launch", "--slurm-task", "--gpus", "1", "--nodes", "2"]
    port = int((tmp_path / "out" / ".launch-5.0").read_text().split()[1])
    for node in (0, 1):
        assert f"[launch] 1 process(es) on node {node} of 2, main process at localhost:{port}" in run.stderr
    lines = sorted(re.findall(r"rank \d of \d sum [\d.]+ nodes \d launched at [\d.]+", run.stdout))
    assert [line.split(" launched")[0] for line in lines] == ["rank 0 of 2 sum 3.0 nodes 2",
                                                              "rank 1 of 2 sum 3.0 nodes 2"], run.stdout
    launched = {float(line.split()[-1]) for line in lines}  # the job's start: the launcher that ran srun
    assert len(launched) == 1 and before <= launched.pop() <= time.time(), run.stdout
