"""Patient-level splits of the BreakHis records: seeded search, official folds, manifests.

No patient (or accession, with group="accession") is ever in two partitions; both classes
are in every partition; subtypes are spread as far as patient counts allow; image
proportions are close to the ratio. A manifest (split.json) lists image paths of all
magnifications; part_records() applies the magnification filter after the split.
"""
from __future__ import annotations

import csv
import json
from collections import Counter, defaultdict
from pathlib import Path, PurePosixPath

import numpy as np

from ..config import parse_split_ratio
from ..errors import UserError
from .dataset import MAGNIFICATIONS, PARTS, SUBTYPES, Record, accession_of, parse_name

TRIALS = 4000  # seeded assignments tried per split
CLASS_COST = 0.5  # weight of the per-class image-fraction error next to the overall one
SPREAD_COST = 0.1  # a (subtype, partition) pair left empty costs as much as 10 points of image-fraction error


def parse_magnification(magnification: str | int) -> int | None:
    """40/100/200/400 -> int; 'all' -> None."""
    if str(magnification).lower() == "all":
        return None
    if str(magnification).upper().rstrip("X") in {str(m) for m in MAGNIFICATIONS}:
        return int(str(magnification).upper().rstrip("X"))
    raise ValueError(f"magnification must be 40, 100, 200, 400 or all, not {magnification!r}")


def group_key(group: str):
    """The split unit of a record: its patient, or its accession (group="accession")."""
    if group == "patient":
        return lambda r: r.patient
    if group == "accession":
        return lambda r: r.accession
    raise ValueError(f"group must be patient or accession, not {group!r}")


def linked_key(group: str, records: list[Record], links=()):
    """The split unit of a record: group_key, with units joined where `links` (pairs of patients, e.g.
    of near-duplicate fields) say two of them must stay on one side. The joined unit is named by its
    smallest member."""
    key = group_key(group)
    unit_of = {r.patient: key(r) for r in records}
    parent: dict[str, str] = {}

    def find(u: str) -> str:
        while parent.get(u, u) != u:
            u = parent[u]
        return u

    for a, b in links:
        if a in unit_of and b in unit_of:
            ra, rb = find(unit_of[a]), find(unit_of[b])
            if ra != rb:
                parent[max(ra, rb)] = min(ra, rb)
    return (lambda r: find(key(r))) if parent else key


def _units(records: list[Record], group: str, key=None):
    """Split units (patients or accessions) in sorted order: (key fn, keys, images (U,), label (U,), subtype (U,)).
    A unit that near-duplicate links made of both classes is counted under the class of most of its images."""
    key = key or group_key(group)
    count, first, per_class = Counter(key(r) for r in records), {}, Counter((key(r), r.label) for r in records)
    for r in records:
        first.setdefault(key(r), r)
    keys = sorted(count)
    label = [int(per_class[(k, 1)] > per_class[(k, 0)]) if per_class[(k, 0)] and per_class[(k, 1)] else first[k].label
             for k in keys]
    return (key, keys, np.array([count[k] for k in keys], np.float64),
            np.array(label), np.array([first[k].subtype_index for k in keys]))


def _require(label: np.ndarray, parts: int, group: str, what: str, records: list[Record] = (), key=None) -> None:
    """A UserError when fewer than `parts` units of a class are left to give every partition both classes;
    said in terms of the units: where near-duplicate links joined units (key: linked_key), how many
    patients they joined into how many units, and how many hold both classes."""
    per = np.bincount(label, minlength=2)
    if per.min() >= parts:
        return
    base, plain = group_key(group), f"{group}s"
    joined = key is not None and any(key(r) != base(r) for r in records)
    if not joined:
        raise UserError(f"cannot split {what}: {per[0]} benign and {per[1]} malignant {plain}, but both classes in "
                        f"each of {parts} partitions need at least {parts} {plain} per class; use a bigger tree "
                        f"(python -m breakhis.data.demo OUT --patients 8) or fewer partitions (e.g. --split-ratio 80:0:20)")
    members, classes = defaultdict(set), defaultdict(set)
    for r in records:
        members[key(r)].add(r.patient)
        classes[key(r)].add(r.label)
    linked = [k for k, m in members.items() if len(m) > 1]
    both = sum(len(classes[k]) == 2 for k in members)
    only = [sum(classes[k] == {c} for k in members) for c in (0, 1)]
    biggest = max(len(members[k]) for k in linked)
    raise UserError(f"cannot split {what}: near-duplicate links join {sum(len(members[k]) for k in linked)} patients "
                    f"into {len(linked)} unit(s) (the largest: {biggest} patients), leaving {len(members)} split units "
                    f"({both} with both classes, {only[0]} benign only, {only[1]} malignant only), but both classes in "
                    f"each of {parts} partitions need at least {parts} units per class; pass --near-duplicates report "
                    f"(links listed, not kept together) or off, or use a bigger tree")


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


def make_split(records: list[Record], ratio=(60, 10, 30), seed: int = 0, group: str = "patient",
               links=()) -> dict:
    """Patient-level (or accession-level) train/val/test manifest over all magnifications.

    No unit in two partitions, both classes in every non-empty partition, each subtype in as many
    partitions as it has units (up to 3), image fractions as close to `ratio` as the search finds.
    links: pairs of patients kept on one side (near-duplicate fields, see near.py)."""
    ratio = parse_split_ratio(ratio)
    key, keys, n, label, sub = _units(records, group, linked_key(group, records, links))
    fracs = np.array(ratio, np.float64) / 100
    _require(label, int((fracs > 0).sum()), group, f"{len(records)} images by {group} {':'.join(map(str, ratio))}",
             records, key)
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
            raise UserError(f"{found} has no rows for fold {fold}: use a fold it lists, or --split-ratio")
        return sides, found
    raise UserError(f"--fold {fold}: no Folds.csv or mkfold/dsfold{fold}.txt in {', '.join(map(str, dirs))}: "
                    f"put the official fold file there, or use --split-ratio")


