"""Files and values: atomic writes, JSON and CSV read back, JSON-able copies, number parsing.

A write goes to a temporary file beside the target, which is then renamed into place: a reader
never sees a half-written file; an interrupted write leaves only a `.tmp-<name>.<host>.<pid>.*`
file, which the next write of the same target removes once that process is gone (temp_owner).
create_new writes a file that must not exist yet (hard-linked into place: exclusive and atomic).
"""
from __future__ import annotations

import contextlib
import csv
import errno
import glob
import hashlib
import io
import json
import math
import os
import socket
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from .errors import UserError

_UMASK = os.umask(0)
os.umask(_UMASK)


HOST = socket.gethostname()
LEGACY_TEMP_S = 3600  # a temp file of the old naming (no host, no pid) older than this is dead


def temp_prefix(path: Path) -> str:
    """The name a temporary file of `path` starts with: it names the target, this host and this process."""
    return f".tmp-{path.name}.{HOST}.{os.getpid()}."


def temp_owner(tmp: Path, target: Path) -> str:
    """Whether a temporary file beside target was left by a dead writer ("dead"), is being written ("alive"),
    or cannot be told ("unknown": another host's). The old naming, .tmp-<name>.<random>, is dead once older
    than LEGACY_TEMP_S."""
    rest = tmp.name[len(f".tmp-{target.name}."):]
    parts = rest.rsplit(".", 2)
    if len(parts) != 3 or not parts[1].isdigit():
        try:
            return "dead" if os.stat(tmp).st_mtime < time.time() - LEGACY_TEMP_S else "alive"
        except FileNotFoundError:
            return "alive"
    host, pid = parts[0], int(parts[1])
    if host != HOST:
        return "unknown"
    if pid == os.getpid():
        return "alive"  # another thread of this process
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return "dead"
    except PermissionError:
        pass  # another user's process
    return "alive"


