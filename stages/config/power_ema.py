"""Post-hoc EMA in the workflow: which training runs track power-function EMA profiles (a section
whose `ema.kind` is power), at which steps they keep snapshots of them and under which names, and
what the posthoc_ema rule synthesises from those (docs/method.md#post-hoc-ema).

A run keeps its snapshots in `phema/` beside its model file (its declared output folder; the
teacher's in its store folder), one file pair per profile and snapshot,
`sigma_rel-<width>-step<step>.safetensors` and `.json` (stages/training/kept.py names files by step,
so a resumed run rolls back the ones past its saved step). The syntheses are sampled and scored as
the snapshots of a pseudo-init `posthoc-<init>` (samples/posthoc-cmt/..., fid/posthoc-cmt.json),
one model per width of `posthoc_ema.sigma_rels`.

Only stdlib: the Snakefile imports this before any job starts.
"""

import math

from stages.config import workload
from stages.training.kept import step_name

FOLDER = "phema"
POSTHOC = "posthoc-"


def is_power(ema):
    return ema.get("kind") == "power"


def profile_stem(sigma_rel):
    """`sigma_rel-0.0500`: a profile's (or a synthesis's) name."""
    return f"sigma_rel-{sigma_rel:.4f}"


def snapshot_steps(ema, total_steps):
    """The steps after which a run of `total_steps` keeps its profiles: every snapshot_every of the
    budget, rounded to a step, and the last step."""
    every = ema["snapshot_every"]
    count = math.floor(1 / every + 1e-9)
    steps = {round(k * every * total_steps) for k in range(1, count + 1)} | {total_steps}
    return sorted(s for s in steps if s > 0)


def snapshots(ema, total_steps):
    """{step: [the snapshot file of each profile, in the order of sigma_rels]}, as paths from the
    folder of the run's model file (FOLDER/...)."""
    return {step: [f"{FOLDER}/{step_name(profile_stem(s), step, 'safetensors')}" for s in ema["sigma_rels"]]
            for step in snapshot_steps(ema, total_steps)}


def snapshot_files(run_folder, ema, total_steps):
    """Every file the snapshots of a run whose model file lies in `run_folder` leave there."""
    return [f"{run_folder}/{name.removesuffix('.safetensors')}.{ext}" for names in snapshots(ema, total_steps).values()
            for name in names for ext in ("safetensors", "json")]


def runs(config):
    """[(rule, init, ema section, total steps)] of every training run whose EMA kind is power (init None
    but for post-training)."""
    out = []
    teacher = config["teacher"]
    if teacher.get("source", "train") == "train":
        out.append(("train_teacher", None, teacher["ema"], teacher["steps"]))
    if config.get("family", "cm") == "mf":
        out.append(("midtrain_mf", None, config["midtrain_mf"]["ema"], config["midtrain_mf"]["steps"]))
        post = config["posttrain_mf"]
        out += [("posttrain_mf", init, post["ema"], workload.meanflow_steps(config, init)) for init in post["inits"]]
    else:
        out.append(("midtrain", None, config["midtrain"]["ema"], config["midtrain"]["steps"]))
        for init in config["posttrain"]["inits"]:
            section = workload.posttrain_section(config, init)
            out.append(("posttrain", init, section["ema"], section["steps"]))
    return [run for run in out if is_power(run[2])]


def keeps_profiles(config, rule):
    """Whether the jobs of training rule `rule` keep power-EMA snapshots (its rule then declares their
    folder; checks make every init of a post-training rule agree)."""
    return any(run[0] == rule for run in runs(config))


def scored_inits(config):
    """The runs the posthoc_ema rule synthesises from, by the init name sample and fid give them: the
    post-training inits, and `midtrain` (family cm: the mid-trained model is scored alone)."""
    out = []
    for rule, init, _, _ in runs(config):
        if rule in ("posttrain", "posttrain_mf"):
            out.append(init)
        elif rule == "midtrain":
            out.append("midtrain")
    return out


def posthoc_names(config):
    """The syntheses' names, by width."""
    return [profile_stem(s) for s in sorted(config["posthoc_ema"]["sigma_rels"])]


def posthoc_init(init):
    return POSTHOC + init


def trained_init(name):
    """The init whose run a sample / fid init name `posthoc-<init>` synthesises from (None: not one)."""
    return name[len(POSTHOC):] if name.startswith(POSTHOC) else None


def stage_config(config):
    """What the posthoc_ema stage receives: the widths to synthesise and the point of training."""
    section = config["posthoc_ema"]
    return {"sigma_rels": sorted(section["sigma_rels"]), "at": section["at"]}


def problems(config):
    """Messages for power-EMA settings that cannot work (checks.py)."""
    out = []
    names = [profile_stem(s) for s in config["posthoc_ema"]["sigma_rels"]]
    if len(set(names)) < len(names):
        out.append(f"posthoc_ema.sigma_rels: {config['posthoc_ema']['sigma_rels']} name the same width twice at "
                   "4 decimals; keep them at least 0.0001 apart")
    post = config["posttrain"]
    if config.get("family", "cm") == "cm" and "baseline" in post["inits"] and len(post["inits"]) > 1 \
            and is_power(post["ema"]) != is_power(config["baseline"]["ema"]):
        out.append("baseline.ema.kind: power for one of posttrain and baseline only; the posttrain rule keeps the "
                   "power-EMA snapshots of all its inits or of none: set the same kind in both")
    at = config["posthoc_ema"]["at"]
    for rule, init, ema, total in runs(config):
        section = "baseline" if init == "baseline" else "teacher" if rule == "train_teacher" else rule
        stems = [profile_stem(s) for s in ema["sigma_rels"]]
        if len(set(stems)) < len(stems):
            out.append(f"{section}.ema.sigma_rels: {ema['sigma_rels']} name the same profile twice at 4 decimals; "
                       "keep them at least 0.0001 apart")
        steps = snapshot_steps(ema, total)
        if len(steps) < math.floor(1 / ema["snapshot_every"] + 1e-9):
            out.append(f"{section}.ema.snapshot_every: {ema['snapshot_every']} of the {total} steps of {section} "
                       "is less than a step; keep snapshots at least a step apart")
        synthesised = rule in ("midtrain", "posttrain", "posttrain_mf")
        if synthesised and round(at * total) not in steps:
            out.append(f"posthoc_ema.at: {at} of the {total} steps of {section} is step {round(at * total)}, where "
                       f"it keeps no snapshot (steps {', '.join(map(str, steps[:3]))}, ..., {steps[-1]}); use a "
                       f"multiple of {section}.ema.snapshot_every, or 1.0")
    return list(dict.fromkeys(out))  # the inits of one section share its messages
