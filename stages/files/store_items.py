"""What a store holds, item by item, for the store command (stages/tools/store.py): listing, sizes,
rehashing against the records, and removal under the rule that keeps an item a job may still read.

A store is `<store>/<kind>/<folder>/<file>` (kinds: datasets, teachers, trajectories, latents); an
item is the files its record names (stages/files/store.py). Files in a folder that no record
claims are listed as `unrecorded` (an item being made, or one whose job died before its record);
a teacher's training state `teachers/<key>-state/` as `training state`.

The removal rule (gc). Training jobs read store files without taking their lock, for as long as
they train, and a resumed job notes no new use. An item is removed only if all of these hold:

1. it meets what was asked: no given row references its key, and/or it was last used before a date;
2. its last use (the latest of its use log's entries, its record's `made.at` and `pulled.at`) lies
   outside the grace period (default 30 days; it must outlast the longest training that reads the
   item, resumes included);
3. no workdir in its use log has a Snakemake run in progress (a lock under `.snakemake/locks/`, as
   far as this host sees that folder);
4. its lock is free (nobody makes or remakes it); the removal holds it.

Under the lock the record goes first, so a planner sees the item incomplete and a `reuse` job stops;
then the use log is read again, and if a use was noted since the decision the record is put back
and the item kept (a receipt notes its use before it reads the record again: one of the two sees
the other). Only then go the files, the use log, the lock file (a lock taken on a removed lock file
is let go: store.ItemLock) and the folder if empty; a teacher's training state goes with it.
Incomplete items are never removed: the next job that needs one makes or adopts it.

Only the standard library: the workflow may import this.
"""

import json
import random
import shutil
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from pathlib import Path

from stages.files import atomic, store

GRACE = timedelta(days=30)
COMPLETE, INCOMPLETE, UNRECORDED, STATE = "complete", "incomplete", "unrecorded", "training state"
# Files a stage writes beside an item that its record does not name: a teacher's training log
# (stages/training/metrics.py), written after teachers were recorded without it, so no record may
# require it. They are no item of their own, go when the last item of their folder goes, and stay
# out of the remote store.
COMPANIONS = ("metrics.jsonl",)


@dataclass
class Item:
    files: list
    record: dict | None
    status: str
    note: str = ""
    uses: dict = field(default_factory=dict)

    @property
    def first(self):
        return Path(self.files[0])

    @property
    def parts(self):
        """(kind, folder, file); a training state folder's file is ''."""
        return (*self.first.parts[-2:], "") if self.status == STATE else self.first.parts[-3:]

    @property
    def name(self):
        return "/".join(self.parts)

    @property
    def kind(self):
        return self.parts[0]

    @property
    def folder(self):
        return self.parts[1]

    @property
    def key(self):
        if self.record and isinstance(self.record.get("key"), str):
            return self.record["key"]
        return self.folder.removesuffix("-state").rsplit("-", 1)[-1]

    @property
    def bytes(self):
        if self.status == COMPLETE:
            return sum(e["bytes"] for e in self.record["files"])
        if self.status == STATE:
            return sum(p.stat().st_size for p in self.first.rglob("*") if p.is_file())
        return sum(Path(f).stat().st_size for f in self.files if Path(f).exists())

    @property
    def made(self):
        return (self.record or {}).get("made", {})

    def last_use(self):
        return last_use(self.record or {}, self.uses)


def parse_time(text):
    """An ISO time from a record or use log (UTC if it names no zone)."""
    t = datetime.fromisoformat(text)
    return t if t.tzinfo else t.replace(tzinfo=timezone.utc)


def last_use(record, uses):
    times = [u["at"] for u in uses.values() if isinstance(u, dict) and u.get("at")]
    times += [record.get(k, {}).get("at") for k in ("made", "pulled") if record.get(k, {}).get("at")]
    return max((parse_time(t) for t in times), default=None)


