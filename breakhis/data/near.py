"""Near-duplicate fields across patients: a perceptual hash of each cached field, compared in pairs.

A copy of a field stored again as grayscale, recompressed or slightly rescaled is not pixel-identical
(dataset.find_duplicates misses it) but looks the same. Each cached field (uint8, already resized)
gets a 64-bit difference hash (dHash): its luminance averaged over a 9x8 grid, one bit per horizontal
neighbour pair telling which is brighter. Two fields whose hashes differ in at most MAX_DISTANCE bits
are near-duplicates. Fields of one patient are alike anyway; only pairs across patients matter: their
patients are then kept on one side of every split (splits.make_split's `links`), and the integrity
report lists them.

The hashes are computed once per cache (a pass over the uint8 array) and kept beside it (dhash.npy).
"""
from __future__ import annotations

from pathlib import PurePosixPath

import numpy as np

from ..errors import UserError
from ..io import atomic_path, read_json, write_json
from .cache import Cache
from .dataset import Record, parse_name

GRID_W, GRID_H = 9, 8  # dHash: 8 rows x 8 neighbour comparisons = 64 bits
MAX_DISTANCE = 5  # bits; unrelated BreakHis-like fields differ in about 32 of 64
FLAT = 2.0  # grey levels: a field whose 9x8 cell means span less than this has no shape to compare (blank)
PAIRS_PER_FIELD = 20  # more near-duplicate pairs than this per field: the fields all look alike; stop
LUMA = np.array([0.299, 0.587, 0.114], np.float32)  # ITU-R 601, as Pillow's "L" conversion


def dhash(images: np.ndarray, chunk: int = 256, flat: np.ndarray | None = None) -> np.ndarray:
    """(N,) uint64 difference hashes of (N, H, W, 3) uint8 fields (block means over a 9x8 grid).
    flat: an (N,) bool array to fill with whether each field is blank (cell means within FLAT)."""
    n, h, w, _ = images.shape
    if h < GRID_H or w < GRID_W:  # smaller than the grid: no shape to compare
        if flat is not None:
            flat[:] = True
        return np.zeros(n, np.uint64)
    ys = np.linspace(0, h, GRID_H + 1).astype(int)
    xs = np.linspace(0, w, GRID_W + 1).astype(int)
    out = np.empty(n, np.uint64)
    weights = (1 << np.arange(63, -1, -1, dtype=np.uint64))
    for s in range(0, n, chunk):
        grey = images[s:s + chunk].astype(np.float32) @ LUMA  # (c, H, W)
        cells = np.add.reduceat(np.add.reduceat(grey, ys[:-1], axis=1), xs[:-1], axis=2)  # (c, 8, 9) sums
        cells /= np.outer(np.diff(ys), np.diff(xs))  # means
        if flat is not None:
            flat[s:s + chunk] = np.ptp(cells.reshape(len(grey), -1), axis=1) < FLAT
        bits = (cells[:, :, 1:] > cells[:, :, :-1]).reshape(len(grey), 64).astype(np.uint64)
        out[s:s + chunk] = (bits * weights).sum(axis=1, dtype=np.uint64)
    return out


def cache_hashes(cache: Cache) -> np.ndarray:
    """(N, 2) uint64: the dHash of every field of the cache and 1 where the field is blank; computed
    once and stored beside the cache."""
    path = cache.folder / "dhash.npy"
    try:
        hashes = np.load(path)
        if hashes.shape == (len(cache.paths), 2) and hashes.dtype == np.uint64:
            return hashes
    except (OSError, ValueError):
        pass
    flat = np.zeros(len(cache.paths), bool)
    hashes = np.stack([dhash(cache.images, flat=flat), flat.astype(np.uint64)], axis=1)
    try:
        with atomic_path(path) as tmp:
            with open(tmp, "wb") as f:
                np.save(f, hashes)
    except OSError:
        pass  # a read-only shared cache: use the hashes without keeping them
    return hashes


