# The MeanFlow family (family: mf): CMT-MF mid-training on the teacher's trajectories (an EDM
# teacher's read in flow-matching time through stages/method/flowmap.py, a MeanFlow teacher's made in
# flow time), then MeanFlow post-training from {cmt, random}.
# Outputs take the consistency family's paths, so sample, fid and report serve both families.
rule midtrain_mf:
    # the critical path: ahead of the random init's post-training, which needs no trajectories
    priority: 10
    input:
        teacher=TEACHER_RECEIPT,
        manifest=MANIFEST,
        dataset=PIXELS_RECEIPT,
    output:
        model=f"{RES}/midtrain/model.safetensors",
        meta=f"{RES}/midtrain/model.json",
        metrics=f"{RES}/midtrain/metrics.jsonl",
        **phema_output("midtrain_mf", f"{RES}/midtrain"),
    params:
        cfg=stage_config("midtrain_mf"),
        teacher=TEACHER.path,
        dataset=DATASET.path,
        checks=trajectory_checks("midtrain_mf"),
        state=state_args("midtrain_mf", lambda w: f"{STATE}/midtrain"),
        gpus=launch_gpus,
    threads: config["threads"]["train"]
    retries: slice_retries("midtrain_mf")
    conda:
        "../../envs/cmt.yaml"
    log:
        f"{LOGS}/midtrain.log",
    benchmark:
        f"{BENCH}/midtrain.tsv"
    shell:
        "python -m stages.launch --gpus {params.gpus} stages.midtrain_mf --config {params.cfg:q} --threads {threads} "
        "--teacher {params.teacher:q} --manifest {input.manifest} --dataset {params.dataset:q} {params.checks} "
        "--out {output.model} {params.state} > {log} 2>&1"


def posttrain_mf_reads(wildcards, output):
    """What posttrain_mf reads besides its init and dataset: a latent row's encoded dataset and, for
    MeanFlow distillation, the teacher (--teacher). Both ride in the `latents` param, a function of
    `output`, so the command and params of a pixel row that learns from data name neither."""
    reads = (latent_training_args("posttrain_mf")(wildcards, output), distillation_args(wildcards))
    return " ".join(a for a in reads if a)


rule posttrain_mf:
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
        **phema_output("posttrain_mf", f"{RES}/posttrain/{{init}}"),
    wildcard_constraints:
        init="cmt|random",
    params:
        cfg=stage_config("posttrain_mf"),
        init=init_model,
        dataset=DATASET.path,
        snapshots=lambda w, output: os.path.dirname(output.snapshots[0]),
        state=state_args("posttrain_mf", lambda w: f"{STATE}/posttrain/{w.init}"),
        latents=posttrain_mf_reads,
        gpus=launch_gpus,
    threads: config["threads"]["train"]
    retries: slice_retries("posttrain_mf")
    conda:
        "../../envs/cmt.yaml"
    log:
        f"{LOGS}/posttrain/{{init}}.log",
    benchmark:
        f"{BENCH}/posttrain/{{init}}.tsv"
    shell:
        "python -m stages.launch --gpus {params.gpus} stages.posttrain_mf --config {params.cfg:q} --threads {threads} "
        "--init {wildcards.init} --init-model {params.init:q} --dataset {params.dataset:q} {params.latents} "
        "--out {output.model} --snapshots {params.snapshots} {params.state} > {log} 2>&1"
