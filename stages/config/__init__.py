"""The configuration: how the workflow assembles it from files and the command line (layers.py)
and the checks across keys that run before any job starts (checks.py)."""

from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
# The overlays under config/rows and the rows each applies to (every other file there is a row, or
# a base under base/ that rows extend): tests check each pair, bench/row_costs.py --smoke uses them.
OVERLAYS = {"smoke/pixel-ect.yaml": ["cifar10-cmt-ect.yaml", "ffhq64-cmt-ect.yaml", "afhqv2-64-cmt-ect.yaml"],
            "smoke/imagenet64.yaml": ["imagenet64-cmt-ecd.yaml", "imagenet64-cmt-ect.yaml"],
            "smoke/imagenet256.yaml": ["imagenet256-cmt-mf.yaml"],
            "smoke/imagenet512.yaml": ["imagenet512-cmt-ecd.yaml", "imagenet512-cmt-ect.yaml"],
            "ablations/digits-cmt-mf-ratio1.yaml": ["digits-cmt-mf.yaml"],
            "ablations/digits-cmt-mf-mfrae.yaml": ["digits-cmt-mf.yaml"],
            "ablations/digits-mf-classes-leading.yaml": ["variants/digits-mf-classes.yaml"]}


def resolve(configfiles=(), command_line=None):
    """The configuration a `snakemake --configfile <configfiles> --config <command_line>` run of this
    repository sees: assembled as the Snakefile does, validated against the schema with its defaults
    filled in, and checked across keys. For tools beside the workflow (bench/); no Snakemake needed."""
    from stages.config import checks, layers

    schema = layers.load_schema(REPO / "workflow" / "schemas" / "config.schema.yaml")
    given = {"default": REPO / "config" / "default.yaml", "configfiles": configfiles, "command_line": command_line}
    config = layers.assemble(**given, schema=schema)
    layers.validate_with_defaults(config, schema, layers.sources(**given))
    checks.check(config)
    return config
