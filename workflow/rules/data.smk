rule prepare_dataset:
    input:
        asset_inputs(DATASET_SPEC.get("path")),
    output:
        dataset=DATASET,
        manifest=f"{DATASET_DIR}/manifest.json",
    params:
        cfg=as_arg(DATASET_SPEC),
        out=lambda w, output: os.path.dirname(output.dataset),
    conda:
        "../../envs/cmt.yaml"
    log:
        f"{LOGS}/prepare_dataset.log",
    benchmark:
        f"{BENCH}/prepare_dataset.tsv"
    shell:
        "python -m stages.prepare_dataset --config {params.cfg:q} --out {params.out} > {log} 2>&1"


rule fid_reference:
    input:
        dataset=ancient(DATASET),
        inception=asset_inputs(FEATURES_CFG.get("model")),
    output:
        f"{RES}/fid_reference.npz",
    params:
        cfg=as_arg(FEATURES_CFG),
        gpus=launch_gpus,
    conda:
        "../../envs/cmt.yaml"
    log:
        f"{LOGS}/fid_reference.log",
    benchmark:
        f"{BENCH}/fid_reference.tsv"
    shell:
        "python -m stages.launch --gpus {params.gpus} --one-process stages.fid_reference "
        "--config {params.cfg:q} --dataset {input.dataset} --out {output} > {log} 2>&1"
