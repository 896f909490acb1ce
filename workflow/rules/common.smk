# Paths and input functions. What is computed from the config (store keys, what each rule passes
# to its stage, budgets) is Python in stages/config/, tested without Snakemake and shared with the
# tests and bench/: the rules only place it.
import os
import shlex
import sys

sys.path.insert(0, workflow.basedir)
from stages.config import asset_paths, power_ema, stage_configs, store_keys  # noqa: E402  (stdlib only)
from stages.config.stage_configs import as_arg  # noqa: E402
from stages.files import store  # noqa: E402  (records, locks and receipts of the store: stdlib only)
from stages.files.assets import CATALOG  # noqa: E402

ROW = config["row"]
RES = f"{config['results']}/{ROW}"
LOGS = f"{RES}/logs"
BENCH = f"{RES}/benchmarks"
# Training state for resume: outside every rule's outputs (Snakemake deletes a failed job's outputs).
STATE = f"{RES}/state"
FAMILY = stage_configs.family(config)
INITS = stage_configs.inits(config)
SNAPSHOTS = stage_configs.snapshot_names(config)
FINAL_SNAPSHOT = SNAPSHOTS[-1]
LATENTS = "latents" in config
ONLINE = store_keys.online_midtrain(config)


def stage_config(name):
    """The params entry of a rule's stage config (stages/config/stage_configs.py)."""
    return lambda wildcards: as_arg(stage_configs.stage_config(name, config, wildcards.get("init")))


def asset_inputs(*paths):
    return asset_paths.inputs(config, *paths)


# ---- the store (stages/files/store.py): its files are no rule's outputs, since Snakemake deletes a
# job's outputs before rerunning it and after it fails, while a teammate's run may be reading them. A
# rule that makes store files outputs a receipt in this workdir, and downstream rules take the
# receipts as inputs: a teammate's newer copy of the same key never makes this workdir stale.
RECEIPTS = f"{RES}/receipts"
ITEMS = store_keys.items(config)
DATASET, TEACHER, TRAJ = ITEMS["dataset"], ITEMS["teacher"], ITEMS["trajectories"]
GUIDE, ECD_TEACHER = ITEMS.get("guide"), ITEMS.get("ecd_teacher")
DATASET_RECEIPT = f"{RECEIPTS}/dataset.json"
# The prepared pixels, where a job reads them: a latent row trains on the encoded dataset and its
# trajectories start from noise (ImageNet-256: 252 GB of uint8 no training job needs)
PIXELS_RECEIPT = [] if LATENTS else DATASET_RECEIPT
TEACHER_RECEIPT = f"{RECEIPTS}/teacher.json"
SPEC_RECEIPT = f"{RECEIPTS}/trajectory-spec.json"
SHARD_IDS = store_keys.trajectory_shard_ids(config)
SHARD_RECEIPTS = expand(f"{RECEIPTS}/shards/{{shard}}.json", shard=SHARD_IDS)
MANIFEST = f"{RES}/trajectories/manifest.json"
# store_remake: this run's store jobs make their files again (with --force on a receipt, the one
# command that regenerates a damaged store file); otherwise complete items are reused.
STORE_REMAKE = config["store_remake"]


def shard_file(shard):
    return f"{TRAJ.folder}/shard-{shard}.tar"


def stored(files):
    """Whether the item was complete (its record says so) when this run was planned. Its receipt is
    then written by the `_from_store` variant of its name, a local job that only reads the record (so
    a second workdir submits no cluster job, and hashes nothing, for what the store holds)."""
    return not STORE_REMAKE and store.complete(files)


def store_rule(name, is_stored):
    """The name of a rule that makes one store item: `<name>_from_store` where the store holds it."""
    return f"{name}_from_store" if is_stored else name


def store_mode(is_stored):
    """--mode of stages.files.store; `is_stored(wildcards)`. A function of `output`: which rule
    writes a receipt is no part of what it records (no params rerun trigger)."""

    def mode(wildcards, output):
        return "remake" if STORE_REMAKE else "reuse" if is_stored(wildcards) else "make"

    return mode


