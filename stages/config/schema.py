"""The config schema (workflow/schemas/config.schema.yaml) as a dict, and how to walk it beside a
config: the nodes a node pulls in through `$ref` and `allOf`, the node of a key or of a list's
items, the keys an object takes. Reading command-line strings back as numbers (layers.py) and
naming the nearest valid key in an error (errors.py) both walk it this way."""

from pathlib import Path

import yaml

# libyaml's parser where PyYAML has it (ten times faster; Snakemake parses every file once more)
LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


def load_schema(path):
    return yaml.load(Path(path).read_text(), Loader=LOADER)


def nodes(node, root):
    """A schema node and the nodes it pulls in through $ref / allOf (their properties apply too)."""
    out = [node]
    ref = node.get("$ref")
    if ref is not None:
        if not ref.startswith("#/"):
            raise ValueError(f"schema: only local references are supported, got {ref!r}")
        target = root
        for part in ref[2:].split("/"):
            target = target[part]
        out += nodes(target, root)
    for sub in node.get("allOf", []):
        out += nodes(sub, root)
    return out


def child(node, key, root):
    """The node of `key` in an object of schema `node`, or None where the schema does not know it."""
    found = nodes(node, root)
    for n in found:
        if key in n.get("properties", {}):
            return n["properties"][key]
    for n in found:
        if isinstance(n.get("additionalProperties"), dict):
            return n["additionalProperties"]
    return None


def items(node, root):
    for n in nodes(node, root):
        if isinstance(n.get("items"), dict):
            return n["items"]
    return None


def keys(node, root):
    """The keys an object of schema `node` names (its properties and those it pulls in), in schema order."""
    out = {}
    for n in nodes(node, root):
        out.update(dict.fromkeys(n.get("properties", {})))
    return list(out)
