"""What a newcomer reads when a config breaks the schema (stages/config/errors.py): one line per
fault, the key's dotted path first, what is wrong, the nearest valid key or value where it looks
like a typo, the file that set it; every fault at once; nothing of the schema dumped."""

import copy

import pytest
import yaml
from workflow_runs import REPO, snakemake

from stages.config import errors, layers, resolve, schema
from stages.config.checks import ConfigError

SCHEMA = layers.load_schema(REPO / "workflow" / "schemas" / "config.schema.yaml")
DEFAULT = REPO / "config" / "default.yaml"


def faults(changes=(), deleted=(), base=None):
    """The fault lines of default.yaml (or `base`) with `changes` {dotted path: value} and `deleted` keys."""
    cfg = copy.deepcopy(base if base is not None else layers.assemble(DEFAULT))
    for path, value in dict(changes).items():
        *parents, last = path.split(".")
        node = cfg
        for key in parents:
            node = node.setdefault(key, {})
        node[last] = value
    for path in deleted:
        *parents, last = path.split(".")
        node = cfg
        for key in parents:
            node = node[key]
        del node[last]
    with pytest.raises(ConfigError) as err:
        layers.validate_with_defaults(cfg, SCHEMA)
    head, *lines = str(err.value).split("\n")
    assert head == "invalid configuration:" and all(line.startswith("  ") for line in lines)
    return [line.strip() for line in lines]


@pytest.mark.parametrize("path,line", [
    ("posttrian", "posttrian: unknown key; did you mean posttrain?"),  # top level
    ("midtrain.stepz", "midtrain.stepz: unknown key; did you mean steps?"),  # a section
    ("midtrain.ema.bta", "midtrain.ema.bta: unknown key; did you mean beta?"),  # $ref to $defs/ema
    ("network.chanels", "network.chanels: unknown key; did you mean channels?"),  # $ref to $defs/network
    # unevaluatedProperties over $defs/ect, then a section inside it
    ("posttrain.stepz", "posttrain.stepz: unknown key; did you mean steps?"),
    ("posttrain.guidance.wieght", "posttrain.guidance.wieght: unknown key; did you mean weight?"),
    # additionalProperties: {...}, any rule's name, then its closed section
    ("resources.midtrain.mem_gb", "resources.midtrain.mem_gb: unknown key; did you mean mem_mb?"),
    # no near neighbour: a small section lists its keys, a large one points to the schema
    ("midtrain.ema.zzz", "midtrain.ema.zzz: unknown key; this section takes beta, rampup, kind, sigma_rels, "
                         "snapshot_every"),
    ("midtrain.xyzzy", ("midtrain.xyzzy: unknown key; workflow/schemas/config.schema.yaml lists the keys this "
                        "section takes")),
])
def test_an_unknown_key_is_named_with_its_nearest_valid_neighbour(path, line):
    assert faults({path: 1}) == [line]


def test_an_unknown_key_inside_one_of_the_forms_a_key_takes():
    """latents.vae is a catalog name or {config, seed} (oneOf): the mapping's typo is named, not the oneOf."""
    found = faults({"latents": {"vae": {"config": {}, "sed": 1}, "num_shards": 1, "per_shard": 1}})
    assert found == ["latents.vae.sed: unknown key; did you mean seed?"]


def test_a_key_the_schema_names_by_enum_is_unknown_when_misspelt():
    found = faults({"paper": {"source": "table 1", "methods": {"cmtt": {}}}})
    assert found == ["paper.methods.cmtt: unknown key; did you mean cmt?"]


@pytest.mark.parametrize("path,value,line", [
    ("posttrain.q", "many", "posttrain.q: expected a number, got the string 'many'"),
    ("seed", 1.5, "seed: expected an integer, got 1.5"),
    ("tf32", "yes", "tf32: expected true or false, got the string 'yes'"),
    ("checkpoint.every_minutes", "often",
     "checkpoint.every_minutes: expected a number or null, got the string 'often'"),
    ("sampling.steps", 2, "sampling.steps: expected a list, got 2"),
    ("midtrain.ema", 0.999, "midtrain.ema: expected a mapping of keys, got 0.999"),
    ("row", {"name": "x"}, "row: expected a string, got a mapping (keys name)"),
])
def test_a_wrong_type_names_the_expected_type_and_what_was_given(path, value, line):
    assert faults({path: value}) == [line]


