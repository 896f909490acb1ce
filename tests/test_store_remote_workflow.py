"""The workflow with a remote store (`store_remote`) against moto's S3 server on localhost
(conftest.py s3_server): an item complete in the remote and not in the local store is planned as a
local pull job (`<rule>_from_remote`) and not made; planning asks with a LIST per key folder, never a
request per item; the tiny row run on a second site from the remote alone makes no dataset, teacher
or trajectory and ends with the same numbers."""

import csv
import json
import re
import subprocess
import sys
from pathlib import Path

import boto3
import pytest
import workflow_runs
import yaml
from workflow_runs import ROWS, TINY, planned_jobs, planned_resources

from stages.config import resolve, store_keys
from stages.files import atomic, store, store_items, store_plan, store_remote

pytestmark = pytest.mark.slow


def overlay(tmp_path, values, name="remote"):
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(values))
    return path


def make_item(files, root=None):
    """A complete item with made-up bytes, recorded as the store wrapper records it; under `root` (another
    site's store) where given, else at `files`."""
    files = [Path(root, *Path(f).parts[-3:]) if root else Path(f) for f in files]
    for f in files:
        atomic.write_bytes(f, f"made-up {f.name}".encode())
    store.write_record(files, key="made-up")
    return files


def fill(url, files_of_items, site):
    """Push made-up items, made in the store `site`, to the remote `url`."""
    pushed = list(store_remote.Remote(url).push_many([make_item(files, site) for files in files_of_items]))
    assert all(str(outcome).startswith("pushed") for _, outcome in pushed), pushed


@pytest.mark.heavy
def test_a_remote_item_is_planned_as_a_pull_job_and_not_made(s3_server, remote_url, tmp_path):
    """The tiny row with three shards: the remote holds the dataset, the teacher, the spec and shard 0,
    the local store shard 1. One planning pass asks the remote with one LIST per key folder; each
    item comes from where it is (a pull, a receipt from the record, the making job for shard 2); the
    pull jobs run (checked against the records) and a later plan reruns none of them."""
    given = overlay(tmp_path, {"store": str(tmp_path / "store"), "store_remote": remote_url,
                               "trajectories": {"num_shards": 3}})
    config = resolve([TINY, given])
    files = store_keys.item_files(config)
    fill(remote_url, [files[n] for n in ("dataset", "teacher", "trajectories", "shard/000000")], tmp_path / "site-a")
    make_item(files["shard/000001"])
    workdir = tmp_path / "w"
    workdir.mkdir()
    s3_server.requests.clear()
    dry = workflow_runs.snakemake(workdir, "-n", configs=(TINY, given))
    jobs = planned_jobs(dry)
    assert {n: c for n, c in jobs.items() if n.startswith(("prepare_dataset", "train_teacher", "trajectory_s"))} == {
        "prepare_dataset_from_remote": 1, "train_teacher_from_remote": 1, "trajectory_spec_from_remote": 1,
        "trajectory_shard_from_remote": 1, "trajectory_shard_from_store": 1, "trajectory_shard": 1}, jobs
    listed, other = s3_server.lists_and_others()
    assert len(listed) == 3 and not other, s3_server.requests  # datasets/, teachers/ and trajectories/ folders
    shells = {rule: shell for rule, _, shell in planned_resources(dry)}
    assert f"--mode pull --remote {remote_url} " in shells["train_teacher_from_remote"]
    assert "--mode reuse " in shells["trajectory_shard_from_store"] and "--mode make " in shells["trajectory_shard"]

    run = workflow_runs.snakemake(workdir, "results/tiny/receipts/shards/000000.json",
                                  "results/tiny/receipts/shards/000001.json", configs=(TINY, given))
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    for name in ("dataset", "teacher", "trajectories", "shard/000000"):
        record = store.read_record(files[name])
        assert record["pulled"]["from"] == remote_url and record["key"] == "made-up", name
        assert [Path(f).read_bytes() for f in files[name]] == [f"made-up {Path(f).name}".encode() for f in files[name]]
    receipt = json.loads((workdir / "results/tiny/receipts/teacher.json").read_text())
    assert not receipt["made_by_this_job"] and receipt["files"][0]["path"] == files["teacher"][0]
    assert "[store] pulling" in (workdir / "results/tiny/logs/train_teacher.log").read_text()
    jobs = planned_jobs(workflow_runs.snakemake(workdir, "-n", configs=(TINY, given)))
    assert not [n for n in jobs if n.endswith(("_from_remote", "_from_store")) or n in (
        "prepare_dataset", "train_teacher", "trajectory_spec")], jobs
    assert jobs["trajectory_shard"] == 1


