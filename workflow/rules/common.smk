# Paths, store keys and per-rule configuration. Store keys are digests of provenance (the config
# that made an artifact, its upstream keys and CODE_VERSION), so two rows or two users with the
# same teacher and solver share one copy, and a different teacher or solver gets a new folder.
import hashlib
import json
import math
import os
import re
import shlex
import sys

sys.path.insert(0, workflow.basedir)
from stages.files.assets import CATALOG, FOLDERS  # noqa: E402  (the catalog of downloadable files: stdlib only)
from stages.files import store  # noqa: E402  (records, locks and receipts of the store: stdlib only)
from stages.runtime import workload  # noqa: E402  (what each job processes: stdlib only)

# Bump an entry when a change to the code changes what that stage writes: it invalidates the store.
CODE_VERSION = {"dataset": 1, "teacher": 1, "trajectories": 1, "latents": 1}


def digest(obj):
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()[:16]


def as_arg(obj):
    return json.dumps(obj, sort_keys=True)


ROW = config["row"]
RES = f"{config['results']}/{ROW}"
STORE = config["store"]
LOGS = f"{RES}/logs"
BENCH = f"{RES}/benchmarks"
SIGMAS = {k: config[k] for k in ("sigma_data", "sigma_min", "sigma_max")}

# Files from the internet (stages/files/assets.py CATALOG). A config value that names a catalog entry
# (teacher.asset, dataset.asset, features.model, midtrain.lpips_weights) means that file in the
# assets folder, which fetch_assets (workflow/rules/assets.smk) makes.
ASSETS_CFG = config.get("assets", {})
ASSETS_DIR = ASSETS_CFG.get("dir", "assets")
NEEDED_ASSETS = set()


def asset(value):
    """A catalog name -> its path in the assets folder (and the asset is needed); a catalog folder
    name (FOLDERS, e.g. the SD-VAE's sd-vae-ft-mse) -> that folder (and each of its files is needed,
    each fetched by its own fetch_assets job); else `value`."""
    if isinstance(value, str) and value in FOLDERS:
        for member in FOLDERS[value]:
            asset(member)
        return os.path.dirname(f"{ASSETS_DIR}/{CATALOG[FOLDERS[value][0]].filename}")
    if isinstance(value, str) and value in CATALOG:
        NEEDED_ASSETS.add(value)
        return f"{ASSETS_DIR}/{CATALOG[value].filename}"
    return value


def asset_inputs(*paths):
    """The asset files among resolved config values (an asset folder: its files): as inputs they
    make fetch_assets run first."""
    files = {f"{ASSETS_DIR}/{CATALOG[n].filename}" for n in NEEDED_ASSETS}
    folders = {os.path.dirname(f"{ASSETS_DIR}/{CATALOG[m[0]].filename}"): [f"{ASSETS_DIR}/{CATALOG[n].filename}" for n in m]
               for m in FOLDERS.values()}
    out = []
    for p in paths:
        if p in files:
            out.append(p)
        elif p in folders and all(f in files for f in folders[p]):
            out.extend(folders[p])
    return out


DATASET_KEY = digest({"dataset": config["dataset"], "code": CODE_VERSION["dataset"]})
DATASET_DIR = f"{STORE}/datasets/{config['dataset']['name']}-{DATASET_KEY}"
DATASET = f"{DATASET_DIR}/dataset.npz"
DATASET_FILES = [DATASET, f"{DATASET_DIR}/manifest.json"]
# The dataset section as the stages see it: a catalog name resolved to its path.
DATASET_SPEC = {k: v for k, v in config["dataset"].items() if k != "asset"}
if "asset" in config["dataset"] and not config["dataset"].get("synthetic"):
    DATASET_SPEC["path"] = asset(config["dataset"]["asset"])

