rule trajectory_spec:
    priority: 10
    output:
        f"{TRAJ_DIR}/spec.json",
    params:
        cfg=as_arg(TRAJ_SPEC),
    conda:
        "../../envs/cmt.yaml"
    log:
        f"{LOGS}/trajectory_spec.log",
    benchmark:
        f"{BENCH}/trajectory_spec.tsv"
    shell:
        "python -m stages.trajectory_spec --config {params.cfg:q} --out {output} > {log} 2>&1"


rule trajectory_shard:
    priority: 10
    input:
        teacher=ancient(TEACHER),
        spec=ancient(f"{TRAJ_DIR}/spec.json"),
        dataset=ancient(DATASET),
    output:
        f"{TRAJ_DIR}/shard-{{shard}}.tar",
    wildcard_constraints:
        shard=r"\d{6}",
    params:
        cfg=as_arg(TRAJ_SPEC),
        index=lambda w: int(w.shard),
        gpus=launch_gpus,
    threads: config["threads"]["light"]
    conda:
        "../../envs/cmt.yaml"
    log:
        f"{LOGS}/trajectory_shard/{{shard}}.log",
    benchmark:
        f"{BENCH}/trajectory_shard/{{shard}}.tsv"
    shell:
        "python -m stages.launch --gpus {params.gpus} --one-process stages.trajectory_shard "
        "--config {params.cfg:q} --threads {threads} "
        "--teacher {input.teacher} --dataset {input.dataset} --shard {params.index} --out {output} "
        "> {log} 2>&1"


rule trajectory_manifest:
    priority: 10
    input:
        spec=ancient(f"{TRAJ_DIR}/spec.json"),
        teacher=ancient(TEACHER),
        shards=[ancient(p) for p in expand(f"{TRAJ_DIR}/shard-{{shard}}.tar", shard=SHARD_IDS)],
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
