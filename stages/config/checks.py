"""Checks across config keys that a JSON schema cannot express, run by the Snakefile right after
the schema (so before any job starts). Every message starts with the key to change."""

from stages.config import power_ema, workload
from stages.files.assets import CATALOG, FOLDERS

# The digits are 8x8; other sources declare `dataset.resolution`.
SOURCE_RESOLUTION = {"digits": 8}
# LPIPS's VGG trunk pools five times; below 16x16 its deepest features are empty.
LPIPS_MIN_RESOLUTION = 16
# Networks with MeanFlow's second time input (dual_time); tests/test_config.py keeps this in step
# with stages/networks (this module imports no torch: the Snakefile runs it on every dry run).
DUAL_TIME_NETWORKS = {"small_unet", "dit"}


class ConfigError(ValueError):
    pass


def problems(cfg):
    """Messages for impossible combinations in a schema-validated config (defaults filled in)."""
    out = []
    if not cfg["sigma_max"] > cfg["sigma_min"]:
        out.append(f"sigma_max: {cfg['sigma_max']} must be above sigma_min {cfg['sigma_min']} "
                   "(the solver's sigma grid decreases from sigma_max to sigma_min)")
    fixed = SOURCE_RESOLUTION.get(cfg["dataset"]["source"])
    if fixed is not None and cfg["dataset"].get("resolution", fixed) != fixed:
        out.append(f"dataset.resolution: {cfg['dataset']['resolution']}, but {cfg['dataset']['source']} "
                   f"images are {fixed}x{fixed}")
    if cfg.get("store_push") and not cfg.get("store_remote"):
        out.append("store_push: true needs store_remote, the remote store to push to (s3://bucket/prefix)")
    if cfg.get("family", "cm") == "mf":
        out += meanflow_problems(cfg)
    else:
        out += consistency_problems(cfg)
    return out + power_ema.problems(cfg)


def consistency_problems(cfg):
    """family cm: midtrain (CMT-CM), posttrain (ECT), 2-step sampling through sigma_mid."""
    out = []
    traj, mid, post = cfg["trajectories"], cfg["midtrain"], cfg["posttrain"]
    sigma_mid = cfg["sampling"]["sigma_mid"]
    if 2 in cfg["sampling"]["steps"] and not cfg["sigma_min"] < sigma_mid < cfg["sigma_max"]:
        out.append(f"sampling.sigma_mid: {sigma_mid} must lie between sigma_min {cfg['sigma_min']} "
                   f"and sigma_max {cfg['sigma_max']} for 2-step sampling")
    online = mid.get("trajectories") == "online"  # no pool to draw from: the step solves its own
    out += trajectories_per_step("midtrain", mid["batch"], traj["nfe"], "trajectories.nfe",
                                 None if online else traj, "a step sees whole trajectories, nfe points each")
    if mid["distance"] == "lpips":
        resolution = cfg["dataset"].get("resolution", SOURCE_RESOLUTION.get(cfg["dataset"]["source"]))
        if resolution is not None and resolution < LPIPS_MIN_RESOLUTION:
            out.append(f"midtrain.distance: lpips needs images of at least {LPIPS_MIN_RESOLUTION}x"
                       f"{LPIPS_MIN_RESOLUTION}, dataset.resolution is {resolution}; use l2 or pseudo_huber")
        if mid.get("lpips_weights") is None and not cfg["dataset"].get("synthetic"):
            out.append("midtrain.lpips_weights: distance lpips needs the VGG16 trunk weights (a file or "
                       "the catalog name vgg16); a random trunk is for tests and smoke runs only")
    out += guidance_problems(post)
    latent = "latents" in cfg
    if mid["distance"] == "elatentlpips" and not latent:
        out.append("midtrain.distance: elatentlpips compares latents; it needs a `latents` section (the latent "
                   "rows), otherwise use lpips")
    if latent:
        out += latent_problems(cfg)
    budgets = [post["steps"]]
    if "baseline" in post["inits"]:
        budgets.append(cfg.get("baseline", {}).get("steps", post["steps"]))
    out += snapshot_problems("posttrain", post["snapshots"], budgets)
    return out


