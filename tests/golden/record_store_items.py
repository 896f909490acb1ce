"""Record the small golden outputs of the stages that make store items, for tests/test_store_golden.py
(what is made and summed up: tests/store_golden.py). Regenerate only after bumping a CODE_VERSION entry
in stages/config/store_keys.py for a change that alters what a stage writes, or when a key moved on
purpose (tests/golden/stage_configs.json), and say so in the commit:

    python tests/golden/record_store_items.py tests/golden/store_items.json
"""

import json
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path[:0] = [str(REPO), str(REPO / "tests")]
import store_golden  # noqa: E402


def rounded(obj):
    """Floats to 10 significant digits, far below every tolerance: a shorter file, the same test."""
    if isinstance(obj, float):
        return float(f"{obj:.10g}")
    if isinstance(obj, dict):
        return {k: rounded(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [rounded(v) for v in obj]
    return obj


if __name__ == "__main__":
    with tempfile.TemporaryDirectory() as folder:
        golden = rounded(store_golden.make(folder))
    Path(sys.argv[1]).write_text(json.dumps(golden, indent=1, sort_keys=True) + "\n")
    made = [f"{kind} (key {entry['key']}, code version {entry['code_version']})" for kind, entry in golden.items()]
    print(f"{sys.argv[1]}: {', '.join(made)}")
