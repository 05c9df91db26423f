"""Near-duplicate fields across patients: hash candidates, verified by correlation, grouped by patient.

A copy of a field stored again as grayscale, recompressed, slightly rescaled, flipped or rotated is not
pixel-identical (dataset.find_duplicates misses it) but shows the same tissue. Two steps find it:

1. Candidates. Each cached field (uint8, already resized) becomes a THUMB x THUMB grayscale thumbnail
   (block means over the whole field: square in the field's own coordinates, so its 8 dihedral views
   are the thumbnails of the field's flipped and rotated copies, whatever the field's aspect). Each
   view gets a 64-bit difference hash (dHash: luminance over a 9x8 grid, one bit per horizontal
   neighbour pair telling which is brighter). A pair of fields of different patients is a candidate
   when the hash of one is within MAX_DISTANCE bits of the hash of any view of the other. The search
   over views costs 8 popcounts per pair (numpy's bitwise_count; about 4 s for the archive's 7,909
   fields on 2 cores, after about 20 s reading the cache into thumbnails), so flipped and rotated
   copies are candidates too.
2. Verification. A hash is 64 bits of coarse layout: fields that share an illumination falloff or a
   framing match it by coincidence (on sklearn's digits laid out as a tree, 7,000-20,000 pairs at 5
   bits). A candidate is kept only when the Pearson correlation of the two thumbnails, high-passed
   (each BAND x BAND block's mean removed, so shading and layout coarser than 1/8 of the field do not
   count), is at least MIN_CORRELATION for one of the 8 views of the second field: the same texture
   at every one of the 1,024 thumbnail cells, nuclei in the same places, not a similar look.

Fields of one patient are alike anyway; only pairs across patients matter. Verified pairs link their
patients (settings.near_duplicates "link", the default): linked patients stay on one side of every
split (splits.make_split's `links`), and `groups` lists the linked patients. A group larger than
max_group() patients is not taken on trust (prepare.check_groups refuses the split and names
--near-duplicates report / off). Thumbnails are computed once per cache (thumbs-<THUMB>.npy) and the
pairs once per cache and setting (near-<VERSION>-<d>.json), beside the cache.
"""
from __future__ import annotations

import math
from collections import defaultdict
from pathlib import PurePosixPath

import numpy as np

from ..errors import UserError
from ..io import atomic_path, read_json, write_json
from .cache import Cache
from .dataset import Record, parse_name

THUMB = 32  # thumbnail side, cells (1,024 values compared per pair)
BAND = 4  # thumbnail cells per side of the blocks whose means are removed before correlating (high-pass)
GRID_W, GRID_H = 9, 8  # dHash: 8 rows x 8 neighbour comparisons = 64 bits
MAX_DISTANCE = 8  # bits; unrelated fields differ in about 32 of 64, copies in 0-3; candidates only
# Measured (tests/test_near.py, docs/data.md) on fields cut from ../shared/data/he-field.png at 256x390:
# copies (grayscale, JPEG q50, rescaled 0.75, all 8 dihedral views) correlate >= 0.989; unrelated fields
# (480 cut from one picture: 114,960 pairs x 8 views) 0.20 at the 99.9th percentile, 0.67 at most (cuts of an
# overlapping spot), 0.40 under a shared 50% vignette; different digits of sklearn's 8x8 set drawn alike: 0.08%
# of pairs above 0.95. 0.95 keeps the copies with a margin and needs nuclei in the same places.
MIN_CORRELATION = 0.95
FLAT = 2.0  # grey levels: a field whose 9x8 cell means span less than this has no shape to compare (blank)
PAIRS_PER_FIELD = 20  # more candidate pairs than this per field: the fields all look alike; stop
GROUP_PATIENTS, GROUP_SHARE = 4, 0.05  # see max_group
VERSION = 2  # of the stored pairs: version 1 kept unverified hash pairs, never read again
MODES = ("link", "report", "off")  # settings.near_duplicates
LUMA = np.array([0.299, 0.587, 0.114], np.float32)  # ITU-R 601, as Pillow's "L" conversion


