# Paths and input functions. What is computed from the config (store keys, what each rule passes
# to its stage, budgets) is Python in stages/config/, tested without Snakemake and shared with the
# tests and bench/: the rules only place it.
import os
import shlex
import sys

sys.path.insert(0, workflow.basedir)
from stages.config import asset_paths, multinode, power_ema, stage_configs, store_keys  # noqa: E402  (stdlib only)
from stages.config.stage_configs import as_arg  # noqa: E402
from stages.files import store_plan  # noqa: E402  (stdlib only; boto3 only with a remote)

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
DATASET_RECEIPT = f"{RECEIPTS}/dataset.json"
# The prepared pixels, where a job reads them: a latent row trains on the encoded dataset and its
# trajectories start from noise (ImageNet-256: 252 GB of uint8 no training job needs)
PIXELS_RECEIPT = [] if LATENTS else DATASET_RECEIPT
TEACHER_RECEIPT = f"{RECEIPTS}/teacher.json"
# the receipts of the networks (store_keys.imported_networks: the teacher, ECD's guide and teacher)
RECEIPT_OF = {"teacher": TEACHER_RECEIPT, "guide": f"{RECEIPTS}/guide.json", "ecd_teacher": f"{RECEIPTS}/ecd-teacher.json"}
# the teacher's metrics log, which a teacher trained here publishes beside its model (none for an
# imported teacher, or one trained before the log existed)
TEACHER_METRICS = f"{TEACHER.folder}/metrics.jsonl"
SPEC_RECEIPT = f"{RECEIPTS}/trajectory-spec.json"
SHARD_IDS = store_keys.trajectory_shard_ids(config)
SHARD_RECEIPTS = expand(f"{RECEIPTS}/shards/{{shard}}.json", shard=SHARD_IDS)
MANIFEST = f"{RES}/trajectories/manifest.json"
# store_remake: this run's store jobs make their files again (with --force on a receipt, the one
# command that regenerates a damaged store file). store_remote: an item complete there and not here
# is pulled by a local job instead of made; only the planning Snakemake asks it (a job's own, on a
# compute node, may reach no network). store_push: what this run makes is pushed there.
STORE_REMAKE = config["store_remake"]
STORE_REMOTE = config["store_remote"] if workflow.is_main_process else None
STORE_PUSH = config["store_push"]
ITEM_FILES = store_keys.item_files(config)


def shard_file(shard):
    return ITEM_FILES[f"shard/{shard}"][0]


if LATENTS:
    LATENT_ITEM = ITEMS["latents"]
    LATENT_SHARD_IDS = store_keys.latent_shard_ids(config)

    def latent_shard_file(shard):
        return ITEM_FILES[f"latent/{shard}"][0]


# Where each item comes from (stages/files/store_plan.py), decided once for the whole row: an item the
# store holds gets its receipt from the `_from_store` variant of its rule, a local job that only reads
# the record (a second workdir submits no cluster job, and hashes nothing, for what the store holds);
# an item the remote holds, from the `_from_remote` variant, a local job that pulls it.
SOURCES = store_plan.sources(ITEM_FILES.values(), remote=STORE_REMOTE, remake=STORE_REMAKE)


def source(files):
    return SOURCES[str(files[0])]


def store_mode(source_of):
    """--mode of stages.files.store and its remote options; `source_of(wildcards)` is the item's
    source. A function of `output`: which rule writes a receipt is no part of what it records (no
    params rerun trigger)."""

    def mode(wildcards, output):
        return store_plan.wrapper_options(source_of(wildcards), STORE_REMAKE, config["store_remote"], STORE_PUSH)

    return mode


STORE_WRAPPER = ("python -m stages.files.store --mode {params.store_mode} --key {params.key} "
                 "--files {params.files:q} --receipt {output:q}")


def store_command(stage):
    """The shell command that makes a store item: the store wrapper running the stage."""
    return f"{STORE_WRAPPER} -- {stage}"


DATASET_FROM = source(DATASET.files)
TEACHER_FROM = source(TEACHER.files)
SPEC_FROM = source(TRAJ.files)
SHARDS_FROM = {k: source([shard_file(k)]) for k in SHARD_IDS}


# ---- training: resumable state, its options and the GPUs a job was given, all functions of `output`:
# how often a run saves, how it is sliced, watched and checked, on how many GPUs, makes nothing stale
def state_args(name, folder, metrics=lambda wildcards, output: output.metrics):
    """--state-dir, --checkpoint, --metrics and --tracking; `folder(wildcards)` is the state folder,
    `metrics(wildcards, output)` where the metrics log is published (the rule's `metrics` output)."""
    return lambda wildcards, output: stage_configs.state_words(name, config, folder(wildcards),
                                                               metrics(wildcards, output))


def trajectory_checks(name):
    return lambda wildcards, output: stage_configs.check_words(name, config)


def launch_gpus(wildcards, output, resources):
    """--gpus for stages.launch: the job's GPUs per node (0 where no profile sets them), and --nodes
    where a training rule spans several (stages/config/multinode.py)."""
    return multinode.launch_gpus(resources)


def slice_retries(name):
    return stage_configs.slice_retries(name, config)


# ---- the latent rows (latents.smk): the training stages read the encoded dataset, sample and
# fid_teacher decode with the row's VAE
if LATENTS:
    LATENT_RECEIPTS = expand(f"{RECEIPTS}/latents/{{shard}}.json", shard=LATENT_SHARD_IDS)
    LATENT_MANIFEST = f"{RES}/latents/manifest.json"
    VAE_DIR = asset_paths.path(config, config["latents"]["vae"]) if isinstance(config["latents"]["vae"], str) else None
    LATENT_SHARDS_FROM = {k: source([latent_shard_file(k)]) for k in LATENT_SHARD_IDS}
    LATENT_VGG = f"{RES}/latent_vgg/model.safetensors"
    LATENT_VGG_ACCURACY = f"{RES}/latent_vgg/accuracy.json"
    LATENT_VGG_METRICS = f"{RES}/latent_vgg/metrics.jsonl"
ELATENTLPIPS = LATENTS and FAMILY == "cm" and config["midtrain"]["distance"] == "elatentlpips"


def latent_training_inputs(wildcards):
    return [LATENT_MANIFEST] if LATENTS else []


def latent_training_args(name):
    return lambda wildcards, output: stage_configs.latent_words(name, config, LATENTS and LATENT_MANIFEST)


def decode_inputs(wildcards):
    return asset_inputs(VAE_DIR) if LATENTS and VAE_DIR else []


def decode_args(wildcards, output):
    return stage_configs.decode_words(config, LATENTS and VAE_DIR)


# ---- post-training inits, what each starts from and what sample and fid score
def init_model(wildcards):
    """The model a post-training run starts from (for random, only its architecture is read)."""
    return f"{RES}/midtrain/model.safetensors" if wildcards.init == "cmt" else TEACHER.path


def init_input(wildcards):
    """What the post-training run depends on: the mid-trained model, or this workdir's teacher receipt."""
    return f"{RES}/midtrain/model.safetensors" if wildcards.init == "cmt" else TEACHER_RECEIPT


def distillation_inputs(wildcards):
    """The receipts of the networks an init's post-training distils (ECD's teacher and guide)."""
    return [RECEIPT_OF[item] for item in stage_configs.distilled(config, wildcards.init).values()]


def distillation_args(wildcards):
    return " ".join(f"--{role} {shlex.quote(ITEMS[item].path)}"
                    for role, item in stage_configs.distilled(config, wildcards.init).items())


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
