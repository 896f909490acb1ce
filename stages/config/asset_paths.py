"""Config values that name files from the internet: a catalog name (stages/files/assets.py CATALOG)
in `dataset.asset`, `teacher.asset`, `features.model` / `features.reference`,
`midtrain.lpips_weights`, `latents.vae` (a catalog folder: FOLDERS), `posttrain.guidance.guide` /
`.teacher` means that file in the assets folder (`assets.dir`), which the fetch_assets rule makes;
any other value is a path of the user's and is passed as it is.

Only stdlib: the Snakefile imports this before any job starts.
"""

import os

from stages.files.assets import CATALOG, FOLDERS

DEFAULT_INCEPTION = "inception-2015-12-05"


def assets_dir(config):
    return config.get("assets", {}).get("dir", "assets")


def path(config, value):
    """A catalog name -> its file in the assets folder; a catalog folder name -> that folder; else
    `value` as it is (None stays None)."""
    if isinstance(value, str) and value in FOLDERS:
        return os.path.dirname(f"{assets_dir(config)}/{CATALOG[FOLDERS[value][0]].filename}")
    if isinstance(value, str) and value in CATALOG:
        return f"{assets_dir(config)}/{CATALOG[value].filename}"
    return value


def named(config):
    """Every config value of the row that names a catalog entry or folder (what the row needs
    fetched), in the places the stages read them."""
    values = []
    dataset = config["dataset"]
    if "asset" in dataset and not dataset.get("synthetic"):
        values.append(dataset["asset"])
    if "latents" in config and isinstance(config["latents"]["vae"], str):
        values.append(config["latents"]["vae"])
    if config["features"]["kind"] == "inception":
        values += [config["features"].get("model", DEFAULT_INCEPTION), config["features"].get("reference")]
    if config["midtrain"]["distance"] == "lpips":
        values.append(config["midtrain"].get("lpips_weights"))
    if config["teacher"].get("source", "train") == "import":
        values.append(config["teacher"]["asset"])
    values += [guide_asset(config), ecd_teacher_asset(config)]
    return [v for v in values if v is not None]


def needed(config):
    """The catalog entries (files) the row needs: a folder stands for each of its files."""
    out = set()
    for value in named(config):
        if value in FOLDERS:
            out.update(FOLDERS[value])
        elif value in CATALOG:
            out.add(value)
    return out


def inputs(config, *paths):
    """The asset files among resolved config values (a folder: its files), as a rule's inputs: they
    make fetch_assets run first. Paths of the user's are no rule's output and are left out."""
    files = {f"{assets_dir(config)}/{CATALOG[name].filename}" for name in needed(config)}
    folders = {path(config, name): [f"{assets_dir(config)}/{CATALOG[m].filename}" for m in members]
               for name, members in FOLDERS.items()}
    out = []
    for p in paths:
        if p in files:
            out.append(p)
        elif p in folders and all(f in files for f in folders[p]):
            out.extend(folders[p])
    return out


def guide_asset(config):
    """ECD's autoguidance guide (posttrain.guidance.guide) where it is a network to import: None
    without one, or where the guide is `teacher` (the row's teacher guides itself)."""
    post = config.get("posttrain", {})
    guide = (post.get("guidance") or {}).get("guide") if post.get("method") == "ecd" else None
    return None if guide == "teacher" else guide


def guide_is_teacher(config):
    post = config.get("posttrain", {})
    return post.get("method") == "ecd" and (post.get("guidance") or {}).get("guide") == "teacher"


def ecd_teacher_asset(config):
    """ECD's reference teacher where it is not the trajectories' (posttrain.guidance.teacher)."""
    post = config.get("posttrain", {})
    teacher = (post.get("guidance") or {}).get("teacher") if post.get("method") == "ecd" else None
    return None if teacher == "teacher" else teacher
