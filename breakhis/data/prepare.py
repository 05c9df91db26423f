"""The one data pipeline: index the tree, decode once into the cache, drop bad files and
duplicates, split by patient, and find each partition's images in the cache.

    prep = prepare(cfg)                 # train.py, tune.py, evaluate.py (split.json of the run)
    prep.parts["test"]                  # [Record], magnification filter applied
    prep.positions["test"]              # (N,) int64 rows of prep.cache.images

`python -m breakhis.data` runs the same steps (load_tree, usable_records, choose_split) and prints
the integrity report between them. Settings come from a validated TrainConfig: nothing here
checks them again.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..config import TrainConfig
from ..errors import UserError
from . import splits
from .cache import Cache, build_cache, default_cache_size
from .dataset import PARTS, Index, Record, drop_duplicates, find_duplicates, index_tree
from .near import cache_pairs, check_groups


@dataclass
class Prepared:
    """The data of one run: records per partition and their positions in the shared uint8 cache."""
    root: Path
    cache: Cache
    manifest: dict                     # the split manifest (split.json), task, skipped and dropped files included
    parts: dict[str, list[Record]]     # partition -> [Record], magnification filter applied
    positions: dict[str, np.ndarray]   # partition -> (N,) int64 positions into cache.images
    task: str

    def labels(self, part: str) -> np.ndarray:
        """(N,) int64 class indices of a partition's images for the run's task."""
        return np.array([r.target(self.task) for r in self.parts[part]], dtype=np.int64)


def field_size(cfg: TrainConfig) -> tuple[int, int]:
    """(H, W) pixels of a run's cached fields: --cache-size, else chosen from --image-size."""
    return cfg.cache_hw() or default_cache_size(cfg.image_size)


def load_tree(cfg: TrainConfig, progress: bool = True) -> tuple[Index, Cache]:
    """The tree's index and its decode cache (built once, then memory-mapped)."""
    index = index_tree(cfg.data)
    cache = build_cache(index.root, [r.path for r in index.records], field_size(cfg), cache_dir=cfg.cache_dir or None,
                        workers=cfg.workers, progress=progress)
    return index, cache


def unreadable(cache: Cache) -> list[dict]:
    """{"path", "error"} of each file the decoder could not read."""
    return [{"path": p, "error": i.get("error")} for p, i in zip(cache.paths, cache.info) if not i["ok"]]


def usable_records(index: Index, cache: Cache, task: str, skip_bad: bool) -> tuple[list[Record], list[dict], list[dict]]:
    """(records, skipped, dropped): unreadable files refused (or skipped with skip_bad), duplicates
    across patients dropped for the task (see dataset.drop_duplicates)."""
    bad = unreadable(cache)
    if bad and not skip_bad:
        listing = "; ".join(f"{b['path']} ({b['error']})" for b in bad)
        raise UserError(f"{len(bad)} unreadable image(s) under {index.root}: {listing}. "
                        f"Replace them, or pass --skip-bad to skip them (recorded in split.json)")
    bad_paths = {b["path"] for b in bad}
    records = [r for r in index.records if r.path not in bad_paths]
    hashes = {p: i["sha1"] for p, i in zip(cache.paths, cache.info) if i["ok"]}
    records, dropped = drop_duplicates(records, find_duplicates(records, hashes), task)
    return records, bad, dropped


def choose_split(root: Path, records: list[Record], cfg: TrainConfig, *, skipped: list[dict],
                 dropped: list[dict], near: list[dict] = ()) -> dict:
    """The manifest: cfg.split_file read back, an official fold, or a seeded patient-level split.
    near: verified near-duplicate pairs across patients (near_pairs); with --near-duplicates link their
    patients stay on one side, unless they join more patients than near.max_group (a UserError naming the
    flag); with report they are only listed in the manifest."""
    linking = cfg.near_duplicates == "link" and not cfg.split_file
    if linking:
        check_groups(list(near), records)
    links = [tuple(x["patients"]) for x in near] if linking else []
    if cfg.split_file:
        manifest = splits.load_split(cfg.split_file, records)
    elif cfg.fold:
        manifest = splits.fold_split(root, records, cfg.fold, seed=cfg.split_seed, val_fraction=cfg.val_fraction,
                                     group=cfg.group, links=links)
    else:
        manifest = splits.make_split(records, cfg.split_percentages(), seed=cfg.split_seed, group=cfg.group,
                                     links=links)
    return {**manifest, "task": cfg.task, "skipped": skipped, "dropped": dropped, "near_duplicates": list(near),
            "near_duplicates_linked": linking and bool(near)}


def near_pairs(cache: Cache, records: list[Record], cfg: TrainConfig) -> tuple[list[dict], str]:
    """(verified near-duplicate pairs among records, a note): none searched with --near-duplicates off or a
    --split-file (the split is given)."""
    if cfg.near_duplicates == "off":
        return [], "near-duplicates not searched (--near-duplicates off)"
    if cfg.split_file:
        return [], ""
    return cache_pairs(cache, records)


def whole_tree(records: list[Record], cfg: TrainConfig, *, skipped: list[dict], dropped: list[dict]) -> dict:
    """A manifest with every image in "test" (scoring another tree with a trained model)."""
    return {"train": [], "val": [], "test": [r.path for r in records], "task": cfg.task,
            "patients": {"train": [], "val": [], "test": sorted({r.patient for r in records})},
            "skipped": skipped, "dropped": dropped}


def prepare(cfg: TrainConfig, progress: bool = True, whole: bool = False) -> Prepared:
    """Index the tree, load (or build once) the decode cache, drop duplicates, split by patient.

    whole: put every image in "test" (scoring another tree with a trained model).
    """
    index, cache = load_tree(cfg, progress=progress)
    records, skipped, dropped = usable_records(index, cache, cfg.task, cfg.skip_bad)
    if whole:
        manifest = whole_tree(records, cfg, skipped=skipped, dropped=dropped)
    else:
        near = near_pairs(cache, records, cfg)[0]
        manifest = choose_split(index.root, records, cfg, skipped=skipped, dropped=dropped, near=near)
    parts = {k: splits.part_records(records, manifest, k, cfg.magnification) for k in PARTS}
    for k in () if whole else ("train", "val"):
        if not parts[k]:
            raise UserError(f"the {k} partition is empty for --magnification {cfg.magnification} "
                            f"(tree {index.root}); use more patients or another --split-ratio")
    positions = {k: np.array([cache.index_of(r.path) for r in v], dtype=np.int64) for k, v in parts.items()}
    return Prepared(index.root, cache, manifest, parts, positions, cfg.task)
