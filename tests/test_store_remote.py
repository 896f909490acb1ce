"""The remote store (stages/files/store_remote.py) against a real S3 API on localhost: moto's server,
started and stopped by the tests (conftest.py s3_server). Push, pull, damaged and half-pushed
objects, two sites pushing one item at once, and the requests that planning costs."""

import json
import os
import sys
import threading
from pathlib import Path

import boto3
import pytest

from stages.files import atomic, store, store_remote
from stages.tools import store as store_cli

REPO = Path(__file__).resolve().parents[1]
KEY = "23404d44e8a8415a"


def make_item(root, rel_files, content, key=KEY):
    """A complete local item, written and recorded as the store wrapper does."""
    files = [Path(root) / f for f in rel_files]
    for f in files:
        atomic.write_bytes(f, content(f.name))
    with store.ItemLock(files):
        store.write_record(files, key, env={"torch": "test"})
    return files


def shard(root, i=0, content=b"trajectories"):
    return make_item(root, [f"trajectories/{KEY}/shard-{i:06d}.tar"], lambda n: content * (100 + i))


def teacher(root, tag=b"A"):
    return make_item(root, ["teachers/tk/model.safetensors", "teachers/tk/model.json"],
                     lambda n: tag * 1000 + n.encode(), key="tk")


def objects(url):
    bucket, prefix = store_remote.parse(url)
    pages = boto3.client("s3").get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix + "/")
    return {o["Key"][len(prefix) + 1:] for page in pages for o in page.get("Contents", [])}


def test_push_then_pull_gives_the_item_with_its_record(remote_url, tmp_path):
    files = teacher(tmp_path / "a")
    remote = store_remote.Remote(remote_url)
    assert remote.push(files) == "pushed teachers/tk/model.safetensors"
    assert remote.push(files) == "teachers/tk/model.safetensors: in the remote already"
    record = store.read_record(files)
    assert objects(remote_url) == {"teachers/tk/model.safetensors.record.json",
                                   *(f"teachers/tk/.objects/{e['name']}.{e['sha256']}" for e in record["files"])}
    there = [tmp_path / "b" / "teachers/tk" / f.name for f in files]
    pulled = remote.pull(there)
    assert [f.read_bytes() for f in there] == [f.read_bytes() for f in files]
    assert store.read_record(there)["files"] == record["files"] and pulled["made"] == record["made"]
    assert pulled["pulled"]["from"] == remote_url and not store.remaking_path(there).exists()


def test_the_wrappers_pull_mode_writes_the_receipt(remote_url, tmp_path, monkeypatch):
    files = shard(tmp_path / "a")
    store_remote.Remote(remote_url).push(files)
    there = [tmp_path / "b" / "trajectories" / KEY / files[0].name]
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as done:
        store.main(["--mode", "pull", "--remote", remote_url, "--key", KEY, "--files", str(there[0]),
                    "--receipt", "r.json"])
    assert done.value.code == 0 and there[0].read_bytes() == files[0].read_bytes()
    receipt = store.read_receipt(tmp_path / "r.json")
    assert not receipt["made_by_this_job"] and receipt["files"][0]["sha256"] == atomic.sha256_file(files[0])
    assert str(tmp_path) in store.read_uses(there)
    # complete here now: a second pull job takes it from the local store
    assert store.provide(there, KEY, tmp_path / "r2.json", "pull", [], remote="s3://nowhere/x") == 0
    # an item the remote no longer holds: the job stops and says what to do
    gone = [tmp_path / "b" / "trajectories" / KEY / "shard-000009.tar"]
    with pytest.raises(SystemExit, match="not complete in the remote .* rerun the workflow"):
        store.provide(gone, KEY, tmp_path / "r3.json", "pull", [], remote=remote_url)
    assert not (tmp_path / "r3.json").exists()


