"""Stage latent_manifest: gather the shards of one encoded dataset into a checked manifest (count,
size and sha256 per shard, from this workdir's store receipts), the file the latent training stages
read their data list from. It refuses a pool that does not hold every image of the source exactly
once (latents.num_shards too small or too large), so no image is silently left out."""

import argparse
import json
import os
import tarfile

from stages.files import atomic, store

p = argparse.ArgumentParser(description=__doc__)
p.add_argument("--spec", type=json.loads, required=True, help="the encoding spec (the rule's key config)")
p.add_argument("--shards", nargs="+", required=True, help="receipts of the shards, in order")
p.add_argument("--out", required=True)
args = p.parse_args()

per_shard = args.spec["per_shard"]
entries, source_counts = [], set()
for k, receipt in enumerate(args.shards):
    shard = store.read_receipt(receipt)["files"][0]
    path, fix = shard["path"], store.remake_command(receipt)
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path}: encoded shard of receipt {receipt} is missing; {fix}")
    if os.path.getsize(path) != shard["bytes"]:
        raise ValueError(f"{path}: {os.path.getsize(path)} bytes, its receipt {receipt} says {shard['bytes']}; {fix}")
    with tarfile.open(path) as tar:
        members = tar.getmembers()
        keys = {m.name.split(".", 1)[0] for m in members}
        first_meta = next((m for m in members if m.name.endswith(".meta.json")), None)
        if first_meta is None:
            raise ValueError(f"{path}: no encoded images in the shard; {fix}")
        meta = json.loads(tar.extractfile(first_meta).read())
    source_counts.add(meta["source_count"])
    expected = min(per_shard, meta["source_count"] - k * per_shard)
    if len(keys) != expected:
        raise ValueError(f"{path}: {len(keys)} encoded images, shard {k} of a source of {meta['source_count']} "
                         f"at {per_shard} per shard should hold {expected}; {fix}")
    entries.append({"path": path, "receipt": receipt, "count": len(keys), "bytes": shard["bytes"],
                    "sha256": shard["sha256"]})
if len(source_counts) != 1:
    raise ValueError(f"the shards were encoded from sources of different sizes {sorted(source_counts)}: the "
                     "dataset changed between their jobs; remake them (store_remake=True)")
source_count = source_counts.pop()
total = sum(e["count"] for e in entries)
if total != source_count:
    raise ValueError(f"{len(entries)} shards x {per_shard} hold {total} of the source's {source_count} images; "
                     f"set latents.num_shards to {-(-source_count // per_shard)} so every image is encoded")
manifest = {"spec": args.spec, "total": total, "shards": entries}
atomic.write_json(args.out, manifest)
print(f"[latent_manifest] {len(entries)} shards, {total} encoded images -> {args.out}", flush=True)
