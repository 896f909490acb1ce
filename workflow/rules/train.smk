# The consistency family (family: cm): CMT-CM mid-training, then post-training from each init.
rule midtrain:
    # the critical path: ahead of the post-training runs that need no trajectories
    priority: 10
    input:
        teacher=TEACHER_RECEIPT,
        # online, the step solves its trajectories: no trajectory jobs before mid-training
        manifest=[] if ONLINE else MANIFEST,
        lpips=asset_inputs(stage_configs.midtrain_section(config).get("lpips_weights")),
        latent_vgg=[LATENT_VGG] if ELATENTLPIPS else [],
        dataset=PIXELS_RECEIPT,
    output:
        model=f"{RES}/midtrain/model.safetensors",
        meta=f"{RES}/midtrain/model.json",
        metrics=f"{RES}/midtrain/metrics.jsonl",
        **phema_output("midtrain", f"{RES}/midtrain"),
    params:
        cfg=stage_config("midtrain"),
        # (and the latent VGG16 of distance elatentlpips)
        manifest=lambda w, input: " ".join(
            ([f"--manifest {shlex.quote(input.manifest)}"] if input.manifest else [])
            + ([f"--latent-vgg {shlex.quote(input.latent_vgg[0])}"] if input.latent_vgg else [])),
        teacher=TEACHER.path,
        dataset=DATASET.path,
        checks=trajectory_checks("midtrain"),
        state=state_args("midtrain", lambda w: f"{STATE}/midtrain"),
        gpus=launch_gpus,
    threads: config["threads"]["train"]
    retries: slice_retries("midtrain")
    conda:
        "../../envs/cmt.yaml"
    log:
        f"{LOGS}/midtrain.log",
    benchmark:
        f"{BENCH}/midtrain.tsv"
    shell:
        "python -m stages.launch --gpus {params.gpus} stages.midtrain --config {params.cfg:q} --threads {threads} "
        "--teacher {params.teacher:q} {params.manifest} --dataset {params.dataset:q} {params.checks} "
        "--out {output.model} {params.state} > {log} 2>&1"


rule posttrain:
    input:
        init=init_input,
        dataset=PIXELS_RECEIPT,
        latents=latent_training_inputs,
        distill=distillation_inputs,
    output:
        model=f"{RES}/posttrain/{{init}}/model.safetensors",
        meta=f"{RES}/posttrain/{{init}}/model.json",
        metrics=f"{RES}/posttrain/{{init}}/metrics.jsonl",
        snapshots=expand(f"{RES}/posttrain/{{{{init}}}}/snapshots/{{snap}}.{{ext}}",
                         snap=SNAPSHOTS, ext=["safetensors", "json"]),
        **phema_output("posttrain", f"{RES}/posttrain/{{init}}"),
    wildcard_constraints:
        init="cmt|teacher|random|baseline",
    params:
        cfg=stage_config("posttrain"),
        init=init_model,
        dataset=DATASET.path,
        # the networks ECD distils and, on a latent row, the encoded dataset
        distill=lambda w: " ".join(a for a in (distillation_args(w), latent_training_args("posttrain")(w, None)) if a),
        snapshots=lambda w, output: os.path.dirname(output.snapshots[0]),
        state=state_args("posttrain", lambda w: f"{STATE}/posttrain/{w.init}"),
        gpus=launch_gpus,
    threads: config["threads"]["train"]
    retries: slice_retries("posttrain")
    conda:
        "../../envs/cmt.yaml"
    log:
        f"{LOGS}/posttrain/{{init}}.log",
    benchmark:
        f"{BENCH}/posttrain/{{init}}.tsv"
    shell:
        "python -m stages.launch --gpus {params.gpus} stages.posttrain --config {params.cfg:q} --threads {threads} --init {wildcards.init} "
        "--init-model {params.init:q} --dataset {params.dataset:q} --out {output.model} "
        "--snapshots {params.snapshots} {params.distill} {params.state} > {log} 2>&1"
