"""The BreaKHis_v1 tree: index the file names, report integrity, split by patient, official folds.

    python -m breakhis.data data/BreaKHis_v1                   # integrity report (rich tables)
    python -m breakhis.data data/BreaKHis_v1 --json            # the same, one JSON object on the last line
    python -m breakhis.data data/BreaKHis_v1 --split 70:10:20 --seed 0 --out split.json
    python -m breakhis.data data/BreaKHis_v1 --fold 1 --out fold1.json   # official protocol, val carved from train
    python -m breakhis.data data/BreaKHis_v1 --split-file split.json     # check a manifest
    python -m breakhis.data --download data                    # fetch and extract the archive, then report

Layout: BreaKHis_v1/histology_slides/breast/<benign|malignant>/SOB/<subtype>/<patient folder>/<mag>X/<file>.png
with patient folders `SOB_B_A_14-22549AB` and files `SOB_B_A-14-22549AB-40-001.png`.
Splits are by patient (or accession with --group accession), so no patient is on two sides;
the --magnification filter is applied afterwards, so one split serves every magnification.
A split manifest lists kept images only: duplicates are dropped per --task (see drop_duplicates).
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import re
import string
from collections import Counter, defaultdict
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

import numpy as np

from .atomic import write_json
from .config import TrainConfig, parse_hw
from .demo import MAGS as MAGNIFICATIONS
from .demo import SUBTYPE_CODES
from .errors import UserError, guard

SUBTYPES = tuple(sub for _, sub in SUBTYPE_CODES.values())  # label order of the subtype task
CLASSES = ("benign", "malignant")
PARTS = ("train", "val", "test")
URL = "http://www.inf.ufpr.br/vri/databases/BreaKHis_v1.tar.gz"
HINT = ("download it (python -m breakhis.data --download data) or make a synthetic tree "
        "(python -m breakhis.demo data/demo)")
FULL = {"patients": 82, "images": 7909, "benign": 2480, "malignant": 5429}  # the published archive
TRIALS = 4000  # seeded assignments tried per split
CLASS_COST = 0.5  # weight of the per-class image-fraction error next to the overall one
SPREAD_COST = 0.1  # a (subtype, partition) pair left empty costs as much as 10 points of image-fraction error
_NAME = re.compile(r"SOB_([BM])_(A|F|PT|TA|DC|LC|MC|PC)-(\d+)-(\d+[A-Za-z]*)-(40|100|200|400)-(\d+)\.(?:png|PNG)")


@dataclass(frozen=True)
class Record:
    """One image, labelled from its file name (checked against its folders by index_tree)."""

    path: str  # posix path relative to the BreaKHis_v1 root
    patient: str  # 'SOB_B_A-14-22549AB' (file-name form)
    label: int  # 0 benign, 1 malignant
    subtype: str  # folder name, e.g. 'adenosis'
    magnification: int  # 40, 100, 200 or 400
    seq: int

    @property
    def cls(self) -> str:
        return CLASSES[self.label]

    @property
    def subtype_index(self) -> int:
        return SUBTYPES.index(self.subtype)

    @property
    def accession(self) -> str:
        """Patient id without the slide letters: 22549AB, 22549CD and 22549G share 'SOB_B_A-14-22549'."""
        return self.patient.rstrip(string.ascii_letters)

    def expected_path(self) -> str:
        """Where the archive keeps a file of this name."""
        folder = self.patient.replace("-", "_", 1)  # SOB_B_A-14-x -> SOB_B_A_14-x
        return (f"histology_slides/breast/{self.cls}/SOB/{self.subtype}/{folder}/{self.magnification}X/"
                f"{PurePosixPath(self.path).name}")


def parse_name(name: str, path: str | None = None) -> Record | None:
    """Record for a BreakHis file name (`SOB_M_PC-15-190EF-100-012.png`), None if it is not one."""
    m = _NAME.fullmatch(name)
    if not m:
        return None
    b, code, year, slide, mag, seq = m.groups()
    cls, sub = SUBTYPE_CODES[code]
    if cls[0].upper() != b:  # e.g. SOB_B_DC: a malignant type under the benign letter
        return None
    return Record(path or name, f"SOB_{b}_{code}-{year}-{slide}", CLASSES.index(cls), sub, int(mag), int(seq))


def _has_png(folder: Path) -> bool:
    return any(f.lower().endswith(".png") and not f.startswith(".") for _, _, fs in os.walk(folder) for f in fs)


def find_root(path: str | Path) -> Path:
    """The BreaKHis_v1 folder, given it, its parent, or the Kaggle mirror's nested BreaKHis_v1/BreaKHis_v1."""
    p = Path(path).expanduser()
    if not p.exists():
        raise UserError(f"data folder {p} not found: {HINT}")
    for c in (p, p / "BreaKHis_v1", p / "BreaKHis_v1" / "BreaKHis_v1"):
        if (c / "histology_slides" / "breast").is_dir() and _has_png(c / "histology_slides"):
            return c
    raise UserError(f"no BreakHis images under {p} (expected BreaKHis_v1/histology_slides/breast/.../*.png "
                    f"in it): point at the extracted archive, or {HINT}")


