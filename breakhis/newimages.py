"""Scoring new images with a trained run: `evaluate.py RUN --images PATH...`.

    out = score_images("results/<run>", find_images(["new/"]), threshold="youden", tta=True, cam=4)
    out["csv"]        # RUN/scores/<time>.csv: one row per file, unreadable ones included with their error

Each file is decoded exactly as the run's decode cache decodes its tree (data/images.py: Pillow,
RGB, resized to the run's cache size with the 700:460 field aspect, whatever the file's own
aspect; read that module's docstring for what happens to a square or a tiny image), then goes
through the run's own evaluation loader (predict.predict_rows: Loader.for_run with the run's
config, its evaluation view, normalisation and precision) and the run's best checkpoint, so
what the run applies to its own test images applies here too. `tta`: the 8 dihedral views. A
temperature the run saved (evaluate.py --calibrate --save-temperature: calibration.json) scales
the probabilities, as it does every later evaluation of the run; a run trained with --stain-norm
normalises each new field with its own stain.json, as its training and test fields were.

The CSV (atomic; never overwriting a file) has, per file: path, width and height (px, as the
file holds them), p_<class> for each class, prediction (a class name: for the binary task
malignant when p_malignant >= threshold, for the subtype task the most probable subtype),
threshold; where the file name is a BreakHis name (SOB_B_A-14-22549AB-40-001, any image
suffix), patient and magnification, and the patient's vote over all its scored images, as the
patient accuracy of metrics.py takes it: the mean probability per class over the patient's images
(patient_p_<class>, over patient_images images), then the same rule as for one image; error:
empty, or why the file could not be read (its other cells then empty). Unreadable files are
also printed. The names of BreakHis files carry their class, but no metric is computed: these
are new images, scored, not a test (evaluate.py --data scores a labelled tree).

Files are decoded and scored CHUNK at a time, so memory stays bounded for any number of files.
"""
from __future__ import annotations

import dataclasses
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from . import runs, stain
from .cam import check_spatial, choose, draw_cams
from .config import TrainConfig
from .data.dataset import class_names
from .data.images import breakhis_record, decode_images
from .data.prepare import field_size, prepare
from .device import resolve_device
from .errors import UserError
from .io import number, write_csv
from .loader import DeviceImages
from .predict import apply_temperature, load_run_model, predict, predict_rows, run_images, run_temperature, threshold_for
from .report import progress_bar

CHUNK = 512  # files decoded and scored together: 150 MB of uint8 fields at the default 256x390
SCORES = "scores"  # the folder under a run that receives the CSVs by default


def output_path(run_dir: Path, out: str | None) -> Path:
    """The CSV to write: `out` (refused when it exists or is not a .csv), else RUN/scores/<time>.csv,
    with a -2, -3... suffix when a file of that second exists."""
    if out:
        p = Path(out)
        if p.suffix.lower() != ".csv":
            raise UserError(f"--out {out}: give a file name ending in .csv")
        if p.exists() or cam_folder(p).exists():
            taken = p if p.exists() else cam_folder(p)
            raise UserError(f"--out {out}: {taken} exists and is never overwritten; give a new name")
        return p
    stamp = time.strftime("%Y%m%d-%H%M%S")
    p, k = run_dir / SCORES / f"{stamp}.csv", 1
    while p.exists() or cam_folder(p).exists():
        k += 1
        p = run_dir / SCORES / f"{stamp}-{k}.csv"
    return p


def cam_folder(csv: Path) -> Path:
    """Where --cam overlays of a scoring go: beside its CSV, `<name>-cam/`."""
    return csv.with_name(csv.stem + "-cam")


def run_threshold(rule: str, run_dir: Path, cfg: TrainConfig, model: torch.nn.Module, device: torch.device,
                  tta: bool, temperature: float | None = None) -> float:
    """The decision threshold as evaluate.py picks it: a number as given; youden / recall=R chosen on the
    run's validation images, predicted again here (with tta when asked) through the same path as the new
    images, which needs the run's own tree."""
    if number(rule) is not None or cfg.task != "binary":
        return threshold_for(rule, run_dir, None, cfg.task)
    if not Path(cfg.data).expanduser().exists():
        raise UserError(f"--threshold {rule} is chosen on the run's validation images, and the run's tree {cfg.data} "
                        f"is not there: give a number (e.g. --threshold 0.5), or make the tree available")
    prep = prepare(dataclasses.replace(cfg, split_file=str(run_dir / "split.json")), progress=False)
    val = apply_temperature(predict(model, prep, "val", cfg, device, tta=tta,
                                    images=run_images(run_dir, prep, cfg, device)), temperature, cfg)
    return threshold_for(rule, run_dir, val, cfg.task)


def decide(probs: np.ndarray, task: str, threshold: float) -> np.ndarray:
    """(N,) class indices: the binary rule p_malignant >= threshold, or the most probable subtype."""
    return (probs[:, 1] >= threshold).astype(np.int64) if task == "binary" else probs.argmax(1)


def patient_votes(patients: Sequence[str], probs: np.ndarray, task: str, threshold: float) -> dict[str, dict]:
    """Per patient: images, the mean probability per class over them, and the vote (decide() on that mean)."""
    out = {}
    patients = np.asarray(patients)
    for q in sorted(set(patients.tolist())):
        mean = probs[patients == q].mean(0)
        out[q] = {"images": int((patients == q).sum()), "mean": mean, "vote": int(decide(mean[None], task, threshold)[0])}
    return out


