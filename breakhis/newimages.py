"""Scoring new images with a trained run: `python score.py RUN PATH...` (docs/evaluate.md: the CSV's columns).

    run = open_run("results/<run>")
    out = score_images(run, find_images(["new/"]), threshold="youden", tta=True, cam=4)
    out["csv"]        # RUN/scores/<time>.csv: one row per file, unreadable ones included with their error

Each file is decoded exactly as the run's decode cache decodes its tree (data/images.py: Pillow,
RGB, resized to the run's cache size with the 700:460 field aspect, whatever the file's own
aspect), then goes through the run's own evaluation loader and model (TrainedRun.predict_rows),
so what the run applies to its own test images (view, normalisation, stain.json, precision,
calibration.json's temperature) applies here too. A patient's vote is the mean probability per
class over its images, then the one-image rule (decide): the rule patient accuracy uses.

Files are decoded and scored CHUNK at a time, so memory stays bounded for any number of files.
"""
from __future__ import annotations

import os
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from .cam import check_spatial, choose, draw_cams
from .data.dataset import class_names
from .data.images import breakhis_record, decode_images
from .data.prepare import field_size
from .errors import UserError
from .evaluation import threshold as run_threshold
from .io import check_writable, create_new, csv_text, shown_path
from .predict import TrainedRun
from .report import progress_bar

CHUNK = 512  # files decoded and scored together: 150 MB of uint8 fields at the default 256x390
SCORES = "scores"  # the folder under a run that receives the CSVs by default


def output_path(run_dir: Path, out: str | None) -> Path:
    """The CSV to write: `out` (refused when it exists), else RUN/scores/<time>.csv, with a -2, -3...
    suffix when a file of that second exists. Only a first choice: publish() takes the name exclusively."""
    if out:
        p = Path(out)
        if p.exists() or cam_folder(p).exists():
            taken = p if p.exists() else cam_folder(p)
            raise UserError(f"--out {out}: {taken} exists and is never overwritten; give a new name")
        check_writable(p, "--out")  # now, not after every image was scored
        return p
    stamp = time.strftime("%Y%m%d-%H%M%S")
    p, k = run_dir / SCORES / f"{stamp}.csv", 1
    while p.exists() or cam_folder(p).exists():
        k += 1
        p = run_dir / SCORES / f"{stamp}-{k}.csv"
    check_writable(p, "the scores CSV (choose another place with --out)")
    return p


def publish(csv: Path, text: str, explicit: bool) -> Path:
    """Write the CSV under csv, or, when another call took that name while these images were scored (two
    calls with one --out, or the default name in the same second), under the next free <stem>-N.csv:
    exclusive creation (io.create_new), so neither result is overwritten. Returns the path written."""
    data = text.encode()
    for k in range(1, 10_000):
        p = csv if k == 1 else csv.with_name(f"{csv.stem}-{k}{csv.suffix}")
        if k > 1 and cam_folder(p).exists():
            continue
        try:
            create_new(p, data)
            return p
        except FileExistsError:
            continue
    raise UserError(f"{csv}: no free name beside it ({'--out' if explicit else 'the default name'}); give --out")


def cam_folder(csv: Path) -> Path:
    """Where --cam overlays of a scoring go: beside its CSV, `<name>-cam/`."""
    return csv.with_name(csv.stem + "-cam")


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