@dataclass
class Index:
    """What index_tree found: labelled images (sorted by path) and ignored stray files."""

    root: Path
    records: list[Record]
    strays: list[str]  # non-image files (.DS_Store, Thumbs.db, text), relative to root

    @property
    def patients(self) -> list[str]:
        return sorted({r.patient for r in self.records})


def index_tree(root: str | Path) -> Index:
    """Parse every file name under the root (no decoding). A name that disagrees with its folders is a UserError."""
    root = find_root(root)
    records, strays, bad = [], [], []
    for dirpath, dirnames, files in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))  # .ipynb_checkpoints and the like
        rel_dir = Path(dirpath).relative_to(root).as_posix()
        for f in sorted(files):
            rel = f if rel_dir == "." else f"{rel_dir}/{f}"
            if f.startswith(".") or not f.lower().endswith(".png"):  # includes macOS '._x.png' forks
                strays.append(rel)
                continue
            rec = parse_name(f, rel)
            if rec is None:
                bad.append(f"{rel} (not a BreakHis name SOB_<B|M>_<type>-<year>-<slide>-<mag>-<seq>.png)")
            elif rec.expected_path() != rel:
                bad.append(f"{rel} (its name belongs in {rec.expected_path().rsplit('/', 1)[0]})")
            else:
                records.append(rec)
    if bad:
        raise UserError(f"{len(bad)} file(s) under {root} disagree with the BreakHis naming or with their folders: "
                        f"{'; '.join(bad)}: rename or move them, or delete stray copies")
    records.sort(key=lambda r: r.path)
    return Index(root, records, strays)


# ---------------------------------------------------------------- duplicates
def find_duplicates(records: list[Record], hashes: dict[str, str]) -> list[list[str]]:
    """Groups of paths (sorted) whose pixel hash is identical and that span more than one patient."""
    by_hash = defaultdict(list)
    for r in records:
        if hashes.get(r.path):
            by_hash[hashes[r.path]].append(r)
    return sorted(sorted(r.path for r in rs) for rs in by_hash.values() if len({r.patient for r in rs}) > 1)


def drop_duplicates(records: list[Record], groups: list[list[str]], task: str) -> tuple[list[Record], list[dict]]:
    """Resolve duplicate groups for a task: copies whose task labels agree keep the first copy;
    copies with conflicting labels (the 13412 DC/LC pair under the subtype task) are all dropped.
    Returns the kept records and one dict per dropped image (path, patient, reason, kept)."""
    if task not in ("binary", "subtype"):
        raise UserError(f"--task {task!r}: choose binary or subtype")
    by_path = {r.path: r for r in records}
    dropped = {}
    for g in groups:
        rs = [by_path[p] for p in g if p in by_path]
        labels = sorted({r.cls if task == "binary" else r.subtype for r in rs})
        if len(rs) < 2:
            continue
        if len(labels) > 1:
            for r in rs:
                dropped[r.path] = {"path": r.path, "patient": r.patient, "kept": None,
                                   "reason": f"pixel-identical copies carry conflicting {task} labels ({', '.join(labels)})"}
        else:
            for r in rs[1:]:
                dropped[r.path] = {"path": r.path, "patient": r.patient, "kept": rs[0].path,
                                   "reason": f"pixel-identical to {rs[0].path} of patient {rs[0].patient}"}
    return [r for r in records if r.path not in dropped], [dropped[p] for p in sorted(dropped)]


# ---------------------------------------------------------------- splits
def parse_ratio(ratio) -> tuple[int, int, int]:
    """'70:10:20' or (70, 10, 20) -> three whole percentages summing to 100 (TrainConfig's rule)."""
    text = ratio if isinstance(ratio, str) else ":".join(str(v) for v in ratio)
    return TrainConfig(split=text).split_ratio()


def parse_magnification(magnification: str | int) -> int | None:
    """40/100/200/400 -> int; 'all' -> None."""
    if str(magnification).lower() == "all":
        return None
    if str(magnification).upper().rstrip("X") in {str(m) for m in MAGNIFICATIONS}:
        return int(str(magnification).upper().rstrip("X"))
    raise UserError(f"--magnification {magnification!r}: choose 40, 100, 200, 400 or all")


def _group_key(group: str):
    if group == "patient":
        return lambda r: r.patient
    if group == "accession":
        return lambda r: r.accession
    raise UserError(f"--group {group!r}: choose patient or accession")


