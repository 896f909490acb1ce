"""The store command: see, check, tidy and share the store (docs/store.md).

    cmt-store ls [--items] [--json] [--no-rows] [--check-remote] [PATTERN ...]
    cmt-store du [PATTERN ...]
    cmt-store verify [--sample N [--seed S]] [PATTERN ...]
    cmt-store gc [--unreferenced] [--unused-since DATE] [--grace DAYS] [--yes]
    cmt-store push [PATTERN ...]
    cmt-store pull PATTERN ...

(`python -m stages.tools.store` is the same.) A PATTERN names items by key, key folder
(`digits-5d68169647a2cf80`), item name (`trajectories/<key>/shard-000001.tar`) or a prefix of it
(`teachers/`). Every command takes --store (default: the config's `store`), --remote (default:
the config's `store_remote`) and --configfile FILES (a row, as given to snakemake; repeat it for
several rows: the first one also sets the defaults of --store and --remote).

Which rows use an item: the rows of config/rows/ (the top level and variants/) and each
--configfile given (with --given-only, those alone), their keys from stages/config/store_keys.py.
gc's rule, which never takes an item from under a job that may read it, is stated in
stages/files/store_items.py.

This is the people's side of the store. The rules call the wrapper, `python -m stages.files.store
--files ... --key ... --receipt ... --mode ... -- <stage>`, which stays where it is: it is imported
by the Snakefile (standard library only), while this command needs the rows (the config layer)
and boto3.
"""

import argparse
import json
import sys
import time
from collections import defaultdict
from datetime import timedelta
from pathlib import Path

from stages import config as project_config
from stages.config import store_refs
from stages.files import store, store_items
from stages.files.store_items import COMPLETE, human


def settings(a):
    """--store and --remote, from the command line or the config of the first --configfile."""
    if a.store is None or a.remote is None:
        cfg = project_config.resolve(a.configfile[0] if a.configfile else ())
        a.store = a.store or cfg["store"]
        a.remote = a.remote or cfg.get("store_remote")
    return a


def given_rows(a):
    rows = {} if a.given_only else store_refs.rows()
    for files in a.configfile:
        rows[" + ".join(Path(f).stem for f in files)] = [Path(f) for f in files]
    return rows


def remote(a):
    if not a.remote:
        raise SystemExit("no remote store: give --remote s3://bucket/prefix or set store_remote in the config")
    from stages.files import store_remote

    return store_remote.Remote(a.remote)


def table(rows, header):
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    for r in [header, *rows]:
        print("  ".join(str(c).ljust(w) for c, w in zip(r, widths, strict=True)).rstrip())


def when(t):
    return t.strftime("%Y-%m-%d %H:%M") if t else "-"


def span(times):
    times = sorted(t for t in times if t)
    if not times:
        return "-"
    first, last = times[0].strftime("%Y-%m-%d"), times[-1].strftime("%Y-%m-%d")
    return first if first == last else f"{first}..{last}"


# ---- ls, du --------------------------------------------------------------------------------

def cmd_ls(a):
    items = store_items.select(store_items.scan(a.store), a.patterns)
    rows = {} if a.no_rows or not items else store_refs.rows_store_keys(given_rows(a))
    using = store_items.referencing(items, rows)
    in_remote = set()
    if a.check_remote:
        in_remote = remote(a).complete([i.name for i in items if i.status == COMPLETE])
    if a.json:
        print(json.dumps([{
            "name": i.name, "kind": i.kind, "key": i.key, "status": i.status, "note": i.note, "bytes": i.bytes,
            "files": (i.record or {}).get("files") or [{"name": Path(f).name} for f in i.files],
            "made": i.made, "pulled": (i.record or {}).get("pulled"),
            "last_use": when(i.last_use()), "rows": using[i.name],
            **({"in_remote": i.name in in_remote} if a.check_remote else {})} for i in items], indent=2))
        return 0
    header = ["KIND", "KEY", "STATUS", "ITEMS", "SIZE", "MADE BY", "MADE (UTC)", "LAST USE", "ENVIRONMENT", "ROWS"]
    if a.check_remote:
        header.append("IN REMOTE")
    lines = []
    groups = defaultdict(list)
    for i in items:
        groups[(i.kind, i.folder, i.status) if not a.items else (i.name,)].append(i)
    for group in groups.values():
        first = group[0]
        made_by = sorted({i.made.get("by", "?") for i in group if i.record})
        envs = sorted({store_items.env_summary(i.made) for i in group if i.record} - {""}, key=lambda e: (-len(e), e))
        uses = [i.last_use() for i in group]
        line = [first.kind, first.key if not a.items else first.name, first.status, len(group),
                human(sum(i.bytes for i in group)),
                (made_by[0] + (f" (+{len(made_by) - 1})" if len(made_by) > 1 else "")) if made_by else "-",
                span(store_items.parse_time(i.made["at"]) for i in group if i.made.get("at")),
                span([max((u for u in uses if u), default=None)]),
                (envs[0] + (f" (+{len(envs) - 1})" if len(envs) > 1 else "")) if envs else "-",
                ", ".join(sorted({r for i in group for r in using[i.name]})) or "-"]
        if a.check_remote:
            line.append(f"{sum(i.name in in_remote for i in group)}/{len(group)}" if first.status == COMPLETE else "-")
        lines.append(line)
    table(lines, header)
    for i in items:
        if i.status != COMPLETE and i.note:
            print(f"{i.name}: {i.status}: {i.note}")
    if rows:
        print(f"rows: {', '.join(rows)}")
    return 0


