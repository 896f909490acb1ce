# CMT pipeline: teacher -> trajectories -> CMT mid-training -> post-training -> samples -> FD -> report.
# The DAG lives in workflow/rules/; stage code lives in stages/. Run: snakemake -c2
import sys

from snakemake.utils import min_version

min_version("9.0")


configfile: workflow.source_path("config/default.yaml")


report: "workflow/report/workflow.rst"


# Snakemake merged default.yaml, the --configfile files and --config; assemble it again with what
# Snakemake does not do: the files a row `extends` beneath it, `{row}` in an overlay's row name,
# numbers in nested --config values (Snakemake passes them as strings), the baseline filled in
# from posttrain (stages/config/layers.py; config/README.md).
sys.path.insert(0, workflow.basedir)
from stages.config import checks as config_checks
from stages.config import layers as config_layers

_given = {
    "default": None if workflow.config_settings.replace_workflow_config else f"{workflow.basedir}/config/default.yaml",
    "configfiles": workflow.config_settings.configfiles,
    "command_line": workflow.config_settings.config,
}
_schema = config_layers.load_schema(f"{workflow.basedir}/workflow/schemas/config.schema.yaml")
_assembled = config_layers.assemble(**_given, schema=_schema)
config.clear()
config.update(_assembled)
# The schema, its defaults filled in; every fault on one line naming the key and the file that set it.
config_layers.validate_with_defaults(config, _schema, config_layers.sources(**_given))
# Impossible combinations of keys, which a schema cannot express; also before any job starts.
config_checks.check(config)

# Jobs run the stages/ package that sits beside this Snakefile, whatever the working directory.
# (Snakemake formats the prefix too, hence the doubled braces inside the f-string.)
# CMT_TF32 carries `tf32` to every stage (stages/core/precision.py): through the environment,
# not a param, as it changes the last bits of a result and not what it is, so it reruns nothing.
shell.prefix(f"export PYTHONPATH={workflow.basedir}${{{{PYTHONPATH:+:$PYTHONPATH}}}}; "
             f"export CMT_TF32={int(config['tf32'])}; ")


include: "workflow/rules/common.smk"
include: "workflow/rules/store.smk"
include: "workflow/rules/assets.smk"
include: "workflow/rules/data.smk"
include: "workflow/rules/teacher.smk"
include: "workflow/rules/trajectories.smk"
if LATENTS:

    include: "workflow/rules/latents.smk"

if config["family"] == "mf":

    include: "workflow/rules/meanflow.smk"

else:

    include: "workflow/rules/train.smk"

if POSTHOC_INITS:

    include: "workflow/rules/posthoc_ema.smk"

include: "workflow/rules/evaluate.smk"
include: "workflow/rules/resources.smk"


rule all:
    input:
        f"{RES}/report.md",
    default_target: True
