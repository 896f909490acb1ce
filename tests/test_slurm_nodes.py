"""A training rule on two SLURM nodes, through `snakemake --profile slurm` on a real 2-node SLURM
cluster on this machine (tests/slurm_cluster.py with nodes=2: two slurmd daemons, each its own node
cmt1/cmt2, which Debian's slurmd, built with multiple-slurmd, allows).

The tiny row's post-training from the teacher asks for `nodes: 2` with one GPU each: the plugin's
actual sbatch command (recorded by an sbatch on PATH that passes it on) asks for the two nodes with a
GPU on each; the job step runs one launcher per node; SLURM's SIGUSR1 (as --signal=USR1@300 sends it
before a time limit, here through `scancel --signal=USR1`) reaches both nodes, rank 0 saves, the job
fails, Snakemake's retry resumes on two nodes and finishes; the model records both jobs on two nodes.
Needs root, like tests/test_slurm.py; skipped where the daemons cannot be installed or this slurmd
cannot run twice on one host.
"""

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import slurm_cluster
import yaml

REPO = Path(__file__).resolve().parents[1]
STEPS = 600  # post-training steps: the signal comes after the first 100
pytestmark = [pytest.mark.slow, pytest.mark.slurm]

SBATCH = """#!/usr/bin/env python3
import json, os, sys
with open(os.environ["SBATCH_RECORD"], "a") as f:
    f.write(json.dumps(sys.argv[1:]) + "\\n")
os.execv({real!r}, [{real!r}, *sys.argv[1:]])
"""


@pytest.fixture(scope="module")
def slurm(tmp_path_factory):
    why = slurm_cluster.install()
    if why:
        pytest.skip(f"no SLURM to test against: {why}")
    root = tmp_path_factory.mktemp("slurm2")
    c = slurm_cluster.Cluster(root, nodes=2)
    try:
        try:
            c.start()
        except (RuntimeError, TimeoutError) as e:
            multiple = slurm_cluster.quiet(["scontrol", "show", "config"]).stdout
            if "MULTIPLE_SLURMD" not in multiple:
                pytest.skip(f"this slurmd is built without multiple-slurmd: two nodes on one host cannot run ({e})")
            raise AssertionError(f"{e}\n{c.logs()}") from None
        yield c
    finally:
        c.stop()


def wait_for_line(path, pattern, proc, timeout):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if path.exists() and re.search(pattern, path.read_text(errors="replace")):
            return
        if proc.poll() is not None:
            break
        time.sleep(0.5)
    raise AssertionError(f"no {pattern!r} in {path} within {timeout} s")


def test_a_training_rule_on_two_nodes(slurm, tmp_path):
    work = tmp_path / "work"
    work.mkdir()
    config = yaml.safe_load((REPO / "tests" / "tiny.yaml").read_text())
    config["threads"] = {"teacher": 1, "train": 1, "light": 1}
    config["posttrain"].update(inits=["teacher"], snapshots=[0, 1.0], steps=STEPS, batch=16)
    config["checkpoint"] = {"every_steps": 100}
    config["resources"] = {"posttrain": {"gpu": 1, "nodes": 2, "mem_mb": 4000, "runtime": 30}}
    (tmp_path / "row.yaml").write_text(yaml.safe_dump(config))
    (tmp_path / "bin").mkdir()
    (tmp_path / "bin" / "sbatch").write_text(SBATCH.format(real=shutil.which("sbatch")))
    (tmp_path / "bin" / "sbatch").chmod(0o755)
    record = tmp_path / "sbatch.jsonl"
    # the SLURM node names cmt1, cmt2 resolve nowhere: the main process is on this host
    env = {**os.environ, "PATH": f"{tmp_path / 'bin'}:{os.environ['PATH']}", "SBATCH_RECORD": str(record),
           "CMT_MAIN_ADDRESS": "127.0.0.1"}
    target = "results/tiny/posttrain/teacher/model.safetensors"
    t0 = time.time()
    proc = subprocess.Popen(
        [sys.executable, "-m", "snakemake", "--profile", "slurm", "--directory", str(work),
         "--configfile", str(tmp_path / "row.yaml"), "--jobs", "2", target,
         "--slurm-init-seconds-before-status-checks", "1", "--seconds-between-status-checks", "2",
         "--slurm-keep-successful-logs"],
        cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    log = work / "results" / "tiny" / "logs" / "posttrain" / "teacher.log"
    try:
        # both nodes train: SLURM's warning before a time limit goes to every process of the job's steps
        wait_for_line(log, rf"0: \[posttrain:teacher\] step 100/{STEPS}", proc, timeout=600)
        (jobid,) = {line.split()[0] for line in slurm_cluster.quiet(
            ["squeue", "-h", "-o", "%i %k"]).stdout.splitlines() if "rule_posttrain" in line}
        subprocess.run(["scancel", "--signal=USR1", jobid], check=True)
        out, _ = proc.communicate(timeout=600)
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGINT)  # Snakemake cancels its SLURM jobs
            proc.communicate(timeout=60)
    assert proc.returncode == 0, out[-6000:] + "\n" + slurm.logs()
    print(f"snakemake --profile slurm, posttrain on 2 nodes: {time.time() - t0:.0f} s")

    # the plugin's sbatch command asked for two nodes with a GPU on each, one task per node
    calls = [json.loads(line) for line in record.read_text().splitlines()]
    posttrain = [c for c in calls if "rule_posttrain_wildcards_teacher" in c]
    assert len(posttrain) == 2, calls  # the signalled job and its retry
    for call in posttrain:
        assert {"--nodes=2", "--ntasks=2", "--gres=gpu:1"} <= set(call), call
        assert not any(a.startswith(("--gpus", "--ntasks-per-gpu")) for a in call), call
    single = [c for c in calls if "rule_train_teacher" in c]
    assert single and "--gpus=1" in single[0] and not any(a.startswith("--nodes") for a in single[0])

    sacct = subprocess.run(["sacct", "-n", "-P", "-a", "-S", "now-1hours", "-o",
                            "JobID,Comment,State,NNodes,NodeList,AllocTRES,NTasks,WorkDir"],
                           capture_output=True, text=True, check=True).stdout
    jobs = [line.split("|") for line in sacct.strip().splitlines()]
    ours = {j[0] for j in jobs if "rule_posttrain" in j[1] and j[7] == str(work)}
    assert len(ours) == 2, sacct
    for job in jobs:
        if job[0] in ours:  # the allocation: two nodes, a GPU on each
            assert job[3] == "2" and job[4] == "cmt[1-2]" and "gres/gpu=2" in job[5] and "node=2" in job[5], job
        if job[0].split(".")[0] in ours and job[0].endswith(".0"):  # the step: a launcher on each node
            assert (job[3], job[4], job[6]) == ("2", "cmt[1-2]", "2"), job

    # the retry's log: one launcher per node, each starting one of the two processes, resumed
    text = log.read_text()
    for node in (0, 1):
        assert f"{node}: [launch] 1 process(es) on node {node} of 2, main process at 127.0.0.1:" in text, text[-3000:]
    assert "resumed from" in text
    meta = json.loads((work / "results" / "tiny" / "posttrain" / "teacher" / "model.json").read_text())
    jobs = meta["jobs"]
    assert [(j["ended"], j.get("signal"), j["nodes"]) for j in jobs] == [("signal", "SIGUSR1", 2),
                                                                         ("finished", None, 2)], jobs
    assert jobs[0]["steps"][0] == 0 and jobs[0]["steps"][1] == jobs[1]["steps"][0] and jobs[1]["steps"][1] == STEPS
    assert jobs[0]["steps"][1] >= 100

