# The latent rows: the dataset encoded once by the VAE (stages/encode_dataset.py) into shards in the
# store, keyed like the trajectories (stages/config/store_keys.py), one job per shard, each writing a
# receipt through stages/files/store.py; latent_manifest gathers them for the training stages.


rule encode_dataset:
    group: "encode"
    input:
        assets=asset_inputs(VAE_DIR, DATASET.spec.get("path")),
    output:
        f"{RECEIPTS}/latents/{{shard}}.json",
    wildcard_constraints:
        # the shards neither store holds (one rule per receipt: planning stays fast)
        shard=store_plan.shard_pattern(LATENT_SHARDS_FROM, store_plan.MAKE),
    params:
        cfg=stage_config("encode_dataset"),
        key=LATENT_ITEM.key,
        files=lambda w: [latent_shard_file(w.shard)],
        index=lambda w: int(w.shard),
        gpus=launch_gpus,
        vae=f"--vae {shlex.quote(VAE_DIR)}" if VAE_DIR else "",
        # how many images per VAE call changes no shard: a function of output, out of the params trigger
        vae_batch=lambda w, output: stage_configs.stage_options("encode_dataset", config)["vae_batch"],
        store_mode=store_mode(lambda w: LATENT_SHARDS_FROM[w.shard]),
    threads: config["threads"]["light"]
    resources:
        trajectory_slot=1,
    conda:
        "../../envs/cmt.yaml"
    log:
        f"{LOGS}/encode_dataset/{{shard}}.log",
    benchmark:
        f"{BENCH}/encode_dataset/{{shard}}.tsv"
    shell:
        store_command(
            "python -m stages.launch --gpus {params.gpus} --one-process "
            "stages.encode_dataset --config {params.cfg:q} --threads {threads} {params.vae} --vae-batch {params.vae_batch} "
            "--shard {params.index} --out {params.files[0]:q} > {log} 2>&1")


# Shards the store holds already: local jobs write this workdir's receipts from their records; shards
# the remote store holds: local jobs pull them.
if store_plan.STORE in LATENT_SHARDS_FROM.values():

    use rule encode_dataset as encode_dataset_from_store with:
        localrule: True
        group: "latent_receipts"
        threads: 1
        wildcard_constraints:
            shard=store_plan.shard_pattern(LATENT_SHARDS_FROM, store_plan.STORE),


if store_plan.REMOTE in LATENT_SHARDS_FROM.values():

    use rule encode_dataset as encode_dataset_from_remote with:
        localrule: True
        group: "latent_receipts"
        threads: 1
        wildcard_constraints:
            shard=store_plan.shard_pattern(LATENT_SHARDS_FROM, store_plan.REMOTE),


rule latent_manifest:
    input:
        shards=LATENT_RECEIPTS,
    output:
        LATENT_MANIFEST,
    params:
        spec=as_arg(LATENT_ITEM.spec["spec"]),
    conda:
        "../../envs/cmt.yaml"
    log:
        f"{LOGS}/latent_manifest.log",
    benchmark:
        f"{BENCH}/latent_manifest.tsv"
    shell:
        "python -m stages.latent_manifest --spec {params.spec:q} --shards {input.shards} --out {output} > {log} 2>&1"


# The E-LatentLPIPS backbone: the latent VGG16 trained as a classifier on the encoded dataset (a row's
# result, resumable like every training stage; its held-out accuracy goes to the report).
rule train_latent_vgg:
    input:
        LATENT_MANIFEST,
    output:
        model=LATENT_VGG,
        meta=LATENT_VGG.replace(".safetensors", ".json"),
        accuracy=f"{RES}/latent_vgg/accuracy.json",
    params:
        cfg=stage_config("train_latent_vgg"),
        # the metrics log beside the model, not a declared output: a latent VGG trained before it was
        # written (days of GPU time on ImageNet) is not trained again for it
        state=state_args("train_latent_vgg", lambda w: f"{STATE}/latent_vgg", lambda w, output: LATENT_VGG_METRICS),
        verify=lambda w, output: stage_configs.stage_options("train_latent_vgg", config)["verify"],
        gpus=launch_gpus,
    threads: config["threads"]["train"]
    retries: slice_retries("train_latent_vgg")
    conda:
        "../../envs/cmt.yaml"
    log:
        f"{LOGS}/train_latent_vgg.log",
    benchmark:
        f"{BENCH}/train_latent_vgg.tsv"
    shell:
        "python -m stages.launch --gpus {params.gpus} stages.train_latent_vgg --config {params.cfg:q} "
        "--threads {threads} --manifest {input:q} --verify {params.verify} --out {output.model:q} "
        "--accuracy {output.accuracy:q} {params.state} > {log} 2>&1"