def test_a_damaged_object_is_refused_naming_it(remote_url, tmp_path):
    files = shard(tmp_path / "a")
    remote = store_remote.Remote(remote_url)
    remote.push(files)
    entry = store.read_record(files)["files"][0]
    obj = f"trajectories/{KEY}/.objects/{entry['name']}.{entry['sha256']}"
    bucket, prefix = store_remote.parse(remote_url)
    boto3.client("s3").put_object(Bucket=bucket, Key=f"{prefix}/{obj}", Body=files[0].read_bytes()[:-1] + b"!")
    there = [tmp_path / "b" / "trajectories" / KEY / files[0].name]
    with pytest.raises(store_remote.DamagedObject) as err:
        remote.pull(there)
    assert f"s3://{bucket}/{prefix}/{obj}: damaged" in str(err.value) and "sha256" in str(err.value)
    assert not there[0].exists() and not store.complete(there)
    assert [p.name for p in there[0].parent.iterdir()] == [f".{there[0].name}.remaking"]


def test_a_half_pushed_item_is_not_complete(remote_url, tmp_path, monkeypatch):
    files = teacher(tmp_path / "a")
    remote = store_remote.Remote(remote_url)
    real = remote.put_new
    monkeypatch.setattr(remote, "put_new", lambda key, **kw: (_ for _ in ()).throw(ConnectionError("cut"))
                        if key.endswith(".record.json") else real(key, **kw))
    with pytest.raises(ConnectionError):
        remote.push(files)
    assert len(objects(remote_url)) == 2  # the files, no record
    name = store_remote.item_name(files)
    assert store_remote.remote_complete(remote_url, [name]) == set()
    with pytest.raises(store_remote.RemoteError, match="not complete in the remote"):
        remote.pull([tmp_path / "b" / "teachers/tk" / f.name for f in files])
    monkeypatch.undo()
    assert store_remote.Remote(remote_url).push(files) == f"pushed {name}"  # the objects there are reused
    assert store_remote.remote_complete(remote_url, [name]) == {name}


def test_push_refuses_a_local_file_that_no_longer_matches_its_record(remote_url, tmp_path):
    files = shard(tmp_path / "a")
    files[0].write_bytes(files[0].read_bytes()[:-1] + b"!")
    with pytest.raises(store_remote.DamagedObject, match="does not match its record"):
        store_remote.Remote(remote_url).push(files)
    assert objects(remote_url) == set()


@pytest.mark.parametrize("parallel", ["threads", "processes"])
def test_two_sites_pushing_one_item_at_once_one_wins_nothing_mixed(remote_url, tmp_path, parallel):
    """Two sites made the same teacher with other last bits and push it at the same instant: both
    reach the record together (the barrier). One record wins; every object it names is its
    pusher's; the other site's pull replaces its copy with the winner's."""
    sites = {tag: teacher(tmp_path / tag, tag.encode()) for tag in ("A", "B")}
    name = store_remote.item_name(sites["A"])
    if parallel == "threads":
        barrier = threading.Barrier(2)
        outcomes = {}

        def push(tag):
            remote = store_remote.Remote(remote_url)
            real = remote.put_new

            def racing(key, **kw):
                if key.endswith(".record.json"):
                    barrier.wait(10)
                return real(key, **kw)

            remote.put_new = racing
            outcomes[tag] = remote.push(sites[tag])

        threads = [threading.Thread(target=push, args=(tag,)) for tag in sites]
        for t in threads:
            t.start()
        for t in threads:
            t.join(30)
    else:
        script = ("import sys; sys.path.insert(0, sys.argv[1]); from stages.files import store_remote; "
                  "print(store_remote.Remote(sys.argv[2]).push(sys.argv[3:]))")
        import subprocess

        procs = [subprocess.Popen([sys.executable, "-c", script, str(REPO), remote_url, *map(str, sites[tag])],
                                  stdout=subprocess.PIPE, text=True) for tag in sites]
        outcomes = {tag: p.communicate(timeout=60)[0].strip() for tag, p in zip(sites, procs, strict=True)}
    winners = [tag for tag, o in outcomes.items() if o.startswith("pushed")]
    assert len(winners) == 1, outcomes
    winner, loser = winners[0], ({"A", "B"} - set(winners)).pop()
    assert outcomes[loser].startswith(f"{name}: the remote holds another copy"), outcomes
    remote = store_remote.Remote(remote_url)
    record = remote.record(name)
    assert record["files"] == store.read_record(sites[winner])["files"]
    fresh = [tmp_path / "C" / "teachers/tk" / f.name for f in sites[winner]]
    remote.pull(fresh)
    assert [f.read_bytes() for f in fresh] == [f.read_bytes() for f in sites[winner]]
    # the other site's next pull takes the remote's bytes
    remote.pull(sites[loser])
    assert [f.read_bytes() for f in sites[loser]] == [f.read_bytes() for f in sites[winner]]
    assert store.read_record(sites[loser])["files"] == record["files"]


