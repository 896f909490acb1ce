"""Stage trajectory_spec: write the solver spec beside the shards it keys, so a store folder
always says what made it."""

import argparse
import json

from stages.files import atomic

p = argparse.ArgumentParser(description=__doc__)
p.add_argument("--config", type=json.loads, required=True, help="the resolved trajectory spec")
p.add_argument("--out", required=True)
args = p.parse_args()
atomic.write_json(args.out, args.config)
print(f"[trajectory_spec] {args.out}: {json.dumps(args.config, sort_keys=True)}", flush=True)
