"""Everything after training: load a run's model, predict, score, finalize, export, evaluate.

    finalize(run_dir)                          best checkpoint -> metrics.json, predictions.csv, plots/
    evaluate_run(run_dir, part="test", ...)    evaluate.py's figures of one run, from its folder alone
    export_program(model, image_size, device, path)   a torch.export program (.pt2)
"""
from __future__ import annotations

import dataclasses
import time
from pathlib import Path

import numpy as np
import torch

from . import metrics as M
from . import plots, runs, stain
from .cam import save_cams
from .config import TrainConfig
from .data.dataset import class_names
from .data.prepare import Prepared, prepare
from .device import amp_dtype, resolve_device
from .engine import evaluate, make_loss
from .errors import UserError
from .io import atomic_path, jsonable, number, read_csv, read_json, sha256_of, write_csv, write_json
from .loader import DeviceImages, Loader
from .models import build_model


def load_run_model(run_dir: Path, cfg: TrainConfig, device: torch.device) -> torch.nn.Module:
    """The run's best checkpoint, rebuilt from its own files (no download)."""
    model = build_model(cfg.backbone, cfg.num_classes, cfg.head, cfg.dropout, pretrained=False, image_size=cfg.image_size)
    runs.load_weights(model, run_dir / "model.safetensors", cfg.backbone)
    model.to(device)
    if cfg.channels_last:
        model = model.to(memory_format=torch.channels_last)
    return model.eval()


class Exported(torch.nn.Module):
    """A torch.export program behind the nn.Module calls the engine makes.

    It was exported in eval mode, and exported modules refuse train()/eval(): keep it out of
    the module tree so that eval() does not reach it.
    """

    def __init__(self, module):
        super().__init__()
        object.__setattr__(self, "program", module)

    def train(self, mode: bool = True):
        return self

    def forward(self, x):
        return self.program(x)


EXPORTS = "exports.json"  # in a run folder: SHA-256 -> what evaluate.py --export wrote from this run


def load_exported(path: str | Path, run_dir: Path, trust: bool = False) -> torch.nn.Module:
    """A model written by `evaluate.py RUN --export` (torch.export program).

    torch.export.load unpickles, so a crafted file can run code. Only files whose SHA-256 this
    run recorded when it exported them are loaded, unless trust is given (--trust-model).
    """
    p = Path(path)
    if not p.is_file():
        raise UserError(f"--model {p}: file not found (write one with evaluate.py RUN --export {p.name})")
    known = read_json(run_dir / EXPORTS) or {}
    if not trust and sha256_of(p) not in known:
        raise UserError(f"--model {p}: not an export recorded by {run_dir} ({run_dir / EXPORTS} lacks its SHA-256). "
                        f"Loading a torch.export file can run code stored in it: export it again with "
                        f"evaluate.py {run_dir} --export {p.name}, or pass --trust-model for a file you trust")
    try:
        program = torch.export.load(str(p))
    except Exception as e:  # a damaged or foreign file: say so in the user's words
        raise UserError(f"--model {p}: not a torch.export program ({type(e).__name__}: {e})") from None
    return Exported(program.module())


def run_images(run_dir: Path, prep: Prepared, cfg: TrainConfig, device: torch.device) -> DeviceImages:
    """The decoded fields of prep as the run's model sees them: with the run's own stain
    normalisation (stain.json) when it was trained with one."""
    return DeviceImages.for_run(prep.cache.images, cfg, device, stain.load(run_dir, cfg))


def predict(model: torch.nn.Module, prep: Prepared, part: str, cfg: TrainConfig, device: torch.device,
            *, tta: bool = False, images: DeviceImages | None = None) -> dict:
    """Probabilities for one partition, aligned with prep.parts[part] (engine.evaluate's dict).

    images: run_images(...) (needed when the run has a stain normalisation); default: the raw cache."""
    if images is None and cfg.stain_norm != "none":
        raise ValueError("a run with --stain-norm needs its normalised images: pass images=run_images(...)")
    images = images or DeviceImages.for_run(prep.cache.images, cfg, device)
    amp = amp_dtype(cfg.amp, device)
    loader = Loader.for_run(images, prep.positions[part], prep.labels(part), cfg, train=False,
                            dtype=amp or torch.float32)
    ev = evaluate(model, loader, make_loss(cfg.class_weights, cfg.label_smoothing, device), amp=amp, tta=tta)
    assert np.array_equal(ev["idx"], prep.positions[part]), "evaluation must iterate in order"
    return ev