def thumbnails(images: np.ndarray, chunk: int = 256) -> np.ndarray:
    """(N, THUMB, THUMB) float32 grey levels: block means of (N, H, W, 3) uint8 fields over a THUMB x THUMB
    grid (cells of H/THUMB x W/THUMB pixels; a field smaller than the grid repeats its pixels)."""
    n, h, w, _ = images.shape
    ys = np.linspace(0, h, THUMB + 1)
    xs = np.linspace(0, w, THUMB + 1)
    out = np.empty((n, THUMB, THUMB), np.float32)
    if h < THUMB or w < THUMB:  # nearest pixel per cell
        yi, xi = np.minimum((ys[:-1] + ys[1:]) / 2, h - 1).astype(int), np.minimum((xs[:-1] + xs[1:]) / 2, w - 1).astype(int)
        for s in range(0, n, chunk):
            out[s:s + chunk] = (images[s:s + chunk][:, yi][:, :, xi].astype(np.float32) @ LUMA)
        return out
    ys, xs = ys.astype(int), xs.astype(int)
    area = np.outer(np.diff(ys), np.diff(xs)).astype(np.float32)
    for s in range(0, n, chunk):
        grey = images[s:s + chunk].astype(np.float32) @ LUMA  # (c, H, W)
        out[s:s + chunk] = np.add.reduceat(np.add.reduceat(grey, ys[:-1], axis=1), xs[:-1], axis=2) / area
    return out


def views(t: np.ndarray) -> np.ndarray:
    """(N, 8, T, T): the 8 dihedral views (identity, flips, rotations, transposes) of (N, T, T) thumbnails."""
    tt = t.transpose(0, 2, 1)
    return np.stack([t, t[:, ::-1], t[:, :, ::-1], t[:, ::-1, ::-1], tt, tt[:, ::-1], tt[:, :, ::-1], tt[:, ::-1, ::-1]], 1)


def dhash(t: np.ndarray, flat: np.ndarray | None = None) -> np.ndarray:
    """(N,) uint64 difference hashes of (N, T, T) thumbnails (cell means over a 9x8 grid).
    flat: an (N,) bool array to fill with whether each is blank (its cell means within FLAT)."""
    n, h, w = t.shape
    ys = np.linspace(0, h, GRID_H + 1).astype(int)
    xs = np.linspace(0, w, GRID_W + 1).astype(int)
    cells = np.add.reduceat(np.add.reduceat(t, ys[:-1], axis=1), xs[:-1], axis=2) / np.outer(np.diff(ys), np.diff(xs))
    if flat is not None:
        flat[:] = np.ptp(cells.reshape(n, -1), axis=1) < FLAT
    bits = (cells[:, :, 1:] > cells[:, :, :-1]).reshape(n, 64).astype(np.uint64)
    return (bits << np.arange(63, -1, -1, dtype=np.uint64)).sum(axis=1, dtype=np.uint64)


def signatures(t: np.ndarray) -> np.ndarray:
    """(N, THUMB, THUMB) float32: thumbnails high-passed (BAND x BAND block means removed), zero mean, unit
    norm, so the dot product of two is their Pearson correlation. The block grid is symmetric (THUMB % BAND
    == 0), so the signature of a view is the view of the signature."""
    n, b = len(t), THUMB // BAND
    v = t.astype(np.float32).reshape(n, b, BAND, b, BAND)
    v = (v - v.mean((2, 4), keepdims=True)).reshape(n, -1)
    v /= np.maximum(np.linalg.norm(v, axis=1, keepdims=True), 1e-6)
    return v.reshape(n, THUMB, THUMB)


def cache_thumbnails(cache: Cache) -> np.ndarray:
    """(N, THUMB, THUMB) float32 thumbnails of every field of the cache, computed once and stored beside it."""
    path = cache.folder / f"thumbs-{THUMB}.npy"
    try:
        t = np.load(path)
        if t.shape == (len(cache.paths), THUMB, THUMB) and t.dtype == np.float16 and np.isfinite(t).all():
            return t.astype(np.float32)
    except (OSError, ValueError):
        pass  # missing or damaged: computed again
    t = thumbnails(cache.images)
    try:
        with atomic_path(path) as tmp:
            with open(tmp, "wb") as f:
                np.save(f, t.astype(np.float16))  # 0.125 grey level at most: far below texture contrast
    except OSError:
        pass  # a read-only shared cache: use them without keeping them
    return t


class TooAlike(Exception):
    """So many candidate pairs that the fields cannot be told apart this way (blank or synthetic)."""