def store_command(stage):
    """The shell command of a rule that makes a store item through the store wrapper."""
    return ("python -m stages.files.store --mode {params.store_mode} --key {params.key} --files {params.files:q} "
            "--receipt {output:q} -- " + stage)


DATASET_STORED = stored(DATASET.files)
TEACHER_STORED = stored(TEACHER.files)
SPEC_STORED = stored(TRAJ.files)
SHARDS_STORED = [k for k in SHARD_IDS if stored([shard_file(k)])]

# Networks imported from official pickles: the teacher (teacher.source import), ECD's autoguidance
# guide and its reference teacher where it is not the trajectories' (posttrain.guidance).
IMPORTS = {}
if config["teacher"].get("source", "train") == "import":
    IMPORTS["import_teacher"] = (TEACHER, config["teacher"]["asset"], TEACHER_RECEIPT)
if GUIDE:
    IMPORTS["import_guide"] = (GUIDE, asset_paths.guide_asset(config), f"{RECEIPTS}/guide.json")
if ECD_TEACHER:
    IMPORTS["import_ecd_teacher"] = (ECD_TEACHER, asset_paths.ecd_teacher_asset(config), f"{RECEIPTS}/ecd-teacher.json")


# ---- training: resumable state, its options and the GPUs a job was given, all functions of `output`:
# how often a run saves, how it is sliced and checked, on how many GPUs, makes nothing stale
def state_args(name, folder):
    """--state-dir and --checkpoint of a training rule; `folder(wildcards)` is its state folder."""

    def args(wildcards, output):
        saving = stage_configs.stage_options(name, config)["checkpoint"]
        return f"--state-dir {shlex.quote(folder(wildcards))} --checkpoint {shlex.quote(as_arg(saving))}"

    return args


def trajectory_checks(name):
    """--verify and --spot-check of a mid-training rule: how its trajectories are checked."""

    def args(wildcards, output):
        options = stage_configs.stage_options(name, config)
        return f"--verify {options['verify']} --spot-check {int(options['spot_check'])}"

    return args


def launch_gpus(wildcards, output, resources):
    """--gpus for stages.launch: the job's gpu resource (0 where no profile sets it)."""
    return int(resources.get("gpu", 0) or 0)


def slice_retries(name):
    return stage_configs.slice_retries(name, config)


# ---- the latent rows (latents.smk): the training stages read the encoded dataset, sample and
# fid_teacher decode with the row's VAE
if LATENTS:
    LATENT_ITEM = ITEMS["latents"]
    LATENT_SHARD_IDS = store_keys.latent_shard_ids(config)
    LATENT_RECEIPTS = expand(f"{RECEIPTS}/latents/{{shard}}.json", shard=LATENT_SHARD_IDS)
    LATENT_MANIFEST = f"{RES}/latents/manifest.json"
    VAE_DIR = asset_paths.path(config, config["latents"]["vae"]) if isinstance(config["latents"]["vae"], str) else None

    def latent_shard_file(shard):
        return f"{LATENT_ITEM.folder}/shard-{shard}.tar"

    LATENT_SHARDS_STORED = [k for k in LATENT_SHARD_IDS if stored([latent_shard_file(k)])]
    LATENT_VGG = f"{RES}/latent_vgg/model.safetensors"
    LATENT_VGG_ACCURACY = f"{RES}/latent_vgg/accuracy.json"
ELATENTLPIPS = LATENTS and FAMILY == "cm" and config["midtrain"]["distance"] == "elatentlpips"


def latent_training_inputs(wildcards):
    return [LATENT_MANIFEST] if LATENTS else []


def latent_training_args(name):
    """--latents and --verify of a training rule on a latent row: the encoded dataset and how its
    shards are checked."""

    def args(wildcards, output):
        if not LATENTS:
            return ""
        return f"--latents {shlex.quote(LATENT_MANIFEST)} --verify {stage_configs.stage_options(name, config)['verify']}"

    return args


