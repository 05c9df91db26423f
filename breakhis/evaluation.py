"""evaluate.py's steps on one opened run: threshold, another tree, calibration, breakdown, and their order.

    run = open_run("results/<run>")
    out = evaluate_run(run, EvalOptions(runs=["results/<run>"], tta=True, threshold="youden").validate())

Every option was checked before (options.EvalOptions.validate, then check_run against the run's
config); nothing here refuses a flag. Figures are computed at one temperature: the one
--save-temperature fits now, else the run's saved one (calibration.json), else none.
"""
from __future__ import annotations

import dataclasses
import time
from pathlib import Path

import numpy as np

from . import calibration as C
from . import metrics as M
from . import runs
from .cam import save_cams
from .data.prepare import Prepared, prepare
from .errors import UserError
from .export import export_program
from .io import jsonable, number, read_csv, read_json
from .options import EvalOptions
from .predict import TrainedRun, save_run_plots, score


def threshold(run: TrainedRun, rule: str, *, tta: bool = False, temperature: float | None = None) -> float:
    """A number as given; youden / recall=R chosen on the run's validation predictions at `temperature`
    (None: the run's own), which needs the run's own tree."""
    value = number(rule)
    if value is not None:
        return value
    if not Path(run.cfg.data).expanduser().exists():
        raise UserError(f"--threshold {rule} is chosen on the run's validation images, and the run's tree {run.cfg.data} "
                        f"is not there: give a number (e.g. --threshold 0.5), or make the tree available")
    if not run.data.parts["val"]:
        raise UserError(f"--threshold {rule}: {run.dir} has no validation images to choose it on; give a number")
    val = run.predict("val", tta=tta, temperature=temperature)
    return float(M.choose_threshold(val["labels"], val["probs"][:, 1], rule))


def on_tree(run: TrainedRun, tree: str, include_seen: bool) -> tuple[TrainedRun, dict]:
    """The run scoring every image of another tree, without those it trained or selected on (the
    patients of its train and val partitions, and pixel copies of their images when the run's own
    tree is there to hash) unless include_seen. Returns the run on that data and what to report."""
    other = prepare(dataclasses.replace(run.cfg, data=tree), whole=True)
    if include_seen:
        return run.on(other), {"not_a_test_figure": "images of the run's training and validation patients are included"}
    kept, note = leave_out_seen(run, other)
    if not kept.parts["test"]:
        raise UserError(f"--data {tree}: every image belongs to a patient the run trained or selected on "
                        f"({note['images']} images); nothing is left to test (--include-seen scores them anyway, "
                        f"as a non-test figure)")
    return run.on(kept), {"left_out": note}


def leave_out_seen(run: TrainedRun, other: Prepared) -> tuple[Prepared, dict]:
    """other's images less the run's train/val patients (split.json) and pixel copies of their images."""
    manifest = read_json(run.dir / runs.SPLIT) or {}
    seen_patients = {q for part in ("train", "val") for q in (manifest.get("patients") or {}).get(part, [])}
    own_tree = Path(run.cfg.data).expanduser().exists()
    seen_hashes: set[str] = set()
    if own_tree:
        sha = {q: i.get("sha1") for q, i in zip(run.data.cache.paths, run.data.cache.info)}
        seen_hashes = {sha[r.path] for part in ("train", "val") for r in run.data.parts[part] if sha.get(r.path)}
    other_sha = {q: i.get("sha1") for q, i in zip(other.cache.paths, other.cache.info)}
    keep = np.array([r.patient not in seen_patients and other_sha.get(r.path) not in seen_hashes
                     for r in other.parts["test"]], dtype=bool)
    left = [r for r, k in zip(other.parts["test"], keep) if not k]
    why = "patient in the run's train or val partition" + (
        ", or pixel-identical to one of their images" if own_tree
        else f" (the run's own tree is not at {run.cfg.data}: pixel copies not checked)")
    kept = dataclasses.replace(other, parts={**other.parts, "test": [r for r, k in zip(other.parts["test"], keep) if k]},
                               positions={**other.positions, "test": other.positions["test"][keep]})
    return kept, {"images": len(left), "patients": len({r.patient for r in left}), "why": why}


def group_of(record, by: str) -> str:
    """The --by group of an image: '40X', its subtype, or its patient."""
    return {"magnification": f"{record.magnification}X", "subtype": record.subtype, "patient": record.patient}[by]


