"""The config schema: defaults fill in, and malformed configs are refused naming the key."""

import copy
from pathlib import Path

import pytest
import yaml
from snakemake.exceptions import WorkflowError
from snakemake.utils import validate

REPO = Path(__file__).resolve().parents[1]
SCHEMA = str(REPO / "workflow" / "schemas" / "config.schema.yaml")


def default():
    return yaml.safe_load((REPO / "config" / "default.yaml").read_text())


def test_default_config_is_valid_and_gets_defaults():
    cfg = default()
    validate(cfg, SCHEMA)
    assert cfg["trajectories"]["solver"] == "dpm_solver_pp"
    assert cfg["trajectories"]["order"] == 3 and cfg["trajectories"]["nfe"] == 16
    assert cfg["posttrain"]["k"] == 8 and cfg["posttrain"]["P_mean"] == -1.1
    assert cfg["midtrain"]["optimizer"]["betas"] == [0.9, 0.999]


def test_every_row_config_is_valid():
    for row in sorted((REPO / "config" / "rows").glob("*.yaml")):
        cfg = default()
        cfg.update(yaml.safe_load(row.read_text()))
        validate(cfg, SCHEMA)


def set_key(cfg, path, value):
    *parents, last = path.split(".")
    node = cfg
    for p in parents:
        node = node[p]
    if value is DELETE:
        del node[last]
    else:
        node[last] = value


DELETE = object()
BAD = [
    ("midtrain.stepz", 10, "stepz"),                      # a typo is an unknown key, not a default
    ("midtrain.steps", "many", "steps"),
    ("midtrain.steps", 0, "steps"),
    ("posttrain.q", 1, "q"),
    ("posttrain.inits", ["cmt", "diffusion"], "inits"),
    ("trajectories.x_T", "prior", "x_T"),
    ("trajectories.order", 4, "order"),
    ("trajectories.num_shards", DELETE, "num_shards"),
    ("teacher.optimizer.name", "sgd", "name"),
    ("midtrain.ema.beta", 1.0, "beta"),
    ("sampling.steps", [3], "steps"),
    ("dataset.source", "imagenet", "source"),
    ("row", "has space", "row"),
]


@pytest.mark.parametrize("path,value,word", BAD, ids=[b[0] + "=" + str(b[1])[:12] for b in BAD])
def test_malformed_config_is_refused(path, value, word):
    cfg = copy.deepcopy(default())
    set_key(cfg, path, value)
    with pytest.raises(WorkflowError) as err:
        validate(cfg, SCHEMA)
    assert word in str(err.value)