def cmd_du(a):
    items = store_items.select(store_items.scan(a.store), a.patterns)
    by_kind, by_key = defaultdict(int), defaultdict(int)
    for i in items:
        by_kind[i.kind] += i.bytes
        by_key[(i.kind, i.key, i.status)] += i.bytes
    lines = []
    for kind in sorted(by_kind):
        lines.append([kind, "", "", human(by_kind[kind])])
        for (k, key, status), n in sorted(by_key.items(), key=lambda kv: -kv[1]):
            if k == kind:
                lines.append(["", key, status, human(n)])
    lines.append(["total", "", "", human(sum(by_kind.values()))])
    table(lines, ["KIND", "KEY", "STATUS", "SIZE"])
    return 0


# ---- verify --------------------------------------------------------------------------------

def cmd_verify(a):
    items = [i for i in store_items.select(store_items.scan(a.store), a.patterns) if i.status == COMPLETE]
    if a.sample:
        items = store_items.sample(items, a.sample, a.seed)
    t0, damaged, busy, done = time.monotonic(), [], [], 0
    for item in items:
        try:
            problems = store_items.verify(item)
        except store.ItemBusy as e:
            busy.append(f"{item.name}: not verified, being made ({e})")
            continue
        done += item.bytes
        if problems:
            damaged.append(item)
            print(f"DAMAGED {item.name}:\n  " + "\n  ".join(problems)
                  + f"\n  remake it {store_items.remake_hint(item)}")
    for line in busy:
        print(line)
    print(f"verified {len(items) - len(busy)} items ({human(done)}) in {time.monotonic() - t0:.1f} s: "
          f"{len(damaged)} damaged, {len(busy)} being made")
    return 1 if damaged else 0


# ---- gc ------------------------------------------------------------------------------------

def cmd_gc(a):
    unused_before = None
    if a.unused_since:
        unused_before = store_items.parse_time(a.unused_since)
    referenced = None
    if a.unreferenced or unused_before is None:
        rows = store_refs.rows_store_keys(given_rows(a))
        referenced = set().union(*rows.values()) if rows else set()
        print(f"rows: {', '.join(rows) or '(none)'}")
    items = store_items.scan(a.store)
    skipped = [i for i in items if i.status != COMPLETE]
    decisions = store_items.plan_gc(items, referenced=referenced, unused_before=unused_before,
                                    grace=timedelta(days=a.grace))
    freed = 0
    for d in decisions:
        if not d.remove:
            print(f"keep    {d.item.name}: {d.reason}")
        elif not a.yes:
            print(f"remove  {d.item.name} ({human(d.item.bytes)}): {d.reason}")
            freed += d.item.bytes
        else:
            outcome = store_items.remove(d.item)
            print(f"{outcome:<7} {d.item.name} ({human(d.item.bytes)}): {d.reason}")
            freed += d.item.bytes if outcome == "removed" else 0
    if skipped:
        print(f"{len(skipped)} items not complete (being made, or left by a job that died) are never removed")
    print(f"{'removed' if a.yes else 'would remove'} {human(freed)}"
          + ("" if a.yes else " (a dry run: add --yes to remove)"))
    return 0


# ---- push, pull ----------------------------------------------------------------------------

