"""End to end: the tiny row in the MeanFlow family (tests/tiny.yaml + tests/tiny-mf.yaml) through
Snakemake: CMT-MF mid-training, MeanFlow from {cmt, random} at equal total budget, report."""

import json

import pytest
import workflow_runs
import yaml
from workflow_runs import TINY, TINY_MF

pytestmark = pytest.mark.slow


def snakemake(workdir, *args, configs=()):
    """The tiny row in the MeanFlow family with the overlays `configs`."""
    return workflow_runs.snakemake(workdir, *args, configs=(TINY, TINY_MF, *configs))


@pytest.mark.heavy
def test_tiny_mf_row_end_to_end(tmp_path):
    result = snakemake(tmp_path)
    assert result.returncode == 0, result.stdout[-5000:] + result.stderr[-5000:]
    res = tmp_path / "results" / "tiny-mf"
    report = (res / "report.md").read_text()
    assert "CMT-MF mid-training, then MeanFlow" in report
    assert "| CMT-MF init (ours) |" in report and "| random init (MeanFlow from scratch) |" in report
    for png in ("fd_curve.png", "samples.png"):
        assert (res / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # equal total budget: random trains for mid + post images, cmt for post after mid
    mid = json.loads((res / "midtrain" / "model.json").read_text())
    assert mid["precond"] == "meanflow" and mid["time"] == "flow_t" and mid["images_seen"] == 20 * 64
    cmt = json.loads((res / "fid" / "cmt.json").read_text())["snapshots"]
    rnd = json.loads((res / "fid" / "random.json").read_text())["snapshots"]
    assert cmt["p100"]["images_seen"] == 10 * 32 and cmt["p100"]["images_seen_total"] == 20 * 64 + 10 * 32
    assert rnd["p100"]["images_seen"] == rnd["p100"]["images_seen_total"] == 20 * 64 + 10 * 32
    assert cmt["p000"]["images_seen_total"] == 20 * 64 and rnd["p000"]["images_seen_total"] == 0
    for snap in list(cmt.values()) + list(rnd.values()):
        for steps in ("1step", "2step"):
            assert len(snap[steps]["per_range"]) == 2
            assert all(v > 0 and v == v for v in snap[steps]["per_range"])
    post = json.loads((res / "posttrain" / "cmt" / "model.json").read_text())
    assert post["precond"] == "meanflow" and post["architecture"]["dual_time"]
    assert "img/s" in (res / "logs" / "posttrain" / "random.log").read_text()
    # midtrain_mf regenerated stored trajectories from their seeds before its first step
    midtrain_log = (res / "logs" / "midtrain.log").read_text()
    assert "spot check: 4 trajectories regenerated from their seeds match" in midtrain_log
    assert "Nothing to be done" in snakemake(tmp_path, "-n").stdout
    # how the trajectories are checked is not what mid-training makes: changing it reruns nothing
    (tmp_path / "checks.yaml").write_text(yaml.safe_dump({"midtrain_mf": {"verify": "fast", "spot_check": 1}}))
    assert "Nothing to be done" in snakemake(tmp_path, "-n", configs=[tmp_path / "checks.yaml"]).stdout
