"""The store command (stages/tools/store.py) on a store the tests make through the store wrapper:
ls and du, verify, gc and its rule, the use log and the environment kept in records."""

import json
import os
import re
import subprocess
import sys
import threading
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest

from stages import config as project_config
from stages.config import store_keys, store_refs
from stages.files import atomic, store, store_items
from stages.tools import store as store_cli

REPO = Path(__file__).resolve().parents[1]

# a stage that writes its files (path=content pairs); with LEAVE_ENV it leaves its environment as a
# stage does through cli.start
MAKER = """
import os, sys
sys.path.insert(0, {repo!r})
if os.environ.get("LEAVE_ENV"):
    import torch  # noqa: F401  (a stage has imported it when it exits)
    from stages.core import provenance
    provenance.leave_for_store()
for pair in sys.argv[1:]:
    path, content = pair.split("=", 1)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    open(path, "w").write(content)
"""

KEYS = {"dataset": "1111aaaa2222bbbb", "teacher": "3333cccc4444dddd", "trajectories": "5555eeee6666ffff"}


class Store:
    """A store made through store.provide, each item from its own workdir under `tmp`."""

    def __init__(self, tmp):
        self.tmp = tmp
        self.root = tmp / "store"
        self.maker = tmp / "maker.py"
        self.maker.write_text(MAKER.format(repo=str(REPO)))

    def make(self, rel_files, key, receipt, workdir="wd", content="x", mode="make"):
        files = [self.root / f for f in rel_files]
        cwd = Path.cwd()
        (self.tmp / workdir).mkdir(exist_ok=True)
        os.chdir(self.tmp / workdir)
        try:
            command = [sys.executable, str(self.maker), *[f"{f}={content}:{f.name}" for f in files]]
            assert store.provide(files, key, receipt, mode, command) == 0
        finally:
            os.chdir(cwd)
        return files

    def standard(self):
        """A dataset, a teacher and a trajectory pool (spec and two shards), as the rules lay them out."""
        k = KEYS
        self.dataset = self.make([f"datasets/digits-{k['dataset']}/dataset.npz",
                                  f"datasets/digits-{k['dataset']}/manifest.json"], k["dataset"],
                                 "results/digits/receipts/dataset.json")
        self.teacher = self.make([f"teachers/{k['teacher']}/model.safetensors", f"teachers/{k['teacher']}/model.json"],
                                 k["teacher"], "results/digits/receipts/teacher.json", content="teacher" * 100)
        self.spec = self.make([f"trajectories/{k['trajectories']}/spec.json"], k["trajectories"],
                              "results/digits/receipts/trajectory-spec.json")
        self.shards = [self.make([f"trajectories/{k['trajectories']}/shard-{i:06d}.tar"], k["trajectories"],
                                 f"results/digits/receipts/shards/{i:06d}.json", content="s" * (1000 + i))
                       for i in range(2)]
        return self


@pytest.fixture
def made(tmp_path):
    return Store(tmp_path).standard()


def age(files, days):
    """Make the item look made and last used `days` ago."""
    then = (datetime.now(timezone.utc) - timedelta(days=days)).isoformat(timespec="seconds")
    record = json.loads(store.record_path(files).read_text())
    record["made"]["at"] = then
    atomic.write_json(store.record_path(files), record)
    uses = json.loads(store.uses_path(files).read_text())
    for use in uses["workdirs"].values():
        use["at"] = then
    atomic.write_json(store.uses_path(files), uses)


def cli(capsys, *argv, status=0):
    """Run the store command on the test's store; its output. `status`: the exit status it must give."""
    assert store_cli.main(list(argv)) == status
    return capsys.readouterr().out


@pytest.fixture
def rows(monkeypatch):
    """Rows whose keys the tests choose (the real dry runs are tested once, below)."""
    keys = {"row-a.yaml": {KEYS["dataset"], KEYS["teacher"]}, "row-b.yaml": {KEYS["dataset"]}}
    monkeypatch.setattr(store_refs, "row_store_keys", lambda files: keys[Path(files[-1]).name])
    return ["--given-only", "--configfile", "row-a.yaml", "--configfile", "row-b.yaml"]


