"""A training rule's job across several SLURM nodes: what the rule asks the executor plugin for, and
which options it gives stages/launch.py. Only stdlib: the Snakefile imports this before any job starts.

A row gives a training rule N nodes of G GPUs each with `resources.<rule>: {gpu: G, nodes: N}` (or
`--set-resources <rule>:nodes=N`); `nodes` defaults to 1, one node as every rule has.

How snakemake-executor-plugin-slurm (2.x) turns resources into sbatch options and runs the job:
- `gpu: G` becomes `--gpus=G`, GPUs counted over the whole job, which SLURM may spread unevenly over
  N nodes; `gres: gpu:G` becomes `--gres=gpu:G`, which SLURM counts per node; `nodes: N` becomes
  `--nodes=N`; `mem_mb` becomes `--mem`, per node.
- Its job step runs the rule's command through `srun -n1`: once, on one node. A rule with an `mpi`
  resource is the exception: the command runs as it is in the allocation's batch step (first node),
  and starts its own job step. The plugin then wants a task count (`tasks` > 1 or
  `tasks_per_node` > 1) and turns `tasks` of a GPU job into `--ntasks-per-gpu` as well, unless
  `tasks_per_gpu` is set (0: no such option).

So a rule with N > 1 asks for `nodes=N, tasks=N, tasks_per_gpu=0, mpi="srun", gres=gpu[:model]:G,
gpu=0`: sbatch --nodes=N --ntasks=N --cpus-per-task=C --gres=gpu:G, one task of C CPUs (the rule's
cpus_per_task) and G GPUs on each of N nodes, and the rule's command, `python -m stages.launch --gpus
G --nodes N ...`, runs in the batch step, where stages/launch.py starts one launcher per node with
`srun --ntasks-per-node=1`. The job's signals (the profile's --signal=USR1@300) reach that step's
processes on every node and not the batch step: the launcher and Snakemake outlive the save.
"""

# The rules whose stage is data-parallel: one process per GPU over every node. The others run one
# process (--one-process) or none on a GPU, and another node would sit idle.
DATA_PARALLEL = ("train_teacher", "midtrain", "posttrain", "midtrain_mf", "posttrain_mf", "train_latent_vgg")


def count(value, key):
    """A resource that must be a whole number of at least 1 (nodes), or ValueError naming the key."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{key}: {value!r} must be a whole number of nodes, at least 1")
    return value


def problems(rule_nodes):
    """Messages for nodes given to a rule that cannot use them (`rule_nodes`: rule -> nodes)."""
    return [f"resources.{rule}.nodes: {n}, but {rule} runs one process and cannot use several nodes; only "
            f"the training rules ({', '.join(DATA_PARALLEL)}) span nodes"
            for rule, n in sorted(rule_nodes.items()) if n > 1 and rule not in DATA_PARALLEL]


def slurm_resources(gpus, nodes, gpu_model=None):
    """The resources a rule with `nodes` > 1 of `gpus` GPUs each gives the executor plugin in place of
    its `gpu` (and `gpu_model`); {} for one node, whose resources stay as they are."""
    if nodes <= 1:
        return {}
    out = {"nodes": nodes, "tasks": nodes, "tasks_per_gpu": 0, "mpi": "srun", "gpu": 0}
    if gpus:
        out["gres"] = f"gpu:{gpu_model}:{gpus}" if gpu_model else f"gpu:{gpus}"
    if gpu_model:
        out["gpu_model"] = ""
    return out


def gpus_per_node(resources):
    """The GPUs of each node of a job (`resources`: its evaluated resources, a mapping): `gpu` on one
    node, the count of the `gres` slurm_resources wrote on several."""
    nodes = int(resources.get("nodes") or 1)
    if nodes <= 1:
        return int(resources.get("gpu") or 0)
    gres = str(resources.get("gres") or "")
    return int(gres.rsplit(":", 1)[1]) if gres.startswith("gpu:") else 0


def launch_gpus(resources):
    """--gpus of stages.launch and, on several nodes, --nodes: `8` on one node, `8 --nodes 4` on four."""
    gpus, nodes = gpus_per_node(resources), int(resources.get("nodes") or 1)
    return gpus if nodes <= 1 else f"{gpus} --nodes {nodes}"
