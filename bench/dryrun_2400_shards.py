"""Time `snakemake -n` on a row with 2,400 trajectory shards (the issue's bound: <= 15 s on the
2-core development machine). Usage: python bench/dryrun_2400_shards.py [--shards 2400]"""

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]

p = argparse.ArgumentParser(description=__doc__)
p.add_argument("--shards", type=int, default=2400)
a = p.parse_args()
with tempfile.TemporaryDirectory() as work:
    cfg = yaml.safe_load((REPO / "tests" / "tiny.yaml").read_text())
    cfg["trajectories"]["num_shards"] = a.shards
    (Path(work) / "row.yaml").write_text(yaml.safe_dump(cfg))
    t0 = time.perf_counter()
    run = subprocess.run([sys.executable, "-m", "snakemake", "-n", "--snakefile", str(REPO / "Snakefile"),
                          "--directory", work, "--configfile", str(Path(work) / "row.yaml")],
                         capture_output=True, text=True, cwd=REPO)
    seconds = time.perf_counter() - t0
    if run.returncode != 0:
        sys.exit(run.stdout[-3000:] + run.stderr[-3000:])
    planned = next(line for line in run.stdout.splitlines() if line.startswith("trajectory_shard"))
    print(f"snakemake -n, {a.shards} shards: {seconds:.1f} s ({planned.split()[1]} shard jobs planned)")