# ---- the latent rows (latents.smk): the dataset encoded once by the VAE into the store. The key is
# the dataset's key, the VAE (its catalog URLs, which pin the hub revision, and pinned sha256s; or the
# random VAE's config), how images are cut into shards and their dtype; not the whitening (applied at
# each use), nor the VAE batch.
LATENTS = "latents" in config
if LATENTS:
    LATENTS_CFG = config["latents"]
    _vae = LATENTS_CFG["vae"]
    if isinstance(_vae, str):
        if _vae not in FOLDERS:
            raise ValueError(f"latents.vae: {_vae!r} is no catalog folder (stages/files/assets.py FOLDERS: "
                             f"{sorted(FOLDERS)}); name one, or give {{config, seed}} for a random AutoencoderKL")
        VAE_DIR = asset(_vae)
        _vae_id = {"assets": [CATALOG[m].url for m in FOLDERS[_vae]],
                   "sha256": [ASSETS_CFG.get("sha256", {}).get(m) for m in FOLDERS[_vae]]}
    else:
        VAE_DIR = None
        _vae_id = _vae
    LATENT_SPEC = {"dataset_key": DATASET_KEY, "resolution": config["dataset"].get("resolution"), "vae": _vae_id,
                   "per_shard": LATENTS_CFG["per_shard"], "dtype": LATENTS_CFG["dtype"],
                   "code": CODE_VERSION["latents"]}
    if LATENTS_CFG["pixels"] != "unit":  # (EDM2's range, the default, keeps the keys made before the key existed)
        LATENT_SPEC["pixels"] = LATENTS_CFG["pixels"]
    LATENT_KEY = digest(LATENT_SPEC)
    LATENT_DIR = f"{STORE}/latents/{config['dataset']['name']}-{LATENT_KEY}"
    # what the stage needs: the resolved dataset section and the encoding settings
    # what the training stages see: the encoded dataset through the whitening
    WHITENING = {k: LATENTS_CFG[k] for k in ("raw_mean", "raw_std", "final_mean", "final_std")}
    LATENT_STAGE_CFG = {"dataset": DATASET_SPEC, "vae": _vae, "per_shard": LATENTS_CFG["per_shard"],
                        "dtype": LATENTS_CFG["dtype"], "spec": LATENT_SPEC}
    if LATENTS_CFG["pixels"] != "unit":
        LATENT_STAGE_CFG["pixels"] = LATENTS_CFG["pixels"]

TEACHER_SOURCE = config["teacher"].get("source", "train")
# A MeanFlow teacher may have its own network (teacher.network: MF-B/4 beside an MF-XL/2 student):
# then the row's network is no part of the teacher
TEACHER_CFG = {"seed": config["seed"], "network": config["teacher"].get("network", config["network"]),
               "teacher": config["teacher"], **SIGMAS}
# A latent row (latents.smk) trains on the encoded dataset and starts its trajectories from noise: no
# job reads the prepared pixels but fid_reference of a smoke run. A teacher trained on a latent row
# (the MeanFlow teacher, the smoke runs' EDM2) trains on the encoded dataset: the latents section
# (VAE, whitening) is part of what it is.
LATENT_ROW = LATENTS
if LATENT_ROW and TEACHER_SOURCE == "train":
    TEACHER_CFG["latents"] = config["latents"]
    TEACHER_CFG["latents_code"] = CODE_VERSION["latents"]
if TEACHER_SOURCE == "import":
    # An imported teacher is its pickle: the key derives from the catalog URL (not a mirror's)
    # and the sha256 pinned in config, if any; the dataset and training settings play no part.
    _name = config["teacher"]["asset"]
    TEACHER_CFG["teacher"] = {**config["teacher"], "url": CATALOG[_name].url}
    TEACHER_KEY = digest({"import": CATALOG[_name].url, "sha256": config.get("assets", {}).get("sha256", {}).get(_name),
                          "network": config["network"], **SIGMAS, "code": CODE_VERSION["teacher"]})
else:
    # batch_per_gpu says how a job splits the batch, like its number of GPUs: not part of the key
    TEACHER_KEY = digest({"dataset": DATASET_KEY, **TEACHER_CFG, "code": CODE_VERSION["teacher"],
                          "teacher": {k: v for k, v in config["teacher"].items() if k != "batch_per_gpu"}})
