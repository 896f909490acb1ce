"""The cost ledger (stages/reporting/ledger.py): GPU-hours per stage from given Snakemake benchmark
files and the jobs a sliced run's model file records, hand-computed."""

import json

import pytest

from stages.files import checkpoints
from stages.reporting import ledger

HEADER = "s\th:m:s\tmax_rss\tmax_vms\tmax_uss\tmax_pss\tio_in\tio_out\tmean_load\tcpu_time\n"


def bench(folder, name, *seconds):
    path = folder / f"{name}.tsv"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(HEADER + "".join(f"{s}\t0:00:00\t1\t1\t1\t1\t0\t0\t0\t0\n" for s in seconds))
    return path


def test_gpu_hours_per_stage_and_route(tmp_path):
    bench(tmp_path, "train_teacher", 7200)              # 2 h on 4 GPUs: 8 GPU-h
    bench(tmp_path, "trajectory_shard/000000", 360)     # 0.1 h x 1 GPU
    bench(tmp_path, "trajectory_shard/000001", 540)     # 0.15 h x 1 GPU
    bench(tmp_path, "midtrain", 3600)                   # 1 h x 8 GPUs
    bench(tmp_path, "posttrain/cmt", 1800, 1800)        # two rows of one job: 1 h x 8 GPUs
    bench(tmp_path, "posttrain/random", 9000)           # 2.5 h x 8 GPUs
    bench(tmp_path, "sample/cmt/p100", 99999)           # evaluation: not in the ledger
    gpus = {"train_teacher": 4, "trajectory_shard": 1, "midtrain": 8, "posttrain": 8}
    costs = ledger.ledger(tmp_path, ["cmt", "random"], gpus)
    cmt = costs["cmt"]
    assert cmt["pretrain"]["gpu_hours"] == pytest.approx(8.0)
    assert cmt["midtrain"]["jobs"] == 3 and cmt["midtrain"]["gpu_hours"] == pytest.approx(0.25 + 8.0)
    assert cmt["posttrain"]["gpu_hours"] == pytest.approx(8.0)
    assert cmt["total"]["gpu_hours"] == pytest.approx(24.25) and cmt["total"]["jobs"] == 5
    assert costs["random"]["posttrain"]["gpu_hours"] == pytest.approx(20.0)
    assert costs["random"]["total"]["gpu_hours"] == pytest.approx(20.0)
    lines = ledger.table(costs, {"cmt": {"pretrain": 38, "midtrain": 135, "posttrain": 587, "total": 760},
                                 "random": {"total": 1520}}, {"cmt": "CMT-MF", "random": "MeanFlow"})
    assert "| CMT-MF | pretrain | 1 | 8 | 0 | 38 |" in lines
    assert "| CMT-MF | **total** | 5 | 24.2 | 0 | 760 |" in lines
    assert "| MeanFlow | **total** | 1 | 20 | 0 | 1520 |" in lines


def test_cpu_jobs_count_apart_and_missing_stages_are_reused(tmp_path):
    bench(tmp_path, "midtrain", 1800)
    bench(tmp_path, "posttrain/cmt", 900)
    costs = ledger.ledger(tmp_path, ["cmt"], {"midtrain": 0, "posttrain": 0})
    assert costs["cmt"]["pretrain"] is None  # imported or in the store: no benchmark here
    assert costs["cmt"]["total"]["gpu_hours"] == 0 and costs["cmt"]["total"]["cpu_hours"] == pytest.approx(0.75)
    assert "| cmt | pretrain | | not run here (store or import) | |  |" in ledger.table(costs, {}, {})


def test_a_file_that_is_no_benchmark_is_refused(tmp_path):
    (tmp_path / "midtrain.tsv").write_text("x\ty\n1\t2\n")
    with pytest.raises(ValueError, match="midtrain.tsv: not a Snakemake benchmark"):
        ledger.ledger(tmp_path, ["cmt"], {})


def model(folder, name, jobs=None):
    """A training stage's model file as the ledger reads it: its .json (the weights are not read)."""
    path = folder / "models" / name / "model.safetensors"
    path.parent.mkdir(parents=True, exist_ok=True)
    meta = {"format": checkpoints.FORMAT, "role": "midtrain", **({} if jobs is None else {"jobs": jobs})}
    (path.parent / "model.json").write_text(json.dumps(meta))
    return path