def _units(records: list[Record], group: str):
    """Split units (patients or accessions) in sorted order: (key fn, keys, images (U,), label (U,), subtype (U,))."""
    key = _group_key(group)
    count, first = Counter(key(r) for r in records), {}
    for r in records:
        first.setdefault(key(r), r)
    keys = sorted(count)
    return (key, keys, np.array([count[k] for k in keys], np.float64),
            np.array([first[k].label for k in keys]), np.array([first[k].subtype_index for k in keys]))


def _require(label: np.ndarray, parts: int, group: str, what: str) -> None:
    per = np.bincount(label, minlength=2)
    if per.min() < parts:
        raise UserError(f"cannot split {what}: {per[0]} benign and {per[1]} malignant {group}s, but both classes in "
                        f"each of {parts} partitions need at least {parts} {group}s per class; use a bigger tree "
                        f"(python -m breakhis.demo OUT --patients 8) or fewer partitions (e.g. --split 80:0:20)")


def _score(assign: np.ndarray, n, label, sub, fracs) -> tuple[np.ndarray, np.ndarray]:
    """Score (lower is better) and feasibility (both classes in every non-empty partition) of (T, U) assignments.

    Score: overall image-fraction error + CLASS_COST * per-class image-fraction error
    + SPREAD_COST * (subtype, partition) pairs left empty although the subtype has units to spare."""
    active = fracs > 0
    onehot = (assign[:, None, :] == np.arange(len(fracs))[:, None]).astype(np.float32)  # (T, P, U)
    cls = np.eye(2)[label]  # (U, 2)
    feats = np.concatenate([n[:, None], n[:, None] * cls, cls, np.eye(len(SUBTYPES))[sub]], 1)  # (U, 5 + S)
    tot = onehot @ feats.astype(np.float32)  # (T, P, 5 + S): images, images per class, units per class, per subtype
    dev = np.abs(tot[:, :, 0] / n.sum() - fracs).sum(1)
    dev = dev + CLASS_COST * np.abs(tot[:, :, 1:3] / feats[:, 1:3].sum(0) - fracs[:, None]).sum((1, 2))
    cover = (tot[:, active, 5:] > 0).sum(1)  # (T, S) partitions holding each subtype
    want = np.minimum(feats[:, 5:].sum(0), active.sum())  # as many partitions as the subtype has units
    return dev + SPREAD_COST * (want - cover).sum(1), (tot[:, active, 3:5] > 0).all((1, 2))


def _search(n, label, sub, fracs, seed: int, trials: int = TRIALS) -> np.ndarray:
    """Best of `trials` seeded assignments of units to partitions, (U,) partition indices.

    Each trial orders every subtype's units at random and lays them along [0, 1) by their image
    counts, shifted by a random start (systematic sampling), so each subtype is split close to the
    target fractions. In half of the trials, a subtype with enough units first gives one unit to
    every partition and the rest fill what each partition still lacks. Trials without both classes
    in a partition are refused (if none is left, the best trial is repaired by moving small units);
    the best one is then polished by single moves and swaps of units (_polish)."""
    rng = np.random.default_rng(seed)
    fracs = np.asarray(fracs, np.float64)
    active = np.flatnonzero(fracs > 0)
    assign = np.zeros((trials, len(n)), np.int64)
    rows = np.arange(trials)[:, None]
    forced = np.arange(trials) < trials // 2  # (T,) trials that seed every partition first
    for s in np.unique(sub):
        idx = np.flatnonzero(sub == s)
        order = idx[np.argsort(rng.random((trials, len(idx))), axis=1)]  # (T, k) units, a permutation per trial
        target = np.broadcast_to(fracs * n[idx].sum(), (trials, len(fracs))).copy()  # (T, P) images wanted
        k0 = len(active) if len(idx) >= len(active) else 0
        if k0:
            seeds = active[np.argsort(rng.random((trials, k0)), axis=1)]  # (T, k0) a partition per seed unit
            assign[rows, order[:, :k0]] = np.where(forced[:, None], seeds, 0)
            got = np.zeros_like(target)
            np.add.at(got, (rows.repeat(k0, 1), seeds), n[order[:, :k0]])
            target = np.where(forced[:, None], np.maximum(target - got, 0), target)
            order = np.where(forced[:, None], np.concatenate([order[:, k0:], order[:, :k0]], 1), order)
            rest = np.where(forced, len(idx) - k0, len(idx))  # (T,) units still to place
        else:
            rest = np.full(trials, len(idx))
        size = n[order] * (np.arange(len(idx)) < rest[:, None])  # (T, k) placed units weigh 0
        total = np.maximum(size.sum(1, keepdims=True), 1e-9)
        mid = (np.cumsum(size, axis=1) - size / 2) / total
        pos = (mid + rng.random((trials, 1))) % 1.0
        bounds = np.cumsum(target, 1)[:, :-1] / np.maximum(target.sum(1, keepdims=True), 1e-9)  # (T, P-1)
        part = (pos[:, :, None] >= bounds[:, None, :]).sum(2)
        keep = np.arange(len(idx)) < rest[:, None]
        assign[rows, order] = np.where(keep, part, assign[rows, order])
    score, feasible = _score(assign, n, label, sub, fracs)
    if feasible.any():
        return _polish(assign[np.argmin(np.where(feasible, score, np.inf))], n, label, sub, fracs)
    best = assign[np.argmin(score)].copy()
    for p in active:
        for c in (0, 1):
            if not ((best == p) & (label == c)).any():
                donor = np.argmax([((best == q) & (label == c)).sum() for q in range(len(fracs))])
                cand = np.flatnonzero((best == donor) & (label == c))
                best[cand[np.argmin(n[cand])]] = p
    return _polish(best, n, label, sub, fracs)


