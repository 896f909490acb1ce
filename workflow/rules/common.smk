# Paths and input functions (the store's in store.smk). What is computed from the config (store keys,
# what each rule passes to its stage, budgets) is Python in stages/config/, tested without Snakemake
# and shared with the tests and bench/: the rules only place it.
import os
import shlex
import sys

sys.path.insert(0, workflow.basedir)
from stages.config import asset_paths, multinode, power_ema, stage_configs, store_keys, workload  # noqa: E402  (stdlib only)
from stages.config.stage_configs import as_arg  # noqa: E402

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
ONLINE = workload.online_midtrain(config)


def stage_config(name):
    """The params entry of a rule's stage config (stages/config/stage_configs.py)."""
    return lambda wildcards: as_arg(stage_configs.stage_config(name, config, wildcards.get("init")))


def asset_inputs(*paths):
    return asset_paths.inputs(config, *paths)


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
    LATENT_MANIFEST = f"{RES}/latents/manifest.json"
    VAE_DIR = asset_paths.path(config, config["latents"]["vae"]) if isinstance(config["latents"]["vae"], str) else None
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
    """The receipts of the networks an init's post-training distils (ECD's teacher and guide, MeanFlow
    distillation's teacher: stage_configs.distilled)."""
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
