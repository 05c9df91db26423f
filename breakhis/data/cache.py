"""Decode-once uint8 cache: every selected image decoded once, resized, stored as one .npy.

    cache = build_cache(root, paths, default_cache_size(224))   # (N, 256, 390, 3) uint8, mmap
    cache.images[cache.index_of(paths[0])]                       # (256, 390, 3) uint8

Layout: <cache dir>/<root name>-<H>x<W>-<key[:16]>/ holds `images.npy` and `index.json`.
The key hashes the root's absolute path, the ordered file list with each file's size and
mtime_ns, the cache size and FORMAT_VERSION: a changed, added or removed image gives a new
key, hence a new folder. Old folders are left in place (another run may still read them, or
use another subset of the same root); delete them by hand to reclaim space.

A build writes into `.tmp-*` beside the final folder, writes `index.json` last (the
completion marker), then renames the folder into place. A folder without a valid index is
never used; when two processes build the same key, the first rename wins and the other
discards its copy. Temp folders of dead builds on this host are removed by the next build.

Decoding (decode_resize): Pillow, then RGB. Transparent images (RGBA, LA, PA, or a palette /
grey image with a transparency key) are alpha-composited onto white, the slide background;
L, P, 1, I;16, CMYK are converted with Pillow's convert("RGB"). Resized with Pillow's
BILINEAR filter (antialiased on downscale: the same as torchvision's
Resize(antialias=True), which the ImageNet weights were trained with); an image already at
the cache size is not resampled. An unreadable or truncated image gets ok=False, the error,
and zero pixels; the caller decides whether that is fatal.
"""
from __future__ import annotations

import concurrent.futures as cf
import ctypes
import hashlib
import json
import multiprocessing as mp
import os
import shutil
import signal
import socket
import sys
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from ..errors import UserError
from ..io import no_space, reserve, write_json
from ..report import progress_bar

FORMAT_VERSION = 1  # bump when the pixels or the index format change: every key changes
RESAMPLE = Image.Resampling.BILINEAR
NATIVE_WH = (700, 460)  # BreakHis field size, (W, H) pixels
INPROCESS_BELOW = 64  # fewer images than this: decode in this process (no start-up cost)
CHUNK_MAX = 32  # images per task sent to a worker process
# what Pillow raises for a missing, unidentifiable, truncated or corrupt image file
DECODE_ERRORS = (OSError, SyntaxError, ValueError, EOFError, Image.DecompressionBombError)


def default_cache_size(image_size: int) -> tuple[int, int]:
    """(H, W) of the cached field for a model input of `image_size`: H = image_size * 8/7
    (256 for 224, the usual resize-then-crop margin), W keeps the 700x460 aspect ratio."""
    h = round(image_size * 8 / 7)
    return h, round(h * NATIVE_WH[0] / NATIVE_WH[1])


def cache_root(cache_dir: str | Path | None = None) -> Path:
    """The folder holding the caches: `cache_dir`, else $BREAKHIS_CACHE, else
    $XDG_CACHE_HOME/breakhis, else ~/.cache/breakhis."""
    if cache_dir:
        return Path(cache_dir).expanduser()
    if os.environ.get("BREAKHIS_CACHE"):
        return Path(os.environ["BREAKHIS_CACHE"]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base).expanduser() / "breakhis"


@dataclass
class Cache:
    """A built cache: `images[i]` holds the field decoded from `paths[i]`."""

    images: np.ndarray  # (N, H, W, 3) uint8, memory-mapped read-only
    paths: list[str]  # relative to the root, in the requested order
    info: list[dict]  # per image: ok, error, mode, width, height, sha1 (see decode_resize)
    key: str
    folder: Path
    build_s: float | None = None  # seconds this call spent building; None: read from disk
    _pos: dict[str, int] = field(default_factory=dict, repr=False, compare=False)

    def index_of(self, path: str) -> int:
        """Row of `path` (relative to the root) in `images`."""
        if not self._pos:
            self._pos.update((p, i) for i, p in enumerate(self.paths))
        try:
            return self._pos[Path(path).as_posix()]
        except KeyError:
            raise KeyError(f"{path} is not in the cache {self.folder}") from None


def decode_resize(path: str | Path, size: tuple[int, int]) -> tuple[np.ndarray, dict]:
    """Decode one image file to RGB and resize it to size=(H, W).

    Returns the (H, W, 3) uint8 pixels and the info dict: ok, error (None or the reason),
    mode (the file's PIL mode), width and height (the file's size, px), sha1 (hex digest of
    the (height, width, 3) uint8 RGB pixels at native size, before resizing; None when
    unreadable). An unreadable image gives zero pixels and ok=False.
    """
    h, w = size
    info = {"ok": False, "error": None, "mode": None, "width": None, "height": None, "sha1": None}
    try:
        with Image.open(path) as im:
            info.update(mode=im.mode, width=im.width, height=im.height)
            im.load()  # a truncated file fails here, after the header gave mode and size
            rgb = _to_rgb(im)
    except DECODE_ERRORS as e:
        info["error"] = f"{type(e).__name__}: {e}"
        return np.zeros((h, w, 3), np.uint8), info
    info["sha1"] = hashlib.sha1(np.asarray(rgb).tobytes()).hexdigest()
    info["ok"] = True
    if rgb.size != (w, h):
        rgb = rgb.resize((w, h), RESAMPLE)
    return np.asarray(rgb), info


