"""`python tests/helpers/group_resources.py <snakemake arguments>`: runs Snakemake (a dry run)
and prints, for each group job it forms, `GROUP <name> <jobs> <json of gpu, mem_mb, runtime,
_cores>`: what the group would ask SLURM for. (Snakemake prints a group's jobs but not its
resources; this reads them from its GroupJob objects.)"""

import atexit
import json
import sys

import snakemake.jobs as jobs
from snakemake.cli import main

made = []
_init = jobs.GroupJob.__init__


def init(self, *args, **kwargs):
    _init(self, *args, **kwargs)
    made.append(self)


def report():
    # Snakemake forms a group per job first, then merges them by --group-components: keep the merged ones
    groups = list({id(g): g for g in made}.values())
    final = [g for g in groups if not any(set(g.jobs) < set(h.jobs) for h in groups)]
    for group in {frozenset(g.jobs): g for g in final}.values():
        if not group.is_toposorted:
            group.finalize()
        res = dict(group.resources.items())
        print("GROUP", group.groupid, len(group.jobs),
              json.dumps({k: res.get(k) for k in ("gpu", "mem_mb", "runtime", "_cores")}), flush=True)


jobs.GroupJob.__init__ = init
atexit.register(report)
sys.argv = ["snakemake", *sys.argv[1:]]
main()
