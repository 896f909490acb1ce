rule sample:
    input:
        model=lambda w: sampled_model(w.init, w.snap),
        vae=decode_inputs,
    output:
        f"{RES}/samples/{{init}}/{{snap}}.npz",
    params:
        cfg=stage_config("sample"),
        decode=decode_args,
        gpus=launch_gpus,
    threads: config["threads"]["light"]
    conda:
        "../../envs/cmt.yaml"
    log:
        f"{LOGS}/sample/{{init}}/{{snap}}.log",
    benchmark:
        f"{BENCH}/sample/{{init}}/{{snap}}.tsv"
    shell:
        "python -m stages.launch --gpus {params.gpus} --one-process stages.sample "
        "--config {params.cfg:q} --threads {threads} --model {input.model} {params.decode} "
        "--out {output} > {log} 2>&1"


rule fid:
    input:
        reference=f"{RES}/fid_reference.npz",
        inception=asset_inputs(stage_configs.features(config).get("model")),
        samples=lambda w: [f"{RES}/samples/{w.init}/{s}.npz" for s in scored_snapshots(w)],
        models=lambda w: [sampled_model(w.init, s) for s in scored_snapshots(w)],
    output:
        f"{RES}/fid/{{init}}.json",
    params:
        cfg=stage_config("fid"),
        gpus=launch_gpus,
    conda:
        "../../envs/cmt.yaml"
    log:
        f"{LOGS}/fid/{{init}}.log",
    benchmark:
        f"{BENCH}/fid/{{init}}.tsv"
    shell:
        "python -m stages.launch --gpus {params.gpus} --one-process stages.fid "
        "--config {params.cfg:q} --reference {input.reference} "
        "--samples {input.samples} --models {input.models} --out {output} > {log} 2>&1"


rule fid_teacher:
    input:
        reference=f"{RES}/fid_reference.npz",
        inception=asset_inputs(stage_configs.features(config).get("model")),
        manifest=MANIFEST,
        vae=decode_inputs,
    output:
        f"{RES}/fid/teacher-solver.json",
    params:
        cfg=stage_config("fid_teacher"),
        decode=decode_args,
        gpus=launch_gpus,
    conda:
        "../../envs/cmt.yaml"
    log:
        f"{LOGS}/fid/teacher-solver.log",
    benchmark:
        f"{BENCH}/fid/teacher-solver.tsv"
    shell:
        "python -m stages.launch --gpus {params.gpus} --one-process stages.fid_teacher "
        "--config {params.cfg:q} --reference {input.reference} "
        "--manifest {input.manifest} {params.decode} --out {output} > {log} 2>&1"


rule report:
    input:
        fid=expand(f"{RES}/fid/{{init}}.json", init=INITS),
        ceiling=f"{RES}/fid/teacher-solver.json",
        samples=expand(f"{RES}/samples/{{init}}/{FINAL_SNAPSHOT}.npz", init=INITS),
        latent_vgg=[LATENT_VGG_ACCURACY] if ELATENTLPIPS else [],
        teacher=TEACHER_RECEIPT,
        models=[f"{RES}/midtrain/model.safetensors"] + expand(f"{RES}/posttrain/{{init}}/model.safetensors", init=INITS),
        midtrain=[f"{RES}/fid/midtrain.json"] if FAMILY == "cm" else [],
        metrics=[f"{RES}/midtrain/metrics.jsonl"] + expand(f"{RES}/posttrain/{{init}}/metrics.jsonl", init=INITS),
        # the post-hoc EMAs of the runs that keep power-EMA snapshots (posthoc_ema.smk)
        **({"posthoc": [f"{RES}/fid/{power_ema.posthoc_init(i)}.json" for i in POSTHOC_INITS]} if POSTHOC_INITS else {}),
    output:
        report=f"{RES}/report.md",
        table=report(f"{RES}/results.csv", caption="../report/results.rst", category="Results"),
        curve=report(f"{RES}/fd_curve.png", caption="../report/fd_curve.rst", category="Results"),
        training=report(f"{RES}/training_curves.png", caption="../report/training_curves.rst", category="Results"),
        grids=report(f"{RES}/samples.png", caption="../report/samples.rst", category="Results"),
        **({"posthoc_curve": report(f"{RES}/fd_sigma_rel.png", caption="../report/fd_sigma_rel.rst",
                                    category="Results")} if POSTHOC_INITS else {}),
    params:
        cfg=stage_config("report"),
        bench=BENCH,
        # the mid-trained model's FD, a latent row's latent VGG16 accuracy, the training curves' logs (the
        # teacher's beside it in the store, where it was trained with them), the receipts (the ledger) and
        # the post-hoc EMAs' FD where runs keep power EMAs
        extra=lambda w, input: " ".join(
            ([f"--midtrain-fid {input.midtrain[0]}"] if input.midtrain else [])
            + ([f"--latent-vgg-accuracy {input.latent_vgg[0]}"] if input.latent_vgg else [])
            + [f"--metrics {' '.join(map(shlex.quote, input.metrics))}",
               f"--teacher-metrics {shlex.quote(TEACHER_METRICS)} --receipts {shlex.quote(RECEIPTS)}"]
            + ([f"--posthoc-fid {' '.join(input.posthoc)} --posthoc-curve {RES}/fd_sigma_rel.png"]
               if POSTHOC_INITS else [])),
        teacher=TEACHER.path,
    conda:
        "../../envs/cmt.yaml"
    log:
        f"{LOGS}/report.log",
    benchmark:
        f"{BENCH}/report.tsv"
    shell:
        "python -m stages.report --config {params.cfg:q} --fid {input.fid} --ceiling {input.ceiling} "
        "--samples {input.samples} --models {params.teacher:q} {input.models} --benchmarks {params.bench} "
        "--out {output.report} --curve {output.curve} --grids {output.grids} --table {output.table} "
        "--training-curves {output.training} {params.extra} > {log} 2>&1"
