"""The paper rows: each row's dry run lists every job of the row and of its vanilla-ECT baseline,
with the store keys the rows had before they shared a base; the smoke overlay's dry run on each
row; the constant-learning-rate baseline variant. The CIFAR-10 smoke variant runs every stage
through Snakemake with the real DDPM++, importing a teacher pickle in the official EDM format
(random weights) from the assets folder, offline."""

import json
import re

import pytest
import torch
import yaml
from workflow_runs import REPO, ROWS, finished_run, planned_jobs, snakemake

from stages import networks
from stages.networks.precond import Precond
from tests.edm_format import official_kwargs, write_edm_pickle

pytestmark = pytest.mark.slow


# Store folders of the paper rows as they were before the rows shared config/rows/base/: the
# same keys mean the same dataset, teacher and shards (a team's store stays valid).
STORE_KEYS = {
    "cifar10-cmt-ect": ["datasets/cifar10-dc44f6543e40a559", "teachers/73e9fc9f6a3395f6",
                        "trajectories/5526a12f7e9bcae0"],
    "ffhq64-cmt-ect": ["datasets/ffhq-64x64-894f672cfdc093d7", "teachers/243bae126b64ad3c",
                       "trajectories/5b11f96844378897"],
    "afhqv2-64-cmt-ect": ["datasets/afhqv2-64x64-3805e8cfc68f9925", "teachers/3ffbac4ae8d80184",
                          "trajectories/bcf7f4a2783132ac"],
}
PAPER_ROWS = sorted(STORE_KEYS)


def row_jobs(row):
    # sample, fid: 2 inits x 5 snapshots, and the mid-trained model alone
    return {"fetch_assets": 4 if row.startswith("cifar10") else 3, "import_teacher": 1, "prepare_dataset": 1,
            "fid_reference": 1, "trajectory_spec": 1, "trajectory_shard": 480, "trajectory_manifest": 1,
            "midtrain": 1, "posttrain": 2, "sample": 11, "fid": 3, "fid_teacher": 1, "report": 1, "all": 1}


@pytest.mark.parametrize("row", PAPER_ROWS)
def test_row_dry_run_lists_the_row_and_its_baseline(row, tmp_path):
    result = snakemake(tmp_path, "-n", "-p", configs=[ROWS / f"{row}.yaml"])
    assert planned_jobs(result) == row_jobs(row)
    out = result.stdout
    assert "--init baseline" in out and "--init cmt" in out
    assert '"double_every": 25000' in out and '"q": 2,' in out and '"steps": 400000' in out  # vanilla ECT
    q = {"cifar10-cmt-ect": 4096, "ffhq64-cmt-ect": 512, "afhqv2-64-cmt-ect": 1024}[row]
    assert f'"q": {q},' in out and '"schedule": "constant"' not in out
    assert '"distance": "lpips"' in out and '"lpips_weights": "assets/vgg16-397923af.pth"' in out
    assert "gpu=1" in out  # the row's SLURM hints reach the jobs
    for key in STORE_KEYS[row]:
        assert f"store/{key}/" in out, key


IMAGENET64_ROWS = {"imagenet64-cmt-ecd": "ecd", "imagenet64-cmt-ect": "ect_snr"}


@pytest.mark.parametrize("row", sorted(IMAGENET64_ROWS))
def test_imagenet64_row_dry_run(row, tmp_path):
    """Every job of the ImageNet-64 rows, planned in seconds: the EDM2 teacher imported, the ADM
    crop of the user's ImageNet folder, 160 shards, CMT with LPIPS, ECD (distilling the teacher) or
    the 512 code's ECT, FID-50k at sigma_mid 1.526."""
    import time

    t0 = time.perf_counter()
    result = snakemake(tmp_path, "-n", "-p", configs=[ROWS / f"{row}.yaml"])
    assert time.perf_counter() - t0 < 60
    assert planned_jobs(result) == {
        "fetch_assets": 3, "import_teacher": 1, "prepare_dataset": 1, "fid_reference": 1, "trajectory_spec": 1,
        "trajectory_shard": 160, "trajectory_manifest": 1, "midtrain": 1, "posttrain": 1, "sample": 6, "fid": 2,
        "fid_teacher": 1, "report": 1, "all": 1}
    out = result.stdout
    assert "assets/edm2-img64-s-1073741-0.075.pkl" in out and '"preset": "edm2-img64-s"' in out
    assert '"source": "imagenet_folder"' in out and '"label_dim": 1000' in out
    assert '"distance": "lpips"' in out and '"sigma_mid": 1.526' in out and '"per_range": 50000' in out
    post = [line for line in out.splitlines() if "stages.posttrain " in line]
    assert len(post) == 1 and "--init cmt" in post[0]
    cfg = json.loads(re.search(r"--config '(.*?)'", post[0]).group(1))["posttrain"]
    assert cfg["method"] == IMAGENET64_ROWS[row] and cfg["q"] == 1024 and cfg["c"] == 0.06
    assert (cfg["P_mean"], cfg["P_std"], cfg["optimizer"]["betas"]) == (-0.8, 1.6, [0.9, 0.99])
    # ECD distils the teacher from the store (plain distillation: no guide); ECT uses none
    assert ("--teacher " in post[0]) == (row == "imagenet64-cmt-ecd") and "--guide" not in post[0]


