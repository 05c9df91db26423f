"""`train.py --protocol eva`: eva's BreakHis linear probe reproduced, and beside it the same probe on held-out patients.

    out = run_eva(cfg, run_dir, seeds=[0, 1, 2, 3, 4])     # writes protocol.json; out["rows"], out["difference"]
    report.console.print(report.protocol_table(out))

Rows (docs/eva.md):
- "eva protocol": eva's split (data/eva.py), eva's centre crop, one probe per seed (probe.py); the checkpoint is
  chosen on eva's 14 validation patients and the figure is their balanced accuracy: validation = selection =
  score. Reported as eva reports it: mean and sample standard deviation over the seeds.
- "held-out patients": per seed s, an accession-grouped train / val / test split drawn with seed s (the same
  images); the probe chooses its checkpoint on val and is scored once on test. Its interval is the
  Nadeau-Bengio corrected t over the repeats (the splits are repeated random splits whose sides overlap:
  intervals.nadeau_bengio), so it spans the variation over patients; with --probe-view both (default) a
  second held-out row reads the whole field (left, centre and right squares of full height, features averaged).
- "difference": eva's figure minus the held-out (centre crop) one, paired by seed, with the same interval;
  "selection bias": within the held-out splits, the chosen checkpoint's validation figure minus its test figure.

All of the data work and every split is checked before the backbone's one feature pass; the probes then
run on the cached features (features.run_features), seconds per seed.
"""
from __future__ import annotations

import dataclasses
import statistics
import time
from pathlib import Path

import numpy as np
import torch

from . import intervals, runs
from .config import TrainConfig
from .data import eva
from .data.dataset import PARTS
from .data.prepare import Prepared, load_tree, near_pairs
from .device import amp_dtype, seed_everything
from .errors import UserError
from .features import run_features
from .io import write_json
from .loader import DeviceImages
from .models import model_for
from .probe import ProbeSettings, balanced_accuracy, fit_probes

VIEWS = {"centre": (0.5,), "whole": (0.0, 0.5, 1.0)}  # square positions across the field (augment.draw)
FILE = "protocol.json"


def eva_inputs(cfg: TrainConfig) -> TrainConfig:
    """cfg with the cached field size that makes the evaluation view eva's ResizeAndCrop: the short side
    resized to --image-size S and the long one to int(S x 700/460) as torchvision's Resize truncates it (224x340),
    so that the central S x S square is eva's centre crop with no second resize (equal to torchvision's within
    1e-5 on a real H&E field: tests/test_eva.py); an explicit --cache-size is kept."""
    if cfg.cache_size:
        return cfg
    s = cfg.image_size
    return dataclasses.replace(cfg, cache_size=f"{s}x{int(s * 700 / 460)}").validate()


def grid_of(cfg: TrainConfig) -> list[ProbeSettings]:
    """The probe settings a protocol run tries: --lr / --weight-decay, or the grid of --probe-lrs x
    --probe-weight-decays (experiments/eva.py "sweep"), each probe's choice made on its validation side."""
    base = ProbeSettings(steps=cfg.probe_steps, batch_size=cfg.batch_size, lr=cfg.lr, weight_decay=cfg.weight_decay,
                         patience=cfg.patience)
    return [dataclasses.replace(base, lr=lr, weight_decay=wd) for lr in cfg.probe_lrs or (cfg.lr,)
            for wd in cfg.probe_weight_decays or (cfg.weight_decay,)]


