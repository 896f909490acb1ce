"""End to end: the tiny digits row through Snakemake, then what a changed knob reruns."""

import json
import os
import time
from pathlib import Path

import pytest
import torch
import workflow_runs
import yaml
from stagekit import midtrain_config, run_in_process
from workflow_runs import TINY, planned_jobs, planned_resources

from stages.data import shards
from stages.files import atomic, checkpoints, store, store_items
from stages.reporting import ledger

pytestmark = pytest.mark.slow


def snakemake(workdir, *args, configs=()):
    """The tiny row (tests/tiny.yaml) with the overlays `configs`."""
    return workflow_runs.snakemake(workdir, *args, configs=(TINY, *configs))


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
    for png in ("fd_curve.png", "samples.png", "training_curves.png"):
        assert (res / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # every training stage published its metrics log: mid- and post-training as outputs, the teacher
    # beside its model in the store, which lists it with the item (not as a file of its own)
    for log in [res / "midtrain" / "metrics.jsonl", *(res / "posttrain").glob("*/metrics.jsonl"),
                *(tiny_run / "store" / "teachers").glob("*/metrics.jsonl")]:
        lines = [json.loads(line) for line in log.read_text().splitlines()]
        assert lines and lines[-1]["kind"] == "train" and lines[-1]["loss"] > 0, log
    assert len(list((res / "posttrain").glob("*/metrics.jsonl"))) == 3
    assert len(list((tiny_run / "store" / "teachers").glob("*/metrics.jsonl"))) == 1
    assert not [i for i in store_items.scan(tiny_run / "store") if i.status == store_items.UNRECORDED]
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
    # one job each: the ledger counts the benchmarks
    assert "## GPU-hours per stage" in report and "| CMT init (ours) | **total** | 5 |" in report
    # on this machine's CPU every job used no GPU, whatever the row's resources asked for
    assert "| CMT init (ours) | **total** | 5 | 0 |" in report
    assert [(j["steps"], j["ended"]) for j in checkpoints.read_meta(res / "midtrain" / "model.safetensors")["jobs"]] \
        == [([0, 20], "finished")]
    # nothing is left to do
    assert "Nothing to be done" in snakemake(tiny_run, "-n").stdout


def test_report_table_and_snakemake_html_report(tiny_run):
    """report.md says how the mid-trained model alone scores; results.csv holds one row per init;
    `snakemake --report` builds a self-contained page with the results table, curves and grids."""
    res = tiny_run / "results" / "tiny"
    report = (res / "report.md").read_text()
    assert "The mid-trained model alone" in report and "sigma_mid = 0.77569" in report
    mid = json.loads((res / "fid" / "midtrain.json").read_text())["snapshots"]["final"]
    assert mid["images_seen"] == 20 * 64 and mid["2step"]["mean"] > 0
    rows = (res / "results.csv").read_text().splitlines()
    assert rows[0].startswith("method,1-step ours,1-step paper,1-step difference,2-step ours")
    assert [r.split(",")[0] for r in rows[1:]] == ["CMT init (ours)", "teacher (diffusion) init", "random init"]
    page = tiny_run / "report.html"
    result = snakemake(tiny_run, "--report", page)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    html = page.read_text()
    for name in ("results.csv", "fd_curve.png", "samples.png", "training_curves.png"):
        assert name in html, name
    assert "each post-training init against training images" in html  # a caption


def test_models_carry_the_boundary_and_the_precision_of_the_config(tiny_run):
    """The ECM boundary (sigma_boundary 0.003, not the grid's 0.002) reaches every consistency
    model a stage wrote, whatever its init, and sampling reads it from there; tiny.yaml's tf32
    reached every training stage."""
    res = tiny_run / "results" / "tiny"
    teacher = json.loads(next((tiny_run / "store" / "teachers").glob("*/model.json")).read_text())
    assert teacher["sigma_min"] == 0.002 and teacher["tf32"] == {"matmul": True, "cudnn": True}
    made = [res / "midtrain" / "model.safetensors"] + [
        res / "posttrain" / init / name for init in ("cmt", "teacher", "random")
        for name in ("model.safetensors", "snapshots/p000.safetensors")]
    for path in made:
        meta = checkpoints.read_meta(path)
        assert meta["sigma_boundary"] == 0.003 and meta["tf32"] == {"matmul": True, "cudnn": True}, path
        assert meta["sigma_min"] == 0.002, path  # the grid's end, as in every model file
        model = checkpoints.build(meta).eval()
        c_skip, c_out, _ = model.coefficients(torch.tensor(0.821, dtype=torch.float64))
        assert (round(c_skip.item(), 6), round(c_out.item(), 6)) == (0.271998, 0.425479), path


def test_precision_and_one_key_from_the_command_line(tiny_run):
    # TF32 changes the last bits, not what a stage computes: it reruns nothing
    assert "Nothing to be done" in snakemake(tiny_run, "-n", "--config", "tf32=false").stdout
    # --config with a nested number (arrives as a string) reruns post-training with it
    result = snakemake(tiny_run, "-n", "-p", "--config", 'posttrain={"q": 512}')
    jobs = planned_jobs(result)
    assert jobs.pop("posttrain") == 3 and set(jobs) <= {"sample", "fid", "report", "all"}, jobs
    commands = [line for line in result.stdout.splitlines() if "stages.posttrain " in line]
    assert len(commands) == 3 and all('"q": 512,' in c for c in commands)


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
    mid = override(tmp_path, "mid", {"sampling": {"sigma_mid": 0.5}})
    jobs = planned_jobs(snakemake(tiny_run, "-n", configs=[mid]))
    assert not {"train_teacher", "midtrain", "posttrain", "trajectory_shard"} & set(jobs), jobs
    assert jobs["sample"] == 9  # 3 inits x 3 snapshots; the mid-trained model keeps its own sigma_mid


def test_checkpoint_settings_make_no_training_stale(tiny_run, tmp_path):
    change = override(tmp_path, "ckpt", {"checkpoint": {"every_steps": 7, "every_minutes": None, "slice_kimg": 0.5}})
    assert "Nothing to be done" in snakemake(tiny_run, "-n", configs=[change]).stdout


def test_tracking_settings_make_no_training_stale(tiny_run, tmp_path):
    change = override(tmp_path, "tracking", {"tracking": {"log_with": "tensorboard", "log_every": 3,
                                                          "project": "elsewhere", "dir": "runs"}})
    assert "Nothing to be done" in snakemake(tiny_run, "-n", configs=[change]).stdout


def test_command_line_resources_win_over_the_row_and_the_row_over_defaults(tmp_path):
    """--set-resources beats the row's `resources:` (what docs/cluster.md, profiles and the launcher's
    messages tell users to do); the row beats --default-resources."""
    result = snakemake(tmp_path, "-n", "--set-resources", "midtrain:gpu=2", "midtrain:runtime=2880",
                       "midtrain:mem=16G", "--default-resources", "runtime=5", "mem_mb=100")
    (_, mid, command), = planned_resources(result, "midtrain")
    assert (mid["gpu"], mid["runtime"], mid["mem_mb"]) == ("2", "2880", "16000"), mid
    assert "stages.launch --gpus 2 " in command
    for _, res, command in planned_resources(result, "posttrain"):  # the row's values, not the defaults'
        assert (res["gpu"], res["runtime"], res["mem_mb"]) == ("1", "720", "8000"), res
        assert "stages.launch --gpus 1 " in command
    (_, res, _), = planned_resources(result, "all")  # no row entry: the defaults
    assert (res["runtime"], res["mem_mb"]) == ("5", "100"), res


def test_every_job_that_asks_for_a_gpu_claims_it_through_the_launcher(tmp_path):
    """On a workstation with several GPUs, concurrent jobs get distinct devices only through
    stages.launch's claims: every job with a gpu resource starts its stage through it."""
    result = snakemake(tmp_path, "-n", "--set-resources", "fid_reference:gpu=1", "sample:gpu=2")
    jobs = planned_resources(result)
    gpu_rules = {rule for rule, res, _ in jobs if int(res.get("gpu", 0))}
    assert {"train_teacher", "trajectory_shard", "fid_reference", "fid_teacher", "midtrain", "posttrain",
            "sample", "fid"} <= gpu_rules, gpu_rules
    for rule, res, command in jobs:
        if int(res.get("gpu", 0)):
            assert f"python -m stages.launch --gpus {res['gpu']} " in command, (rule, command)
            # the stages that are not data-parallel take their devices in one process
            assert ("--one-process" in command) == (rule not in {"train_teacher", "midtrain", "posttrain"}), rule


def test_input_checks_make_no_training_stale(tiny_run, tmp_path):
    """midtrain.verify and midtrain.spot_check say how the trajectories are checked, not what
    mid-training makes: changing them reruns nothing."""
    change = override(tmp_path, "checks", {"midtrain": {"verify": "fast", "spot_check": 1}})
    assert "Nothing to be done" in snakemake(tiny_run, "-n", configs=[change]).stdout


@pytest.mark.heavy
def test_a_run_sliced_into_more_jobs_than_retries_finishes_in_one_invocation(tmp_path):
    """checkpoint.slice_kimg 0.064 (2 steps of 32 images) cuts an 8-step teacher into 4 jobs (three
    exit 75, which Snakemake counts as failures) and the random init's 4 steps into 2: with
    --retries 1 and no margin one invocation still finishes, each training rule retrying as often
    as its slices need."""
    change = override(tmp_path, "slices", {"checkpoint": {"slice_kimg": 0.064, "retry_margin": 0},
                                           "teacher": {"steps": 8}, "posttrain": {"steps": 4}})
    result = snakemake(tmp_path, "--retries", "1", "results/tiny/posttrain/random/model.safetensors",
                       configs=[change])
    assert result.returncode == 0, result.stdout[-5000:] + result.stderr[-5000:]
    assert (result.stdout + result.stderr).count("Trying to restart job") == 3 + 1
    teacher = json.loads(next((tmp_path / "store" / "teachers").glob("*/model.json")).read_text())
    post = json.loads((tmp_path / "results" / "tiny" / "posttrain" / "random" / "model.json").read_text())
    assert (teacher["steps"], post["steps"]) == (8, 4)
    assert not list((tmp_path / "store" / "teachers").glob("*-state"))
    assert not list((tmp_path / "results" / "tiny" / "state").rglob("state.json"))
    # every attempt is in the model files, and the ledger counts them all, not the benchmark's last
    assert [(j["steps"], j["ended"]) for j in teacher["jobs"]] == [
        ([0, 2], "slice"), ([2, 4], "slice"), ([4, 6], "slice"), ([6, 8], "finished")]
    assert [(j["steps"], j["ended"]) for j in post["jobs"]] == [([0, 2], "slice"), ([2, 4], "finished")]
    bench = tmp_path / "results" / "tiny" / "benchmarks"
    model = next((tmp_path / "store" / "teachers").glob("*/model.safetensors"))
    assert ledger.job_seconds(bench / "train_teacher.tsv", model) == (
        pytest.approx(sum(j["wall_seconds"] for j in teacher["jobs"])), 4)


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
    args = ["--config", json.dumps(midtrain_config(**cfg["midtrain"])),
            "--teacher", teacher, "--manifest", tmp_path / "manifest.json", "--dataset", dataset,
            "--spot-check", 2, "--out", tmp_path / "out" / "model.safetensors"]
    with pytest.raises(ValueError, match="differs from the one its seed gives") as err:
        run_in_process("stages.midtrain", args)
    assert str(err.value).startswith(f"{tampered}: trajectory ")
    assert str(err.value).endswith(store.remake_command("results/tiny/receipts/shards/000001.json"))
    assert not (tmp_path / "out").exists()


@pytest.mark.heavy
def test_online_midtrain_plans_no_trajectory_jobs_before_it_and_runs(tmp_path):
    """midtrain.trajectories = online: the mid-trained model needs no trajectory job; the whole row
    plans only the shards the fid_teacher ceiling scores (2 seed ranges x 64 = 2 shards of 64, not
    the pool's 6), and the midtrain job gets the spec instead of a manifest."""
    online = override(tmp_path, "online", {"midtrain": {"trajectories": "online"},
                                           "trajectories": {"num_shards": 6}})
    target = "results/tiny/midtrain/model.safetensors"
    result = snakemake(tmp_path, "-n", "-p", target, configs=[online])
    jobs = planned_jobs(result)
    assert jobs["midtrain"] == 1, jobs
    assert not {"trajectory_spec", "trajectory_shard", "trajectory_manifest"} & set(jobs), jobs
    (_, _, command), = planned_resources(result, "midtrain")
    assert "--manifest" not in command and '"trajectory_spec": {' in command and '"trajectories": "online"' in command
    whole = planned_jobs(snakemake(tmp_path, "-n", configs=[online]))
    assert whole["trajectory_shard"] == 2 and whole["fid_teacher"] == 1, whole
    pool = override(tmp_path, "pool", {"trajectories": {"num_shards": 6}})
    offline = planned_jobs(snakemake(tmp_path, "-n", configs=[pool]))
    assert offline["trajectory_shard"] == 6, offline

    result = snakemake(tmp_path, "-p", target, configs=[online])
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    meta = checkpoints.read_meta(tmp_path / target)
    assert meta["inputs"]["trajectories"] == "online" and meta["trajectories_seen"] == 20 * 64 // 16
    assert not (tmp_path / "results" / "tiny" / "trajectories").exists()
    # the whole row: the ceiling's shards are made after mid-training, and the report's cost says so
    result = snakemake(tmp_path, "-p", "--config", 'posttrain={"inits": ["cmt"]}', configs=[online])
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    report = (tmp_path / "results" / "tiny" / "report.md").read_text()
    assert "| trajectory_shard x2 (the ceiling's only: midtrain solves its own) |" in report