def _to_rgb(im: Image.Image) -> Image.Image:
    """RGB copy of `im`; transparent pixels are composited onto white."""
    if im.mode in ("RGBA", "LA", "PA") or "transparency" in im.info:
        rgba = im.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return im.convert("RGB")


def cache_key(root: Path, paths: Sequence[str], size: tuple[int, int]) -> str:
    """sha256 over the root, the ordered files with size and mtime_ns, the size and version."""
    files = []
    for p in paths:
        try:
            st = (root / p).stat()
            files.append([p, st.st_size, st.st_mtime_ns])
        except OSError:
            files.append([p, None, None])  # missing: decoded as unreadable; appearing changes the key
    blob = json.dumps({"version": FORMAT_VERSION, "root": str(root), "size": list(size), "files": files})
    return hashlib.sha256(blob.encode()).hexdigest()


def build_cache(root, paths, size: tuple[int, int], cache_dir=None, workers: int = 0,
                progress: bool = True) -> Cache:
    """Return the cache of `paths` (relative to `root`) at size=(H, W), building it if needed.

    workers: decoding processes (0: one per core). A second call with the same files, sizes,
    mtimes and size decodes nothing.
    """
    given, root = root, Path(root).resolve()
    rel = [_relative(given, root, p) for p in paths]
    size = (int(size[0]), int(size[1]))
    if size[0] < 1 or size[1] < 1:
        raise ValueError(f"cache size {size}: height and width must be positive")
    key = cache_key(root, rel, size)
    base = cache_root(cache_dir)
    final = base / f"{root.name}-{size[0]}x{size[1]}-{key[:16]}"
    cache = _load(final, key, rel, size)
    if cache is not None:
        return cache

    tmp = base / f".tmp-{final.name}-{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    try:
        base.mkdir(parents=True, exist_ok=True)
        _prune_dead_temps(base)
        tmp.mkdir()
    except OSError as e:  # read-only, not a folder, no space
        raise UserError(f"cannot write the decode cache under {base} ({type(e).__name__}: {e.strerror or e}); "
                        f"pass --cache-dir with a folder you can write (or set BREAKHIS_CACHE)") from None
    t0 = time.perf_counter()
    try:
        info = _decode_all(root, rel, size, tmp / "images.npy", workers, progress)
        write_json(tmp / "index.json", {"version": FORMAT_VERSION, "key": key, "root": str(root),
                                        "size": list(size), "paths": rel, "info": info})
        _fsync_files(tmp)
        _move_into_place(tmp, final, key, rel, size)
    except OSError as e:  # a full disk: one line, not a traceback
        full = no_space(e, "decode cache", final, len(rel) * size[0] * size[1] * 3)
        if full is None:
            raise
        raise full from None
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    cache = _load(final, key, rel, size)
    if cache is None:
        raise RuntimeError(f"cache {final} is not valid right after it was built")
    cache.build_s = time.perf_counter() - t0
    return cache


def _relative(given, root: Path, p) -> str:
    """`p` as a posix path relative to the root (an absolute path must lie inside it; `given`
    is the root as passed, so a root reached through a symlink also works)."""
    p = Path(p)
    if not p.is_absolute():
        return p.as_posix()
    for base, q in ((Path(os.path.abspath(given)), Path(os.path.abspath(p))), (root, p.resolve())):
        try:
            return q.relative_to(base).as_posix()
        except ValueError:
            pass
    raise ValueError(f"{p} is not inside the root {root}")


def _load(folder: Path, key: str, paths: list[str], size: tuple[int, int]) -> Cache | None:
    """The cache in `folder` if it is complete and matches; None otherwise."""
    try:
        index = json.loads((folder / "index.json").read_text())
        images = np.load(folder / "images.npy", mmap_mode="r")
    except (OSError, ValueError):
        return None
    if (not isinstance(index, dict) or index.get("version") != FORMAT_VERSION or index.get("key") != key
            or index.get("paths") != paths or len(index.get("info", ())) != len(paths)
            or images.dtype != np.uint8 or images.shape != (len(paths), *size, 3)):
        return None
    return Cache(images=images, paths=paths, info=index["info"], key=key, folder=folder)


