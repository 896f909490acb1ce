"""Trajectory shards grouped into SLURM jobs (profiles/slurm: --group-components trajectories=N and
one trajectory_slot per submission): a group job makes its N shards one after another on one GPU
and asks for N times a shard's runtime, whatever --cores says. Dry runs with the SLURM executor
(no cluster needed to plan)."""

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow


def dry_run(tmp_path, *args):
    (tmp_path / "pool.yaml").write_text("trajectories: {num_shards: 6}\n")
    cmd = [sys.executable, str(REPO / "tests" / "helpers" / "group_resources.py"),
           "--snakefile", str(REPO / "Snakefile"),
           "-d", str(tmp_path), "--profile", str(REPO / "profiles" / "slurm"), "-n",
           "--configfile", str(REPO / "tests" / "tiny.yaml"), str(tmp_path / "pool.yaml"), *args]
    result = subprocess.run(cmd, capture_output=True, text=True, cwd=tmp_path)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    groups = [(m.group(1), int(m.group(2)), json.loads(m.group(3)))
              for m in re.finditer(r"^GROUP (\S+) (\d+) (\{.*\})$", result.stdout, re.M)]
    return result.stdout, groups


def test_profile_groups_the_shards_into_one_serial_job(tmp_path):
    out, groups = dry_run(tmp_path)
    # the profile's 20 per job: the tiny pool's 6 shards in one SLURM job, made one after another
    assert groups == [("trajectories", 6, {"gpu": 1, "mem_mb": 4000, "runtime": 6 * 120, "_cores": 1})], groups
    assert out.count("Group job trajectories") == 1
    assert len(re.findall(r"rule trajectory_shard:", out)) == 6


def test_group_size_from_the_command_line_and_serial_whatever_the_cores(tmp_path):
    _, groups = dry_run(tmp_path, "--group-components", "trajectories=4", "--cores", "8")
    assert sorted(g[1] for g in groups) == [2, 4], groups
    for _, n, res in groups:
        assert res == {"gpu": 1, "mem_mb": 4000, "runtime": n * 120, "_cores": 1}, res