def cmd_push(a):
    r = remote(a)
    items = [i for i in store_items.select(store_items.scan(a.store), a.patterns) if i.status == COMPLETE]
    failed = 0
    for _files, outcome in r.push_many([i.files for i in items]):
        failed += isinstance(outcome, Exception)
        print(outcome)
    print(f"{len(items)} items to {r.url}: {failed} failed")
    return 1 if failed else 0


def cmd_pull(a):
    from stages.files import store_remote

    r = remote(a)

    def folder_named(kind_folder):
        folder = kind_folder.split("/")[1]
        return any(p in (folder, folder.rsplit("-", 1)[-1]) or kind_folder.startswith(p.rstrip("/"))
                   or p.startswith(kind_folder + "/") for p in a.patterns)

    names = sorted(n for n in r.items(folder_named)
                   if any(not p.startswith(n.rsplit("/", 1)[0] + "/") or n.startswith(p) for p in a.patterns))
    if not names:
        raise SystemExit(f"{r.url}: no complete item matches {' '.join(a.patterns)}")
    failed = 0
    for name in names:
        try:
            record = r.record(name)
            files = [Path(a.store, name).with_name(e["name"]) for e in record["files"]]
            with store.ItemLock(files):
                mine = store.read_record(files)
                if mine and [e["sha256"] for e in mine["files"]] == [e["sha256"] for e in record["files"]]:
                    print(f"{name}: here already")
                    continue
                r.pull(files, record)
        except store_remote.RemoteError as e:
            failed += 1
            print(e)
            continue
        print(f"pulled {name}" + (f" (replacing the local copy made by {mine['made']['by']})" if mine else ""))
    print(f"{len(names)} items from {r.url}: {failed} failed")
    return 1 if failed else 0


def main(argv=None):
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--store", default=None, help="the store folder (default: the config's `store`)")
    common.add_argument("--remote", default=None, help="s3://bucket/prefix (default: the config's `store_remote`)")
    common.add_argument("--configfile", nargs="+", action="append", default=[], metavar="FILE",
                        help="a row's config files, as given to snakemake; repeat for several rows")
    common.add_argument("--given-only", action="store_true", help="the rows given, not those of config/rows/")
    p = argparse.ArgumentParser(prog="cmt-store", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="command", required=True)
    ls = sub.add_parser("ls", parents=[common],
                        help="every item: kind, key, size, who made it, when, which rows use it")
    ls.add_argument("--items", action="store_true", help="one line per item (default: one per key and status)")
    ls.add_argument("--json", action="store_true")
    ls.add_argument("--no-rows", action="store_true", help="leave out which rows use each item")
    ls.add_argument("--check-remote", action="store_true", help="count the items complete in the remote")
    ls.add_argument("patterns", nargs="*")
    du = sub.add_parser("du", parents=[common], help="sizes by kind and key")
    du.add_argument("patterns", nargs="*")
    ve = sub.add_parser("verify", parents=[common], help="rehash items against their records")
    ve.add_argument("--sample", type=int, default=0, help="a random sample of this many items")
    ve.add_argument("--seed", type=int, default=None)
    ve.add_argument("patterns", nargs="*")
    gc = sub.add_parser("gc", parents=[common], help="list (or with --yes remove) what no row uses or nobody used")
    gc.add_argument("--unreferenced", action="store_true",
                    help="items no given row uses (the default without --unused-since; with it, both must hold)")
    gc.add_argument("--unused-since", metavar="DATE", help="items last used before DATE (ISO, e.g. 2026-10-01)")
    gc.add_argument("--grace", type=float, default=store_items.GRACE.days,
                    help="days after its last use during which an item is never removed (default %(default)s)")
    gc.add_argument("--yes", action="store_true", help="remove them (default: list them)")
    pu = sub.add_parser("push", parents=[common], help="upload complete items to the remote")
    pu.add_argument("patterns", nargs="*")
    pl = sub.add_parser("pull", parents=[common], help="download items from the remote, checked against their records")
    pl.add_argument("patterns", nargs="+")
    a = settings(p.parse_args(argv))
    command = {"ls": cmd_ls, "du": cmd_du, "verify": cmd_verify, "gc": cmd_gc, "push": cmd_push, "pull": cmd_pull}
    try:
        return command[a.command](a)
    except FileNotFoundError as e:
        raise SystemExit(str(e)) from None
    except Exception as e:
        from stages.files import store_remote

        if isinstance(e, store_remote.RemoteError):
            raise SystemExit(str(e)) from None
        raise


if __name__ == "__main__":
    sys.exit(main())
