"""Stage trajectory_manifest: gather the shards of one trajectory pool into a checked manifest
(count and sha256 per shard), the single file mid-training reads its data list from."""

import argparse
import json
import os
import tarfile

from stages.files import atomic, checkpoints

p = argparse.ArgumentParser(description=__doc__)
p.add_argument("--spec", required=True)
p.add_argument("--teacher", required=True)
p.add_argument("--shards", nargs="+", required=True)
p.add_argument("--out", required=True)
args = p.parse_args()

spec = json.load(open(args.spec))
entries = []
for path in args.shards:
    with tarfile.open(path) as tar:
        keys = {m.name.split(".", 1)[0] for m in tar.getmembers()}
    if len(keys) != spec["per_shard"]:
        raise ValueError(f"{path}: {len(keys)} trajectories, the spec {args.spec} says {spec['per_shard']}; "
                         f"delete the shard and rerun its trajectory_shard job")
    entries.append({"path": path, "count": len(keys), "bytes": os.path.getsize(path),
                    "sha256": atomic.sha256_file(path)})
manifest = {
    "spec": spec,
    "teacher": {"path": args.teacher, "sha256": checkpoints.read_meta(args.teacher)["sha256"]},
    "total": sum(e["count"] for e in entries),
    "shards": entries,
}
atomic.write_json(args.out, manifest)
print(f"[trajectory_manifest] {len(entries)} shards, {manifest['total']} trajectories -> {args.out}",
      flush=True)