def score(ev: dict, records: list, task: str, threshold: float = 0.5, n_boot: int = 1000, seed: int = 0) -> dict:
    """Metrics of one partition's predictions: image level, patient level, intervals, per magnification."""
    y, probs = ev["labels"], ev["probs"]
    patients = [r.patient for r in records]
    if task == "subtype":
        names, pats, mags = class_names(task), np.array(patients), np.array([r.magnification for r in records])
        out = M.multiclass_metrics(y, probs, names)
        if n_boot and len(set(patients)) > 1:  # intervals over patients, overall and per magnification
            out["ci"] = M.multiclass_ci(y, probs, pats, n_boot=n_boot, seed=seed)
            out["ci_settings"] = M.interval_settings(n_boot, seed)
            out["by"] = {"magnification": {str(m): {**M.multiclass_metrics(y[mags == m], probs[mags == m], names),
                                                    "ci": M.multiclass_ci(y[mags == m], probs[mags == m], pats[mags == m],
                                                                          n_boot=n_boot, seed=seed)}
                                           for m in sorted(set(mags.tolist()))}}
        out = M.jsonable(out)
    else:
        out = M.summarize(y, probs[:, 1], patients, threshold=threshold, n_boot=n_boot, seed=seed,
                          groups={"magnification": [r.magnification for r in records]})
    out["loss"] = ev["loss"]
    return out


def prediction_rows(ev: dict, records: list, part: str, task: str, threshold: float = 0.5) -> list[dict]:
    names = class_names(task)
    rows = []
    for r, y, p in zip(records, ev["labels"], ev["probs"]):
        pred = int(p[1] >= threshold) if task == "binary" else int(np.argmax(p))
        rows.append({"path": r.path, "patient": r.patient, "magnification": r.magnification, "subtype": r.subtype,
                     "label": int(y), **{f"p_{n}": float(v) for n, v in zip(names, p)}, "prediction": pred,
                     "split": part})
    return rows


def finalize(run_dir: Path, data: Prepared | None = None, progress: bool = True,
             images: DeviceImages | None = None) -> dict:
    """Score the best checkpoint on val and test; write metrics.json, predictions.csv and plots/.
    images: those training used (run_images of the same data), to save normalising them again."""
    run_dir = runs.check_run(run_dir)
    cfg = runs.load_config(run_dir)
    device = resolve_device(cfg.device)
    prep = data or prepare(dataclasses.replace(cfg, split_file=str(run_dir / "split.json")), progress=progress)
    model = load_run_model(run_dir, cfg, device)
    images = images or run_images(run_dir, prep, cfg, device)
    history = read_csv(run_dir / "history.csv")
    best_rows = [h for h in history if h.get("is_best") == "True"]
    best_epoch = int(best_rows[-1]["epoch"]) if best_rows else None
    chosen = {k: number(v) for k, v in best_rows[-1].items() if k.startswith("val_")} if best_rows else {}
    # the figures of the checkpoint that is scored (the epoch --select chose), never the best of any epoch
    out: dict = {"best_epoch": best_epoch, "select": cfg.select, "selected": chosen,
                 "best_val_acc": chosen.get("val_acc")}
    rows: list[dict] = []
    evs = {}
    for part in ("val", "test"):
        if not prep.parts[part]:
            continue
        evs[part] = predict(model, prep, part, cfg, device, images=images)
        out[part] = score(evs[part], prep.parts[part], cfg.task)
        rows += prediction_rows(evs[part], prep.parts[part], part, cfg.task)
    write_json(run_dir / "metrics.json", jsonable(out))
    write_csv(run_dir / "predictions.csv", rows)
    test = evs.get("test")
    plots.save_plots(run_dir / "plots", [{k: _cell(v) for k, v in h.items()} for h in history],
                     y=None if test is None or cfg.task != "binary" else test["labels"],
                     p=None if test is None or cfg.task != "binary" else test["probs"][:, 1],
                     class_names=class_names(cfg.task),
                     confusion=(out.get("test") or {}).get("confusion"))
    return out