TEACHER = f"{STORE}/teachers/{TEACHER_KEY}/model.safetensors"
TEACHER_FILES = [TEACHER, TEACHER.replace(".safetensors", ".json")]
# ECD's guide network (autoguidance, posttrain.guidance): imported from its pickle like a teacher,
# into the store under a key of the same kind.
_post = config["posttrain"]
GUIDE_ASSET = (_post.get("guidance") or {}).get("guide") if _post.get("method") == "ecd" else None
# guide `teacher`: the row's own teacher guides itself (D_g = D whatever w): smoke runs take the guided
# code path with no second pickle to import
GUIDE_IS_TEACHER = GUIDE_ASSET == "teacher"
if GUIDE_IS_TEACHER:
    GUIDE_ASSET = None
if GUIDE_ASSET:
    if GUIDE_ASSET not in CATALOG or "network" not in _post["guidance"]:
        raise ValueError(f"posttrain.guidance: the guide {GUIDE_ASSET!r} must be a catalog name "
                         "(stages/files/assets.py) and posttrain.guidance.network its network section")
    GUIDE_CFG = {"seed": config["seed"], "network": _post["guidance"]["network"], **SIGMAS,
                 "teacher": {"source": "import", "asset": GUIDE_ASSET, "url": CATALOG[GUIDE_ASSET].url}}
    GUIDE_KEY = digest({"import": CATALOG[GUIDE_ASSET].url,
                        "sha256": config.get("assets", {}).get("sha256", {}).get(GUIDE_ASSET),
                        "network": GUIDE_CFG["network"], **SIGMAS, "code": CODE_VERSION["teacher"]})
    GUIDE = f"{STORE}/teachers/{GUIDE_KEY}/model.safetensors"
    GUIDE_FILES = [GUIDE, GUIDE.replace(".safetensors", ".json")]
# ECD's reference teacher where it is not the trajectories' (posttrain.guidance.teacher; the 512 code
# distils EDM2-XXL at EMA 0.075 while its CMT trajectories come from 0.070): imported the same way,
# with the row's network section.
ECD_TEACHER_ASSET = (_post.get("guidance") or {}).get("teacher") if _post.get("method") == "ecd" else None
if ECD_TEACHER_ASSET == "teacher":  # the trajectories' teacher, as without the key
    ECD_TEACHER_ASSET = None
if ECD_TEACHER_ASSET:
    if ECD_TEACHER_ASSET not in CATALOG:
        raise ValueError(f"posttrain.guidance.teacher: {ECD_TEACHER_ASSET!r} must be a catalog name (stages/files/assets.py)")
    ECD_TEACHER_CFG = {"seed": config["seed"], "network": config["network"], **SIGMAS,
                       "teacher": {"source": "import", "asset": ECD_TEACHER_ASSET, "url": CATALOG[ECD_TEACHER_ASSET].url}}
    ECD_TEACHER_KEY = digest({"import": CATALOG[ECD_TEACHER_ASSET].url,
                              "sha256": config.get("assets", {}).get("sha256", {}).get(ECD_TEACHER_ASSET),
                              "network": config["network"], **SIGMAS, "code": CODE_VERSION["teacher"]})
    ECD_TEACHER = f"{STORE}/teachers/{ECD_TEACHER_KEY}/model.safetensors"
    ECD_TEACHER_FILES = [ECD_TEACHER, ECD_TEACHER.replace(".safetensors", ".json")]
# Training state for resume: outside every rule's outputs (Snakemake deletes a failed job's outputs).
TEACHER_STATE = f"{STORE}/teachers/{TEACHER_KEY}-state"
STATE = f"{RES}/state"

