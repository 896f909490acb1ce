# Post-hoc EMA (docs/method.md#post-hoc-ema): from the power-EMA snapshots a run kept (ema.kind
# power), the EMA of each width of posthoc_ema.sigma_rels at posthoc_ema.at, one model file each;
# sample and fid score them as the snapshots of the init `posthoc-<init>` (common.smk).
def trained_folder(init):
    """The folder of the model file (and phema/) of the run an init names: `midtrain` or a post-training init."""
    return f"{RES}/midtrain" if init == "midtrain" else f"{RES}/posttrain/{init}"


rule posthoc_ema:
    input:
        phema=lambda w: f"{trained_folder(w.init)}/{power_ema.FOLDER}",
    output:
        expand(f"{RES}/posthoc/{{{{init}}}}/{{name}}.{{ext}}", name=POSTHOC_NAMES, ext=["safetensors", "json"]),
    wildcard_constraints:
        init="|".join(POSTHOC_INITS),
    params:
        cfg=stage_config("posthoc_ema"),
        out_dir=lambda w, output: os.path.dirname(output[0]),
    threads: config["threads"]["light"]
    conda:
        "../../envs/cmt.yaml"
    log:
        f"{LOGS}/posthoc_ema/{{init}}.log",
    benchmark:
        f"{BENCH}/posthoc_ema/{{init}}.tsv"
    shell:
        "python -m stages.posthoc_ema --config {params.cfg:q} --threads {threads} --phema {input.phema} "
        "--out-dir {params.out_dir} > {log} 2>&1"
