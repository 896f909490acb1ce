"""Checks across config keys that a JSON schema cannot express, run by the Snakefile right after
the schema (so before any job starts). Every message starts with the key to change."""

# The digits are 8x8; other sources declare `dataset.resolution`.
SOURCE_RESOLUTION = {"digits": 8}
# LPIPS's VGG trunk pools five times; below 16x16 its deepest features are empty.
LPIPS_MIN_RESOLUTION = 16


class ConfigError(ValueError):
    pass


def problems(cfg):
    """Messages for impossible combinations in a schema-validated config (defaults filled in)."""
    out = []
    traj, mid, post = cfg["trajectories"], cfg["midtrain"], cfg["posttrain"]

    if not cfg["sigma_max"] > cfg["sigma_min"]:
        out.append(f"sigma_max: {cfg['sigma_max']} must be above sigma_min {cfg['sigma_min']} "
                   "(the solver's sigma grid decreases from sigma_max to sigma_min)")
    sigma_mid = cfg["sampling"]["sigma_mid"]
    if 2 in cfg["sampling"]["steps"] and not cfg["sigma_min"] < sigma_mid < cfg["sigma_max"]:
        out.append(f"sampling.sigma_mid: {sigma_mid} must lie between sigma_min {cfg['sigma_min']} "
                   f"and sigma_max {cfg['sigma_max']} for 2-step sampling")

    fixed = SOURCE_RESOLUTION.get(cfg["dataset"]["source"])
    if fixed is not None and cfg["dataset"].get("resolution", fixed) != fixed:
        out.append(f"dataset.resolution: {cfg['dataset']['resolution']}, but {cfg['dataset']['source']} "
                   f"images are {fixed}x{fixed}")

    if mid["batch"] % traj["nfe"]:
        out.append(f"midtrain.batch: {mid['batch']} is not a multiple of trajectories.nfe = {traj['nfe']} "
                   "(a step sees whole trajectories, nfe points each)")
    elif mid["batch"] // traj["nfe"] > traj["num_shards"] * traj["per_shard"]:
        out.append(f"midtrain.batch: {mid['batch'] // traj['nfe']} trajectories per step, more than the "
                   f"pool of trajectories.num_shards x per_shard = {traj['num_shards'] * traj['per_shard']}")
    if mid["distance"] == "lpips":
        resolution = cfg["dataset"].get("resolution", SOURCE_RESOLUTION.get(cfg["dataset"]["source"]))
        if resolution is not None and resolution < LPIPS_MIN_RESOLUTION:
            out.append(f"midtrain.distance: lpips needs images of at least {LPIPS_MIN_RESOLUTION}x"
                       f"{LPIPS_MIN_RESOLUTION}, dataset.resolution is {resolution}; use l2 or pseudo_huber")
        if mid.get("lpips_weights") is None and not cfg["dataset"].get("synthetic"):
            out.append("midtrain.lpips_weights: distance lpips needs the VGG16 trunk weights (a file or "
                       "the catalog name vgg16); a random trunk is for tests and smoke runs only")

    snapshots = post["snapshots"]
    if list(snapshots) != sorted(snapshots):
        out.append(f"posttrain.snapshots: {snapshots} must be increasing (the last one is the final model's)")
    names = [round(100 * f) for f in snapshots]
    # the baseline init takes the same snapshots of its own number of steps
    runs = [("posttrain", post)] + ([("baseline", cfg.get("baseline", post))] if "baseline" in post["inits"] else [])
    for section, run in runs:
        steps = [round(f * run["steps"]) for f in snapshots]
        if len(set(names)) < len(names) or len(set(steps)) < len(steps):
            out.append(f"posttrain.snapshots: {snapshots} name or reach the same snapshot twice "
                       f"(percent {names}, steps {steps} of {section}.steps {run['steps']}); keep them at "
                       "least 1% and one step apart")
            break

    return out


def check(cfg):
    """Raise ConfigError listing every problem of `cfg`."""
    found = problems(cfg)
    if found:
        raise ConfigError("invalid configuration:\n  " + "\n  ".join(found))
