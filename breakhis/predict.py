"""Everything after training: load a run's model, predict, score, finalize, export, evaluate.

    finalize(run_dir)                          best checkpoint -> metrics.json, predictions.csv, plots/
    evaluate_run(run_dir, part="test", ...)    evaluate.py's figures of one run, from its folder alone
    export_program(model, image_size, device, path)   a torch.export program (.pt2)
    apply_temperature(ev, T, cfg)              temperature scaling of a prediction set (calibration.json)
"""
from __future__ import annotations

import dataclasses
import time
from pathlib import Path

import numpy as np
import torch

from . import calibration as C
from . import metrics as M
from . import plots, runs, stain
from .cam import save_cams
from .config import TrainConfig
from .data.dataset import class_names
from .data.prepare import Prepared, prepare
from .device import amp_dtype, resolve_device
from .engine import evaluate, make_loss
from .errors import UserError
from .features import FeatureLoader, features_usable, run_features
from .io import atomic_path, jsonable, number, read_csv, read_json, sha256_of, write_csv, write_json
from .loader import DeviceImages, Loader
from .models import Classifier, build_model


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

    def __init__(self, module, temperature: float = 1.0):
        super().__init__()
        object.__setattr__(self, "program", module)
        self.temperature = temperature  # the T the program already divides its logits by (exports.json)

    def train(self, mode: bool = True):
        return self

    def forward(self, x):
        return self.program(x)


class Tempered(torch.nn.Module):
    """model(x) / T: two logits whose softmax is the temperature-scaled probabilities (what --export writes
    for a calibrated run)."""

    def __init__(self, model: torch.nn.Module, temperature: float):
        super().__init__()
        self.model = model
        self.temperature = float(temperature) * getattr(model, "temperature", 1.0)  # in all, from the raw logits
        self.factor = float(temperature)

    def forward(self, x):
        return self.model(x) / self.factor


EXPORTS = "exports.json"  # in a run folder: SHA-256 -> what evaluate.py --export wrote from this run
CALIBRATION = "calibration.json"  # in a run folder: the temperature evaluate.py --calibrate --save-temperature fitted


def load_exported(path: str | Path, run_dir: Path, trust: bool = False) -> torch.nn.Module:
    """A model written by `evaluate.py RUN --export` (torch.export program).

    torch.export.load unpickles, so a crafted file can run code. Only files whose SHA-256 this
    run recorded when it exported them are loaded, unless trust is given (--trust-model).
    """
    p = Path(path)
    if not p.is_file():
        raise UserError(f"--model {p}: file not found (write one with evaluate.py RUN --export {p.name})")
    known = read_json(run_dir / EXPORTS) or {}
    digest = sha256_of(p)
    if not trust and digest not in known:
        raise UserError(f"--model {p}: not an export recorded by {run_dir} ({run_dir / EXPORTS} lacks its SHA-256). "
                        f"Loading a torch.export file can run code stored in it: export it again with "
                        f"evaluate.py {run_dir} --export {p.name}, or pass --trust-model for a file you trust")
    try:
        program = torch.export.load(str(p))
    except Exception as e:  # a damaged or foreign file: say so in the user's words
        raise UserError(f"--model {p}: not a torch.export program ({type(e).__name__}: {e})") from None
    # a program this run exported with a temperature divides its logits by it already; any other: 1 (raw logits)
    return Exported(program.module(), float((known.get(digest) or {}).get("temperature") or 1.0))


def run_images(run_dir: Path, prep: Prepared, cfg: TrainConfig, device: torch.device) -> DeviceImages:
    """The decoded fields of prep as the run's model sees them: with the run's own stain
    normalisation (stain.json) when it was trained with one."""
    return DeviceImages.for_run(prep.cache.images, cfg, device, stain.load(run_dir, cfg))


