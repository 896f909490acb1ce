"""How the workflow assembles its configuration (the Snakefile calls `assemble`; config/README.md
says the same for users):

1. `config/default.yaml`;
2. each `--configfile` in the order given, each with the files it `extends` beneath it
   (`extends: base/pixel-ect.yaml`, a path relative to the extending file);
3. `--config` from the command line on top.

Every layer is merged into the one below it key by key (dicts recursively, anything else,
lists included, replaced), as Snakemake merges its own config files: an empty dict changes
nothing. One exception: a `network` section (the row's or teacher.network) that names another
`kind` than the one below it replaces it whole (no U-Net setting leaks into a DiT or EDM2 preset).
A layer's `row` may name the row below it as `{row}` (`row: "{row}-smoke"`), so one
overlay serves every row. Then strings the schema does not allow where it expects a number,
boolean or null are read as YAML (Snakemake reads every nested `--config` value as a string),
and the `baseline` section is filled in from `posttrain` (a row writes only what differs); the
post-training snapshots are sorted. `validate_with_defaults` then checks the result against the
schema and fills in its defaults, naming every fault on a line of its own (errors.py).
Only stdlib, PyYAML and jsonschema: the Snakefile imports this before any job starts.
"""

import copy
import json
from pathlib import Path

import yaml

from stages.config import errors
from stages.config.checks import ConfigError
from stages.config.schema import LOADER, child, items, load_schema, nodes  # noqa: F401 (callers use layers.load_schema)

# Sections of posttrain that belong to the row, not to one ECT run: the baseline keeps them.
ROW_LEVEL_POSTTRAIN_KEYS = ("inits", "snapshots")


