"""The store: prepared datasets, teachers and trajectory shards that several workdirs (a team, several
rows) share, each under a key computed from its provenance (stages/config/store_keys.py).

Snakemake deletes a job's outputs before it reruns the job and after the job fails, whoever else
is using them; so no rule declares a store file as its output. A rule that makes store files
declares a receipt in its own workdir instead and runs its stage through this module:

    python -m stages.files.store --files F [F ...] --key KEY --receipt R --mode make -- python -m stages.X ...

An item is the files one job makes under one key (a shard; a teacher's model.safetensors and
model.json; a dataset's dataset.npz and manifest.json). Beside its first file F lie

- `F.record.json`, the record, written once every file of the item is in place: sizes, sha256,
  who made it, when, and in what environment (`made.env`: torch, CUDA, GPU model, python, host;
  stages/core/provenance.py; provenance only, no part of the key, and absent from records
  written before it was kept). An item is complete when its record exists and every file has the
  recorded size; a complete item is reused as it is, never rehashed.
- `.F.lock`, the item's lock (flock). The maker holds it while the stage runs; a second maker of
  the same item (a teammate's run, an overlapping run) waits for it, then finds the item complete
  and reuses it. The kernel drops the lock when its holder dies, however it dies; the next maker
  then makes the item (a training stage resumes from the state the dead one saved). A lock taken
  on a lock file that is no longer in place (the store command removed the item) is let go and
  taken again on the new file.
- `.F.remaking`, while a remake runs: files a failed remake leaves are made again, not adopted.
- `F.uses.json`, the use log: for each workdir that took the item (made it or wrote a receipt for
  it), when it last did and its receipt. The store command's `gc` removes nothing used within its
  grace period (stages/files/store_items.py states the rule). A user who cannot write the folder takes
  the item all the same; the log then misses that use.
- `.F.env.json`, while the stage runs: the environment the stage leaves for the record.

Files found in place without a record (a store made before records existed, or a job killed
between its stage's end and its record) are adopted: hashed once and recorded, not made again.

The receipt says what this workdir took from the store: the paths, sizes and sha256 (from the
record), the key, and who made the item. Downstream rules take receipts as inputs, so a teammate's
newer copy of a store file never makes this workdir's results stale, and store files are never
Snakemake's to delete.

Modes: `make` (reuse the item if complete, else make it under the lock), `reuse` (the item was
complete when the workflow was planned: only write the receipt; fail if it no longer is), `remake`
(make it again under the lock even if complete, replacing the files atomically: the one way to
regenerate a damaged or wrong store file, see remake_command), `pull` (the item was complete in the
remote store `--remote` when the workflow was planned: unless the local store has it by now, download
its files and record under the lock, each file checked against the record's sha256;
stages/files/store_remote.py). With `--push`, an item this job made is then uploaded to `--remote`.

A use is noted before the record is read again: the store command removes an item's record before
it reads the use log again and deletes the files, so of a receipt and a removal that overlap, one
sees the other (the receipt finds no record and the item is made; or the removal finds the use and
puts the record back).

Signals: the stage runs in this process's process group and gets the signals that SLURM, Snakemake
and terminals send to the job's processes; this process outlives it (it notes such signals and
waits), releases the lock when the stage has exited, and never records an item whose stage failed.
"""

import argparse
import fcntl
import getpass
import json
import os
import signal
import socket
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

from stages.core import provenance
from stages.files import atomic

RECORD_FORMAT = "cmt-store-record/1"
RECEIPT_FORMAT = "cmt-store-receipt/1"
USES_FORMAT = "cmt-store-uses/1"


def beside(files, name):
    """The file `name` (a format of the item's first file's name) beside an item's first file."""
    first = Path(files[0])
    return first.with_name(name.format(first.name))


def record_path(files):
    return beside(files, "{}.record.json")


def lock_path(files):
    return beside(files, ".{}.lock")


def remaking_path(files):
    """Present while an item is being remade: files without a record are then not adopted."""
    return beside(files, ".{}.remaking")


def uses_path(files):
    return beside(files, "{}.uses.json")


def env_path(files):
    """Where the stage leaves its environment for the record (stages/core/provenance.py)."""
    return beside(files, ".{}.env.json")