# The pool size (num_shards) is not part of the spec: shard k is the same whatever the pool size,
# so growing the pool reuses the shards already made.
TRAJ_SPEC = {
    **{k: v for k, v in config["trajectories"].items() if k != "num_shards"},
    "sigma_max": config["sigma_max"],
    "sigma_min": config["sigma_min"],
    "teacher_key": TEACHER_KEY,
    "code": CODE_VERSION["trajectories"],
}
TRAJ_KEY = digest(TRAJ_SPEC)
TRAJ_DIR = f"{STORE}/trajectories/{TRAJ_KEY}"
TRAJ_SPEC_FILE = f"{TRAJ_DIR}/spec.json"
# midtrain.trajectories = online: the teacher solves the trajectories inside the mid-training steps,
# and the pool shrinks to what the fid_teacher ceiling scores (its seed ranges); these shards are
# the first of the offline pool of the same spec, so an offline run of the row reuses them.
MIDTRAIN_ONLINE = config.get("family", "cm") == "cm" and config["midtrain"]["trajectories"] == "online"
_pool_shards = config["trajectories"]["num_shards"]
if MIDTRAIN_ONLINE:
    _ceiling = config["sampling"]["num_ranges"] * config["sampling"]["per_range"]
    _pool_shards = min(_pool_shards, math.ceil(_ceiling / config["trajectories"]["per_shard"]))
SHARD_IDS = [f"{k:06d}" for k in range(_pool_shards)]
# what online mid-training solves from: the spec without how the pool is cut into shards and solver
# batches (a new pool layout reruns no online mid-training)
ONLINE_SPEC = {k: v for k, v in TRAJ_SPEC.items() if k not in ("per_shard", "batch")}
MANIFEST = f"{RES}/trajectories/manifest.json"


def shard_file(shard):
    return f"{TRAJ_DIR}/shard-{shard}.tar"


# ---- the store's files are no rule's outputs (stages/files/store.py): Snakemake deletes a job's
# outputs before rerunning it and after it fails, while a teammate's run may be reading them. A rule
# that makes store files outputs a receipt in this workdir, and downstream rules take the receipts
# as inputs: a teammate's newer copy of the same key never makes this workdir's results stale.
RECEIPTS = f"{RES}/receipts"
DATASET_RECEIPT = f"{RECEIPTS}/dataset.json"
# The prepared pixels, where a job reads them: a latent MeanFlow row trains on the encoded dataset and
# its trajectories start from noise, so its training jobs need no prepared dataset (ImageNet-256:
# 252 GB of uint8), only fid_reference may (pixel features of smoke runs)
PIXELS_RECEIPT = [] if LATENT_ROW else DATASET_RECEIPT
TEACHER_RECEIPT = f"{RECEIPTS}/teacher.json"
GUIDE_RECEIPT = f"{RECEIPTS}/guide.json"
ECD_TEACHER_RECEIPT = f"{RECEIPTS}/ecd-teacher.json"
SPEC_RECEIPT = f"{RECEIPTS}/trajectory-spec.json"
SHARD_RECEIPTS = expand(f"{RECEIPTS}/shards/{{shard}}.json", shard=SHARD_IDS)
# store_remake: the store jobs this run runs make their files again (with --force on a receipt, the
# one command that regenerates a damaged store file); otherwise complete items are reused.
STORE_REMAKE = config["store_remake"]


def stored(files):
    """Whether the item was complete (its record says so) when this run was planned. Its receipt is
    then written by the `_from_store` variant of its rule, a local job that only reads the record
    (so a second workdir submits no cluster job, and hashes nothing, for what the store holds)."""
    return not STORE_REMAKE and store.complete(files)


DATASET_STORED = stored(DATASET_FILES)
TEACHER_STORED = stored(TEACHER_FILES)
GUIDE_STORED = bool(GUIDE_ASSET) and stored(GUIDE_FILES)
ECD_TEACHER_STORED = bool(ECD_TEACHER_ASSET) and stored(ECD_TEACHER_FILES)
SPEC_STORED = stored([TRAJ_SPEC_FILE])
SHARDS_STORED = [k for k in SHARD_IDS if stored([shard_file(k)])]


