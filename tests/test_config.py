"""The config schema and the cross-key checks: defaults fill in, and malformed configs are refused
naming the key, before any job starts."""

import copy
import json
import re

import pytest
import yaml
from snakemake.exceptions import WorkflowError
from snakemake.utils import validate
from workflow_runs import REPO, ROWS, TINY, TINY_MF, snakemake

from stages.config import OVERLAYS, checks, layers, resolve

SCHEMA = str(REPO / "workflow" / "schemas" / "config.schema.yaml")


DEFAULT = REPO / "config" / "default.yaml"



def default():
    """config/default.yaml as the workflow assembles it (the baseline filled in from posttrain)."""
    return layers.assemble(DEFAULT)


def test_default_config_is_valid_and_gets_defaults():
    cfg = default()
    validate(cfg, SCHEMA)
    assert cfg["trajectories"]["solver"] == "dpm_solver_pp"
    assert cfg["trajectories"]["order"] == 3 and cfg["trajectories"]["nfe"] == 16
    assert cfg["posttrain"]["k"] == 8 and cfg["posttrain"]["P_mean"] == -1.1
    assert cfg["midtrain"]["optimizer"]["betas"] == [0.9, 0.999]


def row_stacks():
    """Every row file alone and every overlay on each of its rows, as --configfile lists."""
    files = {str(p.relative_to(ROWS)) for p in ROWS.rglob("*.yaml")}
    bases = {f for f in files if f.startswith("base/")}
    rows = sorted(files - bases - set(OVERLAYS))
    return [[ROWS / r] for r in rows] + [[ROWS / r, ROWS / o] for o, rs in OVERLAYS.items() for r in rs]


@pytest.mark.parametrize("stack", row_stacks(), ids=lambda s: "+".join(p.stem for p in s))
def test_every_row_config_is_valid(stack):
    cfg = layers.assemble(DEFAULT, stack)
    validate(cfg, SCHEMA)
    assert checks.problems(cfg) == []


@pytest.mark.parametrize("stack", row_stacks() + [[]], ids=lambda s: "+".join(p.stem for p in s) or "default")
def test_tools_see_the_config_the_workflow_sees(stack):
    """layers.validate_with_defaults (the Snakefile's validation, and stages.config.resolve's for
    bench/) fills in the same defaults as snakemake.utils.validate, row by row."""
    ours = resolve(stack)
    snakemakes = layers.assemble(DEFAULT, stack)
    validate(snakemakes, SCHEMA)
    assert ours == snakemakes


def test_tools_refuse_an_invalid_config():
    with pytest.raises(checks.ConfigError) as err:
        resolve([], {"posttrain": {"inits": ["nonsense"]}})
    assert str(err.value) == ("invalid configuration:\n  posttrain.inits[0]: 'nonsense' is not one of cmt, teacher, "
                              "random, baseline (from --config)")


def test_every_base_is_extended_by_a_row():
    used = set()
    for stack in row_stacks():
        text = stack[0].read_text()
        for line in text.splitlines():
            if line.startswith("extends:"):
                used.add((stack[0].parent / line.split(":", 1)[1].strip()).resolve())
    assert {p.resolve() for p in (ROWS / "base").glob("*.yaml")} <= used


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
    ("checkpoint.every_steps", 0, "every_steps"),
    ("checkpoint.every_minutes", "often", "every_minutes"),
    ("checkpoint.slice_kimg", -1, "slice_kimg"),
    ("checkpoint.keep", 2, "keep"),
    ("sigma_min", 0, "sigma_min"),
    ("midtrain.distance", "l1", "distance"),
    ("posttrain.snapshots", [0, 1.5], "snapshots"),
    ("teacher.optimizer.betas", [0.9], "betas"),
    ("posttrain.stepz", 10, "stepz"),                     # posttrain shares $defs/ect: still closed
    ("baseline.optimizer.schedule", "cosine", "schedule"),
    ("baseline.qq", 2, "qq"),
    ("sigma_boundary", 0, "sigma_boundary"),
    ("tf32", "yes", "tf32"),
]


@pytest.mark.parametrize("path,value,word", BAD, ids=[b[0] + "=" + str(b[1])[:12] for b in BAD])
def test_malformed_config_is_refused(path, value, word):
    """The Snakefile's validation refuses it in one line that starts with the key's path (an item's
    index after it: posttrain.snapshots[1]); Snakemake's own validation refuses it too."""
    cfg = copy.deepcopy(default())
    set_key(cfg, path, value)
    with pytest.raises(checks.ConfigError) as err:
        layers.validate_with_defaults(copy.deepcopy(cfg), layers.load_schema(SCHEMA))
    head, line = str(err.value).split("\n")
    assert head == "invalid configuration:" and re.match(rf"  {re.escape(path)}(\[\d+\])?: ", line), line
    assert word in line
    with pytest.raises(WorkflowError):
        validate(cfg, SCHEMA)


