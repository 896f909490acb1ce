"""The paper rows: each row's dry run lists every job of the row and of its vanilla-ECT baseline;
the CIFAR-10 smoke variant runs every stage through Snakemake with the real DDPM++, importing a
teacher pickle in the official EDM format (random weights) from the assets folder, offline."""

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from stages import networks
from stages.networks.precond import Precond
from tests.edm_format import official_kwargs, write_edm_pickle

REPO = Path(__file__).resolve().parents[1]
ROWS = REPO / "config" / "rows"
pytestmark = pytest.mark.slow


def snakemake(workdir, *args, configs=()):
    cmd = [sys.executable, "-m", "snakemake", "--snakefile", str(REPO / "Snakefile"), "-d", str(workdir),
           "-c2", "--configfile", *map(str, configs), *args]
    return subprocess.run(cmd, capture_output=True, text=True, cwd=workdir)


def planned_jobs(result):
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    table = result.stdout.split("Job stats:")[1].split("total")[0]
    return {m.group(1): int(m.group(2)) for m in re.finditer(r"^(\w+)\s+(\d+)\s*$", table, re.M)}


# The FFHQ and AFHQv2 rows differ from CIFAR-10 only in values (schema-checked by test_config);
# one dry run keeps the suite short. Their smoke variants were run by hand (bench/RESULTS.md).
@pytest.mark.parametrize("row", ["cifar10-cmt-ect"])
def test_row_dry_run_lists_the_row_and_its_baseline(row, tmp_path):
    result = snakemake(tmp_path, "-n", configs=[ROWS / f"{row}.yaml"])
    jobs = planned_jobs(result)
    assert jobs == {"fetch_assets": 4 if row.startswith("cifar10") else 3, "import_teacher": 1, "prepare_dataset": 1, "fid_reference": 1,
                    "trajectory_spec": 1, "trajectory_shard": 480, "trajectory_manifest": 1, "midtrain": 1,
                    "posttrain": 2, "sample": 10, "fid": 2, "fid_teacher": 1, "report": 1, "all": 1}
    out = result.stdout
    assert "--init baseline" in out and "--init cmt" in out
    assert '"double_every": 25000' in out and '"q": 2,' in out and '"steps": 400000' in out  # vanilla ECT
    assert '"distance": "lpips"' in out and '"lpips_weights": "assets/vgg16-397923af.pth"' in out
    assert "gpu=1" in out  # the row's SLURM hints reach the jobs


def test_cifar10_smoke_through_snakemake(tmp_path):
    row = yaml.safe_load((ROWS / "cifar10-cmt-ect.yaml").read_text())
    arch = {**row["network"], "in_channels": 3, "resolution": 32, "dropout": 0.13}
    torch.manual_seed(0)
    teacher = Precond(networks.build(arch), "edm", 0.5).eval()  # EDM-style init: random, real size
    pkl = tmp_path / "assets" / "edm-cifar10-32x32-uncond-vp.pkl"
    pkl.parent.mkdir()
    write_edm_pickle(pkl, teacher, tmp_path / "marker", official_kwargs(arch))
    del teacher
    imported = tmp_path / "import.yaml"
    imported.write_text(yaml.safe_dump({"teacher": {"source": "import"}}))

    configs = [ROWS / "cifar10-cmt-ect.yaml", ROWS / "smoke" / "cifar10-cmt-ect.yaml", imported]
    result = snakemake(tmp_path, configs=configs)
    assert result.returncode == 0, result.stdout[-5000:] + result.stderr[-5000:]
    res = tmp_path / "results" / "cifar10-cmt-ect-smoke"
    assert not (res / "logs" / "fetch_assets").exists()  # the asset was in place: no download
    assert not (tmp_path / "marker").exists()  # nothing from the pickle ran
    report = (res / "report.md").read_text()
    assert "vanilla ECT from the teacher" in report and "CMT + ECT" in report
    # one table: ours and the paper's per method, the difference, budgets in Mimg per stage
    assert "| CMT + ECT | " in report and "| 1.97 | " in report and "38.4 midtrain + 12.8 posttrain = 51.2" in report
    assert "| vanilla ECT, equal total budget | " in report and "| 51.2 |" in report
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

    schema = str(REPO / "workflow" / "schemas" / "config.schema.yaml")
    base = yaml.safe_load((REPO / "config" / "default.yaml").read_text())
    row = {**base, **yaml.safe_load((ROWS / "cifar10-cmt-ect.yaml").read_text())}
    validate(row, schema)
    for teacher, word in [({"source": "import"}, "asset"), ({"source": "train", "asset": "x"}, "steps"),
                          ({"source": "download", "asset": "x"}, "download")]:
        with pytest.raises(WorkflowError, match=word):
            validate({**row, "teacher": teacher}, schema)
