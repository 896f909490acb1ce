"""What each rule passes to its stage: one function per stage config, called by the rules
(workflow/rules/*.smk), the stage tests (tests/stagekit.py) and bench/ alike, so a test runs the
config the workflow would pass.

`stage_config(rule, config, init=None)` is the `--config` JSON of a job (a change to it reruns the
job: Snakemake's params trigger). `stage_options(rule, config)` holds what a job also receives but
what must NOT rerun finished work: how often a run saves its state and how it is sliced into jobs
(`checkpoint`), how it is watched (`tracking`), how its inputs are checked (`verify`, `spot_check`),
how many images a VAE call takes; the rules pass these as functions of `output`, which the params
trigger leaves out.

Only stdlib: the Snakefile imports this before any job starts. tests/golden/stage_configs.json
holds every row's stage configs: a change here that alters one reruns that stage in every workdir.
"""

import json
import math
import shlex

from stages.config import asset_paths, power_ema, store_keys, workload

# How the trajectories (or encoded latents) are checked is not how the model is trained.
INPUT_CHECKS = ("verify", "spot_check")
TRAINING_RULES = ("train_teacher", "midtrain", "posttrain", "midtrain_mf", "posttrain_mf", "train_latent_vgg")


def as_arg(obj):
    """A stage config as the rule passes it: JSON with sorted keys (the same dict, the same bytes)."""
    return json.dumps(obj, sort_keys=True)


def family(config):
    """cm: consistency models (midtrain = CMT-CM, posttrain = ECT/ECD); mf: average-velocity flow maps
    (midtrain_mf = CMT-MF, posttrain_mf = MeanFlow)."""
    return config.get("family", "cm")


def post_section(config):
    return "posttrain_mf" if family(config) == "mf" else "posttrain"


def inits(config):
    return config[post_section(config)]["inits"]


def snapshot_name(fraction):
    """p000, p025, ..., p100: the post-training snapshot at `fraction` of the budget."""
    return f"p{round(100 * fraction):03d}"


def snapshot_names(config):
    """The post-training snapshots' names, sorted by fraction; the last one is the final model's."""
    return [snapshot_name(f) for f in sorted(config[post_section(config)]["snapshots"])]


def features(config):
    """The features section as the FID stages see it: catalog names resolved. A smoke variant's pixel
    features need no network and have their own reference."""
    out = dict(config["features"])
    if out["kind"] == "inception":
        out["model"] = asset_paths.path(config, out.get("model", asset_paths.DEFAULT_INCEPTION))
        if "reference" in out:  # published statistics (the ADM suite's): no dataset features
            out["reference"] = asset_paths.path(config, out["reference"])
    else:
        out.pop("model", None)
        out.pop("reference", None)
    return out


def midtrain_section(config):
    """midtrain as the stage sees it: no input checks; online, no shuffle buffer (each step solves its
    own trajectories); offline, no `trajectories` key (the default route); the LPIPS trunk resolved to
    its file; E-LatentLPIPS, which brings its own backbone, without LPIPS weights."""
    out = {k: v for k, v in config["midtrain"].items() if k not in INPUT_CHECKS}
    if workload.online_midtrain(config):
        out.pop("shuffle_buffer", None)
    else:
        out.pop("trajectories")
    if out.get("distance") == "lpips":
        out["lpips_weights"] = asset_paths.path(config, out.get("lpips_weights"))
    if out.get("distance") == "elatentlpips":
        out.pop("lpips_weights", None)
    return out


def whitening(config):
    return {k: config["latents"][k] for k in ("raw_mean", "raw_std", "final_mean", "final_std")}


def student_network(config):
    """A MeanFlow teacher has its own network: the students take the row's. An EDM teacher's
    students take the teacher's architecture (from its model file) and receive none."""
    return {"network": config["network"]} if config["teacher"].get("objective") == "meanflow" else {}


def sampling(config, init=None):
    """The sampling section; the mid-trained model alone (init `midtrain`, and its post-hoc EMAs) is
    sampled with the mid-training evaluation's sigma_mid."""
    if init in ("midtrain", power_ema.posthoc_init("midtrain")):
        return {**config["sampling"], "sigma_mid": config["sampling"]["sigma_mid_midtrain"]}
    return config["sampling"]


def rule_gpus(config, rule):
    return int(config.get("resources", {}).get(rule, {}).get("gpu", 0) or 0)


def ledger_gpus(config):
    """GPUs per job of each benchmark kind of the cost ledger (stages/reporting/ledger.py), from the
    row's resources (a --set-resources override on the command line is not seen here)."""
    mf = family(config) == "mf"
    return {"train_teacher": rule_gpus(config, "train_teacher"),
            "trajectory_shard": rule_gpus(config, "trajectory_shard"),
            "midtrain": rule_gpus(config, "midtrain_mf" if mf else "midtrain"),
            "posttrain": rule_gpus(config, "posttrain_mf" if mf else "posttrain")}


