# fetch_assets: the one rule that touches the network (see `asset` in common.smk). It is a local
# rule: on a cluster it runs on the login node, where there is internet.
if NEEDED_ASSETS:

    localrules:
        fetch_assets,

    rule fetch_assets:
        output:
            [f"{ASSETS_DIR}/{CATALOG[name].filename}" for name in sorted(NEEDED_ASSETS)],
        params:
            cfg=as_arg({**ASSETS_CFG, "dir": ASSETS_DIR}),
            names=sorted(NEEDED_ASSETS),
        conda:
            "../../envs/cmt.yaml"
        log:
            f"{LOGS}/fetch_assets.log",
        benchmark:
            f"{BENCH}/fetch_assets.tsv"
        shell:
            "python -m stages.fetch_assets --config {params.cfg:q} --names {params.names} > {log} 2>&1"