def test_a_large_file_goes_up_in_parts_conditionally(remote_url, tmp_path, monkeypatch):
    monkeypatch.setattr(store_remote, "PART_BYTES", 5 << 20)  # S3's smallest part
    big = make_item(tmp_path / "a", ["latents/lk/shard-000000.tar"], lambda n: os.urandom(11 << 20), key="lk")
    remote = store_remote.Remote(remote_url)
    sha = store.read_record(big)["files"][0]["sha256"]
    key = remote.key(f"latents/lk/.objects/shard-000000.tar.{sha}")
    assert remote.upload_new(big[0], key, sha) is True
    assert remote.upload_new(big[0], key, sha) is False  # the object exists: the second upload is refused
    assert remote.push(big) == "pushed latents/lk/shard-000000.tar"
    there = [tmp_path / "b" / "latents/lk/shard-000000.tar"]
    remote.pull(there)
    assert atomic.sha256_file(there[0]) == sha
    listed = boto3.client("s3").list_multipart_uploads(Bucket=remote.bucket)
    assert not listed.get("Uploads")  # the refused upload was aborted, not left to bill


def count_requests(remote):
    calls = []
    remote.s3.meta.events.register("before-send.s3", lambda request, **kw: calls.append(request.method))
    operations = []
    remote.s3.meta.events.register("before-call.s3", lambda model, **kw: operations.append(model.name))
    return calls, operations


def test_planning_lists_each_folder_not_each_object(remote_url, tmp_path):
    """A row's items in three folders, 60 shards among them: three LIST requests, none per item."""
    local = tmp_path / "a"
    items = [make_item(local, [f"datasets/digits-{KEY}/dataset.npz", f"datasets/digits-{KEY}/manifest.json"],
                       lambda n: n.encode()),
             teacher(local), make_item(local, [f"trajectories/{KEY}/spec.json"], lambda n: b"{}")]
    items += [shard(local, i) for i in range(60)]
    remote = store_remote.Remote(remote_url)
    list(remote.push_many([f for f in items if "shard-000059" not in str(f[0])]))
    names = [store_remote.item_name(f) for f in items]
    calls, operations = count_requests(remote)
    found = remote.complete(names)
    assert found == set(names) - {f"trajectories/{KEY}/shard-000059.tar"}
    assert operations == ["ListObjectsV2"] * 3 and len(calls) == 3


def test_planning_pages_through_a_large_folder(remote_url, monkeypatch):
    """Records are listed a page at a time (1000 on S3): the requests grow with pages, not items."""
    remote = store_remote.Remote(remote_url)
    for i in range(30):  # records alone: listing reads no object
        remote.put_new(remote.key(f"trajectories/{KEY}/shard-{i:06d}.tar.record.json"), Body=b"{}")
    remote.put_new(remote.key(f"trajectories/{KEY}/.objects/x"), Body=b"")
    monkeypatch.setattr(store_remote, "LIST_PAGE", 7)
    _, operations = count_requests(remote)
    names = [f"trajectories/{KEY}/shard-{i:06d}.tar" for i in range(40)]
    assert remote.complete(names) == set(names[:30])
    assert operations == ["ListObjectsV2"] * 5  # 30 records and the objects' common prefix, 7 a page