def guidance_problems(post):
    """ECD's guide and reference teacher: `teacher` (the row's own) or networks to import."""
    guidance = post.get("guidance") or {}
    if post.get("method") != "ecd":
        return []
    out = []
    guide, teacher = guidance.get("guide"), guidance.get("teacher")
    if guide not in (None, "teacher") and (guide not in CATALOG or "network" not in guidance):
        out.append(f"posttrain.guidance.guide: {guide!r} must be `teacher` or a catalog name (stages/files/assets.py), "
                   "with posttrain.guidance.network its network section")
    if teacher not in (None, "teacher") and teacher not in CATALOG:
        out.append(f"posttrain.guidance.teacher: {teacher!r} must be `teacher` or a catalog name "
                   "(stages/files/assets.py)")
    return out


def latent_problems(cfg):
    """The latent rows: the networks see the encoded dataset, never pixels."""
    out = []
    lat, resolution = cfg["latents"], cfg["dataset"].get("resolution")
    if isinstance(lat["vae"], str) and lat["vae"] not in FOLDERS:
        out.append(f"latents.vae: {lat['vae']!r} is no catalog folder (stages/files/assets.py FOLDERS: "
                   f"{sorted(FOLDERS)}); name one, or give {{config, seed}} for a random AutoencoderKL")
    if cfg["trajectories"].get("x_T", "noise") != "noise":
        out.append("trajectories.x_T: the latent rows start from noise (data-free CMT); data_plus_noise would "
                   "need the pixel dataset in every trajectory job")
    if resolution is None or resolution % 8:
        out.append(f"dataset.resolution: {resolution}; the SD-VAE downsamples 8x, so the latent rows need a "
                   "multiple of 8")
    if len(lat["raw_mean"]) != len(lat["raw_std"]):
        out.append(f"latents.raw_mean and latents.raw_std: {len(lat['raw_mean'])} and {len(lat['raw_std'])} "
                   "values; one per latent channel each")
    if cfg["midtrain"]["distance"] == "lpips":
        out.append("midtrain.distance: lpips compares pixels; the latent rows compare latents with elatentlpips")
    vgg = cfg.get("latent_vgg", {})
    if vgg.get("holdout_shards", 1) >= lat["num_shards"]:
        out.append(f"latent_vgg.holdout_shards: {vgg.get('holdout_shards', 1)} of latents.num_shards "
                   f"{lat['num_shards']} leaves no shard to train the latent VGG16 on")
    return out


def meanflow_problems(cfg):
    """family mf: midtrain_mf (CMT-MF), posttrain_mf (MeanFlow) on a dual-time network."""
    out = []
    traj, mid, post = cfg["trajectories"], cfg["midtrain_mf"], cfg["posttrain_mf"]
    kind = cfg["network"]["kind"]
    if kind not in DUAL_TIME_NETWORKS:
        out.append(f"network.kind: {kind} has no second time input, which the average velocity "
                   f"u(z, r, t) of family mf needs; use {' or '.join(sorted(DUAL_TIME_NETWORKS))}")
    out += meanflow_teacher_problems(cfg)
    out += trajectories_per_step("midtrain_mf", mid["batch"], mid["pairs_per_trajectory"],
                                 "midtrain_mf.pairs_per_trajectory", traj,
                                 "a step draws pairs_per_trajectory pairs from each of its trajectories")
    budgets = sorted({workload.meanflow_steps(cfg, init) for init in post["inits"]})
    out += snapshot_problems("posttrain_mf", post["snapshots"], budgets)
    return out