def test_without_a_remote_no_request_is_sent_and_the_rules_are_as_they_were(s3_server, s3_endpoint, tmp_path):
    """A run without store_remote asks nothing; its store jobs' shell commands carry no remote option."""
    given = overlay(tmp_path, {"store": str(tmp_path / "store")})
    dry = workflow_runs.snakemake(tmp_path, "-n", "-p", configs=(TINY, given))
    assert planned_jobs(dry)["trajectory_shard"] == 2
    assert "--remote" not in dry.stdout and "--push" not in dry.stdout
    assert not s3_server.requests


def test_a_jobs_own_snakemake_asks_no_remote(s3_server, remote_url, tmp_path):
    """On a cluster each job runs its own Snakemake (`--mode remote`, the executor's call) on a compute
    node, which may reach no network: it plans no pulls and sends no request; its job is made."""
    given = overlay(tmp_path, {"store": str(tmp_path / "store"), "store_remote": remote_url})
    fill(remote_url, [store_keys.item_files(resolve([TINY, given]))["trajectories"]], tmp_path / "site-a")
    s3_server.requests.clear()
    run = workflow_runs.snakemake(tmp_path, "--mode", "remote", "--target-jobs", "trajectory_spec:",
                                  "--allowed-rules", "trajectory_spec", configs=(TINY, given))
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert not s3_server.requests
    assert "[store] making" in (tmp_path / "results/tiny/logs/trajectory_spec.log").read_text()


def test_store_push_adds_the_push_to_what_is_made_only(remote_url, tmp_path):
    given = overlay(tmp_path, {"store": str(tmp_path / "store"), "store_remote": remote_url, "store_push": True})
    make_item(store_keys.item_files(resolve([TINY, given]))["shard/000001"])
    shells = {rule: shell for rule, _, shell in planned_resources(workflow_runs.snakemake(
        tmp_path, "-n", configs=(TINY, given)))}
    assert f"--mode make --push --remote {remote_url} " in shells["train_teacher"]
    assert "--mode reuse " in shells["trajectory_shard_from_store"]
    unset = overlay(tmp_path, {"store_push": True}, "push-only")
    failed = workflow_runs.snakemake(tmp_path, "-n", configs=(TINY, unset))
    assert failed.returncode != 0 and "store_push: true needs store_remote" in failed.stdout + failed.stderr


def test_a_remote_that_cannot_be_listed_stops_planning_naming_it(s3_endpoint, tmp_path):
    given = overlay(tmp_path, {"store": str(tmp_path / "store"), "store_remote": "s3://no-such-bucket-cmt/x"})
    failed = workflow_runs.snakemake(tmp_path, "-n", configs=(TINY, given))
    said = failed.stdout + failed.stderr
    assert failed.returncode != 0
    assert re.search(r"store_remote s3://no-such-bucket-cmt/x: cannot list .*NoSuchBucket", said), said
    assert "or plan without it: --config store_remote=" in said


@pytest.mark.heavy
def test_a_paper_rows_plan_lists_key_folders_not_objects(s3_server, remote_url, tmp_path):
    """The ImageNet-512 ECD row: its three imported networks, its trajectory spec, 159 of its 160
    trajectory shards and 255 of its 257 latent shards in the remote, one latent shard in the local
    store. The dry run plans each as a pull, a receipt from the record or a making job, from one LIST
    request per key folder (six), never a request per item."""
    row = ROWS / "imagenet512-cmt-ecd.yaml"
    given = overlay(tmp_path, {"store": str(tmp_path / "store"), "store_remote": remote_url})
    files = store_keys.item_files(resolve([row, given]))
    made_here, local = {"dataset", "shard/000159", "latent/000256"}, "latent/000255"
    make_item(files[local])
    remote = store_remote.Remote(remote_url)
    s3 = boto3.client("s3")
    for name in set(files) - made_here - {local}:  # records alone: planning reads no object
        record = store.read_record(make_item(files[name], tmp_path / "site-a"))
        s3.put_object(Bucket=remote.bucket, Key=remote.key(store_remote.item_name(files[name]) + ".record.json"),
                      Body=json.dumps(record).encode())
    s3_server.requests.clear()
    jobs = planned_jobs(workflow_runs.snakemake(tmp_path, "-n", configs=(row, given)))
    assert {n: c for n, c in jobs.items() if n.startswith(("import_", "trajectory_s", "encode_dataset"))} == {
        "import_teacher_from_remote": 1, "import_guide_from_remote": 1, "import_ecd_teacher_from_remote": 1,
        "trajectory_spec_from_remote": 1, "trajectory_shard_from_remote": 159, "trajectory_shard": 1,
        "encode_dataset_from_remote": 255, "encode_dataset_from_store": 1, "encode_dataset": 1}, jobs
    listed, other = s3_server.lists_and_others()
    assert len(listed) == 6 and not other, s3_server.requests
    assert all("delimiter=%2F" in query for _, _, query in listed)