def _polish(a: np.ndarray, n, label, sub, fracs, rounds: int = 20) -> np.ndarray:
    """Hill-climb from assignment (U,): apply the best single move or swap of units while the score drops."""
    active = np.flatnonzero(np.asarray(fracs) > 0)
    u, v = np.triu_indices(len(a), 1)
    for _ in range(rounds):
        moves = np.repeat(a[None], len(a) * len(active), 0)  # (U*P', U) one unit to another partition
        moves[np.arange(len(moves)), np.repeat(np.arange(len(a)), len(active))] = np.tile(active, len(a))
        swaps = np.repeat(a[None], len(u), 0)  # (pairs, U) two units trade partitions
        swaps[np.arange(len(u)), u], swaps[np.arange(len(u)), v] = a[v], a[u]
        cand = np.concatenate([a[None], moves, swaps])
        score, feasible = _score(cand, n, label, sub, np.asarray(fracs, np.float64))
        best = np.argmin(np.where(feasible, score, np.inf))
        if best == 0 or score[best] >= score[0] - 1e-12:
            break
        a = cand[best]
    return a


def _manifest(records: list[Record], key, part_of: dict[str, str], **meta) -> dict:
    m = {p: [r.path for r in records if part_of.get(key(r)) == p] for p in PARTS}
    m["patients"] = {p: sorted({r.patient for r in records if part_of.get(key(r)) == p}) for p in PARTS}
    m.update(meta, skipped=[], dropped=[])
    m["counts"] = split_counts(records, m)
    return m


def split_counts(records: list[Record], manifest: dict) -> dict:
    """Per partition: images, fraction of all split images, patients, per-class and per-subtype images."""
    by_path = {r.path: r for r in records}
    total = max(1, sum(len(manifest[p]) for p in PARTS))
    out = {}
    for p in PARTS:
        rs = [by_path[x] for x in manifest[p] if x in by_path]
        subs = Counter(r.subtype for r in rs)
        out[p] = {"images": len(rs), "fraction": round(len(manifest[p]) / total, 4),
                  "patients": len({r.patient for r in rs}), "benign": sum(r.label == 0 for r in rs),
                  "malignant": sum(r.label == 1 for r in rs), "subtypes": {s: subs[s] for s in SUBTYPES if subs[s]}}
    return out


def make_split(records: list[Record], ratio=(60, 10, 30), seed: int = 0, group: str = "patient") -> dict:
    """Patient-level (or accession-level) train/val/test manifest over all magnifications.

    No unit in two partitions, both classes in every non-empty partition, each subtype in as many
    partitions as it has units (up to 3), image fractions as close to `ratio` as the search finds."""
    ratio = parse_ratio(ratio)
    key, keys, n, label, sub = _units(records, group)
    fracs = np.array(ratio, np.float64) / 100
    _require(label, int((fracs > 0).sum()), group, f"{len(records)} images by {group} {':'.join(map(str, ratio))}")
    assign = _search(n, label, sub, fracs, seed)
    part_of = {k: PARTS[a] for k, a in zip(keys, assign)}
    return _manifest(records, key, part_of, seed=seed, ratio=list(ratio), group=group, fold=0)