def csv_rows(paths: Sequence[str], info: list[dict], probs: np.ndarray, pred: np.ndarray, recs: list, votes: dict,
             task: str, t: float) -> list[dict]:
    """One CSV row per file (docs/evaluate.md; a name that is not UTF-8 escaped, io.shown_path): probs (N, C) nan and pred -1 for unreadable files;
    recs: each file's BreakHis record or None; votes: patient_votes of the readable named files."""
    names = class_names(task)
    rows = []
    for i, (p, inf, rec) in enumerate(zip(paths, info, recs)):
        ok = bool(inf["ok"])
        v = votes.get(rec.patient) if rec is not None and ok else None
        rows.append({"path": shown_path(p), "width": inf["width"] or "", "height": inf["height"] or "",
                     **{f"p_{n}": float(probs[i, c]) if ok else "" for c, n in enumerate(names)},
                     "prediction": names[pred[i]] if ok else "", "threshold": t if task == "binary" else "",
                     "patient": rec.patient if rec else "", "magnification": rec.magnification if rec else "",
                     "patient_images": v["images"] if v else "",
                     **{f"patient_p_{n}": float(v["mean"][c]) if v else "" for c, n in enumerate(names)},
                     "patient_vote": names[v["vote"]] if v else "", "error": inf["error"] or ""})
    return rows


def score_images(run: TrainedRun, paths: Sequence[str], *, threshold: str = "0.5", tta: bool = False,
                 out: str | None = None, cam: int = 0, progress: bool = True) -> dict:
    """Score image files (data.images.find_images) with a run; write the CSV (see the module docstring).

    threshold: a number, youden or recall=R (chosen on the run's validation images). cam: Grad-CAM
    overlays of that many scored images, the most confident first, into `<csv name>-cam/`.
    Returns a JSON-able summary: run, csv, threshold, tta, images, scored, counts (images per
    predicted class), patient_votes (patients per voted class), skipped ([{path, error}]), resized
    (files of another aspect than 700:460, stretched; files smaller than the field, upsampled), cam.
    """
    cfg = run.cfg
    csv = output_path(run.dir, out)
    names = class_names(cfg.task)
    if cam:  # a transformer has no map to explain: say so before scoring, not after
        check_spatial(run.model, torch.zeros(1, 3, cfg.image_size, cfg.image_size, device=run.device), cfg.backbone)
    t = run_threshold(run, threshold, tta=tta)
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
                ev = run.predict_rows(run.images_of(pixels), ok, tta=tta)
                probs[start + ev["idx"]] = ev["probs"]
            advance(len(chunk))
    good = np.array([i["ok"] for i in info])
    skipped = [{"path": shown_path(p), "error": i["error"]} for p, i in zip(paths, info) if not i["ok"]]
    if not good.any():
        listing = "; ".join(f"{k['path']} ({k['error']})" for k in skipped[:5]) + ("; ..." if len(skipped) > 5 else "")
        raise UserError(f"none of the {len(paths)} file(s) could be read as an image: {listing}")

    pred = np.full(len(paths), -1, np.int64)
    pred[good] = decide(probs[good], cfg.task, t)
    recs = [breakhis_record(p) for p in paths]
    named = [i for i in range(len(paths)) if good[i] and recs[i] is not None]
    votes = patient_votes([recs[i].patient for i in named], probs[named], cfg.task, t) if named else {}
    rows = csv_rows(paths, info, probs, pred, recs, votes, cfg.task, t)

    result = {"run": shown_path(str(run.dir)), "csv": shown_path(str(csv)), "threshold": t, "temperature": run.temperature, "tta": tta,
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
        # drawn beside, under a name of this process, and moved next to the CSV once its name is taken
        drawn = csv.with_name(f".tmp-{csv.stem}-cam.{os.getpid()}")
        result["cam"] = [Path(f).name for f in draw_cams(run.checkpoint(), run.images_of(pixels), np.arange(len(pick)),
                                                           probs[pick], None, [paths[i] for i in pick], cfg, drawn)]
    written = publish(csv, csv_text(rows), explicit=bool(out))  # last: a failure before it leaves no CSV
    if written != csv:
        result["note"] = (f"{csv} was written by another call while these images were scored; this scoring went to "
                          f"{written} (never overwritten)")
    result["csv"] = shown_path(str(written))
    if cam:
        os.rename(drawn, cam_folder(written))
        result["cam"] = [str(cam_folder(written) / f) for f in result["cam"]]
    return result