def predict(model: torch.nn.Module, prep: Prepared, part: str, cfg: TrainConfig, device: torch.device,
            *, tta: bool = False, images: DeviceImages | None = None) -> dict:
    """Probabilities for one partition, aligned with prep.parts[part] (engine.evaluate's dict).

    A run trained on cached features (cfg.cached_features) is scored on them too: its backbone is
    the one the features were computed with (it never trained), so the head on the cached
    evaluation view (or the 8 cached dihedral views, with tta) gives the whole model's
    probabilities up to float16 rounding, and a partition's backbone pass happens once, not at
    every evaluation. An exported program (not a Classifier) always runs whole.
    images: run_images(...) (needed when the run has a stain normalisation); default: the raw cache.
    """
    if images is None and cfg.stain_norm != "none":
        raise ValueError("a run with --stain-norm needs its normalised images: pass images=run_images(...)")
    images = images or DeviceImages.for_run(prep.cache.images, cfg, device)
    if features_usable(cfg) and isinstance(model, Classifier):
        amp = amp_dtype(cfg.amp, device)
        feats = run_features(model.backbone, prep, cfg, device, amp, images, parts=(part,), tta=tta)[part]
        head = Classifier(torch.nn.Identity(), model.head).eval()
        ev = evaluate(head, FeatureLoader.for_run(feats, prep, part, cfg, tta=tta),
                      make_loss(cfg.class_weights, cfg.label_smoothing, device), amp=amp, tta=tta)
    else:
        ev = predict_rows(model, images, prep.positions[part], prep.labels(part), cfg, device, tta=tta)
    assert np.array_equal(ev["idx"], prep.positions[part]), "evaluation must iterate in order"
    return ev


def predict_rows(model: torch.nn.Module, images: DeviceImages, rows, labels, cfg: TrainConfig,
                 device: torch.device, *, tta: bool = False) -> dict:
    """engine.evaluate over `rows` (N,) of `images` through the run's evaluation loader: the one place
    a run's evaluation view, normalisation and precision are set up, for its partitions (predict) and
    for new images (newimages.score_images) alike. labels (N,) only feed the returned loss."""
    amp = amp_dtype(cfg.amp, device)
    loader = Loader.for_run(images, rows, labels, cfg, train=False, dtype=amp or torch.float32)
    return evaluate(model, loader, make_loss(cfg.class_weights, cfg.label_smoothing, device), amp=amp, tta=tta)


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
        cal = C.summary(y, probs[:, 1], patients, n_boot=n_boot, seed=seed)  # ECE and Brier, intervals alike
        out.update({k: v for k, v in cal.items() if k != "ci"})
        if "ci" in cal:
            out["ci"].update(M.jsonable(cal["ci"]))
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


def check_export_name(path: str | Path) -> None:
    if not str(path).endswith(".pt2"):
        raise UserError(f"--export {path}: the file name must end in .pt2")


def export_program(model: torch.nn.Module, image_size: int, device: torch.device, path: str | Path,
                   run_dir: Path | None = None, temperature: float = 1.0) -> None:
    """Save the model as a torch.export program taking (B, 3, S, S) float32 normalised images, giving
    (B, C) logits divided by `temperature` (1: the model's own logits). The run records the file's
    SHA-256 and the temperature its logits carry in all (an exported program's own included)."""
    check_export_name(path)
    if temperature != 1.0:
        model = Tempered(model, temperature)
    carried = float(getattr(model, "temperature", 1.0))
    model = model.float().eval()
    x = torch.randn(2, 3, image_size, image_size, device=device)
    batch = torch.export.Dim("batch", min=1, max=4096)
    prog = torch.export.export(model, (x,), dynamic_shapes=({0: batch},))
    with atomic_path(path) as tmp:
        torch.export.save(prog, str(tmp))
        digest = sha256_of(tmp)
    if run_dir is not None:  # the run vouches for what it wrote: evaluate.py RUN --model loads it without --trust-model
        known = read_json(run_dir / EXPORTS) or {}
        write_json(run_dir / EXPORTS, {**known, digest: {"file": str(Path(path).resolve()), "temperature": carried,
                                                         "time": time.strftime("%Y-%m-%dT%H:%M:%S")}})


def run_temperature(run_dir: Path) -> float | None:
    """The temperature saved in the run (calibration.json), None when it has none."""
    saved = read_json(run_dir / CALIBRATION)
    if saved is None:
        return None
    t = saved.get("temperature") if isinstance(saved, dict) else None
    if not isinstance(t, (int, float)) or isinstance(t, bool) or not np.isfinite(t) or t <= 0:
        raise UserError(f"{run_dir / CALIBRATION}: damaged (temperature {t!r}, need a number > 0); delete it, or "
                        f"fit it again with evaluate.py {run_dir} --calibrate --save-temperature")
    return float(t)


def apply_temperature(ev: dict, temperature: float | None, cfg: TrainConfig) -> dict:
    """engine.evaluate's dict with probs softmax(log probs / T) (calibration.scale: the same as dividing the
    logits by T) and the run's loss recomputed on them; unchanged for None or 1."""
    if temperature is None or temperature == 1.0 or not len(ev["probs"]):
        return ev
    probs = C.scale(ev["probs"], temperature)  # (N, C) float64
    loss_fn = make_loss(cfg.class_weights, cfg.label_smoothing, torch.device("cpu"))
    log_p = torch.log(torch.from_numpy(probs).clamp_min(C.FLOOR)).float()  # CE of log p = CE of the logits
    return {**ev, "probs": probs, "loss": float(loss_fn(log_p, torch.from_numpy(np.asarray(ev["labels"])).long()))}