def remove_stale_temps(path: Path) -> list[Path]:
    """Delete the temporary files of `path` that dead writers left (an interrupted or killed write)."""
    gone = []
    try:
        candidates = [p for p in path.parent.glob(f".tmp-{glob.escape(path.name)}.*") if p.is_file()]
    except OSError:
        return gone
    for p in candidates:
        if temp_owner(p, path) == "dead":
            with contextlib.suppress(FileNotFoundError):
                p.unlink()
                gone.append(p)
    return gone


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside `path`; on success it is renamed to `path`. Temporary files of the
    same target left by dead writers are removed first."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temps(path)
    fd, tmp = tempfile.mkstemp(prefix=temp_prefix(path), dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp makes 0600; give the file the usual permissions
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def write_bytes(path: str | Path, data: bytes) -> None:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def create_new(path: str | Path, data: bytes) -> None:
    """Write a file that must not exist yet: written beside it, then hard-linked into place, which fails
    when the name is taken (FileExistsError), so two writers never overwrite each other and a reader never
    sees half a file. Where hard links are refused (some network or FAT filesystems), an exclusive create
    (O_EXCL) is written in place instead."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temps(path)
    fd, tmp = tempfile.mkstemp(prefix=temp_prefix(path), dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.chmod(tmp, 0o666 & ~_UMASK)
        try:
            os.link(tmp, path)
            return
        except FileExistsError:
            raise
        except OSError as e:
            if e.errno not in (errno.EPERM, errno.EOPNOTSUPP, errno.ENOTSUP, errno.EMLINK, errno.EXDEV):
                raise
        out = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
        with os.fdopen(out, "wb") as f:
            f.write(data)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)


def write_text(path: str | Path, text: str) -> None:
    write_bytes(path, text.encode())


def write_json(path: str | Path, obj: Any) -> None:
    write_text(path, json.dumps(obj, indent=2, default=str) + "\n")


def read_json(path: Path) -> Any:
    """The parsed file, None when it does not exist; a damaged file is a UserError naming it."""
    try:
        return json.loads(Path(path).read_text())
    except FileNotFoundError:
        return None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"{path} is not valid JSON ({e}); the file is damaged") from None


def csv_text(rows: list[dict]) -> str:
    """Rows as CSV text with the union of their keys as columns, in first-seen order."""
    cols: dict[str, None] = {}
    for r in rows:
        cols.update(dict.fromkeys(r))
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=list(cols), lineterminator="\n")
    w.writeheader()
    w.writerows(rows)
    return buf.getvalue()


def write_csv(path: str | Path, rows: list[dict]) -> None:
    """Rows as CSV with the union of their keys as columns, in first-seen order."""
    write_text(path, csv_text(rows))


def read_csv(path: Path) -> list[dict]:
    """The rows of a CSV file as dicts of strings; [] when the file does not exist."""
    if not Path(path).is_file():
        return []
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def plain(v):
    """A Python scalar from a numpy scalar (so dict keys sort and serialise)."""
    return v.item() if isinstance(v, np.generic) else v


def jsonable(obj: Any) -> Any:
    """A copy fit for json.dumps: nan/inf -> None, numpy -> Python, tuples -> lists, keys -> str."""
    if isinstance(obj, dict):
        return {str(plain(k)): jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple, np.ndarray)):
        return [jsonable(v) for v in obj]
    obj = plain(obj)
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return obj


def number(value: Any) -> float | None:
    """The value as a finite float (a CSV cell, a flag, a JSON value), None when it is not one."""
    if isinstance(value, bool):
        return None
    try:
        f = float(value)
    except (TypeError, ValueError):
        return None
    return f if math.isfinite(f) else None


def sha256_of(path: str | Path) -> str:
    """The SHA-256 of a file's bytes, read in 1 MiB blocks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def mount_of(path: str | Path) -> Path:
    """The mount point (the disk) that path is, or would be, written on."""
    p = Path(os.path.abspath(path))
    while not p.exists() or (not os.path.ismount(p) and p != p.parent):
        p = p.parent
    return p


def no_space(e: OSError, what: str, path: str | Path, nbytes: int) -> UserError | None:
    """The one-line UserError for an OSError that is a full disk (ENOSPC, EDQUOT), None for any other."""
    if e.errno not in (errno.ENOSPC, errno.EDQUOT):
        return None
    return UserError(f"no space left on {mount_of(path)} for the {what} at {path} (needs about "
                     f"{max(1, round(nbytes / 2**20))} MB): free some space there, or pass --cache-dir with a "
                     f"folder on another disk")


def reserve(path: str | Path) -> None:
    """Allocate the disk blocks of a file that will be written through a memory map (np.lib.format.open_memmap
    makes it sparse): a full disk then fails here with ENOSPC, not later in a write through the map (SIGBUS)."""
    if not hasattr(os, "posix_fallocate"):
        return
    with open(path, "r+b") as f:
        try:
            os.posix_fallocate(f.fileno(), 0, os.fstat(f.fileno()).st_size)
        except OSError as e:
            if e.errno not in (errno.EOPNOTSUPP, errno.EINVAL, errno.ENOSYS):
                raise


def check_writable(path: str | Path, what: str) -> None:
    """Refuse, before any work, a file that cannot be written at path: a file in the way, no permission, a
    read-only disk. A probe file is created and removed in the nearest folder that exists (none is made)."""
    folder = Path(os.path.abspath(path)).parent
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    try:
        if not folder.is_dir():
            raise NotADirectoryError(errno.ENOTDIR, f"{folder} is a file, not a folder")
        fd, probe = tempfile.mkstemp(prefix=temp_prefix(Path(path)), dir=folder)
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise UserError(f"{what} {path}: cannot write there ({e.strerror or e}); give a path in a folder you "
                        f"can write") from None


def shown_path(path: str) -> str:
    """A file name as text that is valid UTF-8: bytes of a name that are not (os.fsdecode's surrogate
    escapes) become backslash escapes, e.g. b'caf\\xe9.png' -> 'caf\\\\xe9.png'; a UTF-8 name is unchanged."""
    return os.fsencode(path).decode("utf-8", "backslashreplace")
