# Per-rule cluster resources from config `resources` (rule -> {gpu, mem_mb, runtime, cpus_per_task}),
# so each row carries its own SLURM hints; rules without an entry keep Snakemake's defaults.
# Precedence: the command line (--set-resources, also a profile's set-resources) over the row, the
# row over the defaults (--default-resources, the profile's). Snakemake applies --set-resources when
# it defines a rule, before this file runs, so the row's values are applied first and the command
# line's are applied again on top.
# A row may name rules that exist only in some configurations (the teacher's two sources, the
# asset fetch, the two families' training rules); any other unknown name is a typo and an error.
from snakemake.resources import Resources

CONDITIONAL_RULES = {"train_teacher", "import_teacher", "import_guide", "fetch_assets", "midtrain", "posttrain",
                     "midtrain_mf", "posttrain_mf", "encode_dataset", "latent_manifest",
                     "train_latent_vgg", "import_ecd_teacher", "posthoc_ema"}
_defined = {r.name for r in workflow.rules}
for _name, _res in config.get("resources", {}).items():
    if _name in _defined:
        _rule = getattr(rules, _name).rule
        _rule.resources.update(_res)
        _rule.resources.update(Resources.from_mapping(
            workflow.resource_settings.overwrite_resources.get(_name, {})))
    elif _name not in CONDITIONAL_RULES and f"{_name}_from_store" not in _defined:  # (a local job: no resources)
        raise ValueError(f"config resources: no rule named {_name!r} in this workflow")


# A job starts one process per GPU: a batch they cannot share would fail only once the job runs.
_gpus = {}
for _rule in workflow.rules:
    _gpu = _rule.resources.get("gpu")
    if not _gpu.is_evaluable() and isinstance(_gpu.value, int):
        _gpus[_rule.name] = _gpu.value
config_checks.check_processes(config, _gpus)
