"""The workflow passes Snakemake's own linter, which CI runs (`.ci/run`): a comment of a `.smk` file
that reads like a rule header (the word rule, text, a colon) or a path joined with `+` fails it."""

import subprocess
import sys

from workflow_runs import REPO


def test_snakemake_lint_finds_nothing():
    result = subprocess.run([sys.executable, "-m", "snakemake", "--lint"], cwd=REPO, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
