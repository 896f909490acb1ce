rule:
    name: store_plan.rule_name("trajectory_spec", SPEC_FROM)
    priority: 10
    output:
        SPEC_RECEIPT,
    params:
        cfg=stage_config("trajectory_spec"),
        key=TRAJ.key,
        files=TRAJ.files,
        store_mode=store_mode(lambda w: SPEC_FROM),
    localrule: SPEC_FROM != store_plan.MAKE
    conda:
        "../../envs/cmt.yaml"
    log:
        f"{LOGS}/trajectory_spec.log",
    benchmark:
        f"{BENCH}/trajectory_spec.tsv"
    shell:
        store_command("python -m stages.trajectory_spec --config {params.cfg:q} --out {params.files[0]:q} > {log} 2>&1")


# On a cluster, `--group-components trajectories=N` (the SLURM profile) submits N shard jobs as one
# SLURM job: a paper row's shard takes about a minute of GPU, less than a job's queue wait and
# start-up. Each shard job holds the one `trajectory_slot` that `--resources trajectory_slot=1`
# (the profile) allows per submission (scope local), so a group job makes its shards one after
# another and asks for one shard job's GPUs and memory and N times its runtime, whatever --cores says.
resource_scopes:
    trajectory_slot="local",


rule trajectory_shard:
    priority: 10
    group: "trajectories"
    input:
        teacher=TEACHER_RECEIPT,
        spec=SPEC_RECEIPT,
        dataset=PIXELS_RECEIPT,
    output:
        f"{RECEIPTS}/shards/{{shard}}.json",
    wildcard_constraints:
        # the shards neither store holds (one rule per receipt: planning stays fast)
        shard=store_plan.shard_pattern(SHARDS_FROM, store_plan.MAKE),
    params:
        cfg=stage_config("trajectory_shard"),
        key=TRAJ.key,
        files=lambda w: [shard_file(w.shard)],
        index=lambda w: int(w.shard),
        gpus=launch_gpus,
        teacher=TEACHER.path,
        dataset=DATASET.path,
        store_mode=store_mode(lambda w: SHARDS_FROM[w.shard]),
    threads: config["threads"]["light"]
    resources:
        trajectory_slot=1,
    conda:
        "../../envs/cmt.yaml"
    log:
        f"{LOGS}/trajectory_shard/{{shard}}.log",
    benchmark:
        f"{BENCH}/trajectory_shard/{{shard}}.tsv"
    shell:
        store_command(
            "python -m stages.launch --gpus {params.gpus} --one-process "
            "stages.trajectory_shard --config {params.cfg:q} --threads {threads} "
            "--teacher {params.teacher:q} --dataset {params.dataset:q} --shard {params.index} "
            "--out {params.files[0]:q} > {log} 2>&1")


# What the store holds already: local jobs write this workdir's receipts from the records, so a
# second workdir submits no cluster job (and hashes no shard) for them. What the remote store holds:
# local jobs pull it (a compute node may reach no network).
if store_plan.STORE in SHARDS_FROM.values():

    use rule trajectory_shard as trajectory_shard_from_store with:
        localrule: True
        # a group with one local job runs locally whole: keep receipts out of the shard groups
        group: "trajectory_receipts"
        threads: 1
        wildcard_constraints:
            shard=store_plan.shard_pattern(SHARDS_FROM, store_plan.STORE),


if store_plan.REMOTE in SHARDS_FROM.values():

    use rule trajectory_shard as trajectory_shard_from_remote with:
        localrule: True
        group: "trajectory_receipts"
        threads: 1
        wildcard_constraints:
            shard=store_plan.shard_pattern(SHARDS_FROM, store_plan.REMOTE),


rule trajectory_manifest:
    priority: 10
    input:
        spec=SPEC_RECEIPT,
        teacher=TEACHER_RECEIPT,
        shards=SHARD_RECEIPTS,
    output:
        MANIFEST,
    conda:
        "../../envs/cmt.yaml"
    log:
        f"{LOGS}/trajectory_manifest.log",
    benchmark:
        f"{BENCH}/trajectory_manifest.tsv"
    shell:
        "python -m stages.trajectory_manifest --spec {input.spec} --teacher {input.teacher} "
        "--shards {input.shards} --out {output} > {log} 2>&1"
