# The teacher: trained here (source: train) or an official EDM snapshot read by the restricted
# unpickler (source: import). One of the two rules exists, so the teacher's receipt has one maker.
# Both make the teacher in the store through stages.files.store and output this workdir's receipt.
if TEACHER_SOURCE == "train":

    rule train_teacher:
        input:
            PIXELS_RECEIPT,
            latent_training_inputs,
        output:
            TEACHER_RECEIPT,
        params:
            cfg=as_arg(TEACHER_CFG),
            key=TEACHER_KEY,
            files=TEACHER_FILES,
            dataset=DATASET,
            store_mode=store_mode(lambda w: TEACHER_STORED),
            state=state_args(lambda w: TEACHER_STATE),
            latents=latent_training_args,
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
            "python -m stages.files.store --mode {params.store_mode} --key {params.key} --files {params.files:q} "
            "--receipt {output:q} -- python -m stages.launch --gpus {params.gpus} stages.train_teacher --config {params.cfg:q} "
            "--threads {threads} "
            "--dataset {params.dataset:q} {params.latents} --key {params.key} --out {params.files[0]:q} {params.state} "
            "> {log} 2>&1"

    # The teacher is in the store already: a local job writes this workdir's receipt from its record.
    if TEACHER_STORED:

        use rule train_teacher as train_teacher_from_store with:
            localrule: True
            threads: 1

        ruleorder: train_teacher_from_store > train_teacher

else:

    rule import_teacher:
        input:
            pickle=TEACHER_PICKLE,
        output:
            TEACHER_RECEIPT,
        params:
            cfg=as_arg(TEACHER_CFG),
            key=TEACHER_KEY,
            files=TEACHER_FILES,
            store_mode=store_mode(lambda w: TEACHER_STORED),
        threads: config["threads"]["light"]
        conda:
            "../../envs/cmt.yaml"
        log:
            f"{LOGS}/import_teacher.log",
        benchmark:
            f"{BENCH}/import_teacher.tsv"
        shell:
            "python -m stages.files.store --mode {params.store_mode} --key {params.key} --files {params.files:q} "
            "--receipt {output:q} -- python -m stages.import_teacher --config {params.cfg:q} --threads {threads} "
            "--pickle {input.pickle} --key {params.key} --out {params.files[0]:q} > {log} 2>&1"

    if TEACHER_STORED:

        use rule import_teacher as import_teacher_from_store with:
            localrule: True
            threads: 1

        ruleorder: import_teacher_from_store > import_teacher


# ECD's guide network (posttrain.guidance.guide): an official pickle imported like a teacher.
if GUIDE_ASSET:

    rule import_guide:
        input:
            pickle=GUIDE_PICKLE,
        output:
            GUIDE_RECEIPT,
        params:
            cfg=as_arg(GUIDE_CFG),
            key=GUIDE_KEY,
            files=GUIDE_FILES,
            store_mode=store_mode(lambda w: GUIDE_STORED),
        threads: config["threads"]["light"]
        conda:
            "../../envs/cmt.yaml"
        log:
            f"{LOGS}/import_guide.log",
        benchmark:
            f"{BENCH}/import_guide.tsv"
        shell:
            "python -m stages.files.store --mode {params.store_mode} --key {params.key} --files {params.files:q} "
            "--receipt {output:q} -- python -m stages.import_teacher --config {params.cfg:q} --threads {threads} "
            "--pickle {input.pickle} --key {params.key} --out {params.files[0]:q} > {log} 2>&1"

    if GUIDE_STORED:

        use rule import_guide as import_guide_from_store with:
            localrule: True
            threads: 1

        ruleorder: import_guide_from_store > import_guide


# ECD's reference teacher where it is not the trajectories' (posttrain.guidance.teacher): imported the same way.
if ECD_TEACHER_ASSET:

    rule import_ecd_teacher:
        input:
            pickle=ECD_TEACHER_PICKLE,
        output:
            ECD_TEACHER_RECEIPT,
        params:
            cfg=as_arg(ECD_TEACHER_CFG),
            key=ECD_TEACHER_KEY,
            files=ECD_TEACHER_FILES,
            store_mode=store_mode(lambda w: ECD_TEACHER_STORED),
        threads: config["threads"]["light"]
        conda:
            "../../envs/cmt.yaml"
        log:
            f"{LOGS}/import_ecd_teacher.log",
        benchmark:
            f"{BENCH}/import_ecd_teacher.tsv"
        shell:
            "python -m stages.files.store --mode {params.store_mode} --key {params.key} --files {params.files:q} "
            "--receipt {output:q} -- python -m stages.import_teacher --config {params.cfg:q} --threads {threads} "
            "--pickle {input.pickle} --key {params.key} --out {params.files[0]:q} > {log} 2>&1"

    if ECD_TEACHER_STORED:

        use rule import_ecd_teacher as import_ecd_teacher_from_store with:
            localrule: True
            threads: 1

        ruleorder: import_ecd_teacher_from_store > import_ecd_teacher