def test_a_sliced_run_counts_every_job_its_model_records(tmp_path):
    bench(tmp_path, "trajectory_shard/000000", 360)     # 0.1 h x 1 GPU
    bench(tmp_path, "midtrain", 1850)                   # the last of three slices only
    bench(tmp_path, "posttrain/cmt", 1800)              # one job: its benchmark
    models = {
        "midtrain": model(tmp_path, "midtrain", [
            {"wall_seconds": 3000.0, "steps": [0, 400], "ended": "slice"},
            {"wall_seconds": 2400.0, "steps": [400, 720], "ended": "signal", "signal": "SIGUSR1"},
            {"wall_seconds": 1800.0, "steps": [720, 960], "ended": "finished"}]),
        "posttrain/cmt": model(tmp_path, "posttrain",
                               [{"wall_seconds": 1700.0, "steps": [0, 99], "ended": "finished"}]),
        "train_teacher": model(tmp_path, "teacher"),    # no benchmark here: reused, whatever it records
    }
    costs = ledger.ledger(tmp_path, ["cmt"], {"trajectory_shard": 1, "midtrain": 8, "posttrain": 8}, models=models)
    mid = costs["cmt"]["midtrain"]
    # 3000 + 2400 + 1800 = 7200 s of midtrain x 8 GPUs = 16 GPU-h, and the shard's 0.1 GPU-h
    assert mid["seconds"] == pytest.approx(360 + 7200)
    assert mid["gpu_hours"] == pytest.approx(16.0 + 0.1)
    assert mid["jobs"] == 1 + 3 and mid["split"] == {"midtrain": 3}
    post = costs["cmt"]["posttrain"]
    assert post["seconds"] == pytest.approx(1800) and post["gpu_hours"] == pytest.approx(4.0)  # 1800 s x 8 GPUs
    assert post["jobs"] == 1 and post["split"] == {}
    assert costs["cmt"]["pretrain"] is None
    total = costs["cmt"]["total"]
    assert total["gpu_hours"] == pytest.approx(20.1) and total["jobs"] == 5
    lines = ledger.table(costs, {}, {"cmt": "CMT"})
    assert "| CMT | midtrain | 4 (midtrain in 3 jobs) | 16.1 | 0 |  |" in lines
    assert "| CMT | posttrain | 1 | 4 | 0 |  |" in lines
    assert "| CMT | **total** | 5 | 20.1 | 0 |  |" in lines
    # a model that records no jobs (an older model file): the benchmark's seconds
    assert ledger.job_seconds(tmp_path / "midtrain.tsv", model(tmp_path, "old")) == (1850.0, 1)


def test_a_job_record_that_is_not_one_is_refused_naming_the_model(tmp_path):
    bench(tmp_path, "midtrain", 100)
    bad = model(tmp_path, "midtrain", [{"wall_seconds": -5.0, "steps": [0, 4], "ended": "slice"},
                                       {"wall_seconds": 5.0, "steps": [4, 8], "ended": "finished"}])
    with pytest.raises(ValueError, match=r"models/midtrain/model.json: jobs\[0\] .* is not a job record"):
        ledger.ledger(tmp_path, ["cmt"], {"midtrain": 1}, models={"midtrain": bad})


def test_a_job_on_several_nodes_counts_the_gpus_of_every_node(tmp_path):
    """GPU-hours = wall time x GPUs per node x nodes, each job by the nodes its record says; a record
    without nodes is one node's."""
    bench(tmp_path, "midtrain", 1800)                   # the last of two jobs
    bench(tmp_path, "posttrain/cmt", 3600)              # one job: its benchmark, on its record's 4 nodes
    models = {
        "midtrain": model(tmp_path, "midtrain", [
            {"wall_seconds": 3600.0, "steps": [0, 400], "ended": "signal", "signal": "SIGUSR1", "nodes": 2},
            {"wall_seconds": 1800.0, "steps": [400, 960], "ended": "finished"}]),
        "posttrain/cmt": model(tmp_path, "posttrain",
                               [{"wall_seconds": 3500.0, "steps": [0, 99], "ended": "finished", "nodes": 4}]),
    }
    costs = ledger.ledger(tmp_path, ["cmt"], {"midtrain": 8, "posttrain": 8}, models=models)
    mid, post = costs["cmt"]["midtrain"], costs["cmt"]["posttrain"]
    assert mid["seconds"] == pytest.approx(5400) and mid["gpu_hours"] == pytest.approx(1 * 8 * 2 + 0.5 * 8 * 1)
    assert post["seconds"] == pytest.approx(3600) and post["gpu_hours"] == pytest.approx(1 * 8 * 4)
    assert ledger.job_devices(tmp_path / "posttrain" / "cmt.tsv", models["posttrain/cmt"], 8) == [(3600.0, 32, 4)]
    cpu = ledger.ledger(tmp_path, ["cmt"], {}, models=models)["cmt"]["posttrain"]
    assert cpu["cpu_hours"] == pytest.approx(4.0)  # a CPU job on 4 nodes: 4 node-hours