def store_mode(is_stored):
    """--mode of stages.files.store for a job; `is_stored(wildcards)`. A function of `output`, like
    state_args: which rule writes a receipt is no part of what it records (no params rerun trigger)."""

    def mode(wildcards, output):
        if STORE_REMAKE:
            return "remake"
        return "reuse" if is_stored(wildcards) else "make"

    return mode


# family cm: consistency models (midtrain, posttrain = ECT); mf: average-velocity flow maps
# (midtrain_mf = CMT-MF, posttrain_mf = MeanFlow), rules in meanflow.smk.
FAMILY = config["family"]
POST_SECTION = "posttrain_mf" if FAMILY == "mf" else "posttrain"
INITS = config[POST_SECTION]["inits"]
# Snapshots at fractions of the post-training budget, in any order in the config: the list is kept
# sorted (so reordering it reruns nothing), and the final snapshot is the largest fraction.
for _section in ("posttrain", "posttrain_mf"):
    if _section in config:
        config[_section]["snapshots"] = sorted(config[_section]["snapshots"])
SNAPSHOTS = [f"p{round(100 * f):03d}" for f in config[POST_SECTION]["snapshots"]]
FINAL_SNAPSHOT = SNAPSHOTS[-1]
# Everything of posttrain but the list of inits: adding an init must not rerun the others.
POSTTRAIN_CFG = {k: v for k, v in config["posttrain"].items() if k != "inits"}


def posttrain_cfg(init):
    """An init's post-training section; the `baseline` init's is the row's `baseline` overrides over
    posttrain's settings (stages/runtime/workload.py)."""
    return workload.posttrain_section(config, init)


def init_model(wildcards):
    """The model a post-training run starts from (for random, only its architecture is read)."""
    return f"{RES}/midtrain/model.safetensors" if wildcards.init == "cmt" else TEACHER


def distillation_inputs(wildcards):
    """Method ecd distils the teacher (and its guide): their receipts."""
    if posttrain_cfg(wildcards.init).get("method") != "ecd":
        return []
    guide = [GUIDE_RECEIPT] if GUIDE_ASSET else [TEACHER_RECEIPT] if GUIDE_IS_TEACHER else []
    return [ECD_TEACHER_RECEIPT if ECD_TEACHER_ASSET else TEACHER_RECEIPT] + guide


def distillation_args(wildcards):
    if posttrain_cfg(wildcards.init).get("method") != "ecd":
        return ""
    return (f"--teacher {shlex.quote(ECD_TEACHER if ECD_TEACHER_ASSET else TEACHER)}"
            + (f" --guide {shlex.quote(GUIDE)}" if GUIDE_ASSET else "")
            + (f" --guide {shlex.quote(TEACHER)}" if GUIDE_IS_TEACHER else ""))


def init_input(wildcards):
    """What the post-training run depends on: the mid-trained model, or this workdir's teacher receipt."""
    return f"{RES}/midtrain/model.safetensors" if wildcards.init == "cmt" else TEACHER_RECEIPT


def sampled_model(init, snap):
    """The model a sample job draws from: a post-training snapshot, or (init `midtrain`, snapshot
    `final`) the mid-trained model itself, scored on its own as the official mid-training evaluation does."""
    if init == "midtrain":
        return f"{RES}/midtrain/model.safetensors"
    return f"{RES}/posttrain/{init}/snapshots/{snap}.safetensors"


def sampling_cfg(wildcards):
    """The sampling section, with the mid-training evaluation's sigma_mid for the mid-trained model."""
    if wildcards.init == "midtrain":
        return {**config["sampling"], "sigma_mid": config["sampling"]["sigma_mid_midtrain"]}
    return config["sampling"]


def scored_snapshots(wildcards):
    return ["final"] if wildcards.init == "midtrain" else SNAPSHOTS