def fold_split(root: str | Path, records: list[Record], fold: int, seed: int = 0, val_fraction: float = 0.1,
               group: str = "patient", links=()) -> dict:
    """Manifest of an official fold (1..5); validation units are carved out of the fold's train side.

    The official folds (Spanhol et al. 2016; Folds.csv with fold,mag,filename,grp, every fold listing
    every image, or mkfold/dsfold<N>.txt) are five independent random 70/30 patient splits, not a
    partition: each fold is read on its own here, and a patient is on the test side of some folds and
    the train side of others. So the test predictions of the folds' runs, pooled, are each held out
    for the model that made it, but not one prediction per image and not independent: a patient may
    have rows from several folds (compare.py's cross-validation row resamples patients with all their
    rows together).

    A fold file that puts one patient (accession, with group='accession') on both sides is a UserError:
    training on it would leak. Images the file does not list are left out (counted in "unlisted").
    links (near-duplicate patients) keep together when val is carved; pairs the fold file itself puts on
    both sides are listed in "linked_across_sides" (the official fold is not changed)."""
    if not 1 <= int(fold) <= 5 or not 0 <= val_fraction < 1:  # TrainConfig.validate() says so to the user
        raise ValueError(f"fold {fold} must be 1..5 and val_fraction {val_fraction} in [0, 1)")
    sides, source = _fold_sides(Path(root), int(fold))
    key = group_key(group)
    listed = [r for r in records if PurePosixPath(r.path).name in sides]
    unit_sides = defaultdict(set)
    for r in listed:
        unit_sides[key(r)] |= sides[PurePosixPath(r.path).name]
    leaks = sorted(k for k, s in unit_sides.items() if len(s) > 1)
    if leaks:
        raise UserError(f"{source}: fold {fold} puts {len(leaks)} {group}(s) in both train and test "
                        f"({', '.join(leaks)}), which would leak; fix the file or use --split-ratio")
    part_of = {k: s.pop() for k, s in unit_sides.items()}
    train = [r for r in listed if part_of[key(r)] == "train"]
    if not train or len(listed) == len(train):
        raise UserError(f"{source}: fold {fold} matches no {'train' if not train else 'test'} image of this tree; "
                        f"is it the fold file of this dataset?")
    across = sorted({tuple(sorted((a, b))) for a, b in links if {part_of.get(key(r)) for r in listed
                                                                  if r.patient in (a, b)} == {"train", "test"}})
    if val_fraction > 0:
        tkey, keys, n, label, sub = _units(train, group, linked_key(group, train, links))
        _require(label, 2, group, f"the train side of fold {fold} into train and val", train, tkey)
        assign = _search(n, label, sub, np.array([1 - val_fraction, val_fraction]), seed)
        part_of.update({k: ("train", "val")[a] for k, a in zip(keys, assign)})
    known = {PurePosixPath(r.path).name for r in records}
    joined = linked_key(group, train, links)
    part_of.update({key(r): part_of[joined(r)] for r in train if joined(r) in part_of})
    return _manifest(listed, key, part_of, seed=seed, ratio=None, group=group, fold=int(fold),
                     fold_file=str(source), val_fraction=val_fraction, unlisted=len(records) - len(listed),
                     missing=sum(name not in known for name in sides), linked_across_sides=[list(x) for x in across])


def load_split(path: str | Path, records: list[Record] | None = None) -> dict:
    """Read and check a manifest: a patient (or accession) in two partitions, or a path not among
    `records`, is a UserError."""
    p = Path(path)
    remake = f"make a new one with python -m breakhis.data ROOT --split-ratio 60:10:30 --out {p}"
    if not p.is_file():
        raise UserError(f"split file {p} not found: {remake}")
    try:
        m = json.loads(p.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"split file {p} is not valid JSON ({e}): {remake}") from None
    if not isinstance(m, dict) or any(not isinstance(m.get(k), list) for k in PARTS):
        raise UserError(f"split file {p}: expected a JSON object with lists \"train\", \"val\" and \"test\": {remake}")
    key, where, seen = group_key(m.get("group", "patient")), defaultdict(set), {}
    for part in PARTS:
        for x in m[part]:
            rec = parse_name(PurePosixPath(str(x)).name, str(x))
            if rec is None:
                raise UserError(f"split file {p}: {x!r} in {part} is not a BreakHis image path: {remake}")
            if x in seen:
                raise UserError(f"split file {p} lists {x} in both {seen[x]} and {part}: {remake}")
            seen[x] = part
            where[key(rec)].add(part)
    unit = accession_of if m.get("group") == "accession" else (lambda q: q)
    for part, pats in (m.get("patients") or {}).items():
        for pat in pats if part in PARTS else ():
            where[unit(pat)].add(part)
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


def part_records(records: list[Record], manifest: dict, part: str, magnification: str | int = "all") -> list[Record]:
    """The records of one partition, in `records` order, filtered by magnification after the patient split."""
    if part not in PARTS:
        raise ValueError(f"part must be one of {PARTS}, got {part!r}")
    mag, chosen = parse_magnification(magnification), set(manifest[part])
    return [r for r in records if r.path in chosen and (mag is None or r.magnification == mag)]