def remake_command(receipt):
    """The one command that regenerates a damaged or wrong store file, for error messages."""
    if not receipt:
        return "rerun the job that made it"
    return (f"remake it with `snakemake --force {receipt} --config store_remake=True` (add this run's "
            "--configfile, --config and --profile options), then rerun the workflow")


def read_record(files):
    """The item's record if the item is complete (record present, every file at its recorded
    size), else None. Costs a stat per file: no hashing."""
    try:
        record = json.loads(record_path(files).read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None
    if record.get("format") != RECORD_FORMAT:
        return None
    recorded = {e["name"]: e for e in record["files"]}
    for f in map(Path, files):
        entry = recorded.get(f.name)
        try:
            if entry is None or f.stat().st_size != entry["bytes"]:
                return None
        except FileNotFoundError:
            return None
    return record


def complete(files):
    return read_record(files) is not None


def who():
    try:
        user = getpass.getuser()
    except (KeyError, OSError):  # no passwd entry (containers)
        user = str(os.getuid())
    return f"{user}@{socket.gethostname()}"


def now():
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


class InconsistentItem(ValueError):
    """Files found in place that do not belong together."""


def write_record(files, key, *, adopted=False, seconds=None, env=None):
    """Hash the item's files and write its record (atomically, last: the record says complete).

    adopted: the files were found in place without a record (made by a version of the pipeline
    that kept none, or by a job killed between its stage's end and its record). Each file was
    renamed into place whole; a companion JSON that names the first file's sha256 (a dataset's
    manifest.json, a teacher's model.json) must agree with it, so a half-replaced pair is refused.
    """
    entries = [{"name": Path(f).name, "bytes": Path(f).stat().st_size, "sha256": atomic.sha256_file(f)}
               for f in files]
    for f in files[1:] if adopted else ():
        if str(f).endswith(".json"):
            try:
                stated = json.loads(Path(f).read_text()).get("sha256")
            except (json.JSONDecodeError, AttributeError):
                raise InconsistentItem(f"{f}: not a JSON object") from None
            if stated is not None and stated != entries[0]["sha256"]:
                raise InconsistentItem(f"{f}: names sha256 {stated[:12]}... for {files[0]}, which has "
                                       f"{entries[0]['sha256'][:12]}...")
    made = {"by": who(), "at": now(), "workdir": os.getcwd(), "seconds": seconds, "adopted": adopted}
    if env is not None:
        made["env"] = env
    record = {"format": RECORD_FORMAT, "key": key, "files": entries, "made": made}
    atomic.write_json(record_path(files), record)
    return record


def write_receipt(receipt, files, record, made_here):
    by_name = {e["name"]: e for e in record["files"]}
    atomic.write_json(receipt, {
        "format": RECEIPT_FORMAT, "key": record["key"], "record": str(record_path(files)),
        "files": [{"path": str(f), "bytes": by_name[Path(f).name]["bytes"],
                   "sha256": by_name[Path(f).name]["sha256"]} for f in files],
        "made": record["made"], "made_by_this_job": made_here, "received": now(),
    })


def read_uses(files):
    """{workdir: {"at", "by", "receipt"}} of the item's use log; {} if there is none. A log that
    cannot be read counts as a use now: it never lets an item look unused."""
    path = uses_path(files)
    try:
        uses = json.loads(path.read_text())
    except FileNotFoundError:
        return {}
    except (json.JSONDecodeError, OSError):
        return {f"(unreadable use log {path})": {"at": now(), "by": "?", "receipt": ""}}
    return uses.get("workdirs", {}) if isinstance(uses, dict) else {}


def note_use(files, receipt):
    """Note in the use log that this workdir takes the item now. The log is replaced whole (a rename,
    atomic on NFS too, where appends are not): of two workdirs noting a use in the same instant one
    entry may be lost, never the fact that the item was just used."""
    uses = read_uses(files)
    uses[os.getcwd()] = {"at": now(), "by": who(), "receipt": str(receipt)}
    try:
        atomic.write_json(uses_path(files), {"format": USES_FORMAT, "workdirs": uses})
    except OSError as e:
        print(f"[store] {uses_path(files)}: cannot note this use ({e}); the store command's gc then "
              "counts the item's grace period from its last noted use", flush=True)


def read_receipt(path):
    receipt = json.loads(Path(path).read_text())
    if receipt.get("format") != RECEIPT_FORMAT:
        raise ValueError(f"{path}: format {receipt.get('format')!r}, expected {RECEIPT_FORMAT!r}; "
                         f"rerun the rule that writes it (snakemake --force {path})")
    return receipt


class ItemBusy(Exception):
    """Another job holds the item's lock (ItemLock with wait=False)."""


class ItemLock:
    """flock on the item's lock file; waits (saying for whom) while another job holds it, or with
    wait=False raises ItemBusy."""

    def __init__(self, files, wait=True):
        self.path = lock_path(files)
        self.wait = wait
        self.fd = None

    def holder(self):
        try:
            return self.path.read_text().strip() or "another job"
        except OSError:
            return "another job"

    def in_place(self):
        """Whether the locked file is still the one at the lock's path: the store command removes
        an item's lock file while it holds it, and a lock on a removed file locks nothing."""
        try:
            here, locked = os.stat(self.path), os.fstat(self.fd)
        except FileNotFoundError:
            return False
        return (here.st_dev, here.st_ino) == (locked.st_dev, locked.st_ino)

    def __enter__(self):
        while True:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            try:
                self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666)
            except PermissionError:  # a teammate's lock file under umask 0022: flock needs only a read fd locally
                self.fd = os.open(self.path, os.O_RDONLY)
            except FileNotFoundError:  # the folder was removed after the mkdir
                continue
            try:
                fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = self.holder()
                if not self.wait:
                    os.close(self.fd)
                    raise ItemBusy(f"{self.path}: held by {holder}") from None
                print(f"[store] {self.path}: held by {holder}; waiting for it", flush=True)
                t0 = time.monotonic()
                fcntl.flock(self.fd, fcntl.LOCK_EX)
                print(f"[store] {self.path}: acquired after {time.monotonic() - t0:.0f}s", flush=True)
            except OSError as e:  # NFS emulates flock with write locks, which a read-only fd cannot take
                os.close(self.fd)
                raise PermissionError(
                    f"{self.path}: cannot lock ({e}); the store must be writable by every member of the "
                    "team (a shared group, umask 0002, setgid folders: see docs/team-store.md)") from e
            if self.in_place():
                break
            os.close(self.fd)
        try:
            os.ftruncate(self.fd, 0)
            os.pwrite(self.fd, f"{who()} pid {os.getpid()} since {now()}\n".encode(), 0)
        except OSError:
            pass  # read-only fd: the holder's name is a courtesy
        return self

    def __exit__(self, *exc):
        os.close(self.fd)  # releases the flock
        self.fd = None


