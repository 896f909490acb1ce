"""Atomic file writes: a crash or a full disk never leaves a partial file under a final name."""

import contextlib
import hashlib
import json
import os
import secrets
from pathlib import Path


def create_temp(folder, prefix, suffix=".tmp"):
    """Create a new empty file `<folder>/<prefix><random><suffix>` and return its path.

    Unlike tempfile.mkstemp (mode 0600), the file is created with mode 0666 as an ordinary new
    file is, so the kernel applies the user's umask and the folder's default ACL: a teammate
    sharing the store reads what this user wrote (0644 under umask 0022, 0664 under 0002).
    """
    for _ in range(100):
        path = Path(folder) / f"{prefix}{secrets.token_hex(6)}{suffix}"
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
        except FileExistsError:
            continue
        os.close(fd)
        return path
    raise FileExistsError(f"{folder}: no free temporary name {prefix}*{suffix} after 100 tries")


@contextlib.contextmanager
def atomic_path(path):
    """Yield a temporary path beside `path`; rename it onto `path` only if the block succeeds.

    The temporary file lives in the same folder so the final `os.replace` is a rename on one
    filesystem, which POSIX makes atomic: concurrent writers of the same file leave one whole copy.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = create_temp(path.parent, f".{path.name}.")
    mode = os.stat(tmp).st_mode & 0o7777
    try:
        yield tmp
        # a writer that replaces the file itself (safetensors writes its own temporary file, mode
        # 0600, and renames it) loses the mode: give back the one an ordinary new file gets here
        if os.stat(tmp).st_mode & 0o7777 != mode:
            os.chmod(tmp, mode)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def write_bytes(path, data: bytes):
    with atomic_path(path) as tmp:
        Path(tmp).write_bytes(data)


def write_text(path, text: str):
    write_bytes(path, text.encode())


def write_json(path, obj):
    write_text(path, json.dumps(obj, indent=2, sort_keys=True) + "\n")


def sha256_file(path, chunk=1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()