def _fold_sides(root: Path, fold: int) -> tuple[dict[str, set], Path]:
    """File name -> {'train'|'test'} for an official fold, from Folds.csv or mkfold/dsfold<N>.txt."""
    dirs = [root, root.parent, root.parent.parent]
    for d in dirs:
        sides, found = defaultdict(set), None
        if (d / "Folds.csv").is_file():
            found = d / "Folds.csv"
            with open(found, newline="") as fh:
                reader = csv.DictReader(fh)
                if not {"fold", "mag", "filename", "grp"} <= set(reader.fieldnames or ()):
                    raise UserError(f"{found}: expected the columns fold,mag,filename,grp (Kaggle layout), "
                                    f"found {','.join(reader.fieldnames or ())}")
                rows = [(reader.line_num, r["fold"], r["filename"], r["grp"]) for r in reader]
        elif (d / "mkfold" / f"dsfold{fold}.txt").is_file():
            found = d / "mkfold" / f"dsfold{fold}.txt"
            rows = []
            for i, line in enumerate(found.read_text().splitlines(), 1):
                if line.strip():
                    f = line.strip().split("|")
                    if len(f) != 4:
                        raise UserError(f"{found} line {i}: expected name|mag|fold|train-or-test, found {line!r}")
                    rows.append((i, f[2], f[0], f[3]))
        if found is None:
            continue
        for line, fo, name, grp in rows:
            if fo.strip() != str(fold):
                continue
            if grp.strip().lower() not in ("train", "test"):
                raise UserError(f"{found} line {line}: group {grp!r} is neither train nor test")
            sides[PurePosixPath(name.strip().replace("\\", "/")).name].add(grp.strip().lower())
        if not sides:
            raise UserError(f"{found} has no rows for fold {fold}: use a fold it lists, or --split")
        return sides, found
    raise UserError(f"--fold {fold}: no Folds.csv or mkfold/dsfold{fold}.txt in {', '.join(map(str, dirs))}: "
                    f"put the official fold file there, or use --split")


def fold_split(root: str | Path, records: list[Record], fold: int, seed: int = 0, val_fraction: float = 0.1,
               group: str = "patient") -> dict:
    """Manifest of an official fold (1..5); validation units are carved out of the fold's train side.

    A fold file that puts one patient (accession, with group='accession') on both sides is a UserError:
    training on it would leak. Images the file does not list are left out (counted in "unlisted")."""
    if not 1 <= int(fold) <= 5:
        raise UserError(f"--fold {fold}: official folds are 1..5 (0: use --split)")
    if not 0 <= val_fraction < 1:
        raise UserError(f"--val-fraction {val_fraction}: must lie in [0, 1)")
    sides, source = _fold_sides(Path(root), int(fold))
    key = _group_key(group)
    listed = [r for r in records if PurePosixPath(r.path).name in sides]
    unit_sides = defaultdict(set)
    for r in listed:
        unit_sides[key(r)] |= sides[PurePosixPath(r.path).name]
    leaks = sorted(k for k, s in unit_sides.items() if len(s) > 1)
    if leaks:
        raise UserError(f"{source}: fold {fold} puts {len(leaks)} {group}(s) in both train and test "
                        f"({', '.join(leaks)}), which would leak; fix the file or use --split")
    part_of = {k: s.pop() for k, s in unit_sides.items()}
    train = [r for r in listed if part_of[key(r)] == "train"]
    if not train or len(listed) == len(train):
        raise UserError(f"{source}: fold {fold} matches no {'train' if not train else 'test'} image of this tree; "
                        f"is it the fold file of this dataset?")
    if val_fraction > 0:
        _, keys, n, label, sub = _units(train, group)
        _require(label, 2, group, f"the train side of fold {fold} into train and val")
        assign = _search(n, label, sub, np.array([1 - val_fraction, val_fraction]), seed)
        part_of.update({k: ("train", "val")[a] for k, a in zip(keys, assign)})
    known = {PurePosixPath(r.path).name for r in records}
    return _manifest(listed, key, part_of, seed=seed, ratio=None, group=group, fold=int(fold),
                     fold_file=str(source), val_fraction=val_fraction, unlisted=len(records) - len(listed),
                     missing=sum(name not in known for name in sides))


def load_split(path: str | Path, records: list[Record] | None = None) -> dict:
    """Read and check a manifest: a patient (or accession) in two partitions, or a path not among
    `records`, is a UserError."""
    p = Path(path)
    remake = f"make a new one with python -m breakhis.data ROOT --split 60:10:30 --out {p}"
    if not p.is_file():
        raise UserError(f"split file {p} not found: {remake}")
    try:
        m = json.loads(p.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"split file {p} is not valid JSON ({e}): {remake}") from None
    if not isinstance(m, dict) or any(not isinstance(m.get(k), list) for k in PARTS):
        raise UserError(f"split file {p}: expected a JSON object with lists \"train\", \"val\" and \"test\": {remake}")
    key, where, seen = _group_key(m.get("group", "patient")), defaultdict(set), {}
    for part in PARTS:
        for x in m[part]:
            rec = parse_name(PurePosixPath(str(x)).name, str(x))
            if rec is None:
                raise UserError(f"split file {p}: {x!r} in {part} is not a BreakHis image path: {remake}")
            if x in seen:
                raise UserError(f"split file {p} lists {x} in both {seen[x]} and {part}: {remake}")
            seen[x] = part
            where[key(rec)].add(part)
    for part, pats in (m.get("patients") or {}).items():
        for pat in pats if part in PARTS else ():
            where[pat].add(part)
    leaks = sorted(k for k, s in where.items() if len(s) > 1)
    if leaks:
        raise UserError(f"split file {p} puts {', '.join(leaks)} in more than one of train/val/test, "
                        f"which leaks patients across partitions: {remake}")
    if records is not None:
        known = {r.path for r in records}
        missing = [x for x in seen if x not in known]
        if missing:
            raise UserError(f"split file {p} lists {len(missing)} image(s) that are not among the usable images of "
                            f"this tree (e.g. {missing[0]}): it was made for another tree, another --task "
                            f"(its task: {m.get('task', 'unknown')}; duplicates are dropped per task) or without "
                            f"--skip-bad: {remake}")
    return m


