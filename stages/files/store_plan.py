"""Where each of a row's store items comes from, decided once when the workflow is planned: the local
store (a `<rule>_from_store` job writes the receipt from the record), the remote store (a
`<rule>_from_remote` job pulls the item, stages/files/store_remote.py) or the item's stage (the
making job). workflow/rules/store.smk asks this for every item of the row at once.

The remote is asked about the items the local store lacks, all of them in one `remote_complete`
call (a LIST per key folder and page of 1000 records, not a request per item); boto3 is imported
only when a remote is given. Only the standard library otherwise: the workflow imports this.
"""

import shlex

from stages.files import store

STORE, REMOTE, MAKE = "store", "remote", "make"


def sources(items, remote=None, remake=False):
    """{first file: STORE | REMOTE | MAKE} for `items`, lists of an item's files.

    remake: every item is made again (store_remake), so neither store is asked. remote: the remote
    store's URL, or None to ask only the local one."""
    firsts = {str(files[0]): [str(f) for f in files] for files in items}
    if remake:
        return dict.fromkeys(firsts, MAKE)
    found = {first: STORE for first, files in firsts.items() if store.complete(files)}
    missing = {first: files for first, files in firsts.items() if first not in found}
    if remote and missing:
        from stages.files import store_remote  # boto3: only with a remote

        names = {first: store_remote.item_name(files) for first, files in missing.items()}
        try:
            there = store_remote.remote_complete(remote, sorted(set(names.values())))
        except store_remote.RemoteError as e:
            raise store_remote.RemoteError(f"{e}; or plan without it: --config store_remote=") from None
        found |= {first: REMOTE for first, name in names.items() if name in there}
    return {first: found.get(first, MAKE) for first in firsts}


def rule_name(name, source):
    """The name of the rule that provides an item from `source`: `name` where its stage makes it."""
    return name if source == MAKE else f"{name}_{'from_store' if source == STORE else 'from_remote'}"


def wrapper_options(source, remake=False, remote=None, push=False):
    """What follows --mode in the store wrapper's command (stages/files/store.py) for an item from
    `source`: its mode, with `--remote` for a pull, and `--push` for an item made here if `push`."""
    if source == REMOTE and not remake:
        return f"pull --remote {shlex.quote(remote)}"
    mode = "remake" if remake else "reuse" if source == STORE else "make"
    return f"{mode} --push --remote {shlex.quote(remote)}" if push and mode != "reuse" else mode


def shard_pattern(shard_sources, source):
    """The wildcard_constraints of the shards (`{shard id: source}`) that come from `source`: any
    6-digit id where every shard does (the common case: a regex of 2,400 alternatives, matched
    against each of 2,400 outputs, costs seconds of planning), else an alternation of their ids,
    or nothing."""
    if all(s == source for s in shard_sources.values()):
        return r"\d{6}"
    return "|".join(k for k, s in shard_sources.items() if s == source) or "(?!)"
