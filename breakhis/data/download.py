"""Fetch and safely extract the BreakHis archive (about 4 GB).

    download_and_extract(URL, "data")   # -> data/BreaKHis_v1

The download goes to DEST/<name>.part and resumes from there (HTTP Range) when run again;
a server that ignores Range restarts it from zero. The finished file is renamed to
DEST/<name> and kept, so a second run downloads nothing (delete it to free the space).
Every member is checked before anything is extracted: a member with an absolute path or
`..`, a link, a device or a fifo refuses the whole archive. Extraction goes to a temp folder
inside DEST and is renamed into place, then DEST/.<name>.extracted records it.
"""
from __future__ import annotations

import http.client
import os
import shutil
import tarfile
import urllib.error
import urllib.parse
import urllib.request
import uuid
import zlib
from pathlib import Path, PurePosixPath, PureWindowsPath

from ..errors import UserError
from ..io import write_text
from ..report import progress_bar

URL = "http://www.inf.ufpr.br/vri/databases/BreaKHis_v1.tar.gz"
TIMEOUT_S = 60  # seconds without data before a connection counts as failed
CHUNK = 1 << 20  # bytes read per step
NET_ERRORS = (OSError, http.client.HTTPException)  # URLError, timeouts, resets, IncompleteRead
TAR_ERRORS = (tarfile.TarError, EOFError, OSError, zlib.error)


def download_and_extract(url: str, dest: str | Path, progress: bool = True) -> Path:
    """Download `url` into `dest` (resuming a partial download), extract it safely there and
    return the extracted top folder (e.g. DEST/BreaKHis_v1), or `dest` when the archive holds
    several top-level entries."""
    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    name = Path(urllib.parse.unquote(urllib.parse.urlparse(url).path)).name or "download.tar.gz"
    archive = dest / name
    marker = dest / f".{name}.extracted"
    if not archive.exists():
        fetch(url, archive, progress)
    if marker.exists() and (dest / marker.read_text().strip()).exists():
        return dest / marker.read_text().strip()
    top = extract(archive, dest, progress)
    write_text(marker, top + "\n")
    return dest / top


def _manual(url: str, archive: Path) -> str:
    return (f"run the same command again to resume, or download it by hand (curl -C - -o {archive} {url}), "
            f"extract it (tar xzf {archive.name}) and pass the folder: python -m breakhis.data "
            f"{archive.parent / 'BreaKHis_v1'}")


def fetch(url: str, archive: Path, progress: bool = True) -> None:
    """Download `url` to `archive` through `archive`.part, resuming what that file holds."""
    part = archive.with_name(archive.name + ".part")
    for _ in range(2):  # a second round only after a clean restart from zero
        have = part.stat().st_size if part.exists() else 0
        headers = {"User-Agent": "breakhis-toolkit"}
        if have:
            headers["Range"] = f"bytes={have}-"
        try:
            resp = urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=TIMEOUT_S)
        except urllib.error.HTTPError as e:
            total = _total_from_range(e.headers.get("Content-Range", "")) if e.code == 416 else None
            if e.code == 416 and total == have:
                break  # the .part already holds the whole file
            if e.code == 416:
                part.unlink()
                continue
            raise UserError(f"download of {url} failed: HTTP {e.code} {e.reason}; "
                            f"{_manual(url, archive)}") from None
        except NET_ERRORS as e:
            raise UserError(f"download of {url} failed: {_reason(e)}; {_manual(url, archive)}") from None
        with resp:
            start = _start_from_range(resp.headers.get("Content-Range", "")) if resp.status == 206 else 0
            if start not in (0, have):
                part.unlink()  # the server resumed at another offset: start again cleanly
                continue
            length = resp.headers.get("Content-Length")
            length = int(length) if length and length.isdigit() else None
            _receive(resp, part, start, length, url, archive, progress)
        break
    else:
        raise UserError(f"download of {url} failed: the server's byte ranges did not match; "
                        f"{_manual(url, archive)}")
    os.replace(part, archive)