# ---- records and use logs ------------------------------------------------------------------

def test_records_keep_the_environment_the_stage_leaves(tmp_path, monkeypatch):
    s = Store(tmp_path)
    plain = s.make(["teachers/k1/model.safetensors"], "k1", "r1.json")
    monkeypatch.setenv("LEAVE_ENV", "1")
    staged = s.make(["teachers/k2/model.safetensors"], "k2", "r2.json")
    import platform
    import socket

    import torch

    for files in (plain, staged):
        env = store.read_record(files)["made"]["env"]
        assert env["python"] == platform.python_version() and env["hostname"] == socket.gethostname()
        assert env["torch"].split("+")[0] == torch.__version__.split("+")[0]
        assert not store.env_path(files).exists()
    # the stage's own view: its device (it never initialised CUDA) and the CUDA build of its torch
    env = store.read_record(staged)["made"]["env"]
    assert env["device"] == "cpu" and env["cuda"] == torch.version.cuda and env["torch"] == torch.__version__
    assert "device" not in store.read_record(plain)["made"]["env"]


def test_a_record_written_before_environments_were_kept_stays_readable(made, capsys):
    record = json.loads(store.record_path(made.spec).read_text())
    del record["made"]["env"]
    atomic.write_json(store.record_path(made.spec), record)
    assert store.read_record(made.spec)["format"] == "cmt-store-record/1"
    item = next(i for i in store_items.scan(made.root) if i.name.endswith("spec.json"))
    assert item.status == "complete" and store_items.env_summary(item.made) == ""
    out = cli(capsys, "ls", "--store", str(made.root), "--remote", "s3://x/y", "--no-rows", "--items")
    assert "spec.json" in out


def test_make_and_reuse_note_their_use_per_workdir(made):
    made.make(made.shards[0], KEYS["trajectories"], "results/other/receipts/shards/000000.json", workdir="wd2",
              mode="reuse")
    uses = json.loads(store.uses_path(made.shards[0]).read_text())
    assert uses["format"] == "cmt-store-uses/1"
    assert set(uses["workdirs"]) == {str(made.tmp / "wd"), str(made.tmp / "wd2")}
    assert uses["workdirs"][str(made.tmp / "wd2")]["receipt"] == "results/other/receipts/shards/000000.json"


def test_a_removal_between_a_receipts_two_reads_makes_the_item_again(made, monkeypatch):
    """A receipt notes its use, then reads the record again: a removal in between is seen."""
    original = store.note_use

    def removal_first(files, receipt):
        item = next(i for i in store_items.scan(made.root) if i.name.endswith("shard-000000.tar"))
        assert store_items.remove(item) == "removed"
        original(files, receipt)

    monkeypatch.setattr(store, "note_use", removal_first)
    with pytest.raises(SystemExit, match="was complete when this run was planned and is not now"):
        made.make(made.shards[0], KEYS["trajectories"], "r.json", mode="reuse")
    monkeypatch.setattr(store, "note_use", original)
    made.make(made.shards[0], KEYS["trajectories"], "r.json", content="again")
    assert made.shards[0][0].read_text().startswith("again") and store.complete(made.shards[0])


def test_a_lock_on_a_removed_lock_file_is_taken_again(tmp_path):
    files = [tmp_path / "k" / "item.bin"]
    holder = store.ItemLock(files).__enter__()
    got = threading.Event()
    waiter = store.ItemLock(files)
    thread = threading.Thread(target=lambda: (waiter.__enter__(), got.set()))
    thread.start()
    time.sleep(0.2)
    assert not got.is_set()
    store.lock_path(files).unlink()  # as gc does, holding the lock
    holder.__exit__(None, None, None)
    thread.join(10)
    assert got.is_set() and waiter.in_place()
    with pytest.raises(store.ItemBusy):
        store.ItemLock(files, wait=False).__enter__()
    waiter.__exit__(None, None, None)