def candidates(h: np.ndarray, patient: np.ndarray, max_distance: int = MAX_DISTANCE,
               block: int = 64) -> tuple[np.ndarray, np.ndarray]:
    """(i, j) index arrays, i < j, of fields of different patients whose view-0 hash (h (N, 8) uint64, one
    hash per view) is within max_distance bits of a view of the other's; more than PAIRS_PER_FIELD per
    field raises TooAlike."""
    n = len(h)
    cap = PAIRS_PER_FIELD * n + 100
    got: list[np.ndarray] = []
    total = 0
    for s in range(0, n, block):
        d = np.bitwise_count(h[s:s + block, None, 0:1] ^ h[None, :, :]).min(2)  # (b, N) bits, best view
        i, j = np.nonzero(d <= max_distance)
        i = i + s
        keep = (i != j) & (patient[i] != patient[j])
        pair = np.sort(np.stack([i[keep], j[keep]], 1), axis=1)
        total += len(pair)
        if total > 2 * cap:  # each pair can be found from both ends
            raise TooAlike(f"more than {cap} near-duplicate candidates among {n} fields")
        got.append(pair)
    pairs = np.unique(np.concatenate(got or [np.zeros((0, 2), np.int64)]), axis=0)
    if len(pairs) > cap:
        raise TooAlike(f"more than {cap} near-duplicate candidates among {n} fields")
    return pairs[:, 0], pairs[:, 1]


def correlations(sig: np.ndarray, i: np.ndarray, j: np.ndarray, chunk: int = 4096) -> tuple[np.ndarray, np.ndarray]:
    """(correlation, view) of each pair: the largest Pearson correlation of field i with any of the 8
    dihedral views of field j (sig: signatures (N, T, T)), and that view's number (views' order)."""
    corr, view = np.empty(len(i), np.float32), np.empty(len(i), np.int64)
    for s in range(0, len(i), chunk):
        a, b = i[s:s + chunk], j[s:s + chunk]
        c = np.einsum("pd,pvd->pv", sig[a].reshape(len(a), -1), views(sig[b]).reshape(len(b), 8, -1))  # (p, 8)
        corr[s:s + chunk], view[s:s + chunk] = c.max(1), c.argmax(1)
    return corr, view


def near_duplicates(records: list[Record], thumbs: dict[str, np.ndarray], max_distance: int = MAX_DISTANCE
                    ) -> tuple[list[dict], int]:
    """(verified pairs, candidates): pairs of fields of different patients that are hash candidates and
    correlate at MIN_CORRELATION or more, [{"paths": [a, b], "patients": [pa, pb], "distance": bits (view
    0 of a against the best view of b), "correlation": r, "view": v}], sorted; fields without a thumbnail
    (blank ones) are left out. More than PAIRS_PER_FIELD candidates per field raise TooAlike."""
    recs = [r for r in records if r.path in thumbs]
    if len(recs) < 2:
        return [], 0
    t = np.stack([thumbs[r.path] for r in recs])  # (N, T, T)
    h = np.stack([dhash(v) for v in views(t).transpose(1, 0, 2, 3)], 1)  # (N, 8) a hash per view
    patient = np.array([r.patient for r in recs])
    i, j = candidates(h, patient, max_distance)
    corr, view = correlations(signatures(t), i, j)
    bits = np.bitwise_count(h[i, 0:1] ^ h[j]).min(1) if len(i) else np.zeros(0, np.int64)
    out = [{"paths": [recs[a].path, recs[b].path], "patients": sorted({str(patient[a]), str(patient[b])}), "distance": int(d),
            "correlation": round(float(c), 4), "view": int(v)}
           for a, b, d, c, v in zip(i, j, bits, corr, view) if c >= MIN_CORRELATION]
    return sorted(out, key=lambda x: x["paths"]), len(i)


def _well_formed(stored) -> bool:
    """Whether a near-*.json is what cache_pairs writes (anything else is damaged cache data, searched again)."""
    if not isinstance(stored, dict) or not isinstance(stored.get("pairs"), list) or not isinstance(stored.get("note"), str):
        return False
    return all(isinstance(x, dict) and isinstance(x.get("paths"), list) and len(x["paths"]) == 2
               and all(isinstance(q, str) for q in x["paths"]) and isinstance(x.get("patients"), list)
               and all(isinstance(q, str) for q in x["patients"]) for x in stored["pairs"])


def pairs_file(cache: Cache, max_distance: int = MAX_DISTANCE):
    """Where cache_pairs keeps its result beside the cache."""
    return cache.folder / f"near-{VERSION}-{max_distance}.json"


