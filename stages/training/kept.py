"""Files a training run makes while it trains and keeps past its resumable state: the metrics log,
the EMA snapshots. Snakemake deletes a failed job's outputs, and a sliced or killed run is finished
by a later job, so while the run trains they live in its state folder (`<state>/kept/`, or without
a state folder a temporary folder beside the outputs) and are published to the rule's declared
outputs when the run finishes, after which the state folder, and they with it, is removed.

A run resumes from its last saved state, at step S; what it kept past S was made by steps the next
job trains again. `rollback(S)` removes it (resume.TrainState.restore calls it, with S = 0 where no
state is saved yet), so the resumed run writes each step's part exactly once:
- a JSON-lines log (`*.jsonl`, one object with a `step` per line) keeps the lines of steps <= S (a
  torn last line, from a kill in the middle of a write, is dropped too);
- a file named for its step (`<name>-step<9 digits>.<ext>`) of a step > S is removed.
Only the main process writes kept files.
"""

import json
import os
import re
import shutil
from pathlib import Path

from stages.files import atomic

STEP_FILE = re.compile(r".*-step(\d{9})\.[^.]+$")


def step_name(stem, step, ext):
    """`<stem>-step<step:09d>.<ext>`: a kept file that belongs to `step` (rolled back past it)."""
    return f"{stem}-step{step:09d}.{ext}"


class Kept:
    """The kept files of one run in `folder`, each file or folder published to its declared output."""

    def __init__(self, folder):
        self.folder = Path(folder)
        self.outputs = {}

    def keep(self, name, output, folder=False):
        """Register the kept file (or, with `folder`, folder) `name`, published to `output` (None: kept
        and rolled back with the state, never published); its path."""
        self.outputs[name] = None if output is None else Path(output)
        path = self.folder / name
        (path if folder else path.parent).mkdir(parents=True, exist_ok=True)
        return path

    def files(self):
        for name in self.outputs:
            path = self.folder / name
            if path.is_dir():
                yield from (p for p in sorted(path.rglob("*")) if p.is_file())
            elif path.is_file():
                yield path

    def rollback(self, step):
        """Forget what the steps after `step` made (see the module docstring)."""
        for path in list(self.files()):
            match = STEP_FILE.match(path.name)
            if match and int(match.group(1)) > step:
                path.unlink()
            elif path.suffix == ".jsonl":
                truncate_log(path, step)

    def publish(self):
        """Copy every kept file or folder to its output (atomically, file by file)."""
        for name, target in self.outputs.items():
            source = self.folder / name
            if target is None:
                continue
            if source.is_dir():
                for path in sorted(source.rglob("*")):
                    if path.is_file():
                        atomic.write_bytes(target / path.relative_to(source), path.read_bytes())
                target.mkdir(parents=True, exist_ok=True)
            elif source.exists():
                atomic.write_bytes(target, source.read_bytes())
            else:
                raise FileNotFoundError(f"{source}: the run kept no {name} to publish to {target}")

    def remove(self):
        shutil.rmtree(self.folder, ignore_errors=True)


def truncate_log(path, step):
    """Keep the lines of a JSON-lines log whose `step` is at most `step` (and whole)."""
    kept = []
    with open(path) as f:
        for line in f:
            try:
                entry = json.loads(line)
            except json.JSONDecodeError:
                break  # a line torn by a kill: nothing after it was written whole
            if not line.endswith("\n"):
                break
            if entry.get("step", 0) <= step:
                kept.append(line)
    with atomic.atomic_path(path) as tmp:
        Path(tmp).write_text("".join(kept))


class JsonLog:
    """An append-only JSON-lines log in a kept folder: one flushed line per entry."""

    def __init__(self, path):
        self.path = Path(path)

    def write(self, entry):
        with open(self.path, "a") as f:
            f.write(json.dumps(entry, sort_keys=True) + "\n")
            f.flush()
            os.fsync(f.fileno())

    def read(self):
        if not self.path.exists():
            return []
        return [json.loads(line) for line in self.path.read_text().splitlines()]
