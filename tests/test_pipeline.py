"""End to end: the tiny digits row through Snakemake, then what a changed knob reruns."""

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
TINY = REPO / "tests" / "tiny.yaml"
pytestmark = pytest.mark.slow


def snakemake(workdir, *args, configs=()):
    cmd = [sys.executable, "-m", "snakemake", "--snakefile", str(REPO / "Snakefile"), "-d", str(workdir),
           "-c2", "--configfile", str(TINY), *map(str, configs), *args]
    return subprocess.run(cmd, capture_output=True, text=True, cwd=workdir)


def planned_jobs(result):
    """{rule: count} from the 'Job stats' table of a dry run."""
    assert result.returncode == 0, result.stdout + result.stderr
    table = result.stdout.split("Job stats:")[1].split("total")[0]
    return {m.group(1): int(m.group(2)) for m in re.finditer(r"^(\w+)\s+(\d+)\s*$", table, re.M)}


def override(tmp_path, name, values):
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(values))
    return path


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("tiny")
    result = snakemake(workdir)
    assert result.returncode == 0, result.stdout[-5000:] + result.stderr[-5000:]
    return workdir


def test_tiny_row_end_to_end(tiny_run):
    res = tiny_run / "results" / "tiny"
    report = (res / "report.md").read_text()
    assert "| CMT init (ours) |" in report and "ceiling" in report
    for png in ("fd_curve.png", "samples.png"):
        assert (res / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    fid = json.loads((res / "fid" / "cmt.json").read_text())
    assert set(fid["snapshots"]) == {"p000", "p050", "p100"}
    for snap in fid["snapshots"].values():
        for steps in ("1step", "2step"):
            assert len(snap[steps]["per_range"]) == 2
            assert all(v > 0 and v == v for v in snap[steps]["per_range"])
    # the shards are in the store under a provenance key, with their spec beside them
    manifest = json.loads((res / "trajectories" / "manifest.json").read_text())
    assert manifest["total"] == 128 and len(manifest["shards"]) == 2
    spec_path = Path(manifest["shards"][0]["path"]).parent / "spec.json"
    assert json.loads((tiny_run / spec_path).read_text())["nfe"] == 16
    # every stage printed progress and throughput into its log
    assert "img/s" in (res / "logs" / "midtrain.log").read_text()
    assert "teacher NFE/s" in (res / "logs" / "trajectory_shard" / "000000.log").read_text()
    # a training state lives only until its stage has written its outputs
    assert not list((res / "state").rglob("state.json"))
    assert not list((tiny_run / "store" / "teachers").glob("*-state"))
    # nothing is left to do
    assert "Nothing to be done" in snakemake(tiny_run, "-n").stdout


def test_posttrain_knob_reruns_only_posttrain_onward(tiny_run, tmp_path):
    jobs = planned_jobs(snakemake(tiny_run, "-n", configs=[override(tmp_path, "q", {"posttrain": {"q": 512}})]))
    assert jobs.pop("posttrain") == 3
    assert set(jobs) <= {"sample", "fid", "report", "all"}, jobs


def test_solver_change_reruns_trajectories_onward_not_teacher(tiny_run, tmp_path):
    change = override(tmp_path, "order", {"trajectories": {"order": 2}})
    jobs = planned_jobs(snakemake(tiny_run, "-n", configs=[change]))
    assert jobs["trajectory_shard"] == 2 and jobs["midtrain"] == 1
    assert jobs["posttrain"] == 1  # only the CMT init depends on the trajectories
    assert not {"train_teacher", "prepare_dataset", "fid_reference"} & set(jobs), jobs


def test_sampling_change_keeps_training(tiny_run, tmp_path):
    jobs = planned_jobs(snakemake(tiny_run, "-n", configs=[override(tmp_path, "mid", {"sampling": {"sigma_mid": 0.5}})]))
    assert not {"train_teacher", "midtrain", "posttrain", "trajectory_shard"} & set(jobs), jobs
    assert jobs["sample"] == 9


def test_checkpoint_settings_make_no_training_stale(tiny_run, tmp_path):
    change = override(tmp_path, "ckpt", {"checkpoint": {"every_steps": 7, "every_minutes": None, "slice_kimg": 0.5}})
    assert "Nothing to be done" in snakemake(tiny_run, "-n", configs=[change]).stdout