def meanflow_teacher_problems(cfg):
    """A MeanFlow teacher and the flow-time solver go together; the DiT has no dropout; labels,
    label dropout and guidance only with a class-conditional network."""
    out = []
    teacher, traj = cfg["teacher"], cfg["trajectories"]
    mf_teacher = teacher.get("objective") == "meanflow"
    flow_solver = traj.get("solver") == "meanflow"
    if mf_teacher != flow_solver:
        out.append(f"trajectories.solver: {traj.get('solver')} with teacher.objective "
                   f"{teacher.get('objective', 'edm')}; a MeanFlow teacher (objective meanflow) takes solver meanflow, "
                   "an EDM teacher dpm_solver_pp")
    if mf_teacher and "meanflow" not in teacher:
        out.append("teacher.meanflow: objective meanflow needs the section (its keys have defaults: {} will do)")
    if traj.get("label_dropout") and not flow_solver:
        out.append("trajectories.label_dropout: only the flow-time solver (meanflow) drops labels")
    networks = [("network", cfg["network"])]
    if teacher.get("network"):
        networks.append(("teacher.network", teacher["network"]))
    for key, net in networks:
        if net["kind"] != "dit":
            continue
        for section in ("teacher", "midtrain_mf", "posttrain_mf"):
            if section == "teacher" and not mf_teacher:
                continue
            if cfg[section].get("dropout"):
                out.append(f"{section}.dropout: {cfg[section]['dropout']}, but {key} is a DiT, which has no "
                           "dropout (DiT and MeanFlow train without it): set 0")
    conditional = {key: bool(net.get("num_classes")) for key, net in networks}
    teacher_key = "teacher.network" if teacher.get("network") else "network"
    for section, key, values in (("posttrain_mf", "network", cfg["posttrain_mf"]),
                                 ("teacher.meanflow", teacher_key, teacher.get("meanflow") or {})):
        if (values.get("label_dropout") or values.get("guidance")) and not conditional.get(key, False):
            out.append(f"{section}: label_dropout and guidance need a class-conditional network "
                       f"({key}.num_classes > 0)")
        if values.get("guidance") and not values.get("label_dropout"):
            out.append(f"{section}.guidance: needs label_dropout > 0 (the unconditional field is learnt "
                       "from dropped labels)")
    return out


def trajectories_per_step(section, batch, per_trajectory, per_key, traj, why):
    """A mid-training batch of whole trajectories, no more of them than the pool holds."""
    if batch % per_trajectory:
        return [f"{section}.batch: {batch} is not a multiple of {per_key} = {per_trajectory} ({why})"]
    if traj is None:
        return []
    pool = traj["num_shards"] * traj["per_shard"]
    if batch // per_trajectory > pool:
        return [f"{section}.batch: {batch // per_trajectory} trajectories per step, more than the pool of "
                f"trajectories.num_shards x per_shard = {pool}"]
    return []


def snapshot_problems(section, snapshots, budgets):
    """Snapshots may come in any order (the workflow sorts them, the largest is the final model's),
    but two must not share a name (percent) or, at any of the `budgets` (steps), a step."""
    names = [round(100 * f) for f in snapshots]
    if len(set(names)) < len(names):
        return [f"{section}.snapshots: {snapshots} name the same snapshot twice (percent {names}); "
                "keep them at least 1% apart"]
    for total in budgets:
        steps = [round(f * total) for f in snapshots]
        if len(set(steps)) < len(steps):
            return [f"{section}.snapshots: {snapshots} reach the same step twice (steps {steps} of {total}); "
                    "keep them at least one step apart"]
    return []