def _move_into_place(tmp: Path, final: Path, key: str, paths: list[str], size: tuple[int, int]) -> None:
    """Rename the finished `tmp` to `final`; if another process got there first, keep theirs."""
    for _ in range(3):
        try:
            os.rename(tmp, final)
            return
        except OSError:
            if not final.exists():
                raise
        if _load(final, key, paths, size) is not None:
            return  # another build of the same key won; the caller removes our copy
        # `final` exists but is not a valid cache (left by hand or by an older version):
        # no reader would use it, so move it aside and delete it, then try again
        stale = final.with_name(f".stale-{final.name}-{uuid.uuid4().hex[:8]}")
        try:
            os.rename(final, stale)
        except OSError:
            continue
        shutil.rmtree(stale, ignore_errors=True)
    raise RuntimeError(f"could not move the new cache into place at {final}")


def _prune_dead_temps(base: Path) -> None:
    """Delete `.tmp-*` folders left by builds on this host whose process has died."""
    host = socket.gethostname()
    for d in base.glob(".tmp-*"):
        head, pid, _suffix = (d.name.rsplit("-", 2) + ["", ""])[:3]
        if not pid.isdigit() or not head.endswith(f"-{host}") or int(pid) == os.getpid():
            continue
        try:
            os.kill(int(pid), 0)
        except ProcessLookupError:
            shutil.rmtree(d, ignore_errors=True)
        except PermissionError:
            pass  # alive, another user's


def _fsync_files(folder: Path) -> None:
    """Flush the files in `folder` to disk so the marker never outlives missing pixels."""
    for f in folder.iterdir():
        with open(f, "rb") as fh:
            os.fsync(fh.fileno())


def default_workers() -> int:
    """Decode workers when --workers is 0: the cores this process may run on."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def _decode_all(root: Path, paths: list[str], size: tuple[int, int], npy: Path, workers: int,
                progress: bool) -> list[dict]:
    """Decode every path into rows of a new .npy at `npy`; returns the info dicts in order."""
    n = len(paths)
    out = np.lib.format.open_memmap(npy, mode="w+", dtype=np.uint8, shape=(n, *size, 3))
    reserve(npy)  # a sparse file on a full disk would kill the writers with SIGBUS (BrokenProcessPool)
    if workers <= 0:
        workers = default_workers()
    info: list[dict | None] = [None] * n
    if n < INPROCESS_BELOW or workers == 1:
        with progress_bar(progress, "decoding into cache", n) as advance:
            for i, p in enumerate(paths):
                out[i], info[i] = decode_resize(root / p, size)
                advance(1)
        out.flush()
        return info  # type: ignore[return-value]
    out.flush()
    del out  # the workers open the file themselves and write their rows into it
    chunk = max(1, min(CHUNK_MAX, n // (workers * 4)))
    tasks = [[(i, str(root / paths[i])) for i in range(s, min(n, s + chunk))] for s in range(0, n, chunk)]
    with cf.ProcessPoolExecutor(min(workers, len(tasks)), mp_context=_mp_context(),
                                initializer=_worker_init, initargs=(str(npy), os.getpid())) as ex:
        # submit before the progress bar starts its thread: with fork, the workers start here
        futures = [ex.submit(_worker_decode, t, size) for t in tasks]
        try:
            with progress_bar(progress, "decoding into cache", n) as advance:
                for fut in cf.as_completed(futures):
                    done = fut.result()
                    for i, inf in done:
                        info[i] = inf
                    advance(len(done))
        except BaseException:
            ex.shutdown(wait=False, cancel_futures=True)  # do not decode the rest for nothing
            raise
    return info  # type: ignore[return-value]


def _mp_context():
    """fork on Linux: no start-up imports and no need for an `if __name__ == "__main__"`
    guard in the caller's script (the workers only run Pillow and numpy); spawn elsewhere."""
    return mp.get_context("fork" if sys.platform == "linux" else "spawn")


_OUT: np.ndarray | None = None  # in a worker process: the open (N, H, W, 3) uint8 memmap


PR_SET_PDEATHSIG = 1  # prctl option (linux/prctl.h): a signal the kernel sends this process when its parent dies


def _die_with_parent(parent: int) -> None:
    """In a decode worker: be killed when the process that started the build dies (SIGKILL included),
    instead of decoding on for minutes and holding the temporary cache. Linux only; elsewhere the
    pool notices at its next task."""
    if sys.platform == "linux":
        try:
            libc = ctypes.CDLL(None, use_errno=True)
            libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
        except (OSError, AttributeError):
            pass
    if os.getppid() != parent:  # the parent died before the signal was armed
        os._exit(1)


def _worker_init(npy: str, parent: int | None = None) -> None:
    global _OUT
    if parent is not None:
        _die_with_parent(parent)
    _OUT = np.load(npy, mmap_mode="r+")


def _worker_decode(items: list[tuple[int, str]], size: tuple[int, int]) -> list[tuple[int, dict]]:
    """Decode `items` (row, path) straight into the shared memmap; only the info goes back."""
    done = []
    for i, p in items:
        _OUT[i], inf = decode_resize(p, size)
        done.append((i, inf))
    return done
