# The teacher: trained here (source: train) or an official EDM snapshot read by the restricted
# unpickler (source: import). One of the two rules exists, so TEACHER has one producer.
if TEACHER_SOURCE == "train":

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
        retries: slice_retries((config["teacher"]["steps"], config["teacher"]["batch"]))
        conda:
            "../../envs/cmt.yaml"
        log:
            f"{LOGS}/train_teacher.log",
        benchmark:
            f"{BENCH}/train_teacher.tsv"
        shell:
            "python -m stages.launch --gpus {params.gpus} stages.train_teacher --config {params.cfg:q} "
            "--threads {threads} "
            "--dataset {input} --key {params.key} --out {output.model} {params.state} > {log} 2>&1"

else:

    rule import_teacher:
        input:
            pickle=TEACHER_PICKLE,
        output:
            model=TEACHER,
            meta=TEACHER.replace(".safetensors", ".json"),
        params:
            cfg=as_arg(TEACHER_CFG),
            key=TEACHER_KEY,
        threads: config["threads"]["light"]
        conda:
            "../../envs/cmt.yaml"
        log:
            f"{LOGS}/import_teacher.log",
        benchmark:
            f"{BENCH}/import_teacher.tsv"
        shell:
            "python -m stages.import_teacher --config {params.cfg:q} --threads {threads} "
            "--pickle {input.pickle} --key {params.key} --out {output.model} > {log} 2>&1"
