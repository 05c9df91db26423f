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
import json
import os
import re
import string
from collections import Counter, defaultdict
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from .atomic import write_json
from .config import parse_hw
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
    from .splits import select

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
    from .splits import (_group_key, fold_split, load_split, make_split, parse_magnification, parse_ratio,
                         split_counts)

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
