# Files from the internet (stages/assets.py CATALOG). A config value that names a catalog entry
# (teacher.asset, dataset.asset, features.model, midtrain.lpips_weights) means that file in the
# assets folder; fetch_assets makes it, and it is the only rule that touches the network. It is a
# local rule: on a cluster it runs on the login node, where there is internet.
ASSETS_CFG = config.get("assets", {})
ASSETS_DIR = ASSETS_CFG.get("dir", "assets")
NEEDED_ASSETS = set()


def asset(value):
    """A catalog name -> its path in the assets folder (and the asset is needed); else `value`."""
    if isinstance(value, str) and value in CATALOG:
        NEEDED_ASSETS.add(value)
        return f"{ASSETS_DIR}/{CATALOG[value].filename}"
    return value


def asset_inputs(*paths):
    """The asset files among resolved config values (rule inputs: fetch_assets runs first)."""
    files = {f"{ASSETS_DIR}/{CATALOG[n].filename}" for n in NEEDED_ASSETS}
    return [p for p in paths if p in files]


# The configuration as the stages see it: catalog names resolved to paths.
# A smoke variant (dataset.synthetic, pixel features, random LPIPS trunk) needs none of the files
# its row names, so it runs offline.
DATASET_SPEC = {k: v for k, v in config["dataset"].items() if k != "asset"}
if "asset" in config["dataset"] and not config["dataset"].get("synthetic"):
    DATASET_SPEC["path"] = asset(config["dataset"]["asset"])
FEATURES_CFG = dict(config["features"])
if config["features"]["kind"] == "inception":
    FEATURES_CFG["model"] = asset(config["features"].get("model", "inception-2015-12-05"))
else:
    FEATURES_CFG.pop("model", None)
MIDTRAIN_CFG = dict(config["midtrain"])
if MIDTRAIN_CFG.get("distance") == "lpips":
    MIDTRAIN_CFG["lpips_weights"] = asset(MIDTRAIN_CFG.get("lpips_weights"))
if config["teacher"].get("source", "train") == "import":
    TEACHER_PICKLE = asset(config["teacher"]["asset"])


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