@pytest.mark.parametrize("path,value,line", [
    ("trajectories.x_T", "prior", "trajectories.x_T: 'prior' is not one of noise, data_plus_noise"),
    ("dataset.source", "cifar", ("dataset.source: 'cifar' is not one of digits, cifar10, image_folder, "
                                 "imagenet_folder; did you mean cifar10?")),
    ("trajectories.order", 4, "trajectories.order: 4 is not one of 1, 2, 3"),
    ("sampling.steps", [1, 3], "sampling.steps[1]: 3 is not one of 1, 2"),
])
def test_a_value_outside_an_enum_lists_the_allowed_values(path, value, line):
    assert faults({path: value}) == [line]


@pytest.mark.parametrize("path,value,line", [
    ("midtrain.steps", 0, "midtrain.steps: 0 is below the minimum 1"),
    ("sigma_min", 0, "sigma_min: 0 must be above 0"),
    ("posttrain.q", 1, "posttrain.q: 1 must be above 1"),
    ("posttrain.dropout", 1.5, "posttrain.dropout: 1.5 is above the maximum 1"),
    ("midtrain.ema.beta", 1.0, "midtrain.ema.beta: 1.0 must be below 1"),
    ("posttrain.snapshots", [0, 1.5], "posttrain.snapshots[1]: 1.5 is above the maximum 1"),
])
def test_a_number_out_of_range_names_the_bound(path, value, line):
    assert faults({path: value}) == [line]


def test_other_rules_say_what_they_ask():
    assert faults({"row": "has space"}) == ["row: 'has space' does not match the pattern ^[A-Za-z0-9_.-]+$"]
    assert faults({"teacher.optimizer.betas": [0.9]}) == ["teacher.optimizer.betas: needs at least 2 items, got 1"]
    assert faults({"posttrain.inits": ["cmt", "cmt"]}) == ['posttrain.inits: lists an item twice: ["cmt", "cmt"]']


def test_a_missing_required_key_is_named_with_the_condition_that_asks_for_it():
    assert faults(deleted=["trajectories.num_shards"]) == ["trajectories.num_shards: required key missing"]
    assert faults(deleted=["teacher.steps", "teacher.batch"]) == [
        "teacher.batch: required key missing unless teacher.source is import",
        "teacher.steps: required key missing unless teacher.source is import"]
    assert faults({"teacher.source": "import"}) == [
        "teacher.asset: required key missing when teacher.source is import"]
    assert faults({"family": "mf"}) == ["midtrain_mf: required key missing when family is mf",
                                        "posttrain_mf: required key missing when family is mf"]


def test_every_fault_is_named_once_on_a_line_of_its_own_and_nothing_else():
    found = faults({"posttrian": {"q": 1}, "midtrain.steps": 0, "trajectories.x_T": "prior",
                    "posttrain.q": "many"}, deleted=["trajectories.num_shards"])
    assert found == ["midtrain.steps: 0 is below the minimum 1",
                     "posttrain.q: expected a number, got the string 'many'",
                     "posttrian: unknown key; did you mean posttrain?",
                     "trajectories.num_shards: required key missing",
                     "trajectories.x_T: 'prior' is not one of noise, data_plus_noise"]


def test_a_fault_the_baseline_copies_from_posttrain_is_named_once(tmp_path):
    row = tmp_path / "row.yaml"
    row.write_text(yaml.safe_dump({"posttrain": {"stepz": 10}}))
    with pytest.raises(ConfigError) as err:
        resolve([row])
    line = f"  posttrain.stepz: unknown key; did you mean steps? (from {errors.label(row)})"
    assert str(err.value).split("\n")[1:] == [line]
    # a baseline that sets the key itself is named as well
    row.write_text(yaml.safe_dump({"posttrain": {"q": 1}, "baseline": {"q": 1}}))
    with pytest.raises(ConfigError) as err:
        resolve([row])
    assert [line.split(":")[0] for line in str(err.value).split("\n")[1:]] == ["  baseline.q", "  posttrain.q"]