@pytest.mark.parametrize("row", PAPER_ROWS)
def test_smoke_overlay_on_each_row(row):
    from snakemake.utils import validate

    from stages.config import checks, layers

    cfg = layers.assemble(REPO / "config" / "default.yaml", [ROWS / f"{row}.yaml", ROWS / "smoke" / "pixel-ect.yaml"])
    validate(cfg, str(REPO / "workflow" / "schemas" / "config.schema.yaml"))
    checks.check(cfg)
    assert cfg["row"] == f"{row}-smoke" and cfg["dataset"]["synthetic"] == 16
    assert cfg["network"] == layers.assemble(REPO / "config" / "default.yaml", [ROWS / f"{row}.yaml"])["network"]
    # the overlay's resources replace the row's 64 GB / days, rule by rule (files merge key by key)
    # the MeanFlow rules belong to the other family
    used = {rule: r for rule, r in cfg["resources"].items() if not rule.endswith("_mf")}
    assert all(r["gpu"] == 0 and r["mem_mb"] <= 8000 and r["runtime"] <= 15 for r in used.values()), used


def test_smoke_overlay_dry_run(tmp_path):
    # CIFAR-10's smoke variant runs in full below; the FFHQ and AFHQv2 rows share one layout
    result = snakemake(tmp_path, "-n", "-p",
                       configs=[ROWS / "afhqv2-64-cmt-ect.yaml", ROWS / "smoke" / "pixel-ect.yaml"])
    assert planned_jobs(result) == {"prepare_dataset": 1, "fid_reference": 1, "train_teacher": 1,
                                    "trajectory_spec": 1, "trajectory_shard": 1, "trajectory_manifest": 1,
                                    "midtrain": 1, "posttrain": 2, "sample": 3, "fid": 3, "fid_teacher": 1,
                                    "report": 1, "all": 1}  # sample, fid: 2 inits and the mid-trained model
    out = result.stdout
    assert "results/afhqv2-64-cmt-ect-smoke/report.md" in out
    mem = [int(m) for m in re.findall(r"mem_mb=(\d+)", out)]
    assert mem and max(mem) <= 8000 and "gpu=1" not in out


def test_baseline_variant_with_a_constant_learning_rate(tmp_path):
    variant = ROWS / "variants" / "cifar10-cmt-ect-baseline-constant-lr.yaml"
    result = snakemake(tmp_path, "-n", "-p", configs=[variant])
    jobs = planned_jobs(result)
    # sample, fid: the baseline's 5 snapshots and the mid-trained model the report scores alone
    assert jobs["posttrain"] == 1 and jobs["sample"] == 6 and jobs["fid"] == 2
    out = result.stdout
    post = [line for line in out.splitlines() if "stages.posttrain " in line]
    assert len(post) == 1 and "--init baseline" in post[0]
    cfg = json.loads(re.search(r"--config '(.*?)'", post[0]).group(1))["posttrain"]
    assert cfg["optimizer"]["schedule"] == "constant" and cfg["optimizer"]["lr"] == 1.0e-4
    assert cfg["optimizer"]["name"] == "radam" and cfg["q"] == 2 and cfg["steps"] == 400000
    for key in STORE_KEYS["cifar10-cmt-ect"]:  # the row's store: nothing made twice
        assert f"store/{key}/" in out, key