# ---- ls, du --------------------------------------------------------------------------------

def test_ls_lists_items_with_who_made_them_and_the_rows_that_use_them(made, rows, capsys):
    out = cli(capsys, "ls", "--store", str(made.root), "--remote", "s3://x/y", "--json", *rows)
    items = {i["name"]: i for i in json.loads(out)}
    assert sorted(items) == sorted(store_items.Item(f, None, "").name for f in
                                   [made.dataset, made.teacher, made.spec, *made.shards])
    teacher = items[f"teachers/{KEYS['teacher']}/model.safetensors"]
    assert teacher["kind"] == "teachers" and teacher["key"] == KEYS["teacher"] and teacher["status"] == "complete"
    assert teacher["bytes"] == sum(f.stat().st_size for f in made.teacher)
    assert [f["name"] for f in teacher["files"]] == ["model.safetensors", "model.json"]
    assert teacher["made"]["by"] == store.who() and teacher["made"]["workdir"] == str(made.tmp / "wd")
    assert teacher["rows"] == ["row-a"]
    assert items[f"datasets/digits-{KEYS['dataset']}/dataset.npz"]["rows"] == ["row-a", "row-b"]
    assert items[f"trajectories/{KEYS['trajectories']}/shard-000001.tar"]["rows"] == []
    # grouped by key: the pool's three items on one line
    out = cli(capsys, "ls", "--store", str(made.root), "--remote", "s3://x/y", *rows)
    line = next(x for x in out.splitlines() if x.startswith("trajectories"))
    size = sum(f.stat().st_size for f in [*made.spec, *made.shards[0], *made.shards[1]])
    assert line.split()[:6] == ["trajectories", KEYS["trajectories"], "complete", "3", *store_items.human(size).split()]


def test_ls_shows_files_without_a_record_and_incomplete_items(made, capsys):
    (made.root / "trajectories" / KEYS["trajectories"] / "shard-000002.tar").write_text("half")
    made.shards[1][0].write_text("truncated")
    out = cli(capsys, "ls", "--store", str(made.root), "--remote", "s3://x/y", "--no-rows")
    assert "shard-000002.tar: unrecorded: no record" in out
    assert "shard-000001.tar: incomplete: missing or not the recorded size: shard-000001.tar" in out


def test_du_sums_by_kind_and_key(made, capsys):
    state = made.root / "teachers" / f"{KEYS['teacher']}-state"
    state.mkdir()
    (state / "state.safetensors").write_bytes(b"0" * 5000)
    out = cli(capsys, "du", "--store", str(made.root), "--remote", "s3://x/y")
    lines = {tuple(line.split()[:2]): line.split()[-2:] for line in out.splitlines()}
    teacher = sum(f.stat().st_size for f in made.teacher)
    kinds = {line.split()[0]: line.split()[1:] for line in out.splitlines() if not line.startswith(" ")}
    assert kinds["teachers"] == store_items.human(teacher + 5000).split()
    assert lines[(KEYS["teacher"], "complete")] == store_items.human(teacher).split()
    assert lines[(KEYS["teacher"], "training")] == store_items.human(5000).split()
    pool = sum(f.stat().st_size for f in [*made.spec, *made.shards[0], *made.shards[1]])
    assert lines[(KEYS["trajectories"], "complete")] == store_items.human(pool).split()
    total = sum(f.stat().st_size for f in made.root.rglob("*") if f.is_file() and not f.name.startswith(".")
                and not f.name.endswith((".record.json", ".uses.json")))
    assert kinds["total"] == store_items.human(total).split()


# ---- verify --------------------------------------------------------------------------------

