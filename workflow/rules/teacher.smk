# The teacher: trained here (teacher.source train) or read from an official pickle by the restricted
# unpickler (import). Either rule makes the teacher in the store through stages.files.store and
# outputs this workdir's receipt; where the store holds the item, its `_from_store` variant is a
# local job that only reads the record, and where the remote store holds it, its `_from_remote`
# variant a local job that pulls it (store.smk SOURCES).
if config["teacher"].get("source", "train") == "train":

    rule:
        name: store_plan.rule_name("train_teacher", TEACHER_FROM)
        input:
            PIXELS_RECEIPT,
            latent_training_inputs,
        output:
            TEACHER_RECEIPT,
        params:
            cfg=stage_config("train_teacher"),
            key=TEACHER.key,
            files=TEACHER.files,
            dataset=DATASET.path,
            store_mode=store_mode(lambda w: TEACHER_FROM),
            # the metrics log beside the model in the store, not one of the item's recorded files
            # (stages/files/store_items.py COMPANIONS): a teacher recorded before it was written stays complete
            state=state_args("train_teacher", lambda w: store_keys.teacher_state(config),
                             lambda w, output: TEACHER_METRICS),
            latents=latent_training_args("train_teacher"),
            gpus=launch_gpus,
        localrule: TEACHER_FROM != store_plan.MAKE
        threads: config["threads"]["teacher"] if TEACHER_FROM == store_plan.MAKE else 1
        retries: slice_retries("train_teacher")
        conda:
            "../../envs/cmt.yaml"
        log:
            f"{LOGS}/train_teacher.log",
        benchmark:
            f"{BENCH}/train_teacher.tsv"
        shell:
            store_command(
                "python -m stages.launch --gpus {params.gpus} stages.train_teacher --config {params.cfg:q} "
                "--threads {threads} --dataset {params.dataset:q} {params.latents} --key {params.key} "
                "--out {params.files[0]:q} {params.state} > {log} 2>&1")


# Networks imported from official pickles (store_keys.imported_networks): the teacher, ECD's guide and
# reference teacher, one rule each from this one definition.
for _rule, (_name, _asset) in store_keys.imported_networks(config).items():
    _item, _receipt = ITEMS[_name], RECEIPT_OF[_name]
    _from = source(_item.files)

    rule:
        name: store_plan.rule_name(_rule, _from)
        input:
            pickle=asset_paths.path(config, _asset),
        output:
            _receipt,
        params:
            cfg=as_arg(_item.spec),
            key=_item.key,
            files=_item.files,
            store_mode=store_mode(lambda w, source=_from: source),
        localrule: _from != store_plan.MAKE
        threads: config["threads"]["light"] if _from == store_plan.MAKE else 1
        conda:
            "../../envs/cmt.yaml"
        log:
            f"{LOGS}/{_rule}.log",
        benchmark:
            f"{BENCH}/{_rule}.tsv"
        shell:
            store_command(
                "python -m stages.import_teacher --config {params.cfg:q} --threads {threads} "
                "--pickle {input.pickle} --key {params.key} --out {params.files[0]:q} > {log} 2>&1")