def check_calibrate(task: str) -> None:
    """--calibrate: the binary task only (evaluate.py's other rules: calibration.check_options)."""
    if task != "binary":
        raise UserError(f"--calibrate: the {task} task is not supported (calibration figures are those of the "
                        f"malignant probability); calibrate a binary run")


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
                 cam: int = 0, include_seen: bool = False, calibrate: bool = False,
                 save_temperature: bool = False) -> dict:
    """The figures of one run on a partition (or on every image of another tree, `data`), JSON-able.

    threshold: a number, youden or recall=R (chosen on the run's validation predictions).
    model_file: an exported program (.pt2) instead of the run's checkpoint, loaded only when this run
    recorded its SHA-256 (or trust_model). export: write one and record it.
    cam: Grad-CAM overlays of that many images into the run's plots/.
    data: images of the run's train/val patients (or pixel copies of theirs) are left out and counted
    (out["left_out"]); include_seen keeps them, and out["not_a_test_figure"] says so.
    calibrate: fit a temperature on the validation predictions and report the test figures before and
    after (out["calibration"]); save_temperature writes it to calibration.json. The run's saved
    temperature (out["temperature"]) applies to every figure and to export.
    """
    run_dir = runs.check_run(run_dir)
    cfg = runs.load_config(run_dir)
    C.check_options(calibrate, save_temperature, data, part)
    if calibrate:
        check_calibrate(cfg.task)
    if export:
        check_export_name(export)
    saved_t = run_temperature(run_dir)
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
    if calibrate and not prep.parts["val"]:
        raise UserError(f"--calibrate: {run_dir} has no validation images to fit the temperature on")
    images = run_images(run_dir, prep, cfg, dev)
    part = "test" if data else part
    in_model = getattr(model, "temperature", 1.0)  # an exported program's own; undone so that evs hold raw-logit probs

    def run_part(name: str) -> dict:
        return apply_temperature(predict(model, prep, name, cfg, dev, tta=tta, images=images), 1 / in_model, cfg)

    val_raw = run_part("val") if not fixed or calibrate else None
    ev_raw = val_raw if part == "val" and val_raw is not None else run_part(part)

    def at(temperature: float | None) -> tuple[dict, float]:  # predictions and threshold at a temperature
        val = None if val_raw is None else apply_temperature(val_raw, temperature, cfg)
        return apply_temperature(ev_raw, temperature, cfg), threshold_for(threshold, run_dir, val, cfg.task)

    fitted = C.fit_temperature(val_raw["probs"], val_raw["labels"]) if calibrate else None
    use = fitted if save_temperature else saved_t
    ev, t = at(use)
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
    out["temperature"] = use
    if calibrate:
        out["calibration"] = {"temperature": fitted, "at_limit": C.at_limit(fitted), "saved": save_temperature,
                              "previous": saved_t,
                              "val_images": len(val_raw["labels"]),
                              "val_nll": [C.nll(val_raw["labels"], val_raw["probs"]),
                                          C.nll(val_raw["labels"], C.scale(val_raw["probs"], fitted))]}
        for name, temperature in (("before", None), ("after", fitted)):
            e, th = (ev, t) if temperature == use else at(temperature)
            figures = result if temperature == use else score(e, prep.parts[part], cfg.task, threshold=th,
                                                              n_boot=n_boot, seed=boot_seed)
            out["calibration"][name] = {**figures, "nll": C.nll(e["labels"], e["probs"])}
        if save_temperature:
            write_json(run_dir / CALIBRATION, jsonable({
                "temperature": fitted, "fitted_on": "val", "images": len(val_raw["labels"]), "tta": tta,
                "model": str(model_file) if model_file else "model.safetensors",
                "val_nll_before": out["calibration"]["val_nll"][0], "val_nll_after": out["calibration"]["val_nll"][1],
                "time": time.strftime("%Y-%m-%dT%H:%M:%S")}))
    if export:  # after calibration, so that a temperature saved in this same call goes into the program
        export_program(model, cfg.image_size, dev, export, run_dir=run_dir, temperature=(use or 1.0) / in_model)
        out["export"] = str(export)
    return jsonable(out)