def select(records: list[Record], manifest: dict, part: str, magnification: str | int = "all") -> list[Record]:
    """The records of one partition, in `records` order, filtered by magnification after the patient split."""
    if part not in PARTS:
        raise ValueError(f"part must be one of {PARTS}, got {part!r}")
    mag, chosen = parse_magnification(magnification), set(manifest[part])
    return [r for r in records if r.path in chosen and (mag is None or r.magnification == mag)]


# ---------------------------------------------------------------- integrity report
def integrity_report(index: Index, info: list[dict] | None = None, paths: list[str] | None = None,
                     skip_bad: bool = False) -> dict:
    """JSON-able facts about a tree: counts per class x subtype x magnification, patients per subtype,
    strays, and, given the decoder's `info` (aligned with `paths`, default the index's paths),
    unreadable files, converted modes, odd sizes and pixel-identical duplicates across patients."""
    recs = index.records
    paths = [r.path for r in recs] if paths is None else paths
    counts = {}
    for s in SUBTYPES:
        rs = [r for r in recs if r.subtype == s]
        mags = Counter(r.magnification for r in rs)
        counts[s] = {"class": CLASSES[int(s in SUBTYPES[4:])], **{str(m): mags[m] for m in MAGNIFICATIONS},
                     "images": len(rs), "patients": len({r.patient for r in rs})}
    classes = {c: {"images": sum(r.cls == c for r in recs), "patients": len({r.patient for r in recs if r.cls == c})}
               for c in CLASSES}
    rep = {"root": str(index.root), "images": len(recs), "patients": len(index.patients), "classes": classes,
           "magnifications": {str(m): sum(r.magnification == m for r in recs) for m in MAGNIFICATIONS},
           "counts": counts, "strays": index.strays, "checked_pixels": info is not None, "skip_bad": skip_bad,
           "unreadable": [], "modes": {}, "sizes": {}, "odd_sizes": [], "duplicates": [], "duplicate_patients": [],
           "dropped": {}}
    notes = []
    if info is not None:
        if len(info) != len(paths):
            raise ValueError(f"info has {len(info)} entries for {len(paths)} paths")
        ok = [(p, i) for p, i in zip(paths, info) if i["ok"]]
        rep["unreadable"] = [{"path": p, "error": i.get("error")} for p, i in zip(paths, info) if not i["ok"]]
        rep["modes"] = dict(Counter(i["mode"] for _, i in ok if i["mode"] != "RGB"))
        sizes = Counter(f"{i['width']}x{i['height']}" for _, i in ok)
        rep["sizes"] = dict(sizes.most_common())
        common = sizes.most_common(1)[0][0] if sizes else None
        rep["odd_sizes"] = [{"path": p, "size": f"{i['width']}x{i['height']}"} for p, i in ok
                            if f"{i['width']}x{i['height']}" != common]
        groups = find_duplicates(recs, {p: i["sha1"] for p, i in ok})
        by_path = {r.path: r for r in recs}
        pairs = Counter()
        for g in groups:
            pats = sorted({by_path[p].patient for p in g})
            conflict = [t for t, f in (("binary", "cls"), ("subtype", "subtype"))
                        if len({getattr(by_path[p], f) for p in g}) > 1]
            rep["duplicates"].append({"paths": g, "patients": pats, "conflicting_labels": conflict})
            pairs[(tuple(pats), tuple(conflict))] += 1
        rep["duplicate_patients"] = [{"patients": list(p), "images": k, "conflicting_labels": list(c)}
                                     for (p, c), k in sorted(pairs.items())]
        kept = [r for r in recs if r.path not in {u["path"] for u in rep["unreadable"]}]
        rep["dropped"] = {t: len(drop_duplicates(kept, groups, t)[1]) for t in ("binary", "subtype")}
        for d in rep["duplicate_patients"]:
            notes.append(f"{' = '.join(d['patients'])} share {d['images']} pixel-identical image(s)"
                         + (f" with conflicting {'/'.join(d['conflicting_labels'])} labels" if d["conflicting_labels"] else ""))
        if groups:
            notes.append(f"duplicates dropped per task: binary {rep['dropped']['binary']} (one copy kept), "
                         f"subtype {rep['dropped']['subtype']} (conflicting copies all dropped)")
        if rep["modes"]:
            notes.append(f"{sum(rep['modes'].values())} non-RGB image(s) converted to RGB "
                         f"({', '.join(f'{k} {v}' for k, v in rep['modes'].items())})")
        if rep["odd_sizes"]:
            notes.append(f"{len(rep['odd_sizes'])} image(s) not {common} px (accepted; resized by the cache)")
    if len(recs) > 5000 or len(index.patients) > 60:  # looks like the full archive: compare with its facts
        found = {"patients": len(index.patients), "images": len(recs), "benign": classes["benign"]["images"],
                 "malignant": classes["malignant"]["images"]}
        diff = [f"{k} {found[k]:,} (the archive has {v:,})" for k, v in FULL.items() if found[k] != v]
        rep["full_dataset"] = {"expected": FULL, "found": found, "matches": not diff}
        if diff:
            notes.append("looks like the full BreakHis archive but counts differ: " + ", ".join(diff)
                         + "; was the extraction complete?")
    bad = rep["unreadable"]
    if bad and not skip_bad:
        verdict = f"FAIL: {len(bad)} unreadable image(s); replace them or pass --skip-bad"
    else:
        verdict = (f"OK: {len(recs) - len(bad):,} usable images of {len(index.patients)} patients "
                   f"({classes['benign']['images']:,} benign, {classes['malignant']['images']:,} malignant)")
        if bad:
            notes.insert(0, f"{len(bad)} unreadable image(s) skipped (--skip-bad)")
        if info is None:
            notes.append("pixels not checked")
    rep["notes"], rep["verdict"] = notes, verdict + "".join(f"; {n}" for n in notes)
    return rep


