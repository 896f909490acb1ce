# CMT pipeline: teacher -> trajectories -> CMT mid-training -> post-training -> samples -> FD -> report.
# The DAG lives in workflow/rules/; stage code lives in stages/. Run: snakemake -c2
import sys

from snakemake.utils import min_version, validate

min_version("9.0")


configfile: workflow.source_path("config/default.yaml")


report: "workflow/report/workflow.rst"


validate(config, "workflow/schemas/config.schema.yaml")
# Impossible combinations of keys, which a schema cannot express; also before any job starts.
sys.path.insert(0, workflow.basedir)
from stages.config import checks as config_checks

config_checks.check(config)

# Jobs run the stages/ package that sits beside this Snakefile, whatever the working directory.
# (Snakemake formats the prefix too, hence the doubled braces inside the f-string.)
shell.prefix(f"export PYTHONPATH={workflow.basedir}${{{{PYTHONPATH:+:$PYTHONPATH}}}}; ")


include: "workflow/rules/common.smk"
include: "workflow/rules/assets.smk"
include: "workflow/rules/data.smk"
include: "workflow/rules/teacher.smk"
include: "workflow/rules/trajectories.smk"
if config["family"] == "mf":

    include: "workflow/rules/meanflow.smk"

else:

    include: "workflow/rules/train.smk"

include: "workflow/rules/evaluate.smk"
include: "workflow/rules/resources.smk"


rule all:
    input:
        f"{RES}/report.md",
    default_target: True