def _cell(v):
    """A history.csv cell: its number where it is one, else the text."""
    f = number(v)
    return v if f is None and v not in ("nan", "inf", "-inf") else float(v)


def export_program(model: torch.nn.Module, image_size: int, device: torch.device, path: str | Path,
                   run_dir: Path | None = None) -> None:
    """Save the model as a torch.export program taking (B, 3, S, S) float32 normalised images."""
    if not str(path).endswith(".pt2"):
        raise UserError(f"--export {path}: the file name must end in .pt2")
    model = model.float().eval()
    x = torch.randn(2, 3, image_size, image_size, device=device)
    batch = torch.export.Dim("batch", min=1, max=4096)
    prog = torch.export.export(model, (x,), dynamic_shapes=({0: batch},))
    with atomic_path(path) as tmp:
        torch.export.save(prog, str(tmp))
        digest = sha256_of(tmp)
    if run_dir is not None:  # the run vouches for what it wrote: evaluate.py RUN --model loads it without --trust-model
        known = read_json(run_dir / EXPORTS) or {}
        write_json(run_dir / EXPORTS, {**known, digest: {"file": str(Path(path).resolve()),
                                                         "time": time.strftime("%Y-%m-%dT%H:%M:%S")}})


def threshold_for(rule: str, run_dir: Path, val_ev: dict | None, task: str) -> float:
    """A number as given; youden / recall=R chosen on the validation predictions."""
    value = number(rule)
    if value is not None:
        return value
    if task != "binary":
        raise UserError(f"--threshold {rule}: thresholds apply to the binary task only")
    if val_ev is None:
        raise UserError(f"--threshold {rule}: needs the run's validation predictions ({run_dir}/predictions.csv)")
    return float(M.choose_threshold(val_ev["labels"], val_ev["probs"][:, 1], rule))


def group_of(record, by: str) -> str:
    """The --by group of an image: '40X', its subtype, or its patient."""
    return {"magnification": f"{record.magnification}X", "subtype": record.subtype, "patient": record.patient}[by]


def leave_out_seen(run_dir: Path, cfg: TrainConfig, other: Prepared) -> tuple[Prepared, dict]:
    """Another tree's images without those the run trained or selected on: the patients of the run's
    train and val partitions (split.json), and images pixel-identical to one of theirs (when the run's
    own tree is still there to hash). Returns the filtered data and what was left out."""
    manifest = read_json(run_dir / "split.json") or {}
    seen_patients = {q for part in ("train", "val") for q in (manifest.get("patients") or {}).get(part, [])}
    seen_hashes: set[str] = set()
    own_tree = Path(cfg.data).expanduser().exists()
    if own_tree:
        own = prepare(dataclasses.replace(cfg, split_file=str(run_dir / "split.json")), progress=False)
        sha = {q: i.get("sha1") for q, i in zip(own.cache.paths, own.cache.info)}
        seen_hashes = {sha[r.path] for part in ("train", "val") for r in own.parts[part] if sha.get(r.path)}
    other_sha = {q: i.get("sha1") for q, i in zip(other.cache.paths, other.cache.info)}
    keep = [r for r in other.parts["test"] if r.patient not in seen_patients and other_sha.get(r.path) not in seen_hashes]
    kept = {r.path for r in keep}
    left = [r for r in other.parts["test"] if r.path not in kept]
    positions = other.positions["test"][[r.path in kept for r in other.parts["test"]]]
    note = {"images": len(left), "patients": len({r.patient for r in left}),
            "why": "patient in the run's train or val partition" + (", or pixel-identical to one of their images"
                                                                   if own_tree else " (the run's own tree is not at "
                                                                   f"{cfg.data}: pixel copies not checked)")}
    return dataclasses.replace(other, parts={**other.parts, "test": keep}, positions={**other.positions, "test": positions}), note