def render_report(rep: dict, console=None) -> None:
    """Print the report as rich tables and a verdict line."""
    from rich import box
    from rich.console import Console
    from rich.table import Table

    con = console or Console()
    t = Table(title=f"BreakHis images under {rep['root']}", box=box.SIMPLE)
    for col in ("class / subtype", *(f"{m}X" for m in MAGNIFICATIONS), "images", "patients"):
        t.add_column(col, justify="left" if col.startswith("class") else "right", no_wrap=True)
    for s, c in rep["counts"].items():
        if s in (SUBTYPES[0], SUBTYPES[4]):
            cls = rep["classes"][c["class"]]
            t.add_row(c["class"], "", "", "", "", f"{cls['images']:,}", str(cls["patients"]), style="bold")
        t.add_row(f"  {s}", *(f"{c[str(m)]:,}" for m in MAGNIFICATIONS), f"{c['images']:,}", str(c["patients"]))
    t.add_row("all", *(f"{rep['magnifications'][str(m)]:,}" for m in MAGNIFICATIONS), f"{rep['images']:,}",
              str(rep["patients"]), style="bold")
    con.print(t)
    if rep["duplicate_patients"]:
        d = Table(title="pixel-identical images across patients", box=box.SIMPLE)
        for col in ("patients", "images", "conflicting labels"):
            d.add_column(col)
        for row in rep["duplicate_patients"]:
            d.add_row(" = ".join(row["patients"]), str(row["images"]), ", ".join(row["conflicting_labels"]) or "none")
        con.print(d)
    problems = [("unreadable", [f"{u['path']} ({u['error']})" for u in rep["unreadable"]]),
                ("converted to RGB", [f"{k}: {v}" for k, v in rep["modes"].items()]),
                ("other sizes", [f"{o['path']} ({o['size']})" for o in rep["odd_sizes"]]),
                ("stray files (ignored)", rep["strays"])]
    if any(items for _, items in problems):
        p = Table(title="problems", box=box.SIMPLE)
        for col in ("kind", "count", "files"):
            p.add_column(col)
        for kind, items in problems:
            if items:
                p.add_row(kind, str(len(items)), "\n".join(items[:5] + ([f"... {len(items) - 5} more"] if len(items) > 5 else [])))
        con.print(p)
    con.print(rep["verdict"], style="bold red" if rep["verdict"].startswith("FAIL") else "bold green", markup=False)


def render_split(manifest: dict, records: list[Record], magnification: int | None, console=None) -> None:
    """Print a manifest's partitions (optionally at one magnification) as a rich table."""
    from rich import box
    from rich.console import Console
    from rich.table import Table

    how = f"fold {manifest['fold']}" if manifest.get("fold") else ":".join(map(str, manifest.get("ratio") or ()))
    t = Table(title=f"split ({how}, seed {manifest.get('seed')}, by {manifest.get('group', 'patient')}, "
                    f"task {manifest.get('task', 'binary')}, "
                    f"magnification {magnification or 'all'})", box=box.SIMPLE)
    for col in ("part", "patients", "images", "fraction", "benign", "malignant", "subtypes"):
        t.add_column(col, justify="left" if col == "part" else "right")
    parts = {p: select(records, manifest, p, magnification or "all") for p in PARTS}
    total = max(1, sum(map(len, parts.values())))
    for p, rs in parts.items():
        t.add_row(p, str(len({r.patient for r in rs})), f"{len(rs):,}", f"{len(rs) / total:.3f}",
                  f"{sum(r.label == 0 for r in rs):,}", f"{sum(r.label == 1 for r in rs):,}",
                  str(len({r.subtype for r in rs})))
    (console or Console()).print(t)