def slice_retries(*budgets):
    """`retries:` of a training rule whose jobs train `budgets`, (steps, batch) pairs (its inits').

    With checkpoint.slice_kimg each job trains one slice and exits 75, which Snakemake counts as a
    failure: a run of N slices needs N - 1 retries to finish in one invocation, and
    checkpoint.retry_margin more are left for preemptions and time limits. (A rule's `retries:`
    replaces --retries, which Snakemake reads only after the workflow is parsed.) Unsliced, None:
    --retries (the SLURM profile's `retries: 3`) applies as to every other rule. Slices are counted
    as stages/training/resume.py ends them.
    """
    slice_kimg = config["checkpoint"]["slice_kimg"]
    if slice_kimg is None:
        return None
    slices = max(math.ceil(steps / math.ceil(1000.0 * slice_kimg / batch)) for steps, batch in budgets)
    return slices - 1 + config["checkpoint"]["retry_margin"]


def trajectory_checks(section):
    """--verify and --spot-check of a mid-training rule, from config section `section`. A function of
    `output`, like state_args: how the inputs are checked makes nothing that training makes stale."""

    def args(wildcards, output):
        return f"--verify {config[section]['verify']} --spot-check {int(config[section]['spot_check'])}"

    return args


def state_args(folder):
    """--state-dir and --checkpoint of a training rule; `folder(wildcards)` is its state folder.

    The param is a function of `output`, which Snakemake's params rerun trigger leaves out: how
    often a run saves its state, or how it is sliced into jobs, must not make finished training stale.
    """

    def args(wildcards, output):
        return (f"--state-dir {shlex.quote(folder(wildcards))} "
                f"--checkpoint {shlex.quote(as_arg(config['checkpoint']))}")

    return args


# The configuration as the stages see it: catalog names resolved to paths.
# A smoke variant (dataset.synthetic, pixel features, random LPIPS trunk) needs none of the files
# its row names, so it runs offline.
FEATURES_CFG = dict(config["features"])
if config["features"]["kind"] == "inception":
    FEATURES_CFG["model"] = asset(config["features"].get("model", "inception-2015-12-05"))
    if "reference" in FEATURES_CFG:  # published statistics (the ADM suite's): no dataset features
        FEATURES_CFG["reference"] = asset(FEATURES_CFG["reference"])
else:
    FEATURES_CFG.pop("model", None)
    FEATURES_CFG.pop("reference", None)  # a smoke run's pixel features have their own reference
# How the trajectories are checked (verify, spot_check) is not how the model is trained: changing it
# reruns nothing (see trajectory_checks).
INPUT_CHECKS = ("verify", "spot_check")
MIDTRAIN_CFG = {k: v for k, v in config["midtrain"].items() if k not in INPUT_CHECKS}
if MIDTRAIN_ONLINE:
    MIDTRAIN_CFG.pop("shuffle_buffer", None)  # nothing is shuffled: each step solves its own trajectories
else:
    MIDTRAIN_CFG.pop("trajectories")  # the default route: runs made before the key existed stay current
if MIDTRAIN_CFG.get("distance") == "lpips":
    MIDTRAIN_CFG["lpips_weights"] = asset(MIDTRAIN_CFG.get("lpips_weights"))
if config["teacher"].get("source", "train") == "import":
    TEACHER_PICKLE = asset(config["teacher"]["asset"])
if GUIDE_ASSET:
    GUIDE_PICKLE = asset(GUIDE_ASSET)
if ECD_TEACHER_ASSET:
    ECD_TEACHER_PICKLE = asset(ECD_TEACHER_ASSET)


# ---- the latent rows' shards, receipts and latent VGG16 (latents.smk)
if LATENTS:
    LATENT_SHARD_IDS = [f"{k:06d}" for k in range(LATENTS_CFG["num_shards"])]
    LATENT_RECEIPTS = expand(f"{RECEIPTS}/latents/{{shard}}.json", shard=LATENT_SHARD_IDS)
    LATENT_MANIFEST = f"{RES}/latents/manifest.json"

    def latent_shard_file(shard):
        return f"{LATENT_DIR}/shard-{shard}.tar"

    LATENT_SHARDS_STORED = [k for k in LATENT_SHARD_IDS if stored([latent_shard_file(k)])]
    LATENT_VGG = f"{RES}/latent_vgg/model.safetensors"
    LATENT_VGG_ACCURACY = f"{RES}/latent_vgg/accuracy.json"
    # planned steps (the stage counts the images; here the pool's size less the held-out shards)
    LATENT_VGG_STEPS = workload.latent_vgg_steps(config)