# ---- the store command's push and pull ---------------------------------------------------

def test_store_command_push_and_pull(remote_url, tmp_path, capsys):
    a, b = tmp_path / "a", tmp_path / "b"
    files = [teacher(a), shard(a, 0), shard(a, 1)]
    assert store_cli.main(["push", "--store", str(a), "--remote", remote_url]) == 0
    out = capsys.readouterr().out
    assert out.count("pushed ") == 3 and "3 items to" in out and "0 failed" in out
    assert store_cli.main(["pull", "--store", str(b), "--remote", remote_url, KEY]) == 0
    out = capsys.readouterr().out
    assert f"pulled trajectories/{KEY}/shard-000000.tar" in out and "teachers" not in out
    assert store.complete([b / "trajectories" / KEY / "shard-000001.tar"])
    assert store_cli.main(["pull", "--store", str(b), "--remote", remote_url, "teachers/"]) == 0
    assert [p.read_bytes() for p in (b / "teachers" / "tk").glob("model.*") if p.is_file()]
    assert store_cli.main(["pull", "--store", str(b), "--remote", remote_url, KEY]) == 0
    assert "here already" in capsys.readouterr().out
    one = f"trajectories/{KEY}/shard-000001.tar"
    assert store_cli.main(["pull", "--store", str(tmp_path / "c"), "--remote", remote_url, one]) == 0
    assert [p.name for p in (tmp_path / "c").rglob("*.tar")] == ["shard-000001.tar"]
    with pytest.raises(SystemExit, match="no complete item matches latents/"):
        store_cli.main(["pull", "--store", str(b), "--remote", remote_url, "latents/"])
    assert store_cli.main(["ls", "--store", str(a), "--remote", remote_url, "--no-rows", "--check-remote"]) == 0
    out = capsys.readouterr().out
    assert "IN REMOTE" in out and "2/2" in out and "1/1" in out
    del files


def test_pushed_records_read_as_records(remote_url, tmp_path):
    files = teacher(tmp_path / "a")
    store_remote.Remote(remote_url).push(files)
    bucket, prefix = store_remote.parse(remote_url)
    body = boto3.client("s3").get_object(Bucket=bucket, Key=f"{prefix}/teachers/tk/model.safetensors.record.json")
    record = json.loads(body["Body"].read())
    assert record == store.read_record(files)


def test_the_wrapper_pushes_what_it_made_and_a_failed_push_fails_no_job(remote_url, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "store" / "trajectories" / KEY / "shard-000000.tar"
    stage = [sys.executable, "-c", f"open({str(out)!r}, 'w').write('made')"]
    out.parent.mkdir(parents=True)
    assert store.provide([out], KEY, "r.json", "make", stage, remote=remote_url, push=True) == 0
    name = store_remote.item_name([out])
    assert store_remote.remote_complete(remote_url, [name]) == {name}
    out2 = out.with_name("shard-000001.tar")
    stage = [sys.executable, "-c", f"open({str(out2)!r}, 'w').write('made')"]
    assert store.provide([out2], KEY, "r2.json", "make", stage, remote="s3://no-such-bucket-cmt/x", push=True) == 0
    assert store.complete([out2]) and "not pushed to s3://no-such-bucket-cmt/x" in capsys.readouterr().out


def test_a_remote_that_cannot_be_listed_is_named(s3_endpoint):
    with pytest.raises(store_remote.RemoteError, match=r"s3://no-such-bucket-cmt/x/teachers/tk/.*NoSuchBucket"):
        store_remote.remote_complete("s3://no-such-bucket-cmt/x", ["teachers/tk/model.safetensors"])
    with pytest.raises(store_remote.RemoteError, match="is not s3://bucket/prefix"):
        store_remote.Remote("https://example.org/store")