def resized(info: list[dict], size: tuple[int, int]) -> dict:
    """How many readable files the decode reshaped: other_aspect (W/H more than 2% off the field's
    700:460, so stretched), smaller_than_field (narrower or lower than the field, so upsampled);
    field: the run's field size 'HxW' in pixels."""
    h, w = size
    ok = [i for i in info if i["ok"]]
    return {"other_aspect": sum(abs(i["width"] / i["height"] / (w / h) - 1) > 0.02 for i in ok),
            "smaller_than_field": sum(i["width"] < w or i["height"] < h for i in ok), "field": f"{h}x{w}"}


def score_images(run_dir: str | Path, paths: Sequence[str], *, threshold: str = "0.5", tta: bool = False,
                 device: str | None = None, out: str | None = None, cam: int = 0, progress: bool = True) -> dict:
    """Score image files (data.images.find_images) with a run; write the CSV (see the module docstring).

    threshold: a number, youden or recall=R (chosen on the run's validation images). cam: Grad-CAM
    overlays of that many scored images, the most confident first, into `<csv name>-cam/`.
    Returns a JSON-able summary: run, csv, threshold, tta, images, scored, counts (images per
    predicted class), patient_votes (patients per voted class), skipped ([{path, error}]), resized
    (files of another aspect than 700:460, stretched; files smaller than the field, upsampled), cam.
    """
    if not paths:
        raise UserError("--images: no image file given")
    if cam < 0:
        raise UserError(f"--cam {cam}: give the number of images to explain, e.g. --cam 8")
    run_dir = runs.check_run(run_dir)
    csv = output_path(run_dir, out)
    cfg = runs.load_config(run_dir)
    dev = resolve_device(device or cfg.device)
    cfg = dataclasses.replace(cfg, device=str(dev))
    names = class_names(cfg.task)
    model = load_run_model(run_dir, cfg, dev)
    if cam:  # a transformer has no map to explain: say so before scoring, not after
        check_spatial(model, torch.zeros(1, 3, cfg.image_size, cfg.image_size, device=dev), cfg.backbone)
    temperature = run_temperature(run_dir)  # saved by evaluate.py --calibrate --save-temperature, or None
    stain_params = stain.load(run_dir, cfg)  # the run's fitted stain normalisation (stain.json), or None
    t = run_threshold(threshold, run_dir, cfg, model, dev, tta, temperature)
    size = field_size(cfg)

    probs = np.full((len(paths), len(names)), np.nan)
    info: list[dict] = []
    with progress_bar(progress, "scoring images", len(paths)) as advance:
        for start in range(0, len(paths), CHUNK):
            chunk = list(paths[start:start + CHUNK])
            pixels, got = decode_images(chunk, size, workers=cfg.workers)
            info += got
            ok = np.array([i for i, g in enumerate(got) if g["ok"]], dtype=np.int64)
            if len(ok):
                images = DeviceImages.for_run(pixels, cfg, dev, stain_params)
                ev = apply_temperature(predict_rows(model, images, ok, np.zeros(len(ok), np.int64), cfg, dev, tta=tta),
                                       temperature, cfg)
                probs[start + ev["idx"]] = ev["probs"]
            advance(len(chunk))
    good = np.array([i["ok"] for i in info])
    skipped = [{"path": p, "error": i["error"]} for p, i in zip(paths, info) if not i["ok"]]
    if not good.any():
        listing = "; ".join(f"{k['path']} ({k['error']})" for k in skipped[:5]) + ("; ..." if len(skipped) > 5 else "")
        raise UserError(f"--images: none of the {len(paths)} file(s) could be read as an image: {listing}")

    pred = np.full(len(paths), -1, np.int64)
    pred[good] = decide(probs[good], cfg.task, t)
    recs = [breakhis_record(p) for p in paths]
    named = [i for i in range(len(paths)) if good[i] and recs[i] is not None]
    votes = patient_votes([recs[i].patient for i in named], probs[named], cfg.task, t) if named else {}
    rows = []
    for i, (p, inf, rec) in enumerate(zip(paths, info, recs)):
        v = votes.get(rec.patient) if rec is not None and good[i] else None
        rows.append({"path": p, "width": inf["width"] or "", "height": inf["height"] or "",
                     **{f"p_{n}": float(probs[i, c]) if good[i] else "" for c, n in enumerate(names)},
                     "prediction": names[pred[i]] if good[i] else "", "threshold": t if cfg.task == "binary" else "",
                     "patient": rec.patient if rec else "", "magnification": rec.magnification if rec else "",
                     "patient_images": v["images"] if v else "",
                     **{f"patient_p_{n}": float(v["mean"][c]) if v else "" for c, n in enumerate(names)},
                     "patient_vote": names[v["vote"]] if v else "", "error": inf["error"] or ""})

    result = {"run": str(run_dir), "csv": str(csv), "threshold": t, "temperature": temperature, "tta": tta,
              "images": len(paths),
              "scored": int(good.sum()), "skipped": skipped,
              "counts": {n: int((pred[good] == c).sum()) for c, n in enumerate(names)},
              "patient_votes": {n: sum(v["vote"] == c for v in votes.values()) for c, n in enumerate(names)},
              "resized": resized(info, size),
              "cam": []}
    if cam:
        # no labels: the most confident first (choose() with each image's own argmax as its label)
        pick = np.flatnonzero(good)[choose(probs[good], probs[good].argmax(1), cam)]
        pixels, _ = decode_images([paths[i] for i in pick], size, workers=cfg.workers)
        images = DeviceImages.for_run(pixels, cfg, dev, stain_params)
        result["cam"] = [str(f) for f in draw_cams(model, images, np.arange(len(pick)), probs[pick], None,
                                                     [paths[i] for i in pick], cfg, cam_folder(csv))]
    write_csv(csv, rows)  # last: a failure before it leaves no CSV
    return result