# Combinations the schema cannot see: (changes, the key the message starts with).
IMPOSSIBLE = [
    ({"midtrain": {"batch": 100}}, "midtrain.batch"),                       # 100 / 16 points per trajectory
    ({"trajectories": {"num_shards": 1, "per_shard": 4}}, "midtrain.batch"),  # 8 per step from a pool of 4
    ({"sigma_max": 0.001}, "sigma_max"),                                    # the sigma grid would increase
    ({"sampling": {"sigma_mid": 100.0}}, "sampling.sigma_mid"),
    ({"midtrain": {"distance": "lpips", "lpips_weights": "vgg.pth"}}, "midtrain.distance"),  # 8x8 digits
    ({"midtrain": {"distance": "lpips"}}, "midtrain.lpips_weights"),
    ({"dataset": {"resolution": 32}}, "dataset.resolution"),
    ({"posttrain": {"snapshots": [0, 0.5, 0.501]}}, "posttrain.snapshots"),  # both are p050
    ({"posttrain": {"inits": ["cmt", "baseline"], "snapshots": [0, 0.5, 0.52]},  # baseline: steps 5, 5
      "baseline": {"steps": 10}}, "posttrain.snapshots"),
    ({"posttrain": {"inits": ["cmt", "baseline"], "snapshots": [0, 0.5, 1.0]}, "baseline": {"steps": 1}},
     "posttrain.snapshots"),  # the baseline's 1 step: p000 and p050 are both step 0
]
# The MeanFlow family (config/rows/digits-cmt-mf.yaml): what would fail inside its jobs.
IMPOSSIBLE_MF = [
    ({"midtrain_mf": {"batch": 130}}, "midtrain_mf.batch"),                  # 130 / 16 pairs per trajectory
    ({"trajectories": {"num_shards": 1, "per_shard": 4}}, "midtrain_mf.batch"),  # 8 per step from a pool of 4
    ({"network": {"kind": "ddpmpp"}}, "network.kind"),                      # no dual-time DDPM++
    ({"posttrain_mf": {"snapshots": [0, 0.5, 0.504]}}, "posttrain_mf.snapshots"),  # both are p050
    ({"posttrain_mf": {"steps": 4, "snapshots": [0, 0.5, 0.6]}}, "posttrain_mf.snapshots"),  # steps 2, 2
    ({"trajectories": {"solver": "meanflow"}}, "trajectories.solver"),        # an EDM teacher in flow time
    ({"teacher": {"objective": "meanflow", "meanflow": {}}}, "trajectories.solver"),  # a MeanFlow teacher in sigma
    ({"trajectories": {"label_dropout": 0.1}}, "trajectories.label_dropout"),  # DPM-Solver++ drops no labels
    ({"posttrain_mf": {"label_dropout": 0.1}}, "posttrain_mf"),               # an unconditional U-Net
    ({"network": {"kind": "dit", "preset": "MF-B/4", "num_classes": 10}, "posttrain_mf": {"dropout": 0.1}},
     "posttrain_mf.dropout"),                                                # the DiT has no dropout
    ({"network": {"kind": "dit", "preset": "MF-B/4", "num_classes": 10}, "posttrain_mf": {"guidance": {"omega": 1.0}}},
     "posttrain_mf.guidance"),                                               # guidance without dropped labels
]


def mf_row():
    cfg = default()
    cfg.update(yaml.safe_load((REPO / "config" / "rows" / "digits-cmt-mf.yaml").read_text()))
    return cfg


def merged(changes, base=default):
    cfg = copy.deepcopy(base())
    for section, value in changes.items():
        if isinstance(value, dict):
            cfg.setdefault(section, {}).update(value)
        else:
            cfg[section] = value
    return cfg


def test_default_config_passes_the_cross_key_checks():
    for cfg in (default(), mf_row()):
        validate(cfg, SCHEMA)
        assert checks.problems(cfg) == []


@pytest.mark.parametrize("changes,key", IMPOSSIBLE, ids=[json.dumps(c)[:40] for c, _ in IMPOSSIBLE])
def test_impossible_combination_is_refused_naming_the_key(changes, key):
    cfg = merged(changes)
    validate(cfg, SCHEMA)  # each value is fine on its own
    with pytest.raises(checks.ConfigError) as err:
        checks.check(cfg)
    assert f"\n  {key}: " in str(err.value)


@pytest.mark.parametrize("changes,key", IMPOSSIBLE_MF, ids=[json.dumps(c)[:40] for c, _ in IMPOSSIBLE_MF])
def test_impossible_meanflow_combination_is_refused_naming_the_key(changes, key):
    cfg = merged(changes, base=mf_row)
    validate(cfg, SCHEMA)
    with pytest.raises(checks.ConfigError) as err:
        checks.check(cfg)
    assert f"\n  {key}: " in str(err.value)


def test_snapshots_in_any_order_pass_the_checks():
    for cfg in (merged({"posttrain": {"snapshots": [0, 1.0, 0.5]}}),
                merged({"posttrain_mf": {"snapshots": [1.0, 0, 0.5]}}, base=mf_row)):
        validate(cfg, SCHEMA)
        assert checks.problems(cfg) == []