def process_problems(cfg, gpus, nodes=None):
    """Batches that cannot be split over the processes of a job, one per GPU it asks for on each of its
    nodes (`gpus`: rule -> its gpu resource, `nodes`: rule -> its nodes resource where above 1, the
    row's or the command line's): a job would fail only once it runs."""
    out = []
    traj = cfg["trajectories"]
    nodes = nodes or {}

    def processes(rule):
        """The job's world size: a process per GPU (or one, without GPUs) on each of several nodes."""
        if nodes.get(rule, 1) <= 1:
            return gpus.get(rule, 0)
        return max(gpus.get(rule, 0), 1) * nodes[rule]

    def asked(rule, what="one process each"):
        """What the job asks for, as the message names it, and the option that changes it."""
        n = gpus.get(rule, 0)
        if nodes.get(rule, 1) <= 1:
            return f"resources.{rule}.gpu: {n} GPUs ({what})", f"{rule}:gpu=N"
        return (f"resources.{rule}: {nodes[rule]} nodes x {n} GPUs ({processes(rule)} processes, {what})",
                f"{rule}:gpu=G {rule}:nodes=M with G x M")

    def split(rule, key, count, unit, per_gpu=None, per_key=None):
        n = processes(rule)
        if n > 1 and count % n:
            job, fix = asked(rule)
            out.append(f"{job} cannot share {key} = {count} "
                       f"{unit} evenly; ask for a divisor of {count} (--set-resources {fix})")
        elif per_gpu:  # gradient accumulation: each process's share in micro-batches of per_gpu
            share = count // max(n, 1)
            if share % min(per_gpu, share):
                out.append(f"{per_key}: micro-batches of {per_gpu} {unit} do not divide the {share} {unit} of each "
                           f"of the {max(n, 1)} processes of {rule}; choose a divisor of {share}")

    def per_gpu(section, key, points=1):
        value = cfg[section].get("batch_per_gpu")
        if value is not None and value % points:
            out.append(f"{section}.batch_per_gpu: {value} is not a multiple of {key} = {points} "
                       "(a micro-batch holds whole trajectories)")
            return None
        return value and value // points

    def shards(rule):
        n = processes(rule)
        if n > traj["num_shards"]:
            out.append(f"{asked(rule, 'one process each, reading their own shards')[0]} but "
                       f"trajectories.num_shards is {traj['num_shards']}; ask for at most that many")

    if cfg["teacher"].get("source", "train") == "train":
        split("train_teacher", "teacher.batch", cfg["teacher"]["batch"], "images", per_gpu("teacher", ""),
              "teacher.batch_per_gpu")
    if cfg.get("family", "cm") == "mf":
        mid, post = cfg["midtrain_mf"], cfg["posttrain_mf"]
        split("midtrain_mf", "midtrain_mf.batch / pairs_per_trajectory",
              mid["batch"] // mid["pairs_per_trajectory"], "trajectories per step",
              per_gpu("midtrain_mf", "pairs_per_trajectory", mid["pairs_per_trajectory"]), "midtrain_mf.batch_per_gpu")
        shards("midtrain_mf")
        split("posttrain_mf", "posttrain_mf.batch", post["batch"], "images", per_gpu("posttrain_mf", ""),
              "posttrain_mf.batch_per_gpu")
    else:
        mid, post = cfg["midtrain"], cfg["posttrain"]
        split("midtrain", "midtrain.batch / trajectories.nfe", mid["batch"] // traj["nfe"], "trajectories per step",
              per_gpu("midtrain", "trajectories.nfe", traj["nfe"]), "midtrain.batch_per_gpu")
        if mid.get("trajectories") != "online":
            shards("midtrain")
        split("posttrain", "posttrain.batch", post["batch"], "images", per_gpu("posttrain", ""),
              "posttrain.batch_per_gpu")
        if "baseline" in post["inits"] and "batch" in cfg.get("baseline", {}):
            split("posttrain", "baseline.batch", cfg["baseline"]["batch"], "images")
    return out


def check(cfg):
    """Raise ConfigError listing every problem of `cfg`."""
    found = problems(cfg)
    if found:
        raise ConfigError("invalid configuration:\n  " + "\n  ".join(found))


def check_processes(cfg, gpus, nodes=None):
    """Raise ConfigError listing every batch that the jobs' GPUs (on each of their nodes) cannot split."""
    found = process_problems(cfg, gpus, nodes)
    if found:
        raise ConfigError("invalid configuration:\n  " + "\n  ".join(found))