def test_verify_names_the_damaged_item_and_the_command_that_remakes_it(made, capsys):
    out = cli(capsys, "verify", "--store", str(made.root), "--remote", "s3://x/y")
    assert "verified 5 items" in out and "0 damaged" in out
    shard = made.shards[1][0]
    shard.write_text(shard.read_text()[:-1] + "!")  # same size, other bytes
    receipt = made.tmp / "wd" / "results/digits/receipts/shards/000001.json"
    out = cli(capsys, "verify", "--store", str(made.root), "--remote", "s3://x/y", status=1)
    assert "1 damaged" in out
    assert f"DAMAGED trajectories/{KEYS['trajectories']}/shard-000001.tar" in out and "sha256" in out
    assert f"in {made.tmp / 'wd'}: " + store.remake_command("results/digits/receipts/shards/000001.json") in out
    receipt.unlink()  # no workdir keeps a receipt for it: the pattern for any row's workdir
    out = cli(capsys, "verify", "--store", str(made.root), "--remote", "s3://x/y", "shard-000001", status=1)
    assert "verified 1 items" in out
    assert store.remake_command("results/<row>/receipts/shards/000001.json") in out


def test_verify_a_sample_and_one_key(made, capsys):
    out = cli(capsys, "verify", "--store", str(made.root), "--remote", "s3://x/y", "--sample", "2",
                    "--seed", "1")
    assert "verified 2 items" in out
    out = cli(capsys, "verify", "--store", str(made.root), "--remote", "s3://x/y", KEYS["trajectories"])
    assert "verified 3 items" in out


def test_verify_skips_an_item_being_made(made, capsys):
    with store.ItemLock(made.teacher):
        out = cli(capsys, "verify", "--store", str(made.root), "--remote", "s3://x/y", "teachers/")
    assert "not verified, being made" in out and "verified 0 items" in out


# ---- gc ------------------------------------------------------------------------------------

def test_gc_lists_what_no_row_uses_and_keeps_what_was_used_within_the_grace_period(made, rows, capsys):
    for files in made.shards:
        age(files, days=40)
    out = cli(capsys, "gc", "--store", str(made.root), "--remote", "s3://x/y", *rows)
    shard = f"trajectories/{KEYS['trajectories']}/shard-000000.tar"
    assert f"remove  {shard}" in out and "no given row uses it" in out
    assert f"keep    trajectories/{KEYS['trajectories']}/spec.json: no given row uses it, but used" in out
    assert "within the grace period of 30 days" in out
    assert "teachers/" not in out and "datasets/" not in out  # row-a uses them
    assert "a dry run" in out and store.complete(made.shards[0])  # listing removes nothing


def test_gc_removes_record_first_then_files_use_log_and_lock(made, rows, capsys):
    for files in [made.spec, *made.shards]:
        age(files, days=40)
    out = cli(capsys, "gc", "--store", str(made.root), "--remote", "s3://x/y", "--yes", *rows)
    assert len([x for x in out.splitlines() if x.startswith("removed trajectories/")]) == 3
    assert not (made.root / "trajectories" / KEYS["trajectories"]).exists()
    assert store.complete(made.teacher) and store.complete(made.dataset)
    # and the workflow makes it again when it needs it
    made.make(made.shards[0], KEYS["trajectories"], "r.json")
    assert store.complete(made.shards[0])


def test_gc_never_removes_an_item_used_within_the_grace_period(made, rows, capsys):
    age(made.shards[0], days=40)
    age(made.shards[1], days=29)
    cli(capsys, "gc", "--store", str(made.root), "--remote", "s3://x/y", "--yes", *rows)
    assert store.complete(made.shards[1]) and not made.shards[0][0].exists()
    cli(capsys, "gc", "--store", str(made.root), "--remote", "s3://x/y", "--yes", "--grace", "7", *rows)
    assert not made.shards[1][0].exists()


def test_gc_keeps_an_item_a_running_workflow_used_or_one_being_made(made, rows, capsys):
    for files in made.shards:
        age(files, days=40)
    locks = made.tmp / "wd" / ".snakemake" / "locks"
    locks.mkdir(parents=True)
    (locks / "0.input.lock").write_text("")
    out = cli(capsys, "gc", "--store", str(made.root), "--remote", "s3://x/y", "--yes", *rows)
    assert "a Snakemake run is in progress in" in out and store.complete(made.shards[0])
    (locks / "0.input.lock").unlink()
    with store.ItemLock(made.shards[0]):
        out = cli(capsys, "gc", "--store", str(made.root), "--remote", "s3://x/y", "--yes", *rows)
    assert "kept: being made or remade" in out and store.complete(made.shards[0])
    assert not made.shards[1][0].exists()