def test_digits_equal_total_budget_variant(tmp_path):
    """The baseline trains for the CMT route's whole budget: mid + post images and the pool's
    trajectories at 2.65 ECT images each (their cost measured by bench/pipeline_ratios.py)."""
    variant = ROWS / "variants" / "digits-cmt-ect-equal-total.yaml"
    result = snakemake(tmp_path, "-n", "-p", configs=[variant])
    jobs = planned_jobs(result)
    assert jobs["posttrain"] == 2 and jobs["midtrain"] == 1 and jobs["trajectory_shard"] == 4
    post = {re.search(r"--init (\w+)", line).group(1):
            json.loads(re.search(r"--config '(.*?)'", line).group(1))["posttrain"]
            for line in result.stdout.splitlines() if "stages.posttrain " in line}
    mid = [json.loads(re.search(r"--config '(.*?)'", line).group(1))["midtrain"]
           for line in result.stdout.splitlines() if "stages.midtrain " in line][0]
    pool = 4 * 2048
    total = mid["steps"] * mid["batch"] + post["cmt"]["steps"] * post["cmt"]["batch"] + pool * 2.65
    assert post["baseline"]["steps"] == round(total / post["baseline"]["batch"]) == 3670
    assert post["baseline"]["batch"] == post["cmt"]["batch"] == 128 and post["cmt"]["steps"] == 1500
    assert "results/digits-cmt-ect-equal-total/" in result.stdout


@pytest.mark.heavy
def test_cifar10_smoke_through_snakemake(tmp_path):
    from stages.config import layers

    row = layers.assemble(REPO / "config" / "default.yaml", [ROWS / "cifar10-cmt-ect.yaml"])
    arch = {**row["network"], "in_channels": 3, "resolution": 32, "dropout": 0.13}
    torch.manual_seed(0)
    teacher = Precond(networks.build(arch), "edm", 0.5).eval()  # EDM-style init: random, real size
    pkl = tmp_path / "assets" / "edm-cifar10-32x32-uncond-vp.pkl"
    pkl.parent.mkdir()
    write_edm_pickle(pkl, teacher, tmp_path / "marker", official_kwargs(arch))
    del teacher
    imported = tmp_path / "import.yaml"
    imported.write_text(yaml.safe_dump({"teacher": {"source": "import"}}))

    configs = [ROWS / "cifar10-cmt-ect.yaml", ROWS / "smoke" / "pixel-ect.yaml", imported]
    res = finished_run(tmp_path, "cifar10-cmt-ect-smoke", configs)
    assert not (res / "logs" / "fetch_assets").exists()  # the asset was in place: no download
    assert not (tmp_path / "marker").exists()  # nothing from the pickle ran
    report = (res / "report.md").read_text()
    assert "vanilla ECT from the teacher" in report and "CMT + ECT" in report
    # one table: ours and the paper's per method, the difference, budgets in Mimg per stage
    assert "| CMT + ECT | " in report and "| 1.97 | " in report and "38.4 midtrain + 12.8 posttrain = 51.2" in report
    assert "| vanilla ECT, equal total budget | " in report and "| 51.2 posttrain |" in report
    assert "The mid-trained model alone" in report and "sigma_mid = 0.77569" in report
    for init in ("cmt", "baseline"):
        fid = json.loads((res / "fid" / f"{init}.json").read_text())
        assert fid["snapshots"]["p100"]["2step"]["per_range"][0] > 0
    midtrain = json.loads((res / "midtrain" / "model.json").read_text())
    assert midtrain["architecture"]["kind"] == "ddpmpp" and midtrain["architecture"]["channels"] == 128
    assert "import_teacher" in (res / "logs" / "import_teacher.log").read_text()
    assert "Nothing to be done" in snakemake(tmp_path, "-n", configs=configs).stdout


def test_teacher_source_is_validated():
    from snakemake.exceptions import WorkflowError
    from snakemake.utils import validate

    from stages.config import layers

    schema = str(REPO / "workflow" / "schemas" / "config.schema.yaml")
    row = layers.assemble(REPO / "config" / "default.yaml", [ROWS / "cifar10-cmt-ect.yaml"])
    validate(row, schema)
    for teacher, word in [({"source": "import"}, "asset"), ({"source": "train", "asset": "x"}, "steps"),
                          ({"source": "download", "asset": "x"}, "download")]:
        with pytest.raises(WorkflowError, match=word):
            validate({**row, "teacher": teacher}, schema)