def cache_pairs(cache: Cache, records: list[Record], max_distance: int = MAX_DISTANCE) -> tuple[list[dict], str]:
    """(near_duplicates among `records`, a note), from the cache's stored thumbnails.

    The search runs once per cache and distance, over every readable field, and is stored beside the
    cache (pairs_file): every train start, tune trial and evaluation reads it. Blank fields are not
    compared; when the fields all look alike the search stops, the note says so, and no pair is
    returned (nothing can be linked on such evidence)."""
    path = pairs_file(cache, max_distance)
    try:
        stored = read_json(path) if path.is_file() else None
    except UserError:  # not JSON: damaged cache data, searched again
        stored = None
    if not _well_formed(stored):
        thumbs = cache_thumbnails(cache)
        flat = np.zeros(len(thumbs), bool)
        dhash(thumbs, flat=flat)
        by_path = {p: t for p, t, blank, i in zip(cache.paths, thumbs, flat, cache.info) if i["ok"] and not blank}
        blank = sum(bool(b) for b, i in zip(flat, cache.info) if i["ok"])
        stored = {"pairs": [], "candidates": 0,
                  "note": f"{blank} blank field(s) not compared for near-duplicates" if blank else ""}
        every = [r for r in (parse_name(PurePosixPath(p).name, p) for p in by_path) if r is not None]
        try:
            stored["pairs"], stored["candidates"] = near_duplicates(every, by_path, max_distance)
        except TooAlike as e:
            stored["note"] = f"near-duplicate search stopped: {e} (the fields look alike: blank or synthetic?)"
        try:
            write_json(path, stored)
        except OSError:
            pass  # a read-only shared cache: use the pairs without keeping them
    kept = {r.path for r in records}
    return [x for x in stored["pairs"] if set(x["paths"]) <= kept], stored["note"]


def max_group(patients: int) -> int:
    """The most patients one group of linked patients may join before the links are refused as evidence:
    GROUP_PATIENTS, or GROUP_SHARE of the patients if that is more (4 of the archive's 82).

    Why: a field copied under another patient links two patients; an archive with a few such mistakes
    gives a few small groups. Links that join more patients than that come from fields that look alike,
    not from copies, and a group of 5% of the patients on one side already moves a 10% validation
    partition by half its size."""
    return max(GROUP_PATIENTS, math.floor(GROUP_SHARE * patients))


def groups(pairs: list[dict], records: list[Record]) -> list[dict]:
    """Connected components of patients linked by `pairs`, largest first: [{"patients": [...], "size": k,
    "classes": {"benign": patients, "malignant": patients}, "subtypes": [...], "pairs": n}]."""
    cls = {r.patient: r.cls for r in records}
    sub = {r.patient: r.subtype for r in records}
    parent: dict[str, str] = {}

    def find(u: str) -> str:
        while parent.get(u, u) != u:
            u = parent[u]
        return u

    for x in pairs:
        a, b = (find(q) for q in x["patients"])
        if a != b:
            parent[max(a, b)] = min(a, b)
    members, count = defaultdict(set), defaultdict(int)
    for x in pairs:
        root = find(x["patients"][0])
        members[root] |= set(x["patients"])
        count[root] += 1
    out = []
    for root, pats in members.items():
        pats = sorted(pats)
        out.append({"patients": pats, "size": len(pats),
                    "classes": {c: sum(cls.get(q) == c for q in pats) for c in ("benign", "malignant")},
                    "subtypes": sorted({sub[q] for q in pats if q in sub}), "pairs": count[root]})
    return sorted(out, key=lambda g: (-g["size"], g["patients"]))


def describe(group: dict) -> str:
    """'82 patients (24 benign, 58 malignant; 1,234 verified pairs)'."""
    c = group["classes"]
    return (f"{group['size']} patients ({c['benign']} benign, {c['malignant']} malignant; "
            f"{group['pairs']:,} verified pair(s))")


def check_groups(pairs: list[dict], records: list[Record]) -> list[dict]:
    """The groups of linked patients; a UserError when the largest joins more than max_group() patients
    (never formed silently: it would decide the split, on evidence that is not copies)."""
    found = groups(pairs, records)
    patients = len({r.patient for r in records})
    limit = max_group(patients)
    if found and found[0]["size"] > limit:
        g = found[0]
        raise UserError(f"near-duplicate links would join {describe(g)} of {patients} into one split unit (more than "
                        f"{limit} patients is not copies but fields that look alike): see them with python -m "
                        f"breakhis.data ROOT --json, then pass --near-duplicates report (listed, not linked) or "
                        f"--near-duplicates off")
    return found