def breakdown(run: TrainedRun, ev: dict, part: str, by: str, t: float, n_boot: int, seed: int) -> dict | None:
    """The binary figures per --by group of one partition's predictions (None for the subtype task)."""
    if run.cfg.task != "binary":
        return None
    records = run.data.parts[part]
    return M.breakdown(ev["labels"], ev["probs"][:, 1], [group_of(r, by) for r in records], threshold=t,
                       patients=[r.patient for r in records], n_boot=n_boot, seed=seed)


def calibrate(run: TrainedRun, opts: EvalOptions, fitted: float, figures_at: dict) -> dict:
    """--calibrate: the fitted temperature and the test figures before (raw logits) and after it;
    figures_at: {T: the figures already computed at T}, reused rather than scored again."""
    val = run.predict("val", tta=opts.tta, temperature=1.0)
    out = {"temperature": fitted, "at_limit": C.at_limit(fitted), "saved": opts.save_temperature,
           "previous": run.temperature, "val_images": len(val["labels"]),
           "val_nll": [C.nll(val["labels"], val["probs"]), C.nll(val["labels"], C.scale(val["probs"], fitted))]}
    for name, temperature in (("before", 1.0), ("after", fitted)):
        ev = run.predict(opts.part, tta=opts.tta, temperature=temperature)
        figures = figures_at.get(temperature) or score(ev, run.data.parts[opts.part], run.cfg.task,
                                                        threshold=threshold(run, opts.threshold, tta=opts.tta,
                                                                            temperature=temperature),
                                                        n_boot=opts.n_boot, seed=opts.boot_seed)
        out[name] = {**figures, "nll": C.nll(ev["labels"], ev["probs"])}
    return out


def save_temperature(run: TrainedRun, opts: EvalOptions, calibration: dict) -> None:
    """calibration.json: the temperature fitted on val now, and how."""
    runs.save_temperature(run.dir, jsonable({
        "temperature": calibration["temperature"], "fitted_on": "val", "images": calibration["val_images"],
        "tta": opts.tta, "model": str(opts.model) if opts.model else "model.safetensors",
        "val_nll_before": calibration["val_nll"][0], "val_nll_after": calibration["val_nll"][1],
        "time": time.strftime("%Y-%m-%dT%H:%M:%S")}))


def evaluate_run(run: TrainedRun, opts: EvalOptions) -> dict:
    """The figures of one run on a partition (or on another tree, opts.data), JSON-able: what evaluate.py shows."""
    out: dict = {}
    if opts.data:
        run, out = on_tree(run, opts.data, opts.include_seen)
    part = "test" if opts.data else opts.part
    fitted = None
    if opts.calibrate:
        if not run.data.parts["val"]:
            raise UserError(f"--calibrate: {run.dir} has no validation images to fit the temperature on")
        val = run.predict("val", tta=opts.tta, temperature=1.0)
        fitted = C.fit_temperature(val["probs"], val["labels"])
    use = fitted if opts.save_temperature else run.temperature  # the one temperature of every figure below
    ev = run.predict(part, tta=opts.tta, temperature=use or 1.0)
    t = threshold(run, opts.threshold, tta=opts.tta, temperature=use or 1.0)
    result = score(ev, run.data.parts[part], run.cfg.task, threshold=t, n_boot=opts.n_boot, seed=opts.boot_seed)
    saved = read_json(run.dir / "metrics.json") or {}
    out.update({"run": str(run.dir), "split": part, "tta": opts.tta, "threshold": t,
                "best_val_acc": saved.get("best_val_acc"), "best_epoch": saved.get("best_epoch"),
                "select": saved.get("select"), part: result, "temperature": use})
    if opts.by:
        out["by"] = breakdown(run, ev, part, opts.by, t, opts.n_boot, opts.boot_seed)
    if opts.plots:
        out["plots"] = [str(p) for p in save_run_plots(run.dir, read_csv(run.dir / "history.csv"), ev, run.cfg.task,
                                                       confusion=result.get("confusion"), threshold=t)]
    if opts.cam:
        out["cam"] = [str(p) for p in save_cams(run, ev, part, run.dir / "plots", opts.cam)]
    if opts.calibrate:
        out["calibration"] = calibrate(run, opts, fitted, {use or 1.0: result})
        if opts.save_temperature:
            save_temperature(run, opts, out["calibration"])
    if opts.export:  # after calibration, so that a temperature saved in this same call goes into the program
        export_program(run.model, run.cfg.image_size, run.device, opts.export, run_dir=run.dir, temperature=use or 1.0)
        out["export"] = str(opts.export)
    return jsonable(out)
