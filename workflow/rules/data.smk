rule prepare_dataset:
    output:
        dataset=DATASET,
        manifest=f"{DATASET_DIR}/manifest.json",
    params:
        cfg=as_arg(config["dataset"]),
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
        ancient(DATASET),
    output:
        f"{RES}/fid_reference.npz",
    params:
        cfg=as_arg(config["features"]),
    conda:
        "../../envs/cmt.yaml"
    log:
        f"{LOGS}/fid_reference.log",
    benchmark:
        f"{BENCH}/fid_reference.tsv"
    shell:
        "python -m stages.fid_reference --config {params.cfg:q} --dataset {input} --out {output} > {log} 2>&1"
