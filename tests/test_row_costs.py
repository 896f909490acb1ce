"""bench/row_costs.py: the projection runs every measurement path (the smoke overlays' tiny networks
on this CPU), and its hours are the workload's counts times the measured seconds per unit. Heavy:
the projection measures every stage of two rows (about a minute)."""

import json
import subprocess
import sys

import pytest
from workflow_runs import REPO, ROWS

from stages.config import resolve, workload

pytestmark = pytest.mark.heavy


@pytest.fixture(scope="module")
def projection(tmp_path_factory):
    out = tmp_path_factory.mktemp("costs") / "costs.json"
    # the ImageNet-512 ECD row: encoding, the latent VGG, E-LatentLPIPS, guided ECD, decoding; the
    # ImageNet-256 row: the MeanFlow teacher, flow-time trajectories, CMT-MF, MeanFlow on the DiT;
    # Inception features swapped in for the smoke overlays' pixel features
    cmd = [sys.executable, str(REPO / "bench" / "row_costs.py"), "--smoke", "--rows", "imagenet512-cmt-ecd",
           "imagenet256-cmt-mf", "--config", "{features: {kind: inception, batch: 2}}", "--threads", "1",
           "--out", str(out)]
    result = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return json.loads(out.read_text()), result.stdout


def test_every_job_of_both_rows_is_measured(projection):
    results, stdout = projection
    for name, row in results["rows"].items():
        assert row["not_measured"] == [], (name, row["not_measured"])
        for job in row["jobs"]:
            assert job["rate"]["seconds_per_unit"] > 0, (name, job["job"])
        assert f"[{name}] route cmt:" in stdout
    rules = {name: {j["rule"] for j in row["jobs"]} for name, row in results["rows"].items()}
    assert {"encode_dataset", "train_latent_vgg", "posttrain", "fid"} <= rules["imagenet512-cmt-ecd"]
    assert {"train_teacher", "midtrain_mf", "posttrain_mf"} <= rules["imagenet256-cmt-mf"]


def test_hours_are_counts_times_seconds(projection):
    results, _ = projection
    row = results["rows"]["imagenet256-cmt-mf"]
    cfg = resolve([ROWS / "imagenet256-cmt-mf.yaml", ROWS / "smoke" / "imagenet256.yaml"],
                  {"features": {"kind": "inception", "batch": 2}})
    counts = {j["job"]: j["count"] for j in workload.workload(cfg)}
    jobs = {j["job"]: j for j in row["jobs"]}
    assert counts == {name: j["count"] for name, j in jobs.items()}
    for job in jobs.values():
        startup = job["jobs"] * job.get("gpus", 1) * results["startup_s"] / 3600
        assert job["startup_hours"] == pytest.approx(startup) and startup > 0
        assert job["hours"] == pytest.approx(job["count"] * job["rate"]["seconds_per_unit"] / 3600 + startup)
    # the routes are the paper's stages: the CMT route adds the teacher, its trajectories and CMT-MF
    cmt = row["routes"]["cmt"]["ours_gpu_hours"]
    assert cmt["pretrain"] == pytest.approx(jobs["train_teacher"]["hours"])
    assert cmt["midtrain"] == pytest.approx(jobs["trajectory_shard"]["hours"] + jobs["midtrain_mf"]["hours"])
    assert cmt["total"] == pytest.approx(cmt["pretrain"] + cmt["midtrain"] + cmt["posttrain"])
    random = row["routes"]["random"]["ours_gpu_hours"]
    alone = jobs["posttrain/random"]["hours"]
    assert random == pytest.approx({"posttrain": alone, "total": alone})
    assert row["routes"]["cmt"]["paper_gpu_hours"] == {"pretrain": 38, "midtrain": 135, "posttrain": 587, "total": 760}
    # the runtime each job is projected to need, against what the row's resources ask
    checks = {c["job"]: c for c in row["runtime_checks"]}
    post = checks["posttrain/cmt"]
    assert post["asked_min"] == cfg["resources"]["posttrain_mf"]["runtime"]
    assert post["projected_min"] == pytest.approx(jobs["posttrain/cmt"]["hours"] * 60 / post["gpus"])
    shards = checks["trajectory_shard"]
    shard_job = jobs["trajectory_shard"]
    assert shards["projected_min"] == pytest.approx(shard_job["hours"] * 60 / shard_job["jobs"])
    # a training job's seconds per image: its micro-batches and one update per process, over the batch
    post = jobs["posttrain/cmt"]
    r = post["rate"]
    assert r["seconds_per_unit"] == pytest.approx(
        (r["micro_batch_s"] * post["batch"] / post["micro_batch"] + r["update_s"] * post["gpus"]) / post["batch"])