def decode_inputs(wildcards):
    return asset_inputs(VAE_DIR) if LATENTS and VAE_DIR else []


def decode_args(wildcards, output):
    """--latents (and --vae) of sample and fid_teacher on a latent row (a function of `output`: no
    other row's jobs see a new param)."""
    if not LATENTS:
        return ""
    vae = f" --vae {shlex.quote(VAE_DIR)}" if VAE_DIR else ""
    return f"--latents {shlex.quote(as_arg(config['latents']))}{vae}"


# ---- post-training inits, what each starts from and what sample and fid score
def init_model(wildcards):
    """The model a post-training run starts from (for random, only its architecture is read)."""
    return f"{RES}/midtrain/model.safetensors" if wildcards.init == "cmt" else TEACHER.path


def init_input(wildcards):
    """What the post-training run depends on: the mid-trained model, or this workdir's teacher receipt."""
    return f"{RES}/midtrain/model.safetensors" if wildcards.init == "cmt" else TEACHER_RECEIPT


def distillation_inputs(wildcards):
    """Method ecd distils the teacher (and its guide): their receipts."""
    if stage_configs.stage_config("posttrain", config, wildcards.init)["posttrain"].get("method") != "ecd":
        return []
    guide = [IMPORTS["import_guide"][2]] if GUIDE else [TEACHER_RECEIPT] if asset_paths.guide_is_teacher(config) else []
    return [IMPORTS["import_ecd_teacher"][2] if ECD_TEACHER else TEACHER_RECEIPT] + guide


def distillation_args(wildcards):
    if stage_configs.stage_config("posttrain", config, wildcards.init)["posttrain"].get("method") != "ecd":
        return ""
    guide = GUIDE.path if GUIDE else TEACHER.path if asset_paths.guide_is_teacher(config) else None
    return (f"--teacher {shlex.quote((ECD_TEACHER or TEACHER).path)}"
            + (f" --guide {shlex.quote(guide)}" if guide else ""))


def sampled_model(init, snap):
    """The model a sample job draws from: a post-training snapshot, or (init `midtrain`, snapshot
    `final`) the mid-trained model itself, scored on its own as the official mid-training evaluation does,
    or (init `posthoc-<init>`) the post-hoc EMA of one width synthesised from that init's run."""
    if init == "midtrain":
        return f"{RES}/midtrain/model.safetensors"
    if power_ema.trained_init(init) is not None:
        return f"{RES}/posthoc/{power_ema.trained_init(init)}/{snap}.safetensors"
    return f"{RES}/posttrain/{init}/snapshots/{snap}.safetensors"


def scored_snapshots(wildcards):
    if power_ema.trained_init(wildcards.init) is not None:
        return POSTHOC_NAMES
    return ["final"] if wildcards.init == "midtrain" else SNAPSHOTS


# ---- post-hoc EMA (stages/config/power_ema.py): a training run whose ema.kind is power keeps snapshots
# of its power-EMA profiles in phema/ beside its model file; posthoc_ema.smk synthesises EMAs from them,
# which sample and fid score as the snapshots of the init `posthoc-<init>`
POSTHOC_INITS = power_ema.scored_inits(config)
POSTHOC_NAMES = power_ema.posthoc_names(config)


def phema_output(rule, folder):
    """{phema: the phema/ folder in `folder`} as outputs of a training rule whose runs keep power-EMA
    snapshots; none otherwise (the rule is as it was)."""
    return {"phema": directory(f"{folder}/{power_ema.FOLDER}")} if power_ema.keeps_profiles(config, rule) else {}


def trained_folder(init):
    """The folder of the model file (and phema/) of the run an init names: `midtrain` or a post-training init."""
    return f"{RES}/midtrain" if init == "midtrain" else f"{RES}/posttrain/{init}"