def read_item(record_file):
    """The item whose record is `record_file`."""
    first = record_file.with_name(record_file.name[:-len(".record.json")])
    try:
        record = json.loads(record_file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError):
        return Item([first], None, INCOMPLETE, f"{record_file}: not JSON")
    found = record.get("format") if isinstance(record, dict) else None
    if found != store.RECORD_FORMAT:
        return Item([first], None, INCOMPLETE, f"{record_file}: format {found!r}, expected {store.RECORD_FORMAT!r}")
    try:
        files = [first.with_name(e["name"]) for e in record["files"]]
    except (KeyError, TypeError, ValueError):
        return Item([first], None, INCOMPLETE, f"{record_file}: names no files")
    uses = store.read_uses(files)
    if store.read_record(files) is None:
        gone = [f.name for f, e in zip(files, record["files"], strict=True)
                if not f.exists() or f.stat().st_size != e["bytes"]]
        return Item(files, record, INCOMPLETE, f"missing or not the recorded size: {', '.join(gone)}", uses)
    return Item(files, record, COMPLETE, uses=uses)


def scan(root):
    """Every item of the store at `root`, in path order."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"{root}: no store there (the config's `store`, or --store)")
    items = []
    for kind in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")):
        for folder in sorted(p for p in kind.iterdir() if p.is_dir() and not p.name.startswith(".")):
            if folder.name.endswith("-state"):
                items.append(Item([folder], None, STATE, "a teacher's resumable training state"))
                continue
            claimed = set()
            for record_file in sorted(folder.glob("*.record.json")):
                item = read_item(record_file)
                items.append(item)
                claimed |= {Path(f).name for f in item.files}
            for f in sorted(folder.iterdir()):
                if (f.is_file() and not f.name.startswith(".") and f.name not in claimed
                        and not (claimed and f.name in COMPANIONS)
                        and not f.name.endswith((".record.json", ".uses.json"))):
                    items.append(Item([f], None, UNRECORDED, "no record: being made, or its job died before "
                                      "recording it (the next job that needs it makes or adopts it)",
                                      store.read_uses([f])))
    return items


def select(items, patterns):
    """The items that a pattern names: its key, its folder, or a prefix of its name or file name."""
    if not patterns:
        return list(items)
    return [i for i in items if any(p in (i.key, i.folder) or i.name.startswith(p.rstrip("/"))
                                    or i.parts[2].startswith(p) for p in patterns)]


def sample(items, count, seed=None):
    return sorted(random.Random(seed).sample(list(items), min(count, len(items))), key=lambda i: i.name)


# ---- verify ----------------------------------------------------------------------------------

def verify(item):
    """Rehash a complete item against its record, under its lock (a remake in progress is not
    mistaken for damage). Returns the problems found, [] if none; raises store.ItemBusy."""
    with store.ItemLock(item.files, wait=False):
        try:
            record = json.loads(store.record_path(item.files).read_text())
        except FileNotFoundError:
            return ["its record is gone (the item is being remade or was removed)"]
        problems = []
        for f, entry in zip(map(Path, item.files), record["files"], strict=True):
            if not f.exists():
                problems.append(f"{f}: missing")
            elif f.stat().st_size != entry["bytes"]:
                problems.append(f"{f}: {f.stat().st_size} bytes, the record says {entry['bytes']}")
            elif (sha := atomic.sha256_file(f)) != entry["sha256"]:
                problems.append(f"{f}: sha256 {sha[:12]}..., the record says {entry['sha256'][:12]}...")
        return problems


def receipt_pattern(item):
    """The receipt a workdir keeps for this item (workflow/rules/*.smk), with <row> for the row."""
    receipts = "results/<row>/receipts"
    stem = item.first.name.removesuffix(".tar").removeprefix("shard-")
    if item.kind == "datasets":
        return f"{receipts}/dataset.json"
    if item.kind == "teachers":
        return f"{receipts}/teacher.json"  # guide.json, ecd-teacher.json for an imported guide or ECD teacher
    if item.kind == "trajectories":
        if item.first.name == "spec.json":
            return f"{receipts}/trajectory-spec.json"
        return f"{receipts}/shards/{stem}.json"
    if item.kind == "latents":
        return f"{receipts}/latents/{stem}.json"
    return f"{receipts}/<receipt of {item.name}>"


def remake_hint(item):
    """The command that makes a damaged item again: in a workdir whose receipt for it exists (its
    use log names them), else the pattern for any workdir of a row that uses it."""
    for workdir, use in sorted(item.uses.items(), key=lambda kv: kv[1].get("at", ""), reverse=True):
        receipt = use.get("receipt") or ""
        if receipt and (Path(workdir) / receipt).exists():
            return f"in {workdir}: {store.remake_command(receipt)}"
    return (f"in the workdir of a row that uses it (the --configfile of that row): "
            f"{store.remake_command(receipt_pattern(item))}")


# ---- gc --------------------------------------------------------------------------------------

@dataclass
class Decision:
    item: Item
    remove: bool
    reason: str


def running_workdirs(uses):
    """Workdirs in a use log with a Snakemake run in progress (their .snakemake/locks/ holds locks)."""
    locks = {w: Path(w, ".snakemake", "locks") for w in uses}
    return [w for w, folder in locks.items() if folder.is_dir() and any(folder.iterdir())]


def plan_gc(items, *, referenced=None, unused_before=None, grace=GRACE, now=None):
    """What gc would do with each complete item that meets the criteria: `referenced` (the keys the
    given rows use; None: not a criterion), `unused_before` (a time; None: not a criterion)."""
    now = now or datetime.now(timezone.utc)
    decisions = []
    for item in items:
        if item.status != COMPLETE:
            continue
        last = item.last_use()
        why = []
        if referenced is not None:
            if item.key in referenced:
                continue
            why.append("no given row uses it")
        if unused_before is not None:
            if last is not None and last >= unused_before:
                continue
            why.append(f"unused since {last:%Y-%m-%d}" if last else "no use recorded")
        if last is not None and last > now - grace:
            decisions.append(Decision(item, False, f"{'; '.join(why)}, but used {last:%Y-%m-%d %H:%M} UTC, within the "
                                                   f"grace period of {grace / timedelta(days=1):g} days"))
        elif running := running_workdirs(item.uses):
            decisions.append(Decision(item, False, f"{'; '.join(why)}, but a Snakemake run is in progress in "
                                                   f"{', '.join(running)}, which used it"))
        else:
            decisions.append(Decision(item, True, "; ".join(why)))
    return decisions


def remove(item):
    """Remove a complete item under its lock (the module docstring's order). Returns what happened."""
    files = [Path(f) for f in item.files]
    try:
        lock = store.ItemLock(files, wait=False).__enter__()
    except store.ItemBusy as e:
        return f"kept: being made or remade ({e})"
    try:
        record_file = store.record_path(files)
        try:
            saved = record_file.read_bytes()
        except FileNotFoundError:
            return "kept: no longer complete"
        record_file.unlink()
        if store.read_uses(files) != item.uses:
            atomic.write_bytes(record_file, saved)
            return "kept: used while being removed"
        for f in files + [store.uses_path(files), store.env_path(files), store.remaking_path(files)]:
            f.unlink(missing_ok=True)
        store.remove_leftovers(files)
        if not any(files[0].parent.glob("*.record.json")):
            for name in COMPANIONS:
                (files[0].parent / name).unlink(missing_ok=True)
        if item.kind == "teachers":
            shutil.rmtree(files[0].parent.with_name(files[0].parent.name + "-state"), ignore_errors=True)
        lock.path.unlink(missing_ok=True)
    finally:
        lock.__exit__(None, None, None)
    try:
        files[0].parent.rmdir()
    except OSError:
        pass  # other items, or a maker's new lock file
    return "removed"


def referencing(items, rows_keys):
    """{item name: [rows]} from {row: set of keys}."""
    return {i.name: sorted(r for r, keys in rows_keys.items() if i.key in keys) for i in items}


def human(n):
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if n < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000


def env_summary(made):
    env = made.get("env") or {}
    gpus = env.get("gpus")
    device = f"{gpus[0]}{f' x{len(gpus)}' if len(gpus) > 1 else ''}" if gpus else env.get("device", "")
    parts = [f"torch {env['torch']}" if env.get("torch") else "", f"cuda {env['cuda']}" if env.get("cuda") else "",
             device]
    return " ".join(p for p in parts if p)