def _receive(resp, part: Path, start: int, length: int | None, url: str, archive: Path,
             progress: bool) -> None:
    """Write the body of `resp` into `part` from byte `start` (0: truncate, else append)."""
    got = 0
    bar = progress_bar(progress, archive.name, length, done=start, unit="bytes", transient=False, tty_only=False)
    with open(part, "ab" if start else "wb") as f, bar as advance:
        try:
            while chunk := resp.read(CHUNK):
                f.write(chunk)
                got += len(chunk)
                advance(len(chunk))
        except NET_ERRORS as e:
            f.flush()
            raise UserError(f"download of {url} stopped after {(start + got) / 1e6:.1f} MB ({_reason(e)}); "
                            f"{part} is kept: {_manual(url, archive)}") from None
        f.flush()
        os.fsync(f.fileno())
    if length is not None and got < length:
        raise UserError(f"download of {url} stopped after {(start + got) / 1e6:.1f} of "
                        f"{(start + length) / 1e6:.1f} MB; {part} is kept: {_manual(url, archive)}")


def _reason(e: BaseException) -> str:
    reason = getattr(e, "reason", None) or e
    return f"{type(e).__name__}: {reason}" if str(reason) else type(e).__name__


def _start_from_range(value: str) -> int:
    """First byte of a 'bytes START-END/TOTAL' Content-Range (-1 when unreadable)."""
    try:
        return int(value.split()[1].split("-")[0])
    except (IndexError, ValueError):
        return -1


def _total_from_range(value: str) -> int | None:
    """TOTAL of a 'bytes */TOTAL' Content-Range."""
    try:
        return int(value.rsplit("/", 1)[1])
    except (IndexError, ValueError):
        return None


def check_member(m: tarfile.TarInfo) -> str | None:
    """Why member `m` may not be extracted, or None when it is a plain file or folder inside."""
    name = m.name.replace("\\", "/")
    if name.startswith("/") or PurePosixPath(name).is_absolute() or PureWindowsPath(m.name).drive:
        return "has an absolute path"
    if ".." in PurePosixPath(name).parts:
        return "points outside the folder with '..'"
    if m.issym() or m.islnk():
        return f"is a {'symbolic' if m.issym() else 'hard'} link (to {m.linkname!r})"
    if m.ischr() or m.isblk():
        return "is a device file"
    if m.isfifo():
        return "is a fifo"
    if not (m.isreg() or m.isdir()):
        return "is not a plain file or folder"
    return None


def extract(archive: Path, dest: Path, progress: bool = True) -> str:
    """Check every member of `archive`, then extract it into `dest`; returns the name of the
    single top-level folder ('.' when there are several top-level entries)."""
    try:
        tar = tarfile.open(archive, "r:*")
        members = tar.getmembers()  # reads the whole archive: a damaged one fails here
    except TAR_ERRORS as e:
        raise UserError(f"{archive} is damaged or not a tar archive ({type(e).__name__}: {e}); "
                        "delete it and run the same command again") from None
    with tar:
        for m in members:
            why = check_member(m)
            if why:
                raise UserError(f"{archive}: member {m.name!r} {why}; refusing the whole archive, "
                                "nothing was extracted. This is not the expected BreakHis archive: "
                                "delete it and download it again")
        tops = sorted({PurePosixPath(m.name).parts[0] for m in members if PurePosixPath(m.name).parts})
        for t in tops:
            if (dest / t).exists():
                raise UserError(f"{dest / t} already exists: pass it to python -m breakhis.data, "
                                f"or move it away to extract {archive.name} again")
        tmp = dest / f".tmp-extract-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        try:
            with progress_bar(progress, f"extracting {archive.name}", len(members), transient=False, tty_only=False) as advance:
                tar.extractall(tmp, members=_counted(members, advance), filter="data")
            for t in tops:
                os.rename(tmp / t, dest / t)
        except TAR_ERRORS as e:
            raise UserError(f"extracting {archive} into {dest} failed ({type(e).__name__}: {e}); "
                            "nothing was extracted. Check the free space, then run the same command "
                            "again (delete the archive first if it is damaged)") from None
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    if len(tops) == 1 and (dest / tops[0]).is_dir():
        return tops[0]
    return "."


def _counted(members, advance):
    for m in members:
        yield m
        advance(1)
