rule prepare_dataset:
    input:
        asset_inputs(DATASET_SPEC.get("path")),
    output:
        DATASET_RECEIPT,
    params:
        cfg=as_arg(DATASET_SPEC),
        out=DATASET_DIR,
        key=DATASET_KEY,
        files=DATASET_FILES,
        store_mode=store_mode(lambda w: DATASET_STORED),
    conda:
        "../../envs/cmt.yaml"
    log:
        f"{LOGS}/prepare_dataset.log",
    benchmark:
        f"{BENCH}/prepare_dataset.tsv"
    shell:
        "python -m stages.files.store --mode {params.store_mode} --key {params.key} --files {params.files:q} "
        "--receipt {output:q} -- python -m stages.prepare_dataset --config {params.cfg:q} --out {params.out:q} > {log} 2>&1"


# The dataset is in the store already: a local job writes this workdir's receipt from its record.
if DATASET_STORED:

    use rule prepare_dataset as prepare_dataset_from_store with:
        localrule: True

    ruleorder: prepare_dataset_from_store > prepare_dataset


rule fid_reference:
    input:
        # published statistics (features.reference, the ADM suite's) need no prepared dataset
        dataset=[] if "reference" in FEATURES_CFG else DATASET_RECEIPT,
        inception=asset_inputs(FEATURES_CFG.get("model"), FEATURES_CFG.get("reference")),
    output:
        f"{RES}/fid_reference.npz",
    params:
        cfg=as_arg(FEATURES_CFG),
        gpus=launch_gpus,
        dataset=DATASET,
    conda:
        "../../envs/cmt.yaml"
    log:
        f"{LOGS}/fid_reference.log",
    benchmark:
        f"{BENCH}/fid_reference.tsv"
    shell:
        "python -m stages.launch --gpus {params.gpus} --one-process stages.fid_reference "
        "--config {params.cfg:q} --dataset {params.dataset:q} --out {output} > {log} 2>&1"
