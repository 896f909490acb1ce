"""Which store keys a row uses: what the store command (stages/tools/store.py) needs to say which
rows reference an item and what no row uses any more."""

from pathlib import Path

from stages.config import OVERLAYS, REPO, resolve, store_keys


def rows(repo=REPO):
    """{row name: [its config file]} of the rows under config/rows/: its top level and variants/
    (base/ holds what rows extend; smoke/ and ablations/ overlays that go over a row)."""
    folder = Path(repo) / "config" / "rows"
    files = sorted(folder.glob("*.yaml")) + sorted(folder.glob("variants/*.yaml"))
    assert not {str(f.relative_to(folder)) for f in files} & set(OVERLAYS)
    return {str(f.relative_to(folder).with_suffix("")): [f] for f in files}


def row_store_keys(configfiles):
    """The store keys (datasets, teachers, trajectories, latents) of the row that these config files
    make, layered in order as `snakemake --configfile <configfiles>` layers them. A latent row's
    pixel dataset counts, though only a smoke run's jobs read it: its key is part of the others."""
    return {item.key for item in store_keys.items(resolve(configfiles)).values()}


def rows_store_keys(row_files):
    """{row: its store keys} for {row: [config files]}."""
    return {row: row_store_keys(files) for row, files in row_files.items()}