def evaluate_run(run_dir: str | Path, *, part: str = "test", tta: bool = False, threshold: str = "0.5",
                 data: str | None = None, device: str | None = None, by: str | None = None, n_boot: int = 1000,
                 boot_seed: int = 0,
                 model_file: str | None = None, trust_model: bool = False, export: str | None = None,
                 cam: int = 0, include_seen: bool = False) -> dict:
    """The figures of one run on a partition (or on every image of another tree, `data`), JSON-able.

    threshold: a number, youden or recall=R (chosen on the run's validation predictions).
    model_file: an exported program (.pt2) instead of the run's checkpoint, loaded only when this run
    recorded its SHA-256 (or trust_model). export: write one and record it.
    cam: Grad-CAM overlays of that many images into the run's plots/.
    data: images of the run's train/val patients (or pixel copies of theirs) are left out and counted
    (out["left_out"]); include_seen keeps them, and out["not_a_test_figure"] says so.
    """
    run_dir = runs.check_run(run_dir)
    cfg = runs.load_config(run_dir)
    dev = resolve_device(device or cfg.device)
    cfg = dataclasses.replace(cfg, device=str(dev))
    fixed = number(threshold) is not None
    if data and not fixed:
        raise UserError(f"--threshold {threshold} with --data: give a number (the other tree has no validation split)")
    out: dict = {}
    if data:
        prep = prepare(dataclasses.replace(cfg, data=data), whole=True)
        if include_seen:
            out["not_a_test_figure"] = "images of the run's training and validation patients are included"
        else:
            prep, out["left_out"] = leave_out_seen(run_dir, cfg, prep)
            if not prep.parts["test"]:
                raise UserError(f"--data {data}: every image belongs to a patient the run trained or selected on "
                                f"({out['left_out']['images']} images); nothing is left to test (--include-seen "
                                f"scores them anyway, as a non-test figure)")
    else:
        prep = prepare(dataclasses.replace(cfg, split_file=str(run_dir / "split.json")))
    model = load_exported(model_file, run_dir, trust_model) if model_file else load_run_model(run_dir, cfg, dev)
    if export:
        export_program(model, cfg.image_size, dev, export, run_dir=run_dir)
        out["export"] = str(export)
    images = run_images(run_dir, prep, cfg, dev)
    part = "test" if data else part
    val_ev = predict(model, prep, "val", cfg, dev, tta=tta, images=images) if not fixed else None
    t = threshold_for(threshold, run_dir, val_ev, cfg.task)
    ev = val_ev if part == "val" and val_ev is not None else predict(model, prep, part, cfg, dev, tta=tta,
                                                                     images=images)
    result = score(ev, prep.parts[part], cfg.task, threshold=t, n_boot=n_boot, seed=boot_seed)
    saved = read_json(run_dir / "metrics.json") or {}
    out.update({"run": str(run_dir), "split": part, "tta": tta, "threshold": t,
                "best_val_acc": saved.get("best_val_acc"), "best_epoch": saved.get("best_epoch"),
                "select": saved.get("select"), part: result})
    if by:
        keys = [group_of(r, by) for r in prep.parts[part]]
        out["by"] = M.breakdown(ev["labels"], ev["probs"][:, 1], keys, threshold=t,
                                patients=[r.patient for r in prep.parts[part]], n_boot=n_boot,
                                seed=boot_seed) if cfg.task == "binary" else None
    if cam:
        written = save_cams(load_run_model(run_dir, cfg, dev), prep, ev, cfg, dev, run_dir / "plots", cam,
                            images=images)
        out["cam"] = [str(p) for p in written]
    return jsonable(out)
