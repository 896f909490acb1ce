# Per-rule cluster resources from config `resources` (rule -> {gpu, mem_mb, runtime, cpus_per_task}),
# so each row carries its own SLURM hints; rules without an entry keep Snakemake's defaults.
# A row may name rules that exist only in some configurations (the teacher's two sources, the
# asset fetch, the two families' training rules); any other unknown name is a typo and an error.
CONDITIONAL_RULES = {"train_teacher", "import_teacher", "fetch_assets", "midtrain", "posttrain",
                     "midtrain_mf", "posttrain_mf"}
_defined = {r.name for r in workflow.rules}
for _name, _res in config.get("resources", {}).items():
    if _name in _defined:
        getattr(rules, _name).rule.resources.update(_res)
    elif _name not in CONDITIONAL_RULES:
        raise ValueError(f"config resources: no rule named {_name!r} in this workflow")