def test_a_teachers_metrics_log_is_listed_and_removed_with_it(made):
    """The training log beside a teacher's model (stages/training/metrics.py) is no file of the
    item's record and no unrecorded item: it goes when the teacher goes."""
    log = made.teacher[0].parent / "metrics.jsonl"
    log.write_text('{"kind": "train", "step": 100}\n')
    items = store_items.scan(made.root)
    assert not [i for i in items if i.status == store_items.UNRECORDED]
    (teacher,) = [i for i in items if i.kind == "teachers" and i.status == store_items.COMPLETE]
    assert store_items.remove(teacher) == "removed"
    assert not log.exists() and not log.parent.exists()


def test_gc_puts_the_record_back_when_a_use_is_noted_during_the_removal(made):
    age(made.shards[0], days=40)
    item = next(i for i in store_items.scan(made.root) if i.name.endswith("shard-000000.tar"))
    assert store_items.plan_gc([item], referenced=set())[0].remove
    store.note_use(made.shards[0], "results/x/receipts/shards/000000.json")  # a receipt after the decision
    assert store_items.remove(item) == "kept: used while being removed"
    assert store.complete(made.shards[0])


def test_gc_by_last_use(made, capsys):
    age(made.teacher, days=100)
    age(made.dataset, days=50)
    out = cli(capsys, "gc", "--store", str(made.root), "--remote", "s3://x/y",
                    "--unused-since", (datetime.now(timezone.utc) - timedelta(days=60)).date().isoformat())
    assert f"remove  teachers/{KEYS['teacher']}/model.safetensors" in out and "datasets/" not in out
    assert "unused since" in out


def test_gc_leaves_incomplete_items_alone(made, rows, capsys):
    age(made.shards[0], days=40)
    made.shards[0][0].write_text("cut")
    out = cli(capsys, "gc", "--store", str(made.root), "--remote", "s3://x/y", "--yes", *rows)
    assert "items not complete" in out and made.shards[0][0].exists()


# ---- the rows' keys, from the workflow -----------------------------------------------------

@pytest.mark.parametrize("row", ["digits-cmt-ect", "imagenet512-cmt-ect"])
def test_row_store_keys_are_the_keys_the_workflows_store_jobs_are_given(row, tmp_path):
    """Against the workflow's own answer: the --key of every store job in a dry run of the row. A
    latent row's pixel dataset is no job's (its jobs read the encoded dataset) but counts: its key
    is part of the latents' and the teacher's."""
    run = subprocess.run([sys.executable, "-m", "snakemake", "-s", str(REPO / "Snakefile"), "-d", str(tmp_path),
                          "-n", "-p", "--forceall", "--configfile", str(REPO / "config" / "rows" / f"{row}.yaml")],
                         capture_output=True, text=True, check=True)
    planned = set(re.findall(r"--key\s+([0-9a-f]{16})\b", run.stdout))
    keys = store_refs.row_store_keys([REPO / "config" / "rows" / f"{row}.yaml"])
    assert planned and planned <= keys
    extra = keys - planned
    assert extra == ({store_keys.dataset(project_config.resolve([REPO / "config" / "rows" / f"{row}.yaml"])).key}
                     if row.startswith("imagenet512") else set())


def test_the_rows_are_the_row_files_not_bases_or_overlays():
    assert set(store_refs.rows()) >= {"digits-cmt-ect", "imagenet512-cmt-ect", "variants/digits-cmt-ect-equal-total"}
    assert not set(store_refs.rows()) & {"base/pixel-ect", "smoke/pixel-ect", "ablations/digits-cmt-mf-ratio1"}