def _popcount(x: np.ndarray) -> np.ndarray:
    """Set bits of each uint64."""
    x = x - ((x >> np.uint64(1)) & np.uint64(0x5555555555555555))
    x = (x & np.uint64(0x3333333333333333)) + ((x >> np.uint64(2)) & np.uint64(0x3333333333333333))
    x = (x + (x >> np.uint64(4))) & np.uint64(0x0F0F0F0F0F0F0F0F)
    return ((x * np.uint64(0x0101010101010101)) >> np.uint64(56)).astype(np.int64)


class TooAlike(Exception):
    """So many near-duplicate pairs that the fields cannot be told apart this way (blank or synthetic)."""


def near_duplicates(records: list[Record], hashes: dict[str, int], max_distance: int = MAX_DISTANCE,
                    block: int = 1024) -> list[dict]:
    """Pairs of fields of different patients whose hashes differ in at most max_distance bits:
    [{"paths": [a, b], "patients": [pa, pb], "distance": d}], sorted. Fields without a hash (blank
    ones) are left out; more than PAIRS_PER_FIELD pairs per field raise TooAlike."""
    recs = [r for r in records if r.path in hashes]
    h = np.array([hashes[r.path] for r in recs], dtype=np.uint64)
    patient = np.array([r.patient for r in recs])
    out, cap = [], PAIRS_PER_FIELD * len(recs) + 100
    for s in range(0, len(recs), block):
        d = _popcount(h[s:s + block, None] ^ h[None, :])  # (b, N) bits that differ
        i, j = np.nonzero(d <= max_distance)
        i = i + s
        keep = (j > i) & (patient[i] != patient[j])
        if len(out) + int(keep.sum()) > cap:
            raise TooAlike(f"more than {cap} near-duplicate pairs among {len(recs)} fields")
        for a, b in zip(i[keep], j[keep]):
            out.append({"paths": [recs[a].path, recs[b].path], "patients": sorted({patient[a], patient[b]}),
                        "distance": int(d[a - s, b])})
    return sorted(out, key=lambda x: x["paths"])


def _well_formed(stored) -> bool:
    """Whether a near-<d>.json is what cache_pairs writes (anything else is damaged cache data, searched again)."""
    if not isinstance(stored, dict) or not isinstance(stored.get("pairs"), list) or not isinstance(stored.get("note"), str):
        return False
    return all(isinstance(x, dict) and isinstance(x.get("paths"), list) and len(x["paths"]) == 2
               and all(isinstance(q, str) for q in x["paths"]) and isinstance(x.get("patients"), list)
               and all(isinstance(q, str) for q in x["patients"]) for x in stored["pairs"])


def cache_pairs(cache: Cache, records: list[Record], max_distance: int = MAX_DISTANCE) -> tuple[list[dict], str]:
    """(near_duplicates among `records`, a note), from the cache's stored hashes.

    The pairwise search runs once per cache and distance, over every readable field, and is stored
    beside the cache (near-<d>.json): every train start, tune trial and evaluation reads it instead of
    comparing 31 million pairs again. Blank fields are not compared; when the fields all look alike the
    search stops, the note says so, and no pair is returned (nothing can be linked on such evidence)."""
    path = cache.folder / f"near-{max_distance}.json"
    try:
        stored = read_json(path) if path.is_file() else None
    except UserError:  # not JSON: damaged cache data, searched again
        stored = None
    if not _well_formed(stored):
        hashes = cache_hashes(cache)
        by_path = {p: int(h) for p, (h, blank), i in zip(cache.paths, hashes, cache.info) if i["ok"] and not blank}
        blank = len(cache.paths) - len(by_path)
        stored = {"pairs": [], "note": f"{blank} blank field(s) not compared for near-duplicates" if blank else ""}
        every = [r for r in (parse_name(PurePosixPath(p).name, p) for p in by_path) if r is not None]
        try:
            stored["pairs"] = near_duplicates(every, by_path, max_distance)
        except TooAlike as e:
            stored["note"] = f"near-duplicate search stopped: {e} (the fields look alike: blank or synthetic?)"
        try:
            write_json(path, stored)
        except OSError:
            pass  # a read-only shared cache: use the pairs without keeping them
    kept = {r.path for r in records}
    return [x for x in stored["pairs"] if set(x["paths"]) <= kept], stored["note"]
