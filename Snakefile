# CMT pipeline: teacher -> trajectories -> CMT mid-training -> post-training -> samples -> FD -> report.
# The DAG lives in workflow/rules/; stage code lives in stages/. Run: snakemake -c2
from snakemake.utils import min_version, validate

min_version("9.0")


configfile: workflow.source_path("config/default.yaml")


validate(config, "workflow/schemas/config.schema.yaml")

# Jobs run the stages/ package that sits beside this Snakefile, whatever the working directory.
# Braces doubled twice: once for the f-string, once for the shell formatting of Snakemake.
shell.prefix(f"export PYTHONPATH={workflow.basedir}${{{{PYTHONPATH:+:$PYTHONPATH}}}}; ")


include: "workflow/rules/common.smk"
include: "workflow/rules/data.smk"
include: "workflow/rules/teacher.smk"
include: "workflow/rules/trajectories.smk"
if config["family"] == "mf":

    include: "workflow/rules/meanflow.smk"

else:

    include: "workflow/rules/train.smk"

include: "workflow/rules/evaluate.smk"


rule all:
    input:
        f"{RES}/report.md",
    default_target: True
