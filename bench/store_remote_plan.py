"""Time planning with a remote store against moto's S3 server on localhost (tests/s3_server.py, which
counts the requests it answers, from any process):

1. the planning question alone: which of a paper row's items are complete in the remote
   (stages/files/store_remote.py remote_complete), beside one HEAD request per item, which it replaces;
2. `snakemake -n` of that row in an empty workdir with an empty local store: without a remote, with a
   remote that holds none of its items, and with one that holds all of them (each planned as a
   pull); beside them, without a remote and a local store that holds every item (each planned as a
   receipt from its record).

The row is --row (default the CIFAR-10 row) with --shards trajectory shards (default 2,400; the pool
size is no part of any key); the remote holds a record and an object per item, as a push leaves them.
Usage:

    python bench/store_remote_plan.py [--shards 2400] [--row config/rows/cifar10-cmt-ect.yaml] [--repeat 3]

Needs moto[server] (the test extra). On localhost a request costs about a millisecond; to a real
service, tens: the request counts carry over, the seconds do not.
"""

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import boto3
import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "tests")]
from s3_server import S3Server  # noqa: E402

from stages.config import resolve, store_keys  # noqa: E402
from stages.files import atomic, store_remote  # noqa: E402
from stages.files import store as store_module  # noqa: E402

p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
p.add_argument("--shards", type=int, default=2400)
p.add_argument("--row", default="config/rows/cifar10-cmt-ect.yaml")
p.add_argument("--repeat", type=int, default=3, help="dry runs of each case (the fastest and the median are kept)")
a = p.parse_args()


def row_items(config):
    """The files (`<kind>/<folder>/<file>`) of every store item of the row, item by item."""
    return [["/".join(Path(f).parts[-3:]) for f in files] for files in store_keys.item_files(config).values()]


def local_items(store, items):
    """Made-up complete items in the local store `store`, recorded."""
    for item in items:
        files = [Path(store, f) for f in item]
        for f in files:
            atomic.write_bytes(f, b"")
        store_module.write_record(files, key="made-up")


def dry_run(workdir, configs):
    """(seconds, {rule: jobs}) of `snakemake -n`."""
    t0 = time.perf_counter()
    run = subprocess.run([sys.executable, "-m", "snakemake", "-n", "--snakefile", str(REPO / "Snakefile"), "-d",
                          str(workdir), "-c2", "--configfile", *map(str, configs)], capture_output=True, text=True,
                         cwd=workdir)
    seconds = time.perf_counter() - t0
    if run.returncode:
        sys.exit(run.stdout[-3000:] + run.stderr[-3000:])
    table = run.stdout.split("Job stats:")[1].split("total")[0]
    return seconds, {m.group(1): int(m.group(2)) for m in re.finditer(r"^(\w+)\s+(\d+)\s*$", table, re.M)}


server = S3Server()
os.environ.update({"AWS_ENDPOINT_URL_S3": server.url, "AWS_ACCESS_KEY_ID": "bench",
                   "AWS_SECRET_ACCESS_KEY": "bench", "AWS_DEFAULT_REGION": "us-east-1",
                   "AWS_CONFIG_FILE": os.devnull, "AWS_SHARED_CREDENTIALS_FILE": os.devnull})
out = {"row": a.row, "shards": a.shards}
try:
    s3 = boto3.client("s3")
    for bucket in ("cmt-bench", "cmt-empty"):
        s3.create_bucket(Bucket=bucket)
    full, empty = "s3://cmt-bench/team/store", "s3://cmt-empty/team/store"
    with tempfile.TemporaryDirectory() as work:
        work = Path(work)
        layers = {"row": work / "row.yaml", "no remote": work / "none.yaml", "empty remote": work / "empty.yaml",
                  "full remote": work / "full.yaml", "full local store": work / "local.yaml"}
        layers["row"].write_text(yaml.safe_dump({"store": str(work / "store"),
                                                 "trajectories": {"num_shards": a.shards}}))
        for name, url in (("no remote", None), ("empty remote", empty), ("full remote", full)):
            layers[name].write_text(yaml.safe_dump({"store_remote": url}))
        layers["full local store"].write_text(yaml.safe_dump({"store": str(work / "full-store")}))
        items = row_items(resolve([REPO / a.row, layers["row"]]))
        names = [store_remote.item_name(files) for files in items]
        remote = store_remote.Remote(full)

        def fill(name):  # a record and an object per item, as a push leaves them
            s3.put_object(Bucket="cmt-bench", Key=remote.key(name + ".record.json"), Body=b"{}")
            s3.put_object(Bucket="cmt-bench", Key=remote.key(remote.object_name(name, name.rsplit("/", 1)[1],
                                                                                 "0" * 64)), Body=b"")

        t0 = time.perf_counter()
        with ThreadPoolExecutor(16) as pool:
            list(pool.map(fill, names))
        out["items"], out["fill_seconds"] = len(names), round(time.perf_counter() - t0, 1)

        server.requests.clear()
        t0 = time.perf_counter()
        assert remote.complete(names) == set(names)
        out["remote_complete"] = {"requests": len(server.requests), "seconds": round(time.perf_counter() - t0, 3)}
        server.requests.clear()
        t0 = time.perf_counter()
        for name in names:
            remote.s3.head_object(Bucket=remote.bucket, Key=remote.key(name + ".record.json"))
        out["head_per_item"] = {"requests": len(server.requests), "seconds": round(time.perf_counter() - t0, 3)}

        local_items(work / "full-store", items)
        out["dry_run"] = {}
        for name in ("no remote", "empty remote", "full remote", "full local store"):
            (work / name).mkdir()
            times = []
            for _ in range(a.repeat):
                server.requests.clear()
                seconds, jobs = dry_run(work / name, [REPO / a.row, layers["row"], layers[name]])
                times.append(seconds)
            lists, others = server.lists_and_others()
            out["dry_run"][name] = {"seconds_min": round(min(times), 1),
                                    "seconds_median": round(sorted(times)[len(times) // 2], 1),
                                    "list_requests": len(lists),
                                    "other_requests": len(others), "pull_jobs": sum(
                                        c for r, c in jobs.items() if r.endswith("_from_remote")),
                                    "receipt_jobs": sum(c for r, c in jobs.items() if r.endswith("_from_store")),
                                    "trajectory_shard_jobs": jobs.get("trajectory_shard", 0)}
            print(f"{name}: {out['dry_run'][name]}", flush=True)
    print(json.dumps(out, indent=2))
finally:
    server.stop()
