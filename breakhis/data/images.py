"""Image files outside a BreakHis tree: find them (files, folders, globs) and decode them as the cache does.

    paths = find_images(["new/", "slides/*.tif", "one.png"])    # sorted, de-duplicated, as the user spelt them
    pixels, info = decode_images(paths, (256, 390))            # (N, 256, 390, 3) uint8, cache.decode_resize's info

Used by `evaluate.py RUN --images PATH...` (breakhis/newimages.py). No torch here: the paths are
checked before the heavy imports.

What is found: a file named outright is taken whatever its extension (a text file named .png is
then reported unreadable, not skipped in silence); a folder is searched recursively, and a glob
pattern (`*`, `?`, `[`) is expanded here, with `**` reaching into sub-folders, so that a quoted
pattern works too; from folders and patterns only files ending in IMAGE_SUFFIXES (any case) are
taken, hidden files and folders (`.x`, macOS `._x.png` forks) left out. Each argument must yield
at least one file, else a UserError names it. Folders are walked breadth first, following symbolic
links to folders but entering each real folder once (a link to itself or to a parent is not walked
again: no endless or 40-level-deep paths). Paths are de-duplicated by their real path (a file reached
twice, through two arguments or a symlink, is scored once: under the path that goes through no link
when one was found, else its shortest) and sorted.

Decoding is cache.decode_resize itself (see breakhis/data/cache.py): Pillow, RGB (transparency
onto white), then resized with BILINEAR (antialiased) to the run's cache size (H, W), which has
the 700:460 aspect of a BreakHis field; the aspect of the file is NOT kept. So a 500x500 square
is stretched 1.52x horizontally to fill the field, and the model's evaluation view (the central
H x H square of the field) then sees the central 66% (460/700) of its width at full height; a
700x460 field at any scale keeps its shape. A tiny image (smaller than the cache size) is
upsampled: it gains no detail, and the model sees it blurred. The model learnt fields of a given
microns-per-pixel; an image at another magnification or scan resolution is scored all the same.
A multi-page TIFF gives its first page; an image over Pillow's decompression-bomb limit (about
179 megapixels, e.g. a whole-slide TIFF) is refused as unreadable: tile it first.
"""
from __future__ import annotations

import fnmatch
import glob
import os
from collections import deque
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from ..errors import UserError
from .cache import decode_resize, default_workers
from .dataset import Record, parse_name

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff")
MAGIC = ("*", "?", "[")  # a path holding one of these, and naming no existing file, is a glob pattern


def _image_file(name: str) -> bool:
    return not name.startswith(".") and name.lower().endswith(IMAGE_SUFFIXES)


def _walk(folder: str) -> list[str]:
    """Image files below a folder, recursively (hidden files and folders left out): breadth first, each real
    folder entered once, from the shortest path that reaches it (os.walk(followlinks=True) entered a folder
    again through every link to it: 2^40 paths for two links to itself)."""
    out, seen, queue = [], set(), deque([folder])
    while queue:
        d = queue.popleft()
        real = os.path.realpath(d)
        if real in seen:
            continue
        seen.add(real)
        try:
            entries = sorted(os.scandir(d), key=lambda e: e.name)
        except OSError:  # unreadable, or vanished: as os.walk, skipped
            continue
        for e in entries:
            if e.name.startswith("."):
                continue
            try:
                if e.is_dir():
                    queue.append(e.path)
                elif e.is_file() and _image_file(e.name):
                    out.append(e.path)
            except OSError:  # a broken or looping link
                continue
    return out


def _expand(arg: str) -> list[str]:
    """The files one --images argument names (see the module docstring)."""
    p = os.path.expanduser(arg)
    if os.path.isfile(p):
        return [p]
    if os.path.isdir(p):
        return _walk(p)
    if not any(c in p for c in MAGIC):
        return []
    if "**" in p:  # glob's ** follows every link again (endless for a link to a parent): walked here instead
        parts = p.split(os.sep)
        lead = next(i for i, q in enumerate(parts) if any(c in q for c in MAGIC))
        root = os.sep.join(parts[:lead]) or ("/" if p.startswith(os.sep) else ".")
        shallow = p.replace("**" + os.sep, "")  # ** also matches no folder at all
        return [f for f in (_walk(root) if os.path.isdir(root) else [])
                if fnmatch.fnmatchcase(f, p) or fnmatch.fnmatchcase(f, shallow)
                or fnmatch.fnmatchcase(os.path.normpath(f), os.path.normpath(p))]
    out = []
    for m in glob.glob(p):
        if os.path.isdir(m):
            out += _walk(m)
        elif os.path.isfile(m) and _image_file(os.path.basename(m)):
            out.append(m)
    return out


def find_images(args: Sequence[str]) -> list[str]:
    """Image files named by files, folders and glob patterns: normalised, de-duplicated, sorted.

    An argument that yields no file (missing, a folder without PNG/JPEG/TIFF files, a pattern that
    matches none) is a UserError naming every such argument.
    """
    found, empty = [], []
    for arg in args:
        files = _expand(str(arg))
        if not files:
            empty.append(str(arg))
        found += files
    if empty:
        what = ", ".join(empty)
        raise UserError(f"{what}: no image file found (give PNG, JPEG or TIFF files, folders holding "
                        f"them, or glob patterns such as 'new/*.png')")
    unique: dict[str, str] = {}
    # a file found under several paths keeps the one that goes through no link, else the shortest
    for f in sorted({os.path.normpath(f) for f in found},
                    key=lambda f: (os.path.realpath(f) != os.path.abspath(f), f.count(os.sep), f)):
        unique.setdefault(os.path.realpath(f), f)
    return sorted(unique.values())


def decode_images(paths: Sequence[str], size: tuple[int, int], workers: int = 0) -> tuple[np.ndarray, list[dict]]:
    """Decode files into (N, H, W, 3) uint8 with cache.decode_resize (size=(H, W)), in threads.

    Returns the pixels and one info dict per file (ok, error, mode, width, height, sha1); an
    unreadable file has ok=False, its error, and zero pixels. workers: threads (0: one per core);
    Pillow releases the GIL while it decodes and resizes.
    """
    h, w = size
    out = np.zeros((len(paths), h, w, 3), np.uint8)
    info: list[dict] = [{}] * len(paths)
    if workers <= 0:
        workers = default_workers()

    def one(i: int) -> None:
        out[i], info[i] = decode_resize(paths[i], (h, w))

    with ThreadPoolExecutor(max(1, min(workers, len(paths)))) as ex:
        list(ex.map(one, range(len(paths))))
    return out, info


def breakhis_record(path: str) -> Record | None:
    """The Record a BreakHis file name gives (patient, magnification), whatever its folder and image
    suffix (`SOB_B_A-14-22549AB-40-001.jpg` too); None for any other name."""
    stem = Path(path).stem
    return parse_name(stem + ".png", path) if Path(path).suffix.lower() in IMAGE_SUFFIXES else None
