"""How the workflow assembles its config (stages/config/layers.py): files merge key by key, a row
extends its base, an overlay names the row below it, --config strings get the schema's types
back, and the baseline is posttrain under the row's overrides."""

from pathlib import Path

import pytest
import yaml

from stages.config import layers
from stages.config.checks import ConfigError

REPO = Path(__file__).resolve().parents[1]
DEFAULT = REPO / "config" / "default.yaml"
SCHEMA = layers.load_schema(REPO / "workflow" / "schemas" / "config.schema.yaml")


def write(folder, name, data):
    path = Path(folder) / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(data) if not isinstance(data, str) else data)
    return path


def test_merge_is_key_by_key_and_an_empty_dict_clears_nothing():
    base = {"resources": {"midtrain": {"gpu": 1, "mem_mb": 64000}}, "posttrain": {"snapshots": [0, 1.0]}}
    merged = layers.deep_merge(base, {"resources": {}, "posttrain": {"snapshots": [1.0]}})
    assert merged["resources"] == {"midtrain": {"gpu": 1, "mem_mb": 64000}}
    assert merged["posttrain"]["snapshots"] == [1.0]  # lists are replaced, not merged
    merged = layers.deep_merge(base, {"resources": {"midtrain": {"mem_mb": 4000}}})
    assert merged["resources"]["midtrain"] == {"gpu": 1, "mem_mb": 4000}
    assert base["resources"]["midtrain"]["mem_mb"] == 64000  # inputs unchanged


def test_a_row_extends_its_base_and_the_command_line_stays_on_top(tmp_path):
    write(tmp_path, "base/b.yaml", {"seed": 1, "posttrain": {"q": 8, "steps": 10}, "sampling": {"sigma_mid": 0.5}})
    row = write(tmp_path, "row.yaml", {"extends": "base/b.yaml", "row": "r", "posttrain": {"q": 16}})
    over = write(tmp_path, "over.yaml", {"sampling": {"sigma_mid": 0.7}})
    cfg = layers.assemble(DEFAULT, [row, over], command_line={"posttrain": {"steps": "20"}}, schema=SCHEMA)
    assert cfg["row"] == "r" and cfg["seed"] == 1
    assert cfg["posttrain"]["q"] == 16  # the row over its base
    assert cfg["posttrain"]["steps"] == 20  # the command line over both, read as a number
    assert cfg["posttrain"]["batch"] == 128  # default.yaml beneath everything
    assert cfg["sampling"]["sigma_mid"] == 0.7  # a later file over the row's base
    assert "extends" not in cfg


def test_extends_errors_name_the_file(tmp_path):
    row = write(tmp_path, "row.yaml", {"extends": "base/missing.yaml"})
    with pytest.raises(ConfigError, match="row.yaml: extends: base/missing.yaml names no file"):
        layers.assemble(DEFAULT, [row])
    a = write(tmp_path, "a.yaml", {"extends": "b.yaml"})
    write(tmp_path, "b.yaml", {"extends": "a.yaml"})
    with pytest.raises(ConfigError, match="loops back"):
        layers.assemble(DEFAULT, [a])
    listed = write(tmp_path, "list.yaml", "- row: x\n")
    with pytest.raises(ConfigError, match="list.yaml: a config file holds a mapping"):
        layers.assemble(DEFAULT, [listed])


def test_an_overlay_names_the_row_below_it(tmp_path):
    row = write(tmp_path, "row.yaml", {"row": "cifar"})
    overlay = write(tmp_path, "smoke.yaml", {"row": "{row}-smoke"})
    assert layers.assemble(DEFAULT, [row, overlay])["row"] == "cifar-smoke"
    assert layers.assemble(DEFAULT, [overlay])["row"] == "digits-cmt-ect-smoke"


def test_the_baseline_is_posttrain_under_its_overrides():
    cfg = layers.assemble(DEFAULT, command_line={"baseline": {"q": "2", "optimizer": {"schedule": "constant"}}},
                          schema=SCHEMA)
    post, base = cfg["posttrain"], cfg["baseline"]
    assert base["q"] == 2 and post["q"] == 256
    assert base["optimizer"] == {**post["optimizer"], "schedule": "constant"}  # the schedule alone
    assert base["steps"] == post["steps"] and base["ema"] == post["ema"]
    assert "inits" not in base and "snapshots" not in base
    with pytest.raises(ConfigError, match="baseline.snapshots: set posttrain.snapshots"):
        layers.assemble(DEFAULT, command_line={"baseline": {"snapshots": [1.0]}})


