rule:
    name: store_plan.rule_name("prepare_dataset", DATASET_FROM)
    input:
        asset_inputs(DATASET.spec.get("path")),
    output:
        DATASET_RECEIPT,
    params:
        cfg=stage_config("prepare_dataset"),
        out=DATASET.folder,
        key=DATASET.key,
        files=DATASET.files,
        store_mode=store_mode(lambda w: DATASET_FROM),
    localrule: DATASET_FROM != store_plan.MAKE
    conda:
        "../../envs/cmt.yaml"
    log:
        f"{LOGS}/prepare_dataset.log",
    benchmark:
        f"{BENCH}/prepare_dataset.tsv"
    shell:
        store_command("python -m stages.prepare_dataset --config {params.cfg:q} --out {params.out:q} > {log} 2>&1")


rule fid_reference:
    input:
        # published statistics (features.reference, the ADM suite's) need no prepared dataset
        dataset=[] if "reference" in stage_configs.features(config) else DATASET_RECEIPT,
        inception=asset_inputs(stage_configs.features(config).get("model"), stage_configs.features(config).get("reference")),
    output:
        f"{RES}/fid_reference.npz",
    params:
        cfg=stage_config("fid_reference"),
        gpus=launch_gpus,
        dataset=DATASET.path,
    conda:
        "../../envs/cmt.yaml"
    log:
        f"{LOGS}/fid_reference.log",
    benchmark:
        f"{BENCH}/fid_reference.tsv"
    shell:
        "python -m stages.launch --gpus {params.gpus} --one-process stages.fid_reference "
        "--config {params.cfg:q} --dataset {params.dataset:q} --out {output} > {log} 2>&1"
