import re
from stages.files.assets import CATALOG  # (the catalog of downloads: stdlib only)

# fetch_assets: the one rule that touches the network (stages/config/asset_paths.py), one job per
# missing file, so files already in place (placed by hand, say) are never touched. It is a local
# rule: on a cluster it runs on the login node, where there is internet.
NEEDED_ASSETS = asset_paths.needed(config)
if NEEDED_ASSETS:
    ASSET_OF_FILE = {CATALOG[name].filename: name for name in NEEDED_ASSETS}

    localrules:
        fetch_assets,

    rule fetch_assets:
        output:
            f"{asset_paths.assets_dir(config)}/{{asset_file}}",
        wildcard_constraints:
            asset_file="|".join(re.escape(f) for f in sorted(ASSET_OF_FILE)),
        params:
            cfg=stage_config("fetch_assets"),
            name=lambda w: ASSET_OF_FILE[w.asset_file],
            others=lambda w: sorted(n for n in NEEDED_ASSETS if n != ASSET_OF_FILE[w.asset_file]),
        conda:
            "../../envs/cmt.yaml"
        log:
            f"{LOGS}/fetch_assets/{{asset_file}}.log",
        benchmark:
            f"{BENCH}/fetch_assets/{{asset_file}}.tsv"
        shell:
            "python -m stages.fetch_assets --config {params.cfg:q} --names {params.name} "
            "--row-needs {params.others} > {log} 2>&1"