def test_a_misspelt_key_names_the_file_that_set_it(tmp_path, monkeypatch):
    """The row file, the base it extends, or --config: the last layer that holds the key."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "rows" / "base").mkdir(parents=True)
    (tmp_path / "rows" / "base" / "b.yaml").write_text("midtrain: {stepz: 10}\n")
    (tmp_path / "rows" / "row.yaml").write_text("extends: base/b.yaml\nrow: r\nposttrain: {qq: 2}\n")
    with pytest.raises(ConfigError) as err:
        resolve([tmp_path / "rows" / "row.yaml"], {"sampling": {"stpes": "[1]"}})
    assert str(err.value).split("\n")[1:] == [
        "  midtrain.stepz: unknown key; did you mean steps? (from rows/base/b.yaml)",
        "  posttrain.qq: unknown key; did you mean q? (from rows/row.yaml)",
        "  sampling.stpes: unknown key; did you mean steps? (from --config)"]


def test_origin_is_the_last_layer_that_holds_the_key_and_a_list_is_set_whole():
    layers_ = [("a.yaml", {"posttrain": {"q": 2, "snapshots": [0, 1]}}), ("b.yaml", {"posttrain": {"q": 3}})]
    assert errors.origin(("posttrain", "q"), layers_) == "b.yaml"
    assert errors.origin(("posttrain", "snapshots", 1), layers_) == "a.yaml"
    assert errors.origin(("posttrain", "steps"), layers_) is None
    assert errors.origin(("posttrain", "q", "x"), layers_) is None  # a number holds no key


def test_dotted_paths_and_quoted_values():
    assert errors.dotted(("posttrain", "snapshots", 1)) == "posttrain.snapshots[1]"
    assert errors.dotted(("row",)) == "row" and errors.dotted(()) == "the config"
    assert errors.shown(None) == "null" and errors.shown(True) == "true" and errors.shown("x") == "the string 'x'"
    assert len(errors.shown(list(range(100)))) == 60 and "\n" not in errors.shown("a\nb")


def test_the_keys_of_a_section_follow_refs():
    posttrain = SCHEMA["properties"]["posttrain"]
    assert {"inits", "snapshots", "steps", "q", "optimizer"} <= set(schema.keys(posttrain, SCHEMA))
    assert schema.keys(SCHEMA["properties"]["midtrain"]["properties"]["ema"], SCHEMA) == [
        "beta", "rampup", "kind", "sigma_rels", "snapshot_every"]


def test_a_newcomers_misspelt_key_reads_in_a_few_lines_through_snakemake(tmp_path):
    """`snakemake -n --config posttrian='{"q": 1}'` printed 2,351 lines (the schema after Snakemake's
    validation error); now the key, its nearest neighbour and Snakemake's short header."""
    result = snakemake(tmp_path, "-n", "--config", 'posttrian={"q": 1}')
    log = (result.stdout + result.stderr).strip().splitlines()
    assert result.returncode != 0 and "Job stats" not in result.stdout
    assert "  posttrian: unknown key; did you mean posttrain? (from --config)" in log, log
    assert len(log) <= 15, "\n".join(log)


def test_a_misspelt_key_in_a_row_file_names_the_file_through_snakemake(tmp_path):
    (tmp_path / "row.yaml").write_text(yaml.safe_dump({"row": "r", "midtrain": {"stepz": 10, "batch": 0}}))
    result = snakemake(tmp_path, "-n", configs=[tmp_path / "row.yaml"])
    log = (result.stdout + result.stderr).strip().splitlines()
    assert result.returncode != 0 and "Job stats" not in result.stdout
    assert "  midtrain.batch: 0 is below the minimum 1 (from row.yaml)" in log, log
    assert "  midtrain.stepz: unknown key; did you mean steps? (from row.yaml)" in log, log
    assert len(log) <= 15, "\n".join(log)
