"""Store keys: where a row's shared artifacts live in the store (stages/files/store.py) and under
which key. A key is a digest of provenance: the settings that made the item, the keys of what it was
made from and CODE_VERSION. Two rows or two users with the same teacher and solver share one copy;
a different teacher or solver gets a new folder. What does not change an item's bytes stays out of
its key (how a job splits its batch, how many shards the pool has, how shards are checked).

Only stdlib: the Snakefile imports this before any job starts. tests/golden/stage_configs.json
holds every row's keys: a change here that moves one invalidates every team's store.
"""

import dataclasses
import hashlib
import json

from stages.config import asset_paths, power_ema, workload
from stages.files.assets import CATALOG, FOLDERS

# Bump an entry when a change to the code changes what that stage writes: it invalidates the store.
CODE_VERSION = {"dataset": 1, "teacher": 1, "trajectories": 1, "latents": 1}


def digest(obj):
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()[:16]


def sigmas(config):
    return {k: config[k] for k in ("sigma_data", "sigma_min", "sigma_max")}


@dataclasses.dataclass(frozen=True)
class Item:
    """One store item: its key, folder and files (the first names it), and what its making stage
    receives as --config (`spec`)."""

    key: str
    folder: str
    files: list
    spec: dict

    @property
    def path(self):
        return self.files[0]


def dataset_spec(config):
    """The dataset section as the stages see it: a catalog name resolved to its path."""
    spec = {k: v for k, v in config["dataset"].items() if k != "asset"}
    if "asset" in config["dataset"] and not config["dataset"].get("synthetic"):
        spec["path"] = asset_paths.path(config, config["dataset"]["asset"])
    return spec


def dataset(config):
    key = digest({"dataset": config["dataset"], "code": CODE_VERSION["dataset"]})
    folder = f"{config['store']}/datasets/{config['dataset']['name']}-{key}"
    return Item(key, folder, [f"{folder}/dataset.npz", f"{folder}/manifest.json"], dataset_spec(config))


def latent_spec(config):
    """What a latent row's encoded dataset is made of: the dataset's key, the VAE (its catalog URLs,
    which pin the hub revision, and pinned sha256s; or a random VAE's config), how images are cut into
    shards and their dtype; not the whitening (applied at each use), nor the VAE batch."""
    lat = config["latents"]
    vae = lat["vae"]
    if isinstance(vae, str):
        vae = {"assets": [CATALOG[m].url for m in FOLDERS[vae]],
               "sha256": [config.get("assets", {}).get("sha256", {}).get(m) for m in FOLDERS[vae]]}
    spec = {"dataset_key": dataset(config).key, "resolution": config["dataset"].get("resolution"), "vae": vae,
            "per_shard": lat["per_shard"], "dtype": lat["dtype"], "code": CODE_VERSION["latents"]}
    if lat["pixels"] != "unit":  # EDM2's range, the default, is no part of the key
        spec["pixels"] = lat["pixels"]
    return spec


def latents(config):
    """The encoded dataset of a latent row (None elsewhere); its spec is what encode_dataset receives."""
    if "latents" not in config:
        return None
    lat, spec = config["latents"], latent_spec(config)
    key = digest(spec)
    stage = {"dataset": dataset_spec(config), "vae": lat["vae"], "per_shard": lat["per_shard"], "dtype": lat["dtype"],
             "spec": spec}
    if lat["pixels"] != "unit":
        stage["pixels"] = lat["pixels"]
    folder = f"{config['store']}/latents/{config['dataset']['name']}-{key}"
    return Item(key, folder, [], stage)


def latent_shard_ids(config):
    return [f"{k:06d}" for k in range(config["latents"]["num_shards"])]


def imported(config, asset, network, section):
    """A network imported from an official pickle (the teacher, ECD's guide or reference teacher): the
    key derives from the catalog URL (not a mirror's), the sha256 pinned in config if any, the network
    section and the sigmas; the dataset and any training settings play no part. `section` is the
    teacher section the import stage receives."""
    url = CATALOG[asset].url
    key = digest({"import": url, "sha256": config.get("assets", {}).get("sha256", {}).get(asset),
                  "network": network, **sigmas(config), "code": CODE_VERSION["teacher"]})
    spec = {"seed": config["seed"], "network": network, **sigmas(config), "teacher": {**section, "url": url}}
    if "latents" in config:  # a latent row's network was trained on latents whitened as the row's
        spec["latents"] = {k: config["latents"][k] for k in ("raw_mean", "raw_std", "final_mean", "final_std")}
    return _teacher_item(config, key, spec)


def _teacher_item(config, key, spec):
    folder = f"{config['store']}/teachers/{key}"
    return Item(key, folder, [f"{folder}/model.safetensors", f"{folder}/model.json"], spec)