# E-LatentLPIPS brings its own backbone (the latent VGG16): no LPIPS weights
if MIDTRAIN_CFG.get("distance") == "elatentlpips":
    MIDTRAIN_CFG.pop("lpips_weights", None)


# ---- the MeanFlow family (meanflow.smk)
MID_MF = config.get("midtrain_mf", {})
MIDTRAIN_MF_CFG = {k: v for k, v in MID_MF.items() if k not in INPUT_CHECKS}
POST_MF = config.get("posttrain_mf", {})
# A MeanFlow teacher (teacher.objective meanflow) has its own network: the students take the row's,
# passed to them (an EDM teacher's students take the teacher's architecture, and their params stay as they were).
MF_TEACHER = config["teacher"].get("objective") == "meanflow"
STUDENT_NETWORK = {"network": config["network"]} if MF_TEACHER else {}
# A latent row: the training stages read the encoded dataset (its manifest, checked as the
# mid-training section's verify says), sample and fid_teacher decode with the row's VAE.
LATENT_TRAINING = {"latents": config["latents"]} if LATENT_ROW else {}


def latent_training_inputs(wildcards):
    return [LATENT_MANIFEST] if LATENT_ROW else []


def latent_training_args(wildcards, output):
    """--latents and --verify of a training rule on a latent row (a function of `output`, like
    state_args: how the shards are checked makes nothing stale)."""
    if not LATENT_ROW:
        return ""
    verify = config["midtrain_mf" if FAMILY == "mf" else "midtrain"]["verify"]
    return f"--latents {shlex.quote(LATENT_MANIFEST)} --verify {verify}"


def decode_inputs(wildcards):
    return asset_inputs(VAE_DIR) if LATENT_ROW and VAE_DIR else []


def decode_args(wildcards, output):
    """--latents (and --vae) of sample and fid_teacher on a latent row; nothing elsewhere (a
    function of `output`: no other row's jobs see a new param)."""
    if not LATENT_ROW:
        return ""
    vae = f" --vae {shlex.quote(VAE_DIR)}" if VAE_DIR else ""
    return f"--latents {shlex.quote(as_arg(config['latents']))}{vae}"
# Everything of posttrain_mf but the list of inits and the random init's own budget (its steps reach
# its job alone, through meanflow_steps): adding an init or budgeting one must not rerun the others.
POSTTRAIN_MF_CFG = {k: v for k, v in POST_MF.items() if k not in ("inits", "random_steps")}


def meanflow_steps(init):
    """Post-training steps of an init (at equal total budget, random also gets the mid-training's images)."""
    return workload.meanflow_steps(config, init)


def _row_gpus(rule):
    return int(config.get("resources", {}).get(rule, {}).get("gpu", 0) or 0)


# GPUs per job of each benchmark kind of the cost ledger (stages/runtime/ledger.py), from the row's
# resources (a --set-resources override on the command line is not seen here)
LEDGER_GPUS = {"train_teacher": _row_gpus("train_teacher"), "trajectory_shard": _row_gpus("trajectory_shard"),
               "midtrain": _row_gpus("midtrain_mf" if FAMILY == "mf" else "midtrain"),
               "posttrain": _row_gpus("posttrain_mf" if FAMILY == "mf" else "posttrain")}


def launch_gpus(wildcards, output, resources):
    """--gpus for stages.launch: the job's gpu resource (0 where no profile sets it). A function of
    `output` like state_args, so a different GPU count does not make finished training stale."""
    return int(resources.get("gpu", 0) or 0)