# ---------------------------------------------------------------- command line
def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("root", nargs="?", help="BreaKHis_v1, its parent, or the Kaggle mirror's folder")
    ap.add_argument("--json", action="store_true", help="print the report as one JSON object on the last line")
    ap.add_argument("--split", help="train:val:test percentages of images, split by patient (default 60:10:30)")
    ap.add_argument("--seed", type=int, default=0, help="seed of the split search")
    ap.add_argument("--group", default="patient", help="split unit: patient or accession")
    ap.add_argument("--fold", type=int, default=0, help="official fold 1..5 (Folds.csv or mkfold/dsfold<N>.txt)")
    ap.add_argument("--val-fraction", type=float, default=0.1, help="--fold: share of train images moved to val")
    ap.add_argument("--task", default="binary", help="binary or subtype: decides which duplicates are dropped")
    ap.add_argument("--magnification", default="all", help="40, 100, 200, 400 or all: shown split counts")
    ap.add_argument("--out", help="write the split manifest here (JSON)")
    ap.add_argument("--split-file", help="check an existing manifest against this tree")
    ap.add_argument("--skip-bad", action="store_true", help="skip unreadable images (recorded in the manifest)")
    ap.add_argument("--cache-dir", help="decode cache folder (default: ~/.cache/breakhis)")
    ap.add_argument("--cache-size", help="cached field size HxW (default: the size for 224 px inputs)")
    ap.add_argument("--workers", type=int, default=0, help="decoding processes (0: one per core)")
    ap.add_argument("--download", metavar="DIR", help=f"fetch and extract {URL} into DIR, then report")
    a = ap.parse_args(argv)
    # check every option before the slow work
    ratio = parse_ratio(a.split) if a.split else None
    mag = parse_magnification(a.magnification)
    _group_key(a.group)
    if a.task not in ("binary", "subtype"):
        raise UserError(f"--task {a.task!r}: choose binary or subtype")
    if not 0 <= a.fold <= 5:
        raise UserError(f"--fold {a.fold}: official folds are 1..5 (0: use --split)")
    from . import cache as cache_mod

    size = parse_hw(a.cache_size, "--cache-size") if a.cache_size else cache_mod.default_cache_size(224)
    if a.download:
        from .download import download_and_extract

        root = download_and_extract(URL, a.download, progress=not a.json)
    elif a.root:
        root = a.root
    else:
        raise UserError(f"give the data folder (python -m breakhis.data data/BreaKHis_v1), or {HINT}")
    index = index_tree(root)
    paths = [r.path for r in index.records]
    cache = cache_mod.build_cache(index.root, paths, size, cache_dir=a.cache_dir, workers=a.workers,
                                  progress=not a.json)
    rep = integrity_report(index, cache.info, paths, skip_bad=a.skip_bad)
    manifest = None
    if not rep["unreadable"] or a.skip_bad:
        skipped = {u["path"] for u in rep["unreadable"]}
        records = [r for r in index.records if r.path not in skipped]
        records, dropped = drop_duplicates(records, [d["paths"] for d in rep["duplicates"]], a.task)
        if a.split_file:
            manifest = load_split(a.split_file, records)
        elif a.fold or a.split or a.out:
            manifest = (fold_split(index.root, records, a.fold, a.seed, a.val_fraction, a.group) if a.fold
                        else make_split(records, ratio or (60, 10, 30), a.seed, a.group))
            manifest.update(task=a.task, skipped=rep["unreadable"], dropped=dropped)
            if a.out:
                write_json(a.out, manifest)
    if a.json:
        if manifest is not None:
            rep["split"] = {"file": a.out or a.split_file, "counts": manifest.get("counts") or split_counts(records, manifest)}
        print(json.dumps(rep))
    else:
        render_report(rep)
        if manifest is not None:
            render_split(manifest, records, mag)
            if a.out:
                print(f"wrote {a.out}")
    if rep["unreadable"] and not a.skip_bad:
        listing = "; ".join(f"{u['path']} ({u['error']})" for u in rep["unreadable"])
        raise UserError(f"{len(rep['unreadable'])} unreadable image(s) under {index.root}: {listing}: "
                        f"re-extract or replace them, or pass --skip-bad to leave them out (recorded in the manifest)")
    return 0


if __name__ == "__main__":
    raise SystemExit(guard(main))