def distilled(config, init):
    """{role: store item name} of the networks an init's post-training distils: ECD's reference
    teacher (the row's teacher unless posttrain.guidance.teacher names another) and its autoguidance
    guide (a network of its own, or the teacher guiding itself); MeanFlow distillation's
    (posttrain_mf.target teacher) the row's teacher; none for the other methods."""
    if family(config) == "mf":
        return {"teacher": "teacher"} if config["posttrain_mf"].get("target") == "teacher" else {}
    if workload.posttrain_section(config, init).get("method") != "ecd":
        return {}
    out = {"teacher": "ecd_teacher" if asset_paths.ecd_teacher_asset(config) else "teacher"}
    if asset_paths.guide_asset(config):
        out["guide"] = "guide"
    elif asset_paths.guide_is_teacher(config):
        out["guide"] = "teacher"
    return out


def report(config):
    out = {"row": config["row"], "family": family(config), "inits": inits(config), "sampling": config["sampling"],
           "paper": config.get("paper", {}), "notes": config.get("notes", ""),
           "final_snapshot": snapshot_names(config)[-1], "gpus": ledger_gpus(config)}
    if workload.online_midtrain(config):
        out["midtrain_online"] = True
    method = config["posttrain"].get("method", "ect")
    if method != "ect":
        out["method"] = method
    if power_ema.scored_inits(config):  # the runs whose post-hoc EMAs are scored (stages/config/power_ema.py)
        out["posthoc_inits"] = power_ema.scored_inits(config)
    return out


def _teacher(config, init):
    return store_keys.teacher(config).spec


def training_seed(config):
    """The seed of the students' stages (mid- and post-training): `training_seed` where set, else `seed`,
    which the teacher's store key holds, so seeds of these stages can share one teacher and pool."""
    return config.get("training_seed", config["seed"])


def _midtrain(config, init):
    out = {"seed": training_seed(config), "sigma_boundary": config["sigma_boundary"],
           "midtrain": midtrain_section(config)}
    if workload.online_midtrain(config):
        out["trajectory_spec"] = store_keys.online_spec(config)
    return out


def _posttrain(config, init):
    out = {"seed": training_seed(config), "sigma_min": config["sigma_min"], "sigma_boundary": config["sigma_boundary"],
           "posttrain": workload.posttrain_section(config, init)}
    if "latents" in config:
        out["latents"] = whitening(config)
    return out


def _midtrain_mf(config, init):
    section = {k: v for k, v in config["midtrain_mf"].items() if k not in INPUT_CHECKS}
    return {"seed": training_seed(config), "midtrain_mf": section, **student_network(config)}


def _posttrain_mf(config, init):
    # without the list of inits and the random init's own budget (its steps reach its job alone):
    # adding an init or budgeting one must not rerun the others
    section = {k: v for k, v in config["posttrain_mf"].items() if k not in ("inits", "random_steps")}
    section["snapshots"] = sorted(section["snapshots"])
    out = {"seed": training_seed(config), "steps": workload.meanflow_steps(config, init), "posttrain_mf": section,
           **student_network(config)}
    if "latents" in config:
        out["latents"] = config["latents"]
    return out


def _train_latent_vgg(config, init):
    return {"seed": config["seed"], "latents": whitening(config), "latent_vgg": config["latent_vgg"]}


def _import(item):
    return lambda config, init: item(config).spec


STAGE_CONFIGS = {
    "prepare_dataset": lambda config, init: store_keys.dataset(config).spec,
    "fid_reference": lambda config, init: features(config),
    "train_teacher": _teacher,
    "import_teacher": _teacher,
    "import_guide": _import(store_keys.guide),
    "import_ecd_teacher": _import(store_keys.ecd_teacher),
    "trajectory_spec": lambda config, init: store_keys.trajectory_spec(config),
    "trajectory_shard": lambda config, init: store_keys.trajectory_spec(config),
    "encode_dataset": lambda config, init: store_keys.latents(config).spec,
    "train_latent_vgg": _train_latent_vgg,
    "midtrain": _midtrain,
    "posttrain": _posttrain,
    "midtrain_mf": _midtrain_mf,
    "posttrain_mf": _posttrain_mf,
    "sample": lambda config, init: sampling(config, init),
    "fid": lambda config, init: {"features": features(config), "sampling": sampling(config, init)},
    "fid_teacher": lambda config, init: {"features": features(config), "sampling": config["sampling"]},
    "report": lambda config, init: report(config),
    "posthoc_ema": lambda config, init: power_ema.stage_config(config),
    "fetch_assets": lambda config, init: {**config.get("assets", {}), "dir": asset_paths.assets_dir(config)},
}


