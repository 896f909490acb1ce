"""Which store keys a row uses: what the store command (stages/tools/store.py) needs to say which
rows reference an item and what no row uses any more.

`row_store_keys(configfiles)` is the one function the store command calls. Until the store keys
are computed in Python beside the rest of the config, it asks the workflow itself: a dry run of
the row with every job forced (`snakemake -n -p --forceall`, in a scratch workdir, about 2 s a
row) prints each store job's command, whose `--key` values are the row's store keys. Slow, but it
is the workflow's own answer; the Python recipe replaces the body of this one function.
"""

import os
import re
import subprocess
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from stages.config import OVERLAYS, REPO

KEY_ARG = re.compile(r"--key\s+([0-9a-f]+)\b")


def rows(repo=REPO):
    """{row name: [its config file]} of the rows under config/rows/: its top level and variants/
    (base/ holds what rows extend; smoke/ and ablations/ overlays that go over a row)."""
    folder = Path(repo) / "config" / "rows"
    files = sorted(folder.glob("*.yaml")) + sorted(folder.glob("variants/*.yaml"))
    assert not {str(f.relative_to(folder)) for f in files} & set(OVERLAYS)
    return {str(f.relative_to(folder).with_suffix("")): [f] for f in files}


def row_store_keys(configfiles, repo=REPO):
    """The store keys (datasets, teachers, trajectories, latents) of the row that these config files
    make (layered in order, as `snakemake --configfile <configfiles>`)."""
    with tempfile.TemporaryDirectory(prefix="cmt-store-refs-") as workdir:
        cmd = [sys.executable, "-m", "snakemake", "-s", str(Path(repo) / "Snakefile"), "-d", workdir, "-n", "-p",
               "--forceall", "--configfile", *[str(Path(f).resolve()) for f in configfiles]]
        run = subprocess.run(cmd, check=False, capture_output=True, text=True,
                             env={**os.environ, "PYTHONPATH": str(repo)})
    if run.returncode != 0:
        tail = "\n".join((run.stderr or run.stdout).strip().splitlines()[-15:])
        raise RuntimeError(f"{' '.join(map(str, configfiles))}: the workflow's dry run failed "
                           f"({' '.join(cmd)}):\n{tail}")
    return set(KEY_ARG.findall(run.stdout + run.stderr))


def rows_store_keys(row_files, workers=None):
    """{row: its store keys} for {row: [config files]}, the dry runs side by side."""
    workers = workers or min(8, os.cpu_count() or 1, max(1, len(row_files)))
    with ThreadPoolExecutor(workers) as pool:
        keys = pool.map(row_store_keys, row_files.values())
        return dict(zip(row_files, keys))
