"""Time the remote store's planning question, which items of a row are complete in the remote
(stages/files/store_remote.py remote_complete), against moto's S3 server on localhost, and count its
requests; beside it, one HEAD request per item, which it replaces.

A paper row's store items: a dataset, a teacher, a trajectory spec and --shards shards (2,400 for the
CIFAR-10 rows), each with its record and objects in the remote. Usage:

    python bench/store_remote_plan.py [--shards 2400]

Needs moto[server] (the test extra). On localhost a request costs about a millisecond; to a real
service, tens: the request counts carry over, the seconds do not.
"""

import argparse
import json
import logging
import os
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import boto3

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from stages.files import store_remote  # noqa: E402

p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
p.add_argument("--shards", type=int, default=2400)
a = p.parse_args()

from moto.server import ThreadedMotoServer  # noqa: E402

logging.getLogger("werkzeug").setLevel(logging.ERROR)
server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
server.start()
host, port = server.get_host_and_port()
os.environ.update({"AWS_ENDPOINT_URL_S3": f"http://{host}:{port}", "AWS_ACCESS_KEY_ID": "bench",
                   "AWS_SECRET_ACCESS_KEY": "bench", "AWS_DEFAULT_REGION": "us-east-1"})
try:
    s3 = boto3.client("s3")
    s3.create_bucket(Bucket="cmt-bench")
    url = "s3://cmt-bench/team/store"
    traj = "9dc2b8b2729bf0c4"
    names = ["datasets/imagenet-0123456789abcdef/dataset.npz", "teachers/fedcba9876543210/model.safetensors",
             f"trajectories/{traj}/spec.json", *(f"trajectories/{traj}/shard-{i:06d}.tar" for i in range(a.shards))]
    remote = store_remote.Remote(url)

    def fill(name):  # a record and an object per item, as a push leaves them
        s3.put_object(Bucket="cmt-bench", Key=remote.key(name + ".record.json"), Body=b"{}")
        s3.put_object(Bucket="cmt-bench", Key=remote.key(remote.object_name(name, name.rsplit("/", 1)[1], "0" * 64)),
                      Body=b"")

    t0 = time.perf_counter()
    with ThreadPoolExecutor(16) as pool:
        list(pool.map(fill, names))
    fill_s = time.perf_counter() - t0

    sent = []
    remote.s3.meta.events.register("before-send.s3", lambda request, **kw: sent.append(request.method))
    t0 = time.perf_counter()
    found = remote.complete(names)
    listed_s, listed = time.perf_counter() - t0, len(sent)
    assert found == set(names)

    sent.clear()
    t0 = time.perf_counter()
    for name in names:
        remote.s3.head_object(Bucket=remote.bucket, Key=remote.key(name + ".record.json"))
    head_s, heads = time.perf_counter() - t0, len(sent)
    print(json.dumps({"items": len(names), "remote_complete": {"requests": listed, "seconds": round(listed_s, 3)},
                      "head_per_item": {"requests": heads, "seconds": round(head_s, 3)},
                      "fill_seconds": round(fill_s, 1)}, indent=2))
finally:
    server.stop()
