# The store (stages/files/store.py): its items, their receipts and where each item comes from. Its
# files are no rule's outputs, since Snakemake deletes a job's outputs before rerunning it and after it
# fails, while a teammate's run may be reading them. A rule that makes store files outputs a receipt in
# this workdir, and downstream rules take the receipts as inputs: a teammate's newer copy of the same
# key never makes this workdir stale.
from stages.files import store_plan  # noqa: E402  (stdlib only; boto3 only with a remote)

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
SHARD_IDS = workload.trajectory_shard_ids(config)
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
    LATENT_RECEIPTS = expand(f"{RECEIPTS}/latents/{{shard}}.json", shard=LATENT_SHARD_IDS)

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
if LATENTS:
    LATENT_SHARDS_FROM = {k: source([latent_shard_file(k)]) for k in LATENT_SHARD_IDS}
