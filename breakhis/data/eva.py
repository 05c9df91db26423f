"""kaiko-ai eva's BreakHis task: its classes, its fixed validation patients, and the honest split of the same images.

    recs = task_records(index.records, "40")          # TA, MC, F, DC at 40X: 1,471 images of the archive
    eva = eva_manifest(recs)                           # eva's 14 validation patients, no test side
    honest = honest_manifest(recs, (50, 25, 25), seed=0)   # accession-grouped train / val / test

Everything here is read from eva's source (github.com/kaiko-ai/eva, src/eva/vision/data/datasets/
classification/breakhis.py, class BreaKHis):
- `classes` ["TA", "MC", "F", "DC"]: the label order (subtypes with at least 7 patients);
- `_val_patient_ids`: the 14 validation patients, by slide id;
- `_default_magnifications` ["40X"];
- `_expected_dataset_lengths` {"train": 1132, "val": 339, None: 1471} on the real archive;
- `_extract_patient_id`: a file's patient is the third '-' field of its name (SOB_B_TA-14-16184CD-40-001.png
  -> 16184CD), `_extract_class`: its class the code after the last '_' of the first (TA);
- `_make_indices`: every image of the 4 classes whose patient is not in the list is a training image.
There is no test split: eva selects the checkpoint and reports the figure on the same 14 patients.

The honest split is this toolkit's patient split (splits.make_split) of the same images by accession: slides
that differ only in a letter suffix (16184 and 16184CD, 23060AB and 23060CD, 18842 and 18842D, 19979 and
19979C, which eva puts on opposite sides) stay on one side, and the test side chooses nothing.
"""
from __future__ import annotations

import numpy as np

from .dataset import CLASSES, SUBTYPE_CODES, Record
from .splits import make_split, parse_magnification

CODES = ("TA", "MC", "F", "DC")  # eva's classes, in its label order
VAL_SLIDES = frozenset({"18842D", "19979", "15275", "15792", "16875", "3909", "5287", "16716", "2773", "5695",
                        "16184CD", "23060CD", "21998CD", "21998EF"})
COUNTS = {"train": 1132, "val": 339}  # eva's expected images at 40X on the real archive
ARCHIVE_IMAGES = 7909  # a tree of this many images is taken for the archive, where COUNTS must hold
_CODE = {sub: code for code, (_, sub) in SUBTYPE_CODES.items()}

# a small tree with eva's validation slides and training slides of the same accessions (the four pairs eva
# splits), plus made-up slides, so that the protocol runs on a generated tree (train.py --demo --protocol eva)
DEMO_SLIDES = [(code, s) for code, slides in {
    "TA": ["15275", "16184CD", "16184", "10101", "10102"],
    "MC": ["18842D", "19979", "18842", "19979C", "10201", "10202"],
    "F": ["23060CD", "21998CD", "21998EF", "23060AB", "10301", "10302"],
    "DC": ["15792", "16875", "3909", "5287", "16716", "2773", "5695", "10401", "10402", "10403"],
}.items() for s in slides]


def slide_of(patient: str) -> str:
    """'SOB_B_TA-14-16184CD' -> '16184CD': the patient as eva names it (its third '-' field of a file name)."""
    return patient.split("-")[2]


def code_of(record: Record) -> str:
    return _CODE[record.subtype]


def task_records(records: list[Record], magnification: str | int = "40") -> list[Record]:
    """The images of eva's 4 classes at one magnification ("all": every magnification), in the given order."""
    mag = parse_magnification(magnification)
    return [r for r in records if code_of(r) in CODES and (mag is None or r.magnification == mag)]


def class_names(task: str) -> tuple[str, ...]:
    """Label names of the protocol's task: eva's 4 subtypes, or benign / malignant of the same images."""
    return CLASSES if task == "binary" else CODES


def labels(records: list[Record], task: str) -> np.ndarray:
    """(N,) int64: eva's class index (CODES order), or 0 benign / 1 malignant with task "binary"."""
    return np.array([r.label if task == "binary" else CODES.index(code_of(r)) for r in records], dtype=np.int64)


def eva_manifest(records: list[Record]) -> dict:
    """eva's split of task_records: the 14 validation slides (VAL_SLIDES) in "val", all else in "train", no "test"."""
    part = {r.path: "val" if slide_of(r.patient) in VAL_SLIDES else "train" for r in records}
    m = {p: [r.path for r in records if part[r.path] == p] for p in ("train", "val")}
    m["test"] = []
    m["patients"] = {p: sorted({r.patient for r in records if part[r.path] == p}) for p in ("train", "val")}
    m["patients"]["test"] = []
    m.update(group="eva slide list", seed=None, fold=0)
    return m


def count_problem(records: list[Record], manifest: dict, archive: bool) -> str:
    """'' when eva's split of the 40X images has eva's counts, or the tree is not the archive (archive: it holds
    ARCHIVE_IMAGES images); else what differs, in words."""
    got = {p: len(manifest[p]) for p in COUNTS}
    if not archive or got == COUNTS:
        return ""
    return (f"eva's split of this archive gives {got['train']} training and {got['val']} validation images at 40X; "
            f"eva expects {COUNTS['train']} and {COUNTS['val']} (missing or extra files, or another copy of the archive): "
            f"the figure is not comparable with the leaderboard's")


def honest_manifest(records: list[Record], ratio, seed: int, links=()) -> dict:
    """A seeded accession-level train / val / test split of the same images (splits.make_split): no slide id
    shared across sides, both classes in every side, each subtype on as many sides as it has accessions."""
    return make_split(records, ratio, seed=seed, group="accession", links=links)
