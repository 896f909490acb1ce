"""The tiny row through `snakemake --profile slurm` on a real single-node SLURM cluster (Debian's
slurm-wlm, munge, slurmdbd over mariadb), started and stopped by tests/slurm_cluster.py.

Needs root (daemons, /etc/slurm/slurm.conf); .ci/run installs the packages, and the test installs
them itself where it can. It is skipped only when they cannot be installed.
"""

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import slurm_cluster
import yaml

REPO = Path(__file__).resolve().parents[1]
pytestmark = [pytest.mark.slow, pytest.mark.slurm]


@pytest.fixture(scope="module")
def slurm(tmp_path_factory):
    why = slurm_cluster.install()
    if why:
        pytest.skip(f"no SLURM to test against: {why}")
    with slurm_cluster.cluster(tmp_path_factory.mktemp("slurm")) as c:
        yield c


def run_snakemake(cmd, cwd, timeout):
    """Stops Snakemake with SIGINT on timeout: it then cancels its SLURM jobs (SIGTERM does not)."""
    proc = subprocess.Popen(cmd, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.send_signal(signal.SIGINT)
        out, _ = proc.communicate(timeout=60)
        pytest.fail(f"snakemake --profile slurm took over {timeout} s:\n{out[-5000:]}")
    return proc.returncode, out


def test_tiny_row_through_slurm(slurm, tmp_path):
    work = tmp_path / "work"
    work.mkdir()
    # the tiny row with every job at 1 CPU (the node has 2), and one init and two snapshots: every
    # rule still runs, in 14 SLURM jobs instead of 25 (each pays ~8 s of Python start-up)
    config = yaml.safe_load((REPO / "tests" / "tiny.yaml").read_text())
    config["threads"] = {"teacher": 1, "train": 1, "light": 1}
    config["posttrain"].update(inits=["cmt"], snapshots=[0, 1.0])
    (tmp_path / "tiny.yaml").write_text(yaml.safe_dump(config))
    t0 = time.time()
    rc, out = run_snakemake(
        [sys.executable, "-m", "snakemake", "--profile", "slurm", "--directory", str(work),
         "--configfile", str(tmp_path / "tiny.yaml"), "--jobs", "4",
         # a one-node test cluster answers at once; real clusters keep the plugin's defaults
         "--slurm-init-seconds-before-status-checks", "1", "--seconds-between-status-checks", "2",
         "--slurm-keep-successful-logs"],
        cwd=REPO, timeout=900)  # a hang guard, far above the 2 to 5 minutes it takes on 2 cores
    assert rc == 0, out[-8000:] + "\n" + slurm.logs()
    print(f"snakemake --profile slurm: {time.time() - t0:.0f} s")

    # every rule ran as a SLURM job, submitted by this run, and completed
    sacct = subprocess.run(["sacct", "-X", "-n", "-P", "-a", "-S", "now-1hours",
                            "-o", "JobID,JobName,Comment,State,ExitCode,AllocTRES,WorkDir"],
                           capture_output=True, text=True, check=True).stdout
    jobs = [line.split("|") for line in sacct.strip().splitlines()]
    jobs = [j for j in jobs if j[6] == str(work)]
    rules = {}
    for jobid, _name, comment, state, exitcode, tres, _ in jobs:
        assert state == "COMPLETED" and exitcode == "0:0", (jobid, comment, state, exitcode)
        rule = comment.split("_wildcards_")[0].removeprefix("rule_")
        rules.setdefault(rule, []).append(tres)
    expected = {"prepare_dataset": 1, "fid_reference": 1, "train_teacher": 1, "trajectory_spec": 1,
                # the profile's group-components: both shards in one SLURM job (GroupJob name: group_rules)
                "trajectories_trajectory_shard": 1, "trajectory_manifest": 1, "midtrain": 1, "posttrain": 1,
                # sample, fid: the post-training snapshots and the mid-trained model alone
                "sample": 3, "fid": 2, "fid_teacher": 1, "report": 1}
    assert {r: len(t) for r, t in rules.items()} == expected, sacct
    # GPU rules were scheduled with a GPU (the test node declares two), the others without
    assert all("gres/gpu=1" in t for t in rules["midtrain"] + rules["trajectories_trajectory_shard"]), rules
    assert not any("gres/gpu" in t for t in rules["report"] + rules["prepare_dataset"]), rules

    res = work / "results" / "tiny"
    assert "| CMT init (ours) |" in (res / "report.md").read_text()
    fid = json.loads((res / "fid" / "cmt.json").read_text())
    assert all(v > 0 for v in fid["snapshots"]["p100"]["1step"]["per_range"])
    # the training stages went through the launcher: one process for a job with one GPU
    assert "[launch] 1 process(es)" in (res / "logs" / "midtrain.log").read_text()
