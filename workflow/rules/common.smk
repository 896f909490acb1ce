# Paths, store keys and per-rule configuration. Store keys are digests of provenance (the config
# that made an artifact, its upstream keys and CODE_VERSION), so two rows or two users with the
# same teacher and solver share one copy, and a different teacher or solver gets a new folder.
import hashlib
import json
import os
import shlex

# Files in the store are inputs as ancient(): another user's newer copy of the same key must not
# make this workdir's results stale (the key, not the time, says what a file is).
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
SHARD_IDS = [f"{k:06d}" for k in range(config["trajectories"]["num_shards"])]
MANIFEST = f"{RES}/trajectories/manifest.json"

MIDTRAIN_CFG = {k: v for k, v in config["midtrain"].items() if k != "spot_check"}
INITS = config["posttrain"]["inits"]
SNAPSHOTS = [f"p{round(100 * f):03d}" for f in config["posttrain"]["snapshots"]]
FINAL_SNAPSHOT = SNAPSHOTS[-1]
# Everything of posttrain but the list of inits: adding an init must not rerun the others.
POSTTRAIN_CFG = {k: v for k, v in config["posttrain"].items() if k != "inits"}


def init_model(wildcards):
    """The model a post-training run starts from (for random, only its architecture is read)."""
    return f"{RES}/midtrain/model.safetensors" if wildcards.init == "cmt" else ancient(TEACHER)


def state_args(folder):
    """--state-dir and --checkpoint of a training rule; `folder(wildcards)` is its state folder.

    The param is a function of `output`, which Snakemake's params rerun trigger leaves out: how
    often a run saves its state, or how it is sliced into jobs, must not make finished training stale.
    """

    def args(wildcards, output):
        return (f"--state-dir {shlex.quote(folder(wildcards))} "
                f"--checkpoint {shlex.quote(as_arg(config['checkpoint']))}")

    return args


def launch_gpus(wildcards, output, resources):
    """--gpus for stages.launch: the job's gpu resource (0 where no profile sets it). A function of
    `output` like state_args, so a different GPU count does not make finished training stale."""
    return int(resources.get("gpu", 0) or 0)
