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
import re
import shlex
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))
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


def job_output(rule, output):
    """A job's name in the golden file: its rule and output, shard numbers folded."""
    return f"{rule} -> " + re.sub(r"(shards|latents|trajectory_shard|encode_dataset)/\d{6}", r"\1/{shard}", output)


def planned(stack):
    """{job name: {config, key or spec}} of a dry run of `stack`."""
    with tempfile.TemporaryDirectory() as workdir:
        cmd = [sys.executable, "-m", "snakemake", "-n", "-p", "--forceall", "--snakefile", str(REPO / "Snakefile"),
               "-d", workdir, "-c2"] + (["--configfile", *[str(REPO / s) for s in stack]] if stack else [])
        result = subprocess.run(cmd, capture_output=True, text=True, cwd=workdir)
    if result.returncode:
        raise SystemExit(f"{stack_name(stack)}: the dry run failed:\n{result.stderr[-3000:]}")
    jobs = {}
    for block in re.split(r"\n(?=\s*\[[^\]]+\]\n)", result.stdout):
        rule = re.search(r"^\s*(?:local)?rule (\w+):$", block, re.M)
        output = re.search(r"^\s+output: (.*)$", block, re.M)
        shell = re.search(r"^\s*(?:Shell command: )?(python -m .*)$", block, re.M)
        if not (rule and output and shell):
            continue
        words = shlex.split(shell.group(1).split(" > ")[0])
        entry = {flag.strip("-"): words[words.index(flag) + 1] for flag in ("--config", "--key", "--spec")
                 if flag in words}
        if not entry.get("spec", "{").startswith("{"):  # a receipt's path (trajectory_manifest), not a spec
            del entry["spec"]
        name = job_output(rule.group(1), output.group(1))
        if name in jobs and jobs[name] != entry:
            raise SystemExit(f"{stack_name(stack)}: {name} differs between its shards")
        jobs[name] = entry
    return jobs


if __name__ == "__main__":
    golden = {}
    for stack in stacks():
        golden[stack_name(stack)] = planned(stack)
        print(f"{stack_name(stack)}: {len(golden[stack_name(stack)])} jobs", flush=True)
    Path(sys.argv[1]).write_text(json.dumps(golden, indent=1, sort_keys=True) + "\n")