def test_batches_the_jobs_gpus_cannot_share_are_refused_naming_the_rule():
    cfg, mf = default(), mf_row()
    validate(cfg, SCHEMA)
    validate(mf, SCHEMA)
    assert checks.process_problems(cfg, {"train_teacher": 2, "midtrain": 4, "posttrain": 8, "sample": 3}) == []
    found = checks.process_problems(cfg, {"posttrain": 3, "midtrain": 16})
    assert [m.split(":")[0] for m in found] == ["resources.midtrain.gpu"] * 2 + ["resources.posttrain.gpu"], found
    assert "midtrain.batch / trajectories.nfe = 8 trajectories per step" in found[0]
    assert "trajectories.num_shards is 4" in found[1] and "posttrain.batch = 128" in found[2]
    found = checks.process_problems(mf, {"midtrain_mf": 3, "posttrain_mf": 2})
    assert len(found) == 1 and found[0].startswith("resources.midtrain_mf.gpu: 3 GPUs"), found


def test_micro_batches_that_do_not_split_a_share_are_refused():
    """batch_per_gpu: the default row's midtrain batch is 8 trajectories x 16 points, posttrain 128."""
    cfg = merged({"midtrain": {"batch_per_gpu": 32}, "posttrain": {"batch_per_gpu": 32}})
    validate(cfg, SCHEMA)
    assert checks.process_problems(cfg, {"midtrain": 2, "posttrain": 2}) == []  # 4 trajectories: 2 x 2; 64: 2 x 32
    cfg = merged({"midtrain": {"batch_per_gpu": 24}, "posttrain": {"batch_per_gpu": 48}})
    found = checks.process_problems(cfg, {"posttrain": 2})
    assert "midtrain.batch_per_gpu: 24 is not a multiple of trajectories.nfe = 16" in found[0]
    assert found[1].startswith("posttrain.batch_per_gpu: micro-batches of 48 images do not divide the 64"), found


def test_snakemake_refuses_gpus_that_cannot_share_a_batch_before_any_job(tmp_path):
    result = snakemake(tmp_path, "--set-resources", "posttrain:gpu=3", cores=1)
    assert result.returncode != 0
    assert "resources.posttrain.gpu: 3 GPUs" in result.stderr and "Job stats" not in result.stdout + result.stderr
    assert not (tmp_path / "store").exists() and not (tmp_path / "results").exists()


def test_dual_time_networks_are_the_ones_that_take_a_second_time_input():
    import inspect

    from stages import networks

    takes = {kind for kind, cls in networks.ARCHITECTURES.items()
             if "dual_time" in inspect.signature(cls).parameters}
    assert checks.DUAL_TIME_NETWORKS == takes


def test_the_table_has_at_least_20_malformed_configs():
    assert len(BAD) + len(IMPOSSIBLE) + len(IMPOSSIBLE_MF) >= 20


@pytest.mark.parametrize("changes,key", [({"midtrain": {"stepz": 10}}, "stepz"),
                                         ({"midtrain": {"batch": 100}}, "midtrain.batch")])
def test_snakemake_refuses_a_bad_config_before_any_job(tmp_path, changes, key):
    (tmp_path / "bad.yaml").write_text(yaml.safe_dump(changes))
    result = snakemake(tmp_path, configs=[tmp_path / "bad.yaml"], cores=1)
    assert result.returncode != 0
    assert key in result.stderr and "Job stats" not in result.stdout + result.stderr
    assert not (tmp_path / "store").exists() and not (tmp_path / "results").exists()


@pytest.mark.parametrize("family", ["cm", "mf"])
def test_the_largest_snapshot_is_the_final_whatever_the_order(tmp_path, family):
    """[0, 1.0, 0.5]: the report presents p100 as the final model, not the last-listed p050."""
    section = "posttrain_mf" if family == "mf" else "posttrain"
    (tmp_path / "order.yaml").write_text(yaml.safe_dump({section: {"snapshots": [0, 1.0, 0.5]}}))
    configs = [TINY, *([TINY_MF] if family == "mf" else []), tmp_path / "order.yaml"]
    result = snakemake(tmp_path, "-n", configs=configs, cores=1)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    report = re.search(r"^Shell command: python -m stages.report (.*)$", result.stdout, re.M).group(1)
    assert '"final_snapshot": "p100"' in report
    assert "results/tiny" in report and "/samples/cmt/p100.npz" in report and "p050.npz" not in report


def test_a_command_line_string_where_a_number_belongs_says_what_to_do(tmp_path):
    # (a nested number that parses is read back: test_pipeline's dry run with posttrain q 512)
    result = snakemake(tmp_path, "-n", "-p", "--config", 'posttrain={"q": "5l2"}')
    log = result.stdout + result.stderr
    assert result.returncode != 0 and "Job stats" not in log
    assert "posttrain.q: got the string '5l2' where the schema expects number" in log and "--configfile" in log
