"""Stage trajectory_manifest: gather the shards of one trajectory pool into a checked manifest
(count, size and sha256 per shard), the single file mid-training reads its data list from.

It reads this workdir's store receipts: the sha256 of each shard is the one recorded when the shard
was made (no shard is hashed again here), so mid-training's check against the manifest catches any
change to a shard since it was made."""

import argparse
import json
import os
import tarfile

from stages.files import atomic, checkpoints, store

p = argparse.ArgumentParser(description=__doc__)
p.add_argument("--spec", required=True, help="receipt of the trajectory spec")
p.add_argument("--teacher", required=True, help="receipt of the teacher")
p.add_argument("--shards", nargs="+", required=True, help="receipts of the shards, in order")
p.add_argument("--out", required=True)
args = p.parse_args()

spec_path = store.read_receipt(args.spec)["files"][0]["path"]
teacher_path = store.read_receipt(args.teacher)["files"][0]["path"]
spec = json.load(open(spec_path))
entries = []
for receipt in args.shards:
    shard = store.read_receipt(receipt)["files"][0]
    path = shard["path"]
    fix = store.remake_command(receipt)
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path}: trajectory shard of receipt {receipt} is missing; {fix}")
    if os.path.getsize(path) != shard["bytes"]:
        raise ValueError(f"{path}: {os.path.getsize(path)} bytes, its receipt {receipt} says {shard['bytes']}; {fix}")
    with tarfile.open(path) as tar:
        keys = {m.name.split(".", 1)[0] for m in tar.getmembers()}
    if len(keys) != spec["per_shard"]:
        raise ValueError(f"{path}: {len(keys)} trajectories, the spec {spec_path} says {spec['per_shard']}; {fix}")
    entries.append({"path": path, "receipt": receipt, "count": len(keys), "bytes": shard["bytes"],
                    "sha256": shard["sha256"]})
manifest = {
    "spec": spec,
    "teacher": {"path": teacher_path, "sha256": checkpoints.read_meta(teacher_path)["sha256"]},
    "total": sum(e["count"] for e in entries),
    "shards": entries,
}
atomic.write_json(args.out, manifest)
print(f"[trajectory_manifest] {len(entries)} shards, {manifest['total']} trajectories -> {args.out}",
      flush=True)
