"""Record what the workflow passes to every stage, for tests/test_stage_configs.py.

For every row stack (config/default.yaml, each row, each overlay over its rows, the variants, the
test rows), a dry run (`snakemake -n -p --forceall` in an empty workdir) prints every job's shell
command; this keeps, per rule and output (shard numbers folded into {shard}), the `--config` JSON
the job's stage receives and the store key (`--key`, or the latent manifest's `--spec`). The golden
file is what the Python functions of stages/config must reproduce byte for byte: a change that moves
a store key invalidates every team's store, and one that changes a stage's config reruns its jobs.
Regenerate it only for such a change on purpose, and say in the commit which key moved and why:

    python tests/golden/record_stage_configs.py tests/golden/stage_configs.json
"""

import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path[:0] = [str(REPO), str(REPO / "tests")]
from workflow_runs import planned_configs  # noqa: E402

from stages.config import OVERLAYS  # noqa: E402


def stacks():
    rows = REPO / "config" / "rows"
    out = [[]]
    out += [[f"config/rows/{p.name}"] for p in sorted(rows.glob("*.yaml"))]
    out += [[f"config/rows/{row}", f"config/rows/{overlay}"] for overlay, names in OVERLAYS.items() for row in names]
    out += [[f"config/rows/variants/{p.name}"] for p in sorted((rows / "variants").glob("*.yaml"))]
    return out + [["tests/tiny.yaml"], ["tests/tiny.yaml", "tests/tiny-mf.yaml"]]


def stack_name(stack):
    return " + ".join(stack) or "default"


if __name__ == "__main__":
    golden = {}
    for stack in stacks():
        golden[stack_name(stack)] = planned_configs(stack)
        print(f"{stack_name(stack)}: {len(golden[stack_name(stack)])} jobs", flush=True)
    Path(sys.argv[1]).write_text(json.dumps(golden, indent=1, sort_keys=True) + "\n")
