"""The ImageNet-256 MeanFlow row (config/rows/imagenet256-cmt-mf.yaml): its dry run lists every job
in seconds with the row's recipe on the command lines, and its smoke overlay runs every stage
through Snakemake on CPU, offline (heavy)."""

import json
import re

import pytest
from workflow_runs import ROWS, finished_run, planned_jobs, snakemake

ROW = ROWS / "imagenet256-cmt-mf.yaml"
SMOKE = ROWS / "smoke" / "imagenet256.yaml"


def stage_config(out, stage):
    """The --config JSON of the first command line of `stage` in a dry run's -p output."""
    line = next(line for line in out.splitlines() if f"stages.{stage} " in line)
    return json.loads(re.search(r"--config '([^']*)'", line).group(1))


def test_dry_run_lists_every_job_of_the_row(tmp_path):
    result = snakemake(tmp_path, "-n", "-p", configs=[ROW])
    # no prepare_dataset: the training jobs read the encoded latents, FID the ADM statistics
    assert planned_jobs(result) == {
        "fetch_assets": 4, "encode_dataset": 257, "latent_manifest": 1, "fid_reference": 1, "train_teacher": 1,
        "trajectory_spec": 1, "trajectory_shard": 256, "trajectory_manifest": 1, "midtrain_mf": 1, "posttrain_mf": 2,
        "sample": 10, "fid": 2, "fid_teacher": 1, "report": 1, "all": 1}
    out = result.stdout
    for stage in ("train_teacher", "posttrain_mf"):
        line = next(line for line in out.splitlines() if f"stages.{stage} " in line)
        assert "--latents results/imagenet256-cmt-mf/latents/manifest.json" in line, stage
        assert stage_config(out, stage)["latents"]["raw_std"][0] == pytest.approx(1 / 0.18215)
    for stage in ("sample", "fid_teacher"):
        line = next(line for line in out.splitlines() if f"stages.{stage} " in line)
        assert "--vae assets/sd-vae-ft-mse" in line and "--latents '" in line, stage
    teacher = stage_config(out, "train_teacher")
    assert teacher["network"] == {"kind": "dit", "preset": "MF-B/4", "num_classes": 1000}
    assert teacher["teacher"]["objective"] == "meanflow" and teacher["teacher"]["meanflow"]["label_dropout"] == 0.1
    assert teacher["teacher"]["optimizer"]["warmup_steps"] == 0 and teacher["teacher"]["ema"]["rampup"] is None
    spec = stage_config(out, "trajectory_shard")
    assert spec["solver"] == "meanflow" and spec["nfe"] == 8 and spec["label_dropout"] == 0.1
    mid = stage_config(out, "midtrain_mf")
    assert mid["network"] == {"kind": "dit", "preset": "MF-XL/2", "num_classes": 1000}
    post = stage_config(out, "posttrain_mf")
    assert post["posttrain_mf"]["guidance"] == {"omega": 0.2, "kappa": 0.92, "t_min": 0.0, "t_max": 0.75}
    assert post["network"]["preset"] == "MF-XL/2"
    steps = {re.search(r"--init (\w+)", line).group(1):
             json.loads(re.search(r"--config '([^']*)'", line).group(1))["steps"]
             for line in out.splitlines() if "stages.posttrain_mf " in line}
    assert steps == {"cmt": 464000, "random": 464000 + 305000}  # random: the same total images
    assert "VIRTUAL_imagenet256_labeled.npz" in out  # the ADM reference batch, fetched
    assert "gpu=8" in out


@pytest.mark.heavy
def test_smoke_row_end_to_end(tmp_path):
    res = finished_run(tmp_path, "imagenet256-cmt-mf-smoke", (ROW, SMOKE))
    report = (res / "report.md").read_text()
    assert "## GPU-hours per stage" in report and "| 38 |" in report and "| 1520 |" in report
    teacher_log = (res / "logs" / "train_teacher.log").read_text()
    assert "objective meanflow" in teacher_log and "guidance in the target" in teacher_log
    assert "spot check: 4 trajectories regenerated" in (res / "logs" / "midtrain.log").read_text()
    mid = json.loads((res / "midtrain" / "model.json").read_text())
    assert mid["architecture"]["kind"] == "dit" and mid["architecture"]["patch_size"] == 2
    teacher = json.loads(next((tmp_path / "store" / "teachers").glob("*/model.json")).read_text())
    assert teacher["architecture"]["in_channels"] == 4 and teacher["architecture"]["resolution"] == 4  # latents
    assert "latents" in teacher["inputs"]
    # samples: decoded by the row's (tiny) VAE into 32x32 pixels
    with __import__("numpy").load(res / "samples" / "cmt" / "p100.npz") as data:
        assert data["labels_r0"].max() < 1000 and data["images_1step_r0"].shape == (4, 3, 32, 32)
