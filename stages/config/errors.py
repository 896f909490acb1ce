"""What a config's faults against its schema read like: one line each, the key first (a dotted
path), then what is wrong, the nearest valid key or value where it looks like a typo, and the file
(or --config) that set it:

    posttrian: unknown key; did you mean posttrain? (from --config)
    posttrain.q: 1 must be above 1 (from config/rows/cifar10-cmt-ect.yaml)
    trajectories.x_T: 'prior' is not one of noise, data_plus_noise

`describe` turns one jsonschema ValidationError into (path, text) faults, `report` joins them into
the message of a ConfigError. Nothing of the schema or the config is dumped: a reader sees the
key to change and how, as in checks.py."""

import difflib
import json
import os
from pathlib import Path

from jsonschema.exceptions import best_match

from stages.config.schema import keys

SCHEMA_FILE = "workflow/schemas/config.schema.yaml"
# An unknown key with no near neighbour: list the section's keys when they fit on a line.
MAX_KEYS_LISTED = 12
TYPE_NAMES = {"integer": "an integer", "number": "a number", "string": "a string", "boolean": "true or false",
              "null": "null", "array": "a list", "object": "a mapping of keys"}


def dotted(path):
    """('posttrain', 'snapshots', 1) -> 'posttrain.snapshots[1]'."""
    out = ""
    for part in path:
        out += f"[{part}]" if isinstance(part, int) else f".{part}" if out else str(part)
    return out or "the config"


def shown(value, limit=60):
    """A value as a message quotes it: YAML's words for booleans and null, on one short line."""
    if isinstance(value, str):
        text = f"the string {value!r}"
    elif isinstance(value, dict):
        text = f"a mapping (keys {', '.join(map(str, value))})"
    else:
        text = json.dumps(value, default=str)
    return shortened(text, limit)


def quoted(value, limit=60):
    """A value where the sentence says what it should be: strings in quotes, nothing more."""
    return shortened(repr(value), limit) if isinstance(value, str) else shown(value, limit)


def shortened(text, limit):
    return text if len(text) <= limit else text[:limit - 3] + "..."


def nearest(word, choices):
    """The choice `word` looks like a typo of, or None."""
    found = difflib.get_close_matches(str(word), [str(c) for c in choices], n=1)
    return found[0] if found else None


def unknown_key(key, valid):
    near = nearest(key, valid)
    if near is not None:
        return f"unknown key; did you mean {near}?"
    if len(valid) <= MAX_KEYS_LISTED:
        return f"unknown key; this section takes {', '.join(valid)}"
    return f"unknown key; {SCHEMA_FILE} lists the keys this section takes"


def one_of(values):
    return ", ".join(v if isinstance(v, str) else json.dumps(v) for v in values)


def condition(error, root):
    """' when teacher.source is import' where a `then` (' unless ...' for an `else`) asked for the key."""
    owner, branch = _owner_of(error.schema, root)
    if owner is None:
        return ""
    path = tuple(error.absolute_path)
    said = [f"{dotted((*path, key))} is {sub['const']}" for key, sub in owner["if"].get("properties", {}).items()
            if isinstance(sub, dict) and "const" in sub]
    if not said:
        return ""
    return f" {'when' if branch == 'then' else 'unless'} {' and '.join(said)}"


def _owner_of(node, tree):
    """The schema object whose `then` or `else` is `node` (by identity), and which of the two."""
    if isinstance(tree, dict):
        for branch in ("then", "else"):
            if tree.get(branch) is node and isinstance(tree.get("if"), dict):
                return tree, branch
        children = tree.values()
    elif isinstance(tree, list):
        children = tree
    else:
        return None, None
    for sub in children:
        found = _owner_of(node, sub)
        if found[0] is not None:
            return found
    return None, None


def describe(error, root):
    """[(path, text)] for one jsonschema ValidationError of a config against schema `root`."""
    path = tuple(error.absolute_path)
    kind, bound, value = error.validator, error.validator_value, error.instance
    if "propertyNames" in error.relative_schema_path:  # the key itself broke the rule
        if kind == "enum":
            return [((*path, value), unknown_key(value, [str(v) for v in bound]))]
        return [((*path, value), f"not a key this section takes ({kind}: {shown(bound)})")]
    if kind in ("additionalProperties", "unevaluatedProperties") and bound is False:
        valid = keys(error.schema, root)
        # additionalProperties sees the node's own properties only; unevaluatedProperties those it pulls in
        own = error.schema.get("properties", {}) if kind == "additionalProperties" else valid
        extra = [key for key in value if key not in own]
        if extra:
            return [((*path, key), unknown_key(key, valid)) for key in extra]
    if kind == "type":
        wanted = [bound] if isinstance(bound, str) else bound
        return [(path, f"expected {' or '.join(TYPE_NAMES.get(t, t) for t in wanted)}, got {shown(value)}")]
    if kind == "enum":
        near = nearest(value, [v for v in bound if isinstance(v, str)]) if isinstance(value, str) else None
        hint = f"; did you mean {near}?" if near is not None else ""
        return [(path, f"{quoted(value)} is not one of {one_of(bound)}{hint}")]
    if kind == "const":
        return [(path, f"must be {json.dumps(bound)}, got {shown(value)}")]
    if kind == "required":
        why = condition(error, root)
        return [((*path, key), f"required key missing{why}") for key in bound if key not in value]
    bounds = {"minimum": "is below the minimum", "exclusiveMinimum": "must be above",
              "maximum": "is above the maximum", "exclusiveMaximum": "must be below"}
    if kind in bounds:
        return [(path, f"{shown(value)} {bounds[kind]} {bound}")]
    if kind == "pattern":
        return [(path, f"{quoted(value)} does not match the pattern {bound}")]
    if kind in ("minItems", "maxItems"):
        most = "least" if kind == "minItems" else "most"
        return [(path, f"needs at {most} {bound} item{'s' * (bound != 1)}, got {len(value)}")]
    if kind == "uniqueItems":
        return [(path, f"lists an item twice: {shown(value)}")]
    if kind in ("oneOf", "anyOf") and error.context:
        best = best_match([error])
        if best is not error:
            return describe(best, root)
    return [(path, f"{shown(value)} breaks the schema's {kind} rule ({shown(bound)})")]


def origin(path, sources):
    """Where the key at `path` was set last: the label of the last of `sources` ([(label, mapping)],
    in merge order) that holds it, or None. A list is set whole, so an item's origin is its list's."""
    keys_only = []
    for part in path:
        if isinstance(part, int):
            break
        keys_only.append(part)
    for name, layer in reversed(sources):
        node = layer
        for key in keys_only:
            if not isinstance(node, dict) or key not in node:
                break
            node = node[key]
        else:
            return name
    return None


def label(source):
    """A layer as a message names it: '--config', or its file, relative where it lies below the working directory."""
    if not isinstance(source, Path):
        return str(source)
    relative = os.path.relpath(source)
    return str(source) if relative.startswith("..") else relative


def report(faults, sources=()):
    """The ConfigError message for [(path, text)]: each fault once, sorted by key, with where it was set."""
    lines = []
    for path, text in sorted(dict.fromkeys(faults), key=lambda fault: dotted(fault[0])):
        where = origin(path, sources)
        lines.append(f"{dotted(path)}: {text}" + (f" (from {label(where)})" if where is not None else ""))
    return "invalid configuration:\n  " + "\n  ".join(lines)
