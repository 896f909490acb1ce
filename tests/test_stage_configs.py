"""What each rule passes to its stage and the store keys, computed by stages/config without Snakemake,
against the golden file recorded from Snakemake's own dry runs (tests/golden/record_stage_configs.py):
byte for byte, for every row stack and every job."""

import json
import re
from pathlib import Path

import pytest
from workflow_runs import planned_configs

from stages.config import resolve, stage_configs, store_keys

REPO = Path(__file__).resolve().parents[1]
GOLDEN = json.loads((REPO / "tests" / "golden" / "stage_configs.json").read_text())


KEYED = {"prepare_dataset": store_keys.dataset, "train_teacher": store_keys.teacher,
         "import_teacher": store_keys.teacher, "import_guide": store_keys.guide,
         "import_ecd_teacher": store_keys.ecd_teacher, "trajectory_spec": store_keys.trajectories,
         "trajectory_shard": store_keys.trajectories, "encode_dataset": store_keys.latents}


def configfiles(stack):
    return [] if stack == "default" else [REPO / name for name in stack.split(" + ")]


def rule_and_init(job):
    """(rule, init) of a golden job name `rule -> outputs`: the init of a post-training, sample or fid job."""
    rule, outputs = job.split(" -> ")
    init = re.search(r"/(?:posttrain|samples|fid)/([\w-]+)[/.]", outputs)
    return rule, init.group(1) if init and init.group(1) != "teacher-solver" else None


@pytest.mark.parametrize("stack", sorted(GOLDEN))
def test_stage_configs_and_store_keys_are_the_golden_ones(stack):
    config = resolve(configfiles(stack))
    for job, expected in GOLDEN[stack].items():
        rule, init = rule_and_init(job)
        if "config" in expected:
            assert stage_configs.as_arg(stage_configs.stage_config(rule, config, init)) == expected["config"], job
        if "key" in expected:
            assert KEYED[rule](config).key == expected["key"], job
        if "spec" in expected:  # the latent manifest checks the shards against the latents' spec
            assert stage_configs.as_arg(store_keys.latents(config).spec["spec"]) == expected["spec"], job


@pytest.mark.heavy
@pytest.mark.parametrize("stack", sorted(GOLDEN))
def test_snakemake_passes_every_training_stage_the_config_the_stage_tests_run(stack):
    """What Snakemake itself prints (`-n -p`) for each training rule's job is what stage_config gives,
    which the stage tests run (tests/stagekit.py)."""
    config = resolve(configfiles(stack))
    planned = planned_configs([] if stack == "default" else stack.split(" + "))
    training = {job: entry for job, entry in planned.items() if rule_and_init(job)[0] in stage_configs.TRAINING_RULES}
    assert training, stack
    for job, entry in training.items():
        rule, init = rule_and_init(job)
        assert entry["config"] == stage_configs.as_arg(stage_configs.stage_config(rule, config, init)), job