def plan(cfg: TrainConfig, seeds: list[int], progress: bool = True) -> dict:
    """The data of a protocol run, every check done: the tree, its task records, eva's manifest, one honest
    manifest per seed, and a note when the tree is the archive but eva's counts do not hold. No feature pass."""
    index, cache = load_tree(cfg, progress=progress)
    bad = {p for p, i in zip(cache.paths, cache.info) if not i["ok"]}
    if bad and not cfg.skip_bad:
        raise UserError(f"{len(bad)} unreadable image(s) under {index.root}, e.g. {sorted(bad)[0]}: replace them, "
                        f"or pass --skip-bad to leave them out")
    records = eva.task_records([r for r in index.records if r.path not in bad], cfg.magnification)
    split = eva.eva_manifest(records)
    if not split["val"] or not split["train"]:
        raise UserError(f"{index.root}: eva's {len(eva.VAL_SLIDES)} validation patients ({', '.join(sorted(eva.VAL_SLIDES))}) "
                        f"are {'not' if not split['val'] else 'the only patients'} in this tree at --magnification "
                        f"{cfg.magnification}; the protocol needs the real archive (or python train.py --demo --protocol eva)")
    note = eva.count_problem(records, split, archive=len(index.records) == eva.ARCHIVE_IMAGES
                             and cfg.magnification == "40")
    near = near_pairs(cache, records, cfg)[0]
    links = [tuple(x["patients"]) for x in near] if cfg.near_duplicates == "link" else []
    honest = [eva.honest_manifest(records, cfg.split_percentages(), seed=s, links=links) for s in seeds]
    return {"root": index.root, "cache": cache, "records": records, "eva": split, "honest": honest, "note": note}


def features_of(cfg: TrainConfig, data: dict, device: torch.device, views: tuple[str, ...]) -> dict[str, torch.Tensor]:
    """{view: (n, F) float32} features of data["records"] (in their order), one pass per square position."""
    records = data["records"]
    positions = np.array([data["cache"].index_of(r.path) for r in records], dtype=np.int64)
    manifest = {"train": [], "val": [], "test": [r.path for r in records]}
    prep = Prepared(data["root"], data["cache"], manifest, {"train": [], "val": [], "test": records},
                    {"train": positions[:0], "val": positions[:0], "test": positions}, "subtype")
    model = model_for(cfg)
    images = DeviceImages.for_run(prep.cache.images, cfg, device)
    amp = amp_dtype(cfg.amp, device)
    squares = {x: run_features(model.backbone, prep, cfg, device, amp, images, parts=("test",), position=x)["test"].float()
               for x in sorted({x for v in views for x in VIEWS[v]})}
    return {v: torch.stack([squares[x] for x in VIEWS[v]]).mean(0) for v in views}


def rows_of(records, manifest: dict, part: str) -> np.ndarray:
    """Positions in records (int64, manifest order) of the images one side of a manifest lists, by path."""
    where = {r.path: i for i, r in enumerate(records)}
    return np.array([where[p] for p in manifest[part]], dtype=np.int64)


def probe_split(f: torch.Tensor, y: torch.Tensor, records, manifest: dict, grid: list[ProbeSettings],
                num_classes: int, seed: int) -> dict:
    """One probe per setting of grid on a manifest's train side, each checkpoint chosen on val, then the setting
    with the best validation figure (the first of equals); scored on test when there is one. The test rows are
    looked at only after the choice is made."""
    tr, va = (torch.as_tensor(rows_of(records, manifest, p), device=f.device) for p in ("train", "val"))
    probes = fit_probes(f[tr], y[tr], f[va], y[va], grid, num_classes, seed)
    i = max(range(len(probes)), key=lambda j: (probes[j].val_score, -j))
    probe = probes[i]
    out = {"seed": seed, "val": probe.val_score, "best_epoch": probe.best_epoch, "best_step": probe.best_step,
           "steps": probe.steps, "train_images": len(tr), "val_images": len(va), "lr": grid[i].lr,
           "weight_decay": grid[i].weight_decay}
    if manifest["test"]:
        te = torch.as_tensor(rows_of(records, manifest, "test"), device=f.device)
        out.update(test=balanced_accuracy(probe.predict(f[te]), y[te]), test_images=len(te))
    return out