def deep_merge(base, extra):
    """`extra` over `base`, dicts merged key by key (a new dict; neither input changes)."""
    out = copy.deepcopy(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def read_yaml(path):
    path = Path(path)
    try:
        data = yaml.load(path.read_text(), Loader=LOADER)
    except FileNotFoundError:
        raise ConfigError(f"config file {path} does not exist") from None
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML: {err}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: a config file holds a mapping of keys, not a {type(data).__name__}")
    return data


def with_bases(path, _chain=()):
    """The layers a config file stands for, each as (its file, its mapping): what it `extends`
    (recursively), then the file itself."""
    path = Path(path).resolve()
    if path in _chain:
        raise ConfigError(f"{path}: `extends` loops back to it through {' -> '.join(map(str, _chain))}")
    data = read_yaml(path)
    base = data.pop("extends", None)
    if base is None:
        return [(path, data)]
    if not isinstance(base, str):
        raise ConfigError(f"{path}: extends: {base!r} must be one path (relative to this file)")
    base_path = path.parent / base
    if not base_path.is_file():
        raise ConfigError(f"{path}: extends: {base} names no file (looked for {base_path})")
    return with_bases(base_path, (*_chain, path)) + [(path, data)]


def sources(default, configfiles=(), command_line=None):
    """Every layer of the configuration in merge order, each as (where it comes from: a file's path
    or '--config', its mapping). The arguments are assemble's."""
    out = [(Path(default), read_yaml(default))] if default is not None else []
    for path in configfiles:
        out += with_bases(path)
    if command_line:
        out.append(("--config", json.loads(json.dumps(dict(command_line)))))
    return out


def apply_layer(config, layer):
    layer = dict(layer)
    if isinstance(layer.get("row"), str) and "{row}" in layer["row"]:
        layer["row"] = layer["row"].replace("{row}", str(config.get("row", "")))
    merged = deep_merge(config, layer)
    # A network of another kind shares no settings with the one beneath it: the digits' U-Net's
    # channels, channel_mult and num_blocks must not leak into an EDM2 or DiT section that names a
    # preset. A layer that names no kind (a smoke overlay shrinking the row's network) still merges.
    for section in (merged, merged.get("teacher")):
        ours = (layer if section is merged else layer.get("teacher") or {}).get("network")
        below = (config if section is merged else config.get("teacher") or {}).get("network")
        if (isinstance(ours, dict) and isinstance(below, dict) and "kind" in ours
                and ours["kind"] != below.get("kind")):
            section["network"] = copy.deepcopy(ours)
    return merged


def expand_baseline(config):
    """`baseline` = posttrain's ECT settings under the row's `baseline` overrides, merged the same
    way as config files (so `baseline: {optimizer: {schedule: constant}}` changes the schedule
    alone). Snapshots and the list of inits stay the row's."""
    post = {k: v for k, v in config.get("posttrain", {}).items() if k not in ROW_LEVEL_POSTTRAIN_KEYS}
    overrides = config.get("baseline") or {}
    for key in ROW_LEVEL_POSTTRAIN_KEYS:
        if key in overrides:
            raise ConfigError(f"baseline.{key}: set posttrain.{key}; the baseline init shares the row's")
    config["baseline"] = deep_merge(post, overrides)
    return config


# ---- strings from the command line, read back as the types the schema expects

def _readings(text):
    """What a string could have meant: int, float, then YAML (true, null, 1.0e-4, [1, 2])."""
    out = []
    for parse in (int, float, yaml.safe_load):
        try:
            value = parse(text)
        except (ValueError, yaml.YAMLError):
            continue
        if not isinstance(value, str):
            out.append(value)
    return out


JSON_TYPES = {bool: "boolean", int: "integer", float: "number", str: "string", type(None): "null",
              list: "array", dict: "object"}


def _expected(node, root):
    types = set()
    for n in nodes(node, root):
        t = n.get("type")
        if t is not None:
            types.update([t] if isinstance(t, str) else t)
        if "enum" in n:
            types.update(JSON_TYPES[type(v)] for v in n["enum"])
    return types


def restore_types(config, schema):
    """Read strings back as the number, boolean, null or list the schema expects, in place.

    Returns messages for strings that read as nothing the schema allows where it expects no
    string at all (`posttrain.q: 'many'`); a string the schema allows is never touched."""
    from jsonschema import Draft202012Validator

    validators = {}

    def allowed(value, node):
        if id(node) not in validators:
            validators[id(node)] = Draft202012Validator({**node, "$defs": schema.get("$defs", {})})
        return validators[id(node)].is_valid(value)

    problems = []

    def walk(value, node, path):
        if node is None:  # a key the schema does not know: validation names it
            return value
        if isinstance(value, dict):
            for key in list(value):
                value[key] = walk(value[key], child(node, key, schema), f"{path}.{key}" if path else key)
            return value
        if isinstance(value, list):
            item = items(node, schema)
            return [walk(v, item, f"{path}[{i}]") for i, v in enumerate(value)]
        if not isinstance(value, str) or allowed(value, node):
            return value
        readings = _readings(value)
        for reading in readings:
            if allowed(reading, node):
                return reading
        if readings:  # a number, but out of range: validation's message names the bound
            return readings[0]
        expected = _expected(node, schema)
        if expected and "string" not in expected:
            problems.append(
                f"{path}: got the string {value!r} where the schema expects "
                f"{' or '.join(sorted(expected))}. Nested values given with --config arrive as "
                f"strings and are read back when they parse, e.g. "
                f"--config posttrain='{{\"q\": 512}}'; check the value, or set it in a --configfile")
        return value

    walk(config, schema, "")
    return problems


def validate_with_defaults(config, schema, layers=()):
    """Validate `config` against `schema`, filling in the defaults of the properties an object lacks
    (in place), as `snakemake.utils.validate` does: jsonschema's validator extended as its
    documentation suggests. The Snakefile validates with it, and tools beside the workflow (bench/)
    see the workflow's config without importing Snakemake.

    Raises ConfigError with one line for each fault (errors.py), every fault found, each naming the
    file or --config that set the key where `layers` (`sources`' list) holds it."""
    from jsonschema import Draft202012Validator, validators

    check_properties = Draft202012Validator.VALIDATORS["properties"]

    def properties_with_defaults(validator, properties, instance, node):
        if isinstance(instance, dict):
            for name, sub in properties.items():
                if "default" in sub:
                    instance.setdefault(name, copy.deepcopy(sub["default"]))
        yield from check_properties(validator, properties, instance, node)

    validator = validators.extend(Draft202012Validator, {"properties": properties_with_defaults})(schema)
    found = list(validator.iter_errors(config))  # all of them, and every default filled in on the way
    if found:
        faults = [fault for error in found for fault in errors.describe(error, schema)]
        # expand_baseline copied posttrain into baseline: a fault of posttrain's is named once, there
        copied = {(("baseline", *path[1:]), text) for path, text in faults if path[:1] == ("posttrain",)}
        faults = [fault for fault in faults if fault not in copied or errors.origin(fault[0], layers) is not None]
        raise ConfigError(errors.report(faults, layers))
    return config


def assemble(default, configfiles=(), command_line=None, schema=None):
    """The workflow's configuration before schema validation (see the module docstring).

    default: config/default.yaml (None: start empty, Snakemake's --replace-workflow-config);
    configfiles: the --configfile paths in order; command_line: the dict Snakemake parsed from
    --config; schema: the schema as a dict (types of command-line strings are restored from it).
    """
    config = {}
    for _, layer in sources(default, configfiles, command_line):
        config = apply_layer(config, layer)
    if schema is not None:
        problems = restore_types(config, schema)
        if problems:
            raise ConfigError("invalid configuration:\n  " + "\n  ".join(problems))
    return sort_snapshots(expand_baseline(config))


def sort_snapshots(config):
    """Post-training snapshots may come in any order: they are kept sorted (reordering the list reruns
    nothing), and the last is the final model's. A list that is not all numbers is left to validation."""
    for section in ("posttrain", "posttrain_mf"):
        snaps = config.get(section, {}).get("snapshots") if isinstance(config.get(section), dict) else None
        if isinstance(snaps, list) and all(isinstance(f, (int, float)) and not isinstance(f, bool) for f in snaps):
            config[section]["snapshots"] = sorted(snaps)
    return config