def results(workdir):
    """The numbers of the report's table (results.csv) of a finished tiny run but its wall times:
    {row label: {column: value}}."""
    rows = list(csv.DictReader((workdir / "results" / "tiny" / "results.csv").open()))
    return {tuple(v for v in r.values() if not number(v)): {k: float(v) for k, v in r.items()
                                                            if number(v) and "wall time" not in k} for r in rows}


def number(text):
    try:
        float(text)
    except (TypeError, ValueError):
        return False
    return True


@pytest.mark.heavy
def test_a_second_site_runs_the_tiny_row_from_the_remote_alone(remote_url, tmp_path):
    """Site A runs the tiny row with store_push: every store item it makes is pushed. Site B, with an
    empty store of its own, plans no dataset, teacher or trajectory job, only pulls, and its run ends
    with site A's numbers."""
    sites = {}
    for name in ("a", "b"):
        (tmp_path / name).mkdir()
        sites[name] = overlay(tmp_path, {"store": str(tmp_path / name / "store"), "store_remote": remote_url,
                                         "store_push": name == "a"}, f"site-{name}")
    workflow_runs.finished_run(tmp_path / "a", "tiny", (TINY, sites["a"]))
    made = {i.name for i in store_items.scan(tmp_path / "a" / "store") if i.status == store_items.COMPLETE}
    assert len(made) == 5 and set(store_remote.Remote(remote_url).items()) == made

    jobs = planned_jobs(workflow_runs.snakemake(tmp_path / "b", "-n", configs=(TINY, sites["b"])))
    assert not {"prepare_dataset", "train_teacher", "trajectory_spec", "trajectory_shard"} & set(jobs), jobs
    assert {n: c for n, c in jobs.items() if n.endswith("_from_remote")} == {
        "prepare_dataset_from_remote": 1, "train_teacher_from_remote": 1, "trajectory_spec_from_remote": 1,
        "trajectory_shard_from_remote": 2}
    workflow_runs.finished_run(tmp_path / "b", "tiny", (TINY, sites["b"]))
    pulled = store_items.scan(tmp_path / "b" / "store")
    assert {i.name for i in pulled} == made and all(i.record["pulled"]["from"] == remote_url for i in pulled)
    assert "[store] pulling" in (tmp_path / "b" / "results/tiny/logs/train_teacher.log").read_text()
    a, b = results(tmp_path / "a"), results(tmp_path / "b")
    assert a.keys() == b.keys() and a
    for label in a:
        assert b[label] == pytest.approx(a[label], rel=1e-5), label


def test_the_plans_helpers_without_snakemake(tmp_path):
    """Where items come from without a remote (no boto3 imported), the wrapper's options and the shard
    rules' patterns."""
    made = [str(f) for f in make_item([tmp_path / "trajectories/k/shard-000001.tar"])]
    script = ("import sys; from stages.files import store_plan as p; "
              f"print(p.sources([{made!r}, [{str(tmp_path / 'trajectories/k/shard-000002.tar')!r}]])); "
              "print('boto3' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=workflow_runs.REPO,
                         check=True).stdout.splitlines()
    assert out == [repr({made[0]: "store", str(tmp_path / "trajectories/k/shard-000002.tar"): "make"}), "False"]
    assert store_plan.sources([made], remake=True) == {made[0]: "make"}
    assert store_plan.wrapper_options("remote", remote="s3://b/p") == "pull --remote s3://b/p"
    assert store_plan.wrapper_options("make", remote="s3://b/p", push=True) == "make --push --remote s3://b/p"
    assert store_plan.wrapper_options("store", remote="s3://b/p", push=True) == "reuse"
    assert store_plan.wrapper_options("remote", remake=True, remote="s3://b/p", push=True) == (
        "remake --push --remote s3://b/p")
    sources = {"000000": "remote", "000001": "store", "000002": "remote"}
    assert [store_plan.shard_pattern(sources, s) for s in ("remote", "store", "make")] == [
        "000000|000002", "000001", "(?!)"]
    assert store_plan.shard_pattern(dict.fromkeys(sources, "remote"), "remote") == r"\d{6}"
    assert store_plan.rule_name("trajectory_shard", "remote") == "trajectory_shard_from_remote"