def teacher(config):
    """The row's teacher, trained here (teacher.source train) or imported. A MeanFlow teacher may have
    its own network (teacher.network: MF-B/4 beside an MF-XL/2 student). A teacher trained on a latent
    row trains on the encoded dataset: the latents section (VAE, whitening) is part of what it is."""
    tc = config["teacher"]
    if tc.get("source", "train") == "import":
        item = imported(config, tc["asset"], config["network"], tc)
        # the import stage reads the teacher's own network section where one is given
        spec = {**item.spec, "network": tc.get("network", config["network"])}
        return dataclasses.replace(item, spec=spec)
    spec = {"seed": config["seed"], "network": tc.get("network", config["network"]), "teacher": tc,
            **sigmas(config)}
    if "latents" in config:
        spec["latents"] = config["latents"]
        spec["latents_code"] = CODE_VERSION["latents"]
    # batch_per_gpu says how a job splits the batch, like its number of GPUs: not part of the key
    key = digest({"dataset": dataset(config).key, **spec, "code": CODE_VERSION["teacher"],
                  "teacher": {k: v for k, v in tc.items() if k != "batch_per_gpu"}})
    item = _teacher_item(config, key, spec)
    if power_ema.is_power(tc["ema"]):  # its power-EMA snapshots are part of the item (phema/ beside the model)
        snapshots = power_ema.snapshot_files(item.folder, tc["ema"], tc["steps"])
        item = dataclasses.replace(item, files=item.files + snapshots)
    return item


def teacher_state(config):
    """The teacher's resumable training state: beside it in the store, outside every rule's outputs."""
    return f"{teacher(config).folder}-state"


def guide(config):
    """ECD's autoguidance guide, imported like a teacher with its own network section (None without one)."""
    name = asset_paths.guide_asset(config)
    if name is None:
        return None
    return imported(config, name, config["posttrain"]["guidance"]["network"], {"source": "import", "asset": name})


def ecd_teacher(config):
    """ECD's reference teacher where it is not the trajectories' (the 512 code distils EDM2-XXL at EMA
    0.075 while its CMT trajectories come from 0.070), with the row's network section."""
    name = asset_paths.ecd_teacher_asset(config)
    if name is None:
        return None
    return imported(config, name, config["network"], {"source": "import", "asset": name})


def imported_networks(config):
    """{rule: (item name, catalog asset)} of the networks the row imports from official pickles: the
    teacher (teacher.source import), ECD's guide and its reference teacher where they are networks of
    their own (posttrain.guidance)."""
    out = {}
    if config["teacher"].get("source", "train") == "import":
        out["import_teacher"] = ("teacher", config["teacher"]["asset"])
    if asset_paths.guide_asset(config):
        out["import_guide"] = ("guide", asset_paths.guide_asset(config))
    if asset_paths.ecd_teacher_asset(config):
        out["import_ecd_teacher"] = ("ecd_teacher", asset_paths.ecd_teacher_asset(config))
    return out


def trajectory_spec(config):
    """What makes a trajectory: the solver settings, the sigma range, the teacher's key. The pool size
    (num_shards) is not part of it: shard k is the same whatever the pool size, so growing the pool
    reuses the shards already made."""
    return {**{k: v for k, v in config["trajectories"].items() if k != "num_shards"},
            "sigma_max": config["sigma_max"], "sigma_min": config["sigma_min"],
            "teacher_key": teacher(config).key, "code": CODE_VERSION["trajectories"]}


def trajectories(config):
    spec = trajectory_spec(config)
    key = digest(spec)
    folder = f"{config['store']}/trajectories/{key}"
    return Item(key, folder, [f"{folder}/spec.json"], spec)


def online_spec(config):
    """What online mid-training solves from: the spec without how the pool is cut into shards and
    solver batches (a new pool layout reruns no online mid-training)."""
    return {k: v for k, v in trajectory_spec(config).items() if k not in ("per_shard", "batch")}


def items(config):
    """{name: Item} of every store item the row uses."""
    out = {"dataset": dataset(config), "teacher": teacher(config), "trajectories": trajectories(config),
           "latents": latents(config), "guide": guide(config), "ecd_teacher": ecd_teacher(config)}
    return {name: item for name, item in out.items() if item is not None}


def item_files(config):
    """{name: files} of every store item the row uses, one entry per shard: `shard/<id>` for the
    trajectory pool's, `latent/<id>` for the encoded dataset's. What planning asks the stores about
    (workflow/rules/store.smk), the tests and bench/ alike."""
    row = items(config)
    out = {name: item.files for name, item in row.items() if item.files}
    pool = row["trajectories"].folder
    out |= {f"shard/{k}": [f"{pool}/shard-{k}.tar"] for k in workload.trajectory_shard_ids(config)}
    if "latents" in row:
        out |= {f"latent/{k}": [f"{row['latents'].folder}/shard-{k}.tar"] for k in latent_shard_ids(config)}
    return out