def summarise(eva_runs: list[dict], held: dict[str, list[dict]]) -> dict:
    """The logbook rows: eva's (mean, sample std over seeds), the held-out ones (mean, Nadeau-Bengio interval),
    the paired difference eva - held-out (centre crop) and the selection bias val - test of the held-out splits."""
    vals = [r["val"] for r in eva_runs]
    rows = [{"row": "eva protocol (validation = selection = score)", "view": "centre", "mean": statistics.mean(vals),
             "std": statistics.stdev(vals) if len(vals) > 1 else 0.0, "ci": None, "per_seed": vals,
             "scored_on": "eva's 14 validation patients"}]
    ratio = {}
    for view, runs_ in held.items():
        tests = [r["test"] for r in runs_]
        ratio[view] = statistics.mean(r["test_images"] / r["train_images"] for r in runs_)
        nb = intervals.nadeau_bengio("balanced_accuracy", tests, ratio[view], "mean over splits, Nadeau-Bengio t")
        rows.append({"row": "held-out patients", "view": view, "mean": nb["diff"],
                     "std": statistics.stdev(tests) if len(tests) > 1 else 0.0, "ci": list(nb["ci"]),
                     "per_seed": tests, "scored_on": "test patients of each seed's accession split"})
    base = held.get("centre") or next(iter(held.values()))
    view = "centre" if "centre" in held else next(iter(held))
    diff = intervals.nadeau_bengio("balanced_accuracy", [a - b["test"] for a, b in zip(vals, base)], ratio[view],
                                   "paired by seed, Nadeau-Bengio t")
    bias = intervals.nadeau_bengio("balanced_accuracy", [b["val"] - b["test"] for b in base], ratio[view],
                                   "over splits, Nadeau-Bengio t")
    return {"rows": rows,
            "difference": {"what": f"eva protocol - held-out patients ({view})", "view": view, "mean": diff["diff"],
                           "ci": list(diff["ci"]), "p_value": diff["p_value"]},
            "selection_bias": {"what": f"held-out splits ({view}): validation figure of the kept checkpoint - "
                                       f"its test figure", "view": view, "mean": bias["diff"], "ci": list(bias["ci"]),
                               "p_value": bias["p_value"]}}


def run_eva(cfg: TrainConfig, run_dir: Path, seeds: list[int], data: dict, device: torch.device,
            progress: bool = True) -> dict:
    """The protocol into run_dir (config.json, split.json: eva's manifest with the held-out ones, protocol.json);
    data: plan()'s, checked before the folder was made. Returns protocol.json's content."""
    views = ("centre", "whole") if cfg.probe_view == "both" else (cfg.probe_view,)
    need = tuple(dict.fromkeys(("centre", *views)))  # eva's row reads the centre crop
    runs.start_run(run_dir, cfg, {**data["eva"], "honest": data["honest"]}, device)
    try:
        t0 = time.perf_counter()
        feats = features_of(cfg, data, device, need)
        t_feat = time.perf_counter() - t0
        y = torch.as_tensor(eva.labels(data["records"], cfg.task), device=device)
        grid, k = grid_of(cfg), len(eva.class_names(cfg.task))
        seed_everything(cfg.seed)
        t0 = time.perf_counter()
        eva_runs = [probe_split(feats["centre"], y, data["records"], data["eva"], grid, k, s) for s in seeds]
        held = {v: [probe_split(feats[v], y, data["records"], m, grid, k, s) for s, m in zip(seeds, data["honest"])]
                for v in views}
        t_probe = time.perf_counter() - t0
        out = {"protocol": "eva", "task": cfg.task, "classes": list(eva.class_names(cfg.task)),
               "magnification": cfg.magnification, "seeds": seeds, "settings": [dataclasses.asdict(g) for g in grid],
               "counts": {"eva": {p: len(data["eva"][p]) for p in ("train", "val")},
                          "held_out": [{p: len(m[p]) for p in PARTS} for m in data["honest"]]},
               "note": data["note"], **summarise(eva_runs, held), "eva_runs": eva_runs, "held_out_runs": held,
               "seconds": {"features": round(t_feat, 2), "probes": round(t_probe, 2)}}
        write_json(run_dir / FILE, out)
        runs.set_status(run_dir, runs.FINISHED, epoch=0)
        return out
    except BaseException as e:
        runs.abandon(run_dir, e)
        raise