def test_each_job_counts_the_device_it_recorded_not_its_rule(tmp_path):
    """A training job records its device (job_log.device_of), a trajectory shard's receipt the one its
    stage computed on: those count, the rule's resources only where a job recorded nothing."""
    cpu = {"device": "cpu", "processes": 1, "gpus": 0, "nodes": 1}
    bench(tmp_path, "midtrain", 1800)                   # one job on a CPU, its rule asking for 8 GPUs
    bench(tmp_path, "posttrain/cmt", 900)               # the last of two jobs
    bench(tmp_path, "trajectory_shard/000000", 360)     # made here on 2 GPUs
    bench(tmp_path, "trajectory_shard/000001", 720)     # made here on a CPU
    bench(tmp_path, "trajectory_shard/000002", 3)       # made elsewhere: this job read the record
    bench(tmp_path, "trajectory_shard/000003", 36)      # made before the device was recorded: the rule's
    receipts = tmp_path / "receipts" / "shards"
    receipts.mkdir(parents=True)
    for shard, here, env in (("000000", True, {"device": "cuda", "gpus": ["H100", "H100"]}),
                             ("000001", True, {"device": "cpu"}), ("000002", False, {"device": "cuda", "gpus": ["A"]}),
                             ("000003", True, {"python": "3.11"})):
        (receipts / f"{shard}.json").write_text(json.dumps({"made_by_this_job": here, "made": {"env": env}}))
    models = {
        "midtrain": model(tmp_path, "midtrain", [{"wall_seconds": 1700.0, "steps": [0, 9], "ended": "finished",
                                                  **cpu}]),
        "posttrain/cmt": model(tmp_path, "posttrain", [
            {"wall_seconds": 3600.0, "steps": [0, 5], "ended": "slice", "device": "cuda", "processes": 16, "gpus": 16,
             "nodes": 2, "gpu_model": "H100"},                                   # 2 nodes x 8 GPUs x 1 h
            {"wall_seconds": 900.0, "steps": [5, 9], "ended": "finished", **cpu}]),
    }
    costs = ledger.ledger(tmp_path, ["cmt"], {"trajectory_shard": 1, "midtrain": 8, "posttrain": 8}, models=models,
                          receipts=tmp_path / "receipts")
    mid, post = costs["cmt"]["midtrain"], costs["cmt"]["posttrain"]
    # shards: 360 s x 2 GPUs + 36 s x 1 (the rule's) GPU; 720 s + 3 s on no GPU; midtrain 1800 s on none
    assert mid["gpu_hours"] == pytest.approx((720 + 36) / 3600)
    assert mid["cpu_hours"] == pytest.approx((720 + 3 + 1800) / 3600)
    assert post["gpu_hours"] == pytest.approx(16.0) and post["cpu_hours"] == pytest.approx(0.25)
    assert post["jobs"] == 2


def test_a_device_record_that_is_no_count_is_refused(tmp_path):
    bench(tmp_path, "midtrain", 100)
    bad = model(tmp_path, "midtrain", [{"wall_seconds": 5.0, "steps": [0, 4], "ended": "slice", "gpus": -1},
                                       {"wall_seconds": 5.0, "steps": [4, 8], "ended": "finished"}])
    with pytest.raises(ValueError, match=r"jobs\[0\] .* gpus and nodes as counts"):
        ledger.ledger(tmp_path, ["cmt"], {"midtrain": 1}, models={"midtrain": bad})
