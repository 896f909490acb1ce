"""End to end: the tiny digits row through Snakemake, then what a changed knob reruns."""

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from stagekit import midtrain_config, run_in_process

from stages.files import atomic, store
from stages.data import shards

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


# ---- the team store -------------------------------------------------------------------------

def test_second_workdir_sharing_the_store_generates_nothing(tiny_run, tmp_path):
    """Another user (another workdir) pointed at the same store plans no dataset, teacher or
    trajectory job: only local jobs that write its receipts from the store's records. A newer copy
    of every store file (another user rewrote them) makes neither workdir rerun anything: a
    workdir's results depend on its receipts, not on the store files' times."""
    shared = override(tmp_path, "store", {"store": str(tiny_run / "store")})
    second = tmp_path / "second"
    second.mkdir()
    jobs = planned_jobs(snakemake(second, "-n", configs=[shared]))
    assert not {"prepare_dataset", "train_teacher", "trajectory_spec", "trajectory_shard"} & set(jobs), jobs
    assert {name: jobs[name] for name in jobs if name.endswith("_from_store")} == {
        "prepare_dataset_from_store": 1, "train_teacher_from_store": 1, "trajectory_spec_from_store": 1,
        "trajectory_shard_from_store": 2}
    assert jobs["midtrain"] == 1 and jobs["trajectory_manifest"] == 1
    later = time.time() + 60
    for f in (tiny_run / "store").rglob("*"):
        if f.is_file():
            os.utime(f, (later, later))
    assert "Nothing to be done" in snakemake(tiny_run, "-n").stdout


def test_spot_check_passes_on_the_real_pool_and_stops_a_tampered_shard(tiny_run, tmp_path):
    """The tiny run's midtrain regenerated stored trajectories from their seeds; a shard whose
    trajectories were swapped, with a manifest whose sha256 was rewritten to match, is caught."""
    assert "spot check: 4 trajectories regenerated from their seeds match" in \
        (tiny_run / "results" / "tiny" / "logs" / "midtrain.log").read_text()
    manifest = json.loads((tiny_run / "results" / "tiny" / "trajectories" / "manifest.json").read_text())
    for entry in manifest["shards"]:
        entry["path"] = str(tiny_run / entry["path"])
    shard = Path(manifest["shards"][1]["path"])
    samples = shards.read_shard(shard)
    tampered = tmp_path / shard.name
    # each trajectory paired with its neighbour's states: a valid shard, the wrong trajectories
    shards.write_shard(tampered, [(s["index"], samples[(k + 1) % len(samples)]["states"], s["sigmas"], s["meta"])
                                  for k, s in enumerate(samples)])
    manifest["shards"][1].update(path=str(tampered), sha256=atomic.sha256_file(tampered),
                                 bytes=tampered.stat().st_size)
    atomic.write_json(tmp_path / "manifest.json", manifest)
    cfg = yaml.safe_load(TINY.read_text())
    teacher = next((tiny_run / "store" / "teachers").glob("*/model.safetensors"))
    dataset = next((tiny_run / "store" / "datasets").glob("*/dataset.npz"))
    args = ["--config", json.dumps({"seed": 0, "midtrain": midtrain_config(**cfg["midtrain"])["midtrain"]}),
            "--teacher", teacher, "--manifest", tmp_path / "manifest.json", "--dataset", dataset,
            "--spot-check", 2, "--out", tmp_path / "out" / "model.safetensors"]
    with pytest.raises(ValueError, match="differs from the one its seed gives") as err:
        run_in_process("stages.midtrain", args)
    assert str(err.value).startswith(f"{tampered}: trajectory ")
    assert str(err.value).endswith(store.remake_command("results/tiny/receipts/shards/000001.json"))
    assert not (tmp_path / "out").exists()
