rule train_teacher:
    input:
        ancient(DATASET),
    output:
        model=TEACHER,
        meta=TEACHER.replace(".safetensors", ".json"),
    params:
        cfg=as_arg(TEACHER_CFG),
        key=TEACHER_KEY,
        state=state_args(lambda w: TEACHER_STATE),
        gpus=launch_gpus,
    threads: config["threads"]["teacher"]
    conda:
        "../../envs/cmt.yaml"
    log:
        f"{LOGS}/train_teacher.log",
    benchmark:
        f"{BENCH}/train_teacher.tsv"
    shell:
        "python -m stages.launch --gpus {params.gpus} stages.train_teacher --config {params.cfg:q} --threads {threads} "
        "--dataset {input} --key {params.key} --out {output.model} {params.state} > {log} 2>&1"
