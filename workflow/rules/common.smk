# Paths, store keys and per-rule configuration. Store keys are digests of provenance (the config
# that made an artifact, its upstream keys and CODE_VERSION), so two rows or two users with the
# same teacher and solver share one copy, and a different teacher or solver gets a new folder.
import hashlib
import json
import os

# Bump an entry when a change to the code changes what that stage writes: it invalidates the store.
CODE_VERSION = {"dataset": 1, "teacher": 1, "trajectories": 1}


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

DATASET_KEY = digest({"dataset": config["dataset"], "code": CODE_VERSION["dataset"]})
DATASET_DIR = f"{STORE}/datasets/{config['dataset']['name']}-{DATASET_KEY}"
DATASET = f"{DATASET_DIR}/dataset.npz"

TEACHER_CFG = {"seed": config["seed"], "network": config["network"], "teacher": config["teacher"], **SIGMAS}
TEACHER_KEY = digest({"dataset": DATASET_KEY, **TEACHER_CFG, "code": CODE_VERSION["teacher"]})
TEACHER = f"{STORE}/teachers/{TEACHER_KEY}/model.safetensors"

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
SHARD_IDS = [f"{k:06d}" for k in range(config["trajectories"]["num_shards"])]
MANIFEST = f"{RES}/trajectories/manifest.json"

# family cm: consistency models (midtrain, posttrain = ECT); mf: average-velocity flow maps
# (midtrain_mf = CMT-MF, posttrain_mf = MeanFlow), rules in meanflow.smk.
FAMILY = config["family"]
POST_SECTION = "posttrain_mf" if FAMILY == "mf" else "posttrain"
INITS = config[POST_SECTION]["inits"]
SNAPSHOTS = [f"p{round(100 * f):03d}" for f in config[POST_SECTION]["snapshots"]]
FINAL_SNAPSHOT = SNAPSHOTS[-1]
# Everything of posttrain but the list of inits: adding an init must not rerun the others.
POSTTRAIN_CFG = {k: v for k, v in config["posttrain"].items() if k != "inits"}


def init_model(wildcards):
    """The model a post-training run starts from (for random, only its architecture is read)."""
    return f"{RES}/midtrain/model.safetensors" if wildcards.init == "cmt" else TEACHER


# ---- the MeanFlow family (meanflow.smk)
MID_MF = config.get("midtrain_mf", {})
POST_MF = config.get("posttrain_mf", {})
# Everything of posttrain_mf but the list of inits: adding an init must not rerun the others.
POSTTRAIN_MF_CFG = {k: v for k, v in POST_MF.items() if k != "inits"}


def meanflow_steps(wildcards):
    """Post-training steps of an init: at equal total budget, random also gets the mid-training's
    images (rounded to whole post-training batches)."""
    steps = POST_MF["steps"]
    if wildcards.init == "random" and POST_MF["equal_total_budget"]:
        steps += round(MID_MF["steps"] * MID_MF["batch"] / POST_MF["batch"])
    return steps
