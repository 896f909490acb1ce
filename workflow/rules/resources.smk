# Per-rule cluster resources from config `resources` (rule -> {gpu, nodes, mem_mb, runtime, cpus_per_task}),
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
    elif _name not in CONDITIONAL_RULES and not {f"{_name}_from_store", f"{_name}_from_remote"} & _defined:
        # (a local job: no resources)
        raise ValueError(f"config resources: no rule named {_name!r} in this workflow")


# A job starts one process per GPU on each of its nodes (`nodes`, default 1): a batch they cannot
# share would fail only once the job runs.
_gpus, _nodes = {}, {}
for _rule in workflow.rules:
    _gpu, _node = _rule.resources.get("gpu"), _rule.resources.get("nodes")
    if not _gpu.is_evaluable() and isinstance(_gpu.value, int):
        _gpus[_rule.name] = _gpu.value
    if not _node.is_evaluable() and _node.value is not None:
        _nodes[_rule.name] = multinode.count(_node.value, f"resources.{_rule.name}.nodes")
_problems = multinode.problems(_nodes)
if _problems:
    raise config_checks.ConfigError("invalid configuration:\n  " + "\n  ".join(_problems))
config_checks.check_processes(config, _gpus, _nodes)

# A training rule on several nodes: one allocation of N nodes with its GPUs on each, and the rule's
# command in the batch step, from where stages.launch starts one launcher per node
# (stages/config/multinode.py says how the executor plugin is told).
for _name, _n in _nodes.items():
    _rule = getattr(rules, _name).rule
    _rule.resources.update(multinode.slurm_resources(_gpus.get(_name, 0), _n, _rule.resources.get("gpu_model").value))