def remove_leftovers(files):
    """Temporary files of writers of this item that were killed; only called under its lock,
    when nobody else writes the item."""
    for f in map(Path, files):
        for tmp in f.parent.glob(f".{f.name}.*.tmp"):
            tmp.unlink(missing_ok=True)


def run_stage(command, env=None):
    """Run the stage; signals sent to this process alone are noted, not passed on (see the module
    docstring). Returns the stage's exit status as a shell would report it."""

    def note(signum, frame):
        print(f"[store] received {signal.Signals(signum).name}; waiting for the stage to end", flush=True)

    old = {s: signal.signal(s, note) for s in (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1)}
    try:
        proc = subprocess.Popen(command, env=env)
        code = proc.wait()
    finally:
        for s, handler in old.items():
            signal.signal(s, handler)
    return 128 - code if code < 0 else code


def complete_for(files, receipt):
    """The item's record if it is complete, its use by this workdir noted; else None. The record is
    read again after the note (see the module docstring: a removal in between is seen)."""
    if read_record(files) is None:
        return None
    note_use(files, receipt)
    return read_record(files)


def provide(files, key, receipt, mode, command, remote=None, push=False):
    """Reuse, make, remake or pull the item; write the receipt. Returns an exit status."""
    files = [str(f) for f in files]
    where = files[0]
    if mode in ("make", "reuse", "pull") and (record := complete_for(files, receipt)) is not None:
        print(f"[store] {where}: complete in the store (made by {record['made']['by']} at "
              f"{record['made']['at']}); reusing it", flush=True)
        write_receipt(receipt, files, record, made_here=False)
        return 0
    if mode == "reuse":
        raise SystemExit(f"[store] {where}: was complete when this run was planned and is not now "
                         f"(record {record_path(files)}); rerun the workflow, which plans the job that makes it")
    with ItemLock(files):
        record = read_record(files)
        if mode in ("make", "pull") and record is not None:
            print(f"[store] {where}: made by {record['made']['by']} while this job waited; reusing it",
                  flush=True)
            note_use(files, receipt)
            write_receipt(receipt, files, record, made_here=False)
            return 0
        remove_leftovers(files)
        if mode == "pull":
            from stages.files import store_remote  # boto3: only the jobs that pull import it

            print(f"[store] pulling {where} from {remote}", flush=True)
            t0 = time.monotonic()
            try:
                record = store_remote.Remote(remote).pull(files)
            except store_remote.RemoteError as e:
                raise SystemExit(f"[store] {e}") from None
            note_use(files, receipt)
            print(f"[store] pulled {where} in {time.monotonic() - t0:.1f}s", flush=True)
            write_receipt(receipt, files, record, made_here=False)
            return 0
        if (mode == "make" and not record_path(files).exists() and not remaking_path(files).exists()
                and all(Path(f).exists() for f in files)):
            print(f"[store] {where}: in place without a record (an earlier pipeline version, or a job "
                  "killed before recording it); recording it", flush=True)
            try:
                record = write_record(files, key, adopted=True)
            except InconsistentItem as e:
                print(f"[store] {e}; making the item again", flush=True)
            else:
                note_use(files, receipt)
                write_receipt(receipt, files, record, made_here=False)
                return 0
        if mode == "remake":  # incomplete until made again, and never adopted as it is
            remaking_path(files).touch()
            record_path(files).unlink(missing_ok=True)
        print(f"[store] {'remaking' if mode == 'remake' else 'making'} {where} (key {key})", flush=True)
        sidecar = env_path(files)
        sidecar.unlink(missing_ok=True)
        t0 = time.monotonic()
        code = run_stage(command, env={**os.environ, provenance.SIDECAR_ENV: str(sidecar)})
        if code != 0:
            print(f"[store] {where}: the stage exited with {code}; nothing recorded", flush=True)
            return code
        missing = [f for f in files if not Path(f).exists()]
        if missing:
            raise SystemExit(f"[store] the stage exited 0 but did not write {', '.join(missing)}")
        seconds = round(time.monotonic() - t0, 1)
        record = write_record(files, key, seconds=seconds, env=provenance.of_job(sidecar))
        sidecar.unlink(missing_ok=True)
        remaking_path(files).unlink(missing_ok=True)
        note_use(files, receipt)
    print(f"[store] made {where} in {seconds:.1f}s", flush=True)
    write_receipt(receipt, files, record, made_here=True)
    if push:  # the item is made and received whatever happens to the upload
        from stages.files import store_remote

        try:
            print(f"[store] {store_remote.Remote(remote).push(files)}", flush=True)
        except Exception as e:  # noqa: BLE001  (a network or service error of any kind)
            print(f"[store] {where}: not pushed to {remote} ({type(e).__name__}: {e}); push it later with "
                  f"`cmt-store push {Path(where).parent.name}`", flush=True)
    return 0


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--files", nargs="+", required=True, help="the item's store files, the first one naming it")
    p.add_argument("--key", required=True, help="the item's store key")
    p.add_argument("--receipt", required=True, help="the receipt to write in this workdir")
    p.add_argument("--mode", choices=["make", "reuse", "remake", "pull"], default="make")
    p.add_argument("--remote", default=None, help="the remote store (s3://bucket/prefix) of --mode pull and --push")
    p.add_argument("--push", action="store_true", help="upload an item this job made to --remote")
    p.add_argument("command", nargs=argparse.REMAINDER, help="-- the stage command that makes the files")
    a = p.parse_args(argv)
    command = a.command[1:] if a.command[:1] == ["--"] else a.command
    if not command and a.mode not in ("reuse", "pull"):
        p.error("no stage command after --")
    if (a.mode == "pull" or a.push) and not a.remote:
        p.error("--mode pull and --push need --remote s3://bucket/prefix")
    sys.exit(provide(a.files, a.key, a.receipt, a.mode, command, remote=a.remote, push=a.push))


if __name__ == "__main__":
    main()