def test_ecd_with_autoguidance_imports_the_guide_into_the_store(tmp_path):
    """posttrain.guidance names a guide pickle from the catalog: rule import_guide makes it a store
    item under its own key, and ECD gets it beside the teacher."""
    guided = tmp_path / "guided.yaml"
    guided.write_text(yaml.safe_dump({"posttrain": {"guidance": {
        "weight": 2.05, "guide": "edm2-img64-xl-0671088-0.040",
        "network": {"kind": "edm2", "preset": "edm2-img64-xl", "label_dim": 1000}}}}))
    result = snakemake(tmp_path, "-n", "-p", configs=[ROWS / "imagenet64-cmt-ecd.yaml", guided])
    jobs = planned_jobs(result)
    assert jobs["import_guide"] == 1 and jobs["import_teacher"] == 1 and jobs["fetch_assets"] == 4
    out = result.stdout
    guide = re.search(r"--pickle (\S*edm2-img64-xl-0671088-0.040.pkl) --key (\w+)", out)
    assert guide, out[-3000:]
    post = [line for line in out.splitlines() if "stages.posttrain " in line][0]
    assert f"--guide store/teachers/{guide.group(2)}/model.safetensors" in post and "--teacher store/teachers/" in post


@pytest.mark.parametrize("row", sorted(IMAGENET64_ROWS))
def test_imagenet64_smoke_overlay(row, tmp_path):
    from snakemake.utils import validate

    from stages.config import checks, layers

    configs = [ROWS / f"{row}.yaml", ROWS / "smoke" / "imagenet64.yaml"]
    cfg = layers.assemble(REPO / "config" / "default.yaml", configs)
    validate(cfg, str(REPO / "workflow" / "schemas" / "config.schema.yaml"))
    checks.check(cfg)
    assert cfg["network"]["kind"] == "edm2" and cfg["network"]["channels"] == 16 and cfg["teacher"]["source"] == "train"
    used = {rule: r for rule, r in cfg["resources"].items() if not rule.endswith("_mf")}  # MeanFlow: another family
    assert all(r["gpu"] == 0 and r["mem_mb"] <= 8000 and r["runtime"] <= 15 for r in used.values()), used
    assert planned_jobs(snakemake(tmp_path, "-n", configs=configs)) == {
        "prepare_dataset": 1, "fid_reference": 1, "train_teacher": 1, "trajectory_spec": 1, "trajectory_shard": 1,
        "trajectory_manifest": 1, "midtrain": 1, "posttrain": 1, "sample": 2, "fid": 2, "fid_teacher": 1,
        "report": 1, "all": 1}


@pytest.mark.heavy
def test_imagenet64_ecd_smoke_through_snakemake(tmp_path):
    """Every stage of the ECD row on CPU, offline: labelled synthetic ImageNet folder, a tiny EDM2
    teacher trained here, labelled trajectories, CMT, ECD distilling that teacher, labelled samples."""
    from stages.data import shards

    configs = [ROWS / "imagenet64-cmt-ecd.yaml", ROWS / "smoke" / "imagenet64.yaml"]
    res = finished_run(tmp_path, "imagenet64-cmt-ecd-smoke", configs)
    report = (res / "report.md").read_text()
    assert "then ECD" in report and "| CMT + ECD | " in report and "| 1.32 | " in report
    assert "[posttrain:cmt] ECD q=1024" in (res / "logs" / "posttrain" / "cmt.log").read_text()
    (shard,) = (tmp_path / "store" / "trajectories").glob("*/shard-000000.tar")
    assert all(0 <= s["meta"]["label"] < 1000 for s in shards.read_shard(shard))
    midtrain = json.loads((res / "midtrain" / "model.json").read_text())
    assert midtrain["architecture"]["kind"] == "edm2" and midtrain["precond"] == "edm"
    import numpy as np

    with np.load(res / "samples" / "cmt" / "p100.npz") as samples:
        assert samples["labels_r0"].shape == (4,) and samples["images_2step_r0"].shape == (4, 3, 64, 64)
    assert "Nothing to be done" in snakemake(tmp_path, "-n", configs=configs).stdout