@pytest.mark.parametrize("section,given,expected", [
    ({"posttrain": {"q": "512"}}, ("posttrain", "q"), 512),
    ({"sampling": {"sigma_mid": "0.821"}}, ("sampling", "sigma_mid"), 0.821),
    ({"posttrain": {"optimizer": {"lr": "1.0e-4"}}}, ("posttrain", "optimizer", "lr"), 1e-4),
    ({"posttrain": {"optimizer": {"lr": "2e-4"}}}, ("posttrain", "optimizer", "lr"), 2e-4),  # YAML 1.1 reads a str
    ({"trajectories": {"order": "2"}}, ("trajectories", "order"), 2),  # an enum of integers
    ({"trajectories": {"lower_order_final": "false"}}, ("trajectories", "lower_order_final"), False),
    ({"posttrain": {"double_every": "null"}}, ("posttrain", "double_every"), None),
    ({"posttrain": {"snapshots": ["0", "0.5", "1"]}}, ("posttrain", "snapshots"), [0, 0.5, 1]),
    ({"checkpoint": {"slice_kimg": "12.8"}}, ("checkpoint", "slice_kimg"), 12.8),
    ({"resources": {"midtrain": {"gpu": "4"}}}, ("resources", "midtrain", "gpu"), 4),
    ({"row": "2024"}, ("row",), "2024"),  # a string the schema allows stays a string
    ({"trajectories": {"x_T": "noise"}}, ("trajectories", "x_T"), "noise"),
])
def test_command_line_strings_get_the_schema_types_back(section, given, expected):
    cfg = layers.assemble(DEFAULT, command_line=section, schema=SCHEMA)
    value = cfg
    for key in given:
        value = value[key]
    assert value == expected and type(value) is type(expected)


def test_a_string_that_is_no_number_is_refused_with_what_to_do():
    with pytest.raises(ConfigError) as err:
        layers.assemble(DEFAULT, command_line={"posttrain": {"q": "many"}, "seed": "x"}, schema=SCHEMA)
    message = str(err.value)
    assert "posttrain.q: got the string 'many' where the schema expects number" in message
    assert "seed: got the string 'x' where the schema expects integer" in message
    assert "--config posttrain='{\"q\": 512}'" in message and "--configfile" in message


def test_a_number_out_of_range_is_left_to_the_schema():
    cfg = layers.assemble(DEFAULT, command_line={"posttrain": {"steps": "0.5"}}, schema=SCHEMA)
    assert cfg["posttrain"]["steps"] == 0.5  # validation then says it is not a positive integer


def test_a_network_of_another_kind_replaces_the_one_below_and_an_overlay_without_kind_merges(tmp_path):
    row = write(tmp_path, "row.yaml", {"row": "r", "network": {"kind": "dit", "preset": "MF-XL/2", "num_classes": 1000},
                                       "teacher": {"network": {"kind": "dit", "preset": "MF-B/4"}}})
    smoke = write(tmp_path, "smoke.yaml", {"network": {"preset": None, "depth": 1},
                                           "teacher": {"network": {"kind": "small_unet", "channels": 8}}})
    cfg = layers.assemble(DEFAULT, [row])
    # default.yaml's U-Net settings (channels, channel_mult, num_blocks) do not leak into the DiT
    assert cfg["network"] == {"kind": "dit", "preset": "MF-XL/2", "num_classes": 1000}
    assert cfg["teacher"]["network"] == {"kind": "dit", "preset": "MF-B/4"}
    cfg = layers.assemble(DEFAULT, [row, smoke])
    assert cfg["network"] == {"kind": "dit", "preset": None, "num_classes": 1000, "depth": 1}
    assert cfg["teacher"]["network"] == {"kind": "small_unet", "channels": 8}
    # a section of the same kind merges key by key: the pixel rows' DDPM++ sections
    cifar = layers.assemble(DEFAULT, [REPO / "config" / "rows" / "cifar10-cmt-ect.yaml"])
    assert cifar["network"]["channel_mult"] == [2, 2, 2] and cifar["network"]["num_blocks"] == 4