def stage_config(rule, config, init=None):
    """The --config a job of `rule` passes to its stage (`init`: the post-training init, or for sample
    and fid also `midtrain`, the mid-trained model alone)."""
    if rule not in STAGE_CONFIGS:
        raise KeyError(f"no stage config for rule {rule!r}; rules with one: {sorted(STAGE_CONFIGS)}")
    return STAGE_CONFIGS[rule](config, init)


def tracking_options(config):
    """The tracking section as a training stage takes it (stages/training/metrics.py): the folder
    resolved, the row as the first part of each run's name."""
    tracking = config["tracking"]
    return {"log_with": tracking["log_with"], "log_every": tracking["log_every"], "project": tracking["project"],
            "dir": tracking["dir"] or f"{config['results']}/{config['row']}/tracking", "run": config["row"]}


def stage_options(rule, config):
    """What a job of `rule` receives besides its stage config and must not rerun finished work for."""
    out = {}
    if rule in TRAINING_RULES:
        out["checkpoint"] = config["checkpoint"]
        out["tracking"] = tracking_options(config)
    if rule in ("midtrain", "midtrain_mf"):
        out.update({k: config[rule][k] for k in INPUT_CHECKS})
    elif rule in ("posttrain", "posttrain_mf", "train_teacher", "train_latent_vgg") and "latents" in config:
        # the encoded dataset's shards are checked as the mid-training section says
        out["verify"] = config[("midtrain_mf" if family(config) == "mf" else "midtrain")]["verify"]
    if rule == "encode_dataset":
        out["vae_batch"] = config["latents"]["batch"]
    return out


def state_words(rule, config, state_dir, metrics):
    """--state-dir, --checkpoint, --metrics and --tracking of a training job (stage_options: none of
    them reruns finished work)."""
    options = stage_options(rule, config)
    return (f"--state-dir {shlex.quote(state_dir)} --checkpoint {shlex.quote(as_arg(options['checkpoint']))} "
            f"--metrics {shlex.quote(metrics)} --tracking {shlex.quote(as_arg(options['tracking']))}")


def check_words(rule, config):
    """--verify and --spot-check of a mid-training job: how its trajectories are checked."""
    options = stage_options(rule, config)
    return f"--verify {options['verify']} --spot-check {int(options['spot_check'])}"


def latent_words(rule, config, manifest):
    """--latents and --verify of a training job on a latent row: the encoded dataset and how its shards
    are checked; nothing elsewhere."""
    if "latents" not in config:
        return ""
    return f"--latents {shlex.quote(manifest)} --verify {stage_options(rule, config)['verify']}"


def decode_words(config, vae_dir):
    """--latents (and --vae) of sample and fid_teacher on a latent row; nothing elsewhere."""
    if "latents" not in config:
        return ""
    return f"--latents {shlex.quote(as_arg(config['latents']))}" + (f" --vae {shlex.quote(vae_dir)}" if vae_dir else "")


def training_budgets(rule, config):
    """(steps, batch) of each job a training rule runs (one per init for post-training)."""
    if rule == "train_teacher":
        return [(config["teacher"]["steps"], config["teacher"]["batch"])]
    if rule == "midtrain":
        return [(config["midtrain"]["steps"], config["midtrain"]["batch"])]
    if rule == "midtrain_mf":
        return [(config["midtrain_mf"]["steps"], config["midtrain_mf"]["batch"])]
    if rule == "posttrain":
        return [(workload.posttrain_section(config, i)["steps"], workload.posttrain_section(config, i)["batch"])
                for i in inits(config)]
    if rule == "posttrain_mf":
        return [(workload.meanflow_steps(config, i), config["posttrain_mf"]["batch"]) for i in inits(config)]
    if rule == "train_latent_vgg":
        return [(workload.latent_vgg_steps(config), config["latent_vgg"]["batch"])]
    raise KeyError(f"{rule!r} is not a training rule ({TRAINING_RULES})")


def slice_retries(rule, config):
    """`retries:` of a training rule. With checkpoint.slice_kimg each job trains one slice and exits 75,
    which Snakemake counts as a failure: a run of N slices needs N - 1 retries to finish in one
    invocation, and checkpoint.retry_margin more are left for preemptions and time limits. (A rule's
    `retries:` replaces --retries, which Snakemake reads only after the workflow is parsed.) Unsliced,
    None: --retries (the SLURM profile's `retries: 3`) applies as to every other rule. Slices are
    counted as stages/training/resume.py ends them."""
    slice_kimg = config["checkpoint"]["slice_kimg"]
    if slice_kimg is None:
        return None
    slices = max(math.ceil(steps / math.ceil(1000.0 * slice_kimg / batch))
                 for steps, batch in training_budgets(rule, config))
    return slices - 1 + config["checkpoint"]["retry_margin"]
