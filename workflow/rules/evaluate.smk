rule sample:
    input:
        f"{RES}/posttrain/{{init}}/snapshots/{{snap}}.safetensors",
    output:
        f"{RES}/samples/{{init}}/{{snap}}.npz",
    params:
        cfg=as_arg(config["sampling"]),
    threads: config["threads"]["light"]
    conda:
        "../../envs/cmt.yaml"
    log:
        f"{LOGS}/sample/{{init}}/{{snap}}.log",
    benchmark:
        f"{BENCH}/sample/{{init}}/{{snap}}.tsv"
    shell:
        "python -m stages.sample --config {params.cfg:q} --threads {threads} --model {input} "
        "--out {output} > {log} 2>&1"


rule fid:
    input:
        reference=f"{RES}/fid_reference.npz",
        inception=asset_inputs(FEATURES_CFG.get("model")),
        samples=expand(f"{RES}/samples/{{{{init}}}}/{{snap}}.npz", snap=SNAPSHOTS),
        models=expand(f"{RES}/posttrain/{{{{init}}}}/snapshots/{{snap}}.safetensors", snap=SNAPSHOTS),
    output:
        f"{RES}/fid/{{init}}.json",
    params:
        cfg=as_arg({"features": FEATURES_CFG, "sampling": config["sampling"]}),
    conda:
        "../../envs/cmt.yaml"
    log:
        f"{LOGS}/fid/{{init}}.log",
    benchmark:
        f"{BENCH}/fid/{{init}}.tsv"
    shell:
        "python -m stages.fid --config {params.cfg:q} --reference {input.reference} "
        "--samples {input.samples} --models {input.models} --out {output} > {log} 2>&1"


rule fid_teacher:
    input:
        reference=f"{RES}/fid_reference.npz",
        inception=asset_inputs(FEATURES_CFG.get("model")),
        manifest=MANIFEST,
    output:
        f"{RES}/fid/teacher-solver.json",
    params:
        cfg=as_arg({"features": FEATURES_CFG, "sampling": config["sampling"]}),
    conda:
        "../../envs/cmt.yaml"
    log:
        f"{LOGS}/fid/teacher-solver.log",
    benchmark:
        f"{BENCH}/fid/teacher-solver.tsv"
    shell:
        "python -m stages.fid_teacher --config {params.cfg:q} --reference {input.reference} "
        "--manifest {input.manifest} --out {output} > {log} 2>&1"


rule report:
    input:
        fid=expand(f"{RES}/fid/{{init}}.json", init=INITS),
        ceiling=f"{RES}/fid/teacher-solver.json",
        samples=expand(f"{RES}/samples/{{init}}/{FINAL_SNAPSHOT}.npz", init=INITS),
        teacher=TEACHER_RECEIPT,
        models=[f"{RES}/midtrain/model.safetensors"] + expand(f"{RES}/posttrain/{{init}}/model.safetensors", init=INITS),
    output:
        report=f"{RES}/report.md",
        curve=f"{RES}/fd_curve.png",
        grids=f"{RES}/samples.png",
    params:
        cfg=as_arg({"row": ROW, "family": FAMILY, "inits": INITS, "sampling": config["sampling"],
                    "paper": config.get("paper", {}), "notes": config.get("notes", ""),
                    "final_snapshot": FINAL_SNAPSHOT}),
        bench=BENCH,
        teacher=TEACHER,
    conda:
        "../../envs/cmt.yaml"
    log:
        f"{LOGS}/report.log",
    benchmark:
        f"{BENCH}/report.tsv"
    shell:
        "python -m stages.report --config {params.cfg:q} --fid {input.fid} --ceiling {input.ceiling} "
        "--samples {input.samples} --models {params.teacher:q} {input.models} --benchmarks {params.bench} "
        "--out {output.report} --curve {output.curve} --grids {output.grids} > {log} 2>&1"
