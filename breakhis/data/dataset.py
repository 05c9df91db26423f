"""The BreaKHis_v1 tree: its vocabulary, file names, index, and pixel-identical duplicates.

Layout: BreaKHis_v1/histology_slides/breast/<benign|malignant>/SOB/<subtype>/<patient folder>/<mag>X/<file>.png
with patient folders `SOB_B_A_14-22549AB` and files `SOB_B_A-14-22549AB-40-001.png`.
A Record is one image labelled from its name; index_tree() checks every name against its folders.
Duplicates are dropped per task (see drop_duplicates).
"""
from __future__ import annotations

import os
import re
import string
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from ..errors import UserError

# code -> (class, subtype folder); the order is the subtype label order used everywhere
SUBTYPE_CODES = {
    "A": ("benign", "adenosis"), "F": ("benign", "fibroadenoma"),
    "PT": ("benign", "phyllodes_tumor"), "TA": ("benign", "tubular_adenoma"),
    "DC": ("malignant", "ductal_carcinoma"), "LC": ("malignant", "lobular_carcinoma"),
    "MC": ("malignant", "mucinous_carcinoma"), "PC": ("malignant", "papillary_carcinoma"),
}
MAGNIFICATIONS = (40, 100, 200, 400)
SUBTYPES = tuple(sub for _, sub in SUBTYPE_CODES.values())  # label order of the subtype task
CLASSES = ("benign", "malignant")
PARTS = ("train", "val", "test")
URL = "http://www.inf.ufpr.br/vri/databases/BreaKHis_v1.tar.gz"
HINT = ("download it (python -m breakhis.data --download data) or make a synthetic tree "
        "(python -m breakhis.data.demo data/demo)")
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

    def target(self, task: str) -> int:
        """The class index of this image for a task: benign/malignant, or one of the 8 subtypes."""
        return self.subtype_index if task == "subtype" else self.label

    @property
    def accession(self) -> str:
        """The numeric slide id with its year, across slide letters and subtype codes: 22549AB, 22549CD and
        22549G share '14-22549'; so do SOB_M_DC-14-13412 and SOB_M_LC-14-13412 (the same slides filed
        under two subtypes), and 21998 (F/PT) and 29960 (A/F)."""
        return accession_of(self.patient)

    def expected_path(self) -> str:
        """Where the archive keeps a file of this name."""
        folder = self.patient.replace("-", "_", 1)  # SOB_B_A-14-x -> SOB_B_A_14-x
        return (f"histology_slides/breast/{self.cls}/SOB/{self.subtype}/{folder}/{self.magnification}X/"
                f"{PurePosixPath(self.path).name}")


def accession_of(patient: str) -> str:
    """'SOB_B_A-14-22549AB' -> '14-22549' (see Record.accession)."""
    return patient.split("-", 1)[-1].rstrip(string.ascii_letters)


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
    if task not in ("binary", "subtype"):  # TrainConfig.validate() says so to the user
        raise ValueError(f"task must be binary or subtype, not {task!r}")
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


def class_names(task: str) -> tuple[str, ...]:
    """The class names of a task, in label order."""
    return SUBTYPES if task == "subtype" else CLASSES
