"""A trained run opened once from its folder, its predictions, their figures, and the final scoring.

    run = open_run("results/<run>")       # checked now; model, data and images are loaded on first use
    ev = run.predict("test", tta=True)    # probabilities at the run's temperature (calibration.json, or none)
    figures = score(ev, run.data.parts["test"], run.cfg.task)
    finalize(run_dir, data=prep, images=images)   # end of training: metrics.json, predictions.csv, plots/

open_run is the one place a trained run is put back together: its config (device resolved), the
precision, its own partitions (split.json) or another tree's images, its best checkpoint or an
exported program, the images with its stain normalisation (stain.json) applied, and its one
temperature. Evaluation (evaluation.py), new images (newimages.py), Grad-CAM (cam.py), export
(export.py) and the end of training (finalize, from fit) all take a TrainedRun.

Temperatures: every prediction is computed once per (partition, tta) at the raw logits (an
exported program's own temperature undone) and scaled on request, softmax(log p / T)
(calibration.scale, exact for logits divided by T), so that no figure is ever scaled twice and
asking for another T costs no model pass.
"""
from __future__ import annotations

import dataclasses
import functools
from pathlib import Path

import numpy as np
import sklearn
import torch

from . import calibration as C
from . import intervals, plots, runs, stain
from . import metrics as M
from .config import TrainConfig
from .data.dataset import class_names
from .data.prepare import Prepared, prepare
from .device import amp_dtype, resolve_device
from .engine import evaluate, make_loss
from .export import load_exported, trusted_temperature
from .features import part_batches
from .io import jsonable, number, read_csv, write_csv, write_json
from .loader import DeviceImages, Loader
from .models import model_for
from .stain import StainParams

N_BOOT = 1000  # patient-bootstrap resamples of the intervals finalize writes into metrics.json


class TrainedRun:
    """A trained run and what its later steps need: cfg (device resolved), device, amp, stain, the
    saved temperature, and on first use the model, the data and the images (see the module docstring).

    data: the partitions scored, the run's own (split.json) unless another Prepared is given;
    images: data's fields as the run sees them (its stain normalisation applied), on the device.
    Built by open_run from a folder; built directly (run_dir None) for a model that has none."""

    def __init__(self, cfg: TrainConfig, device: torch.device, *, run_dir: Path | None = None,
                 model: torch.nn.Module | None = None, model_file: str | None = None, trust: bool = False,
                 data: Prepared | None = None, images: DeviceImages | None = None,
                 stain_params: StainParams | None = None, temperature: float | None = None, progress: bool = True):
        self.cfg, self.device, self.dir = cfg, device, run_dir
        self.amp = amp_dtype(cfg.amp, device)
        self.stain = stain_params
        self.temperature = temperature  # the run's saved T (calibration.json), None when it has none
        self.model_file, self._trust = model_file, trust
        self._model, self._data, self._images, self._progress = model, data, images, progress
        self._raw: dict[tuple[str, bool], dict] = {}  # (part, tta) -> predictions at the raw logits

    @property
    def model(self) -> torch.nn.Module:
        """The exported program (model_file) or the best checkpoint, in eval mode on the device."""
        if self._model is None:
            self._model = load_exported(self.model_file, self.dir, self._trust) if self.model_file \
                else self.checkpoint()
        return self._model

    def checkpoint(self) -> torch.nn.Module:
        """The run's best checkpoint (model.safetensors), e.g. for Grad-CAM, which needs gradients an exported
        program does not have: the model already loaded when it is the checkpoint, else loaded now. A run
        built without a folder has only its model."""
        if self.dir is None or (self._model is not None and not self.model_file):
            return self._model
        model = model_for(self.cfg, initial=False)
        runs.load_weights(model, self.dir / "model.safetensors", self.cfg.backbone)
        model.to(self.device)
        if self.cfg.channels_last:
            model = model.to(memory_format=torch.channels_last)
        return model.eval()

    @property
    def data(self) -> Prepared:
        if self._data is None:
            self._data = prepare(runs.own_split(self.cfg, self.dir), progress=self._progress)
        return self._data

    @property
    def images(self) -> DeviceImages:
        if self._images is None:
            self._images = self.images_of(self.data.cache.images)
        return self._images

    def images_of(self, pixels) -> DeviceImages:
        """Decoded fields (N, H, W, 3) uint8 as the run sees them: on its device, stain-normalised as in training."""
        return DeviceImages.for_run(pixels, self.cfg, self.device, self.stain)

    def on(self, data: Prepared) -> TrainedRun:
        """The same run (model shared, not reloaded) scoring other data, e.g. another tree's images."""
        other = TrainedRun(self.cfg, self.device, run_dir=self.dir, model=self._model, model_file=self.model_file,
                           trust=self._trust, data=data, stain_params=self.stain, temperature=self.temperature,
                           progress=self._progress)
        return other

    def predict(self, part: str, *, tta: bool = False, temperature: float | None = None) -> dict:
        """engine.evaluate's dict for one partition, aligned with data.parts[part], at `temperature`
        (None: the run's own; 1.0: the raw logits). Computed once per (part, tta): on cached features
        when the run trained on them (features.part_batches decides), else through the model."""
        if (part, tta) not in self._raw:
            net, batches = part_batches(self.model, self.data, part, self.cfg, self.device, self.images, tta=tta)
            ev = evaluate(net, batches, self.loss, amp=self.amp, tta=tta)
            assert np.array_equal(ev["idx"], self.data.positions[part]), "evaluation must iterate in order"
            self._raw[(part, tta)] = self._undo_program_temperature(ev)
        return scaled(self._raw[(part, tta)], self.temperature if temperature is None else temperature, self.cfg)

    def predict_rows(self, images: DeviceImages, rows, *, tta: bool = False) -> dict:
        """engine.evaluate over `rows` (N,) of `images` (images_of new fields) through the run's evaluation
        loader and model, at the run's temperature; no labels (the loss is meaningless)."""
        loader = Loader.for_run(images, rows, np.zeros(len(rows), np.int64), self.cfg, train=False,
                                dtype=self.amp or torch.float32)
        ev = evaluate(self.model, loader, self.loss, amp=self.amp, tta=tta)
        # one rescaling: from the program's own temperature (1 for a checkpoint) to the run's
        return scaled(ev, (self.temperature or 1.0) / getattr(self.model, "temperature", 1.0), self.cfg)

    def _undo_program_temperature(self, ev: dict) -> dict:
        """An exported program divides its logits by the temperature it carries: back to the raw logits."""
        carried = getattr(self.model, "temperature", 1.0)
        return scaled(ev, 1 / carried, self.cfg) if carried != 1.0 else ev

    @functools.cached_property
    def loss(self) -> torch.nn.Module:
        return make_loss(self.cfg.class_weights, self.cfg.label_smoothing, self.device)


def open_run(run_dir: str | Path, *, device: str | None = None, data: Prepared | None = None,
             images: DeviceImages | None = None, model_file: str | None = None, trust: bool = False,
             progress: bool = True, model: torch.nn.Module | None = None) -> TrainedRun:
    """The run at run_dir, checked before any work: a run folder with a checkpoint, its config, a
    device that exists, its stain.json and calibration.json (when it has them). device: default the
    run's own. data/images: what training just used (fit), to save preparing and normalising them
    again. model: the run's best checkpoint already in memory (fit). model_file: an exported program to use instead of the checkpoint, trusted only when the run
    recorded it (export.load_exported), or with trust."""
    run_dir = runs.check_run(run_dir)
    cfg = runs.load_config(run_dir)
    dev = resolve_device(device or cfg.device)
    cfg = dataclasses.replace(cfg, device=str(dev))
    run = TrainedRun(cfg, dev, run_dir=run_dir, model=model, model_file=model_file, trust=trust, data=data, images=images,
                     stain_params=stain.load(run_dir, cfg), temperature=runs.saved_temperature(run_dir),
                     progress=progress)
    if model_file:
        trusted_temperature(model_file, run_dir, trust)  # the trust rule, now, before any work; loaded on first use
    return run


def scaled(ev: dict, temperature: float | None, cfg: TrainConfig) -> dict:
    """engine.evaluate's dict with probs softmax(log probs / T) (calibration.scale: the same as dividing the
    logits by T) and the run's loss recomputed on them; unchanged for None or 1."""
    if temperature is None or temperature == 1.0 or not len(ev["probs"]):
        return ev
    probs = C.scale(ev["probs"], temperature)  # (N, C) float64
    loss_fn = make_loss(cfg.class_weights, cfg.label_smoothing, torch.device("cpu"))
    log_p = torch.log(torch.from_numpy(probs).clamp_min(C.FLOOR)).float()  # CE of log p = CE of the logits
    return {**ev, "probs": probs, "loss": float(loss_fn(log_p, torch.from_numpy(np.asarray(ev["labels"])).long()))}


def score(ev: dict, records: list, task: str, threshold: float = 0.5, n_boot: int = 1000, seed: int = 0,
          groups: bool = True) -> dict:
    """Metrics of one partition's predictions: image level, patient level, per magnification (groups), and
    with n_boot > 0 their intervals over patients (n_boot 0: the point figures alone, the same numbers)."""
    y, probs = ev["labels"], ev["probs"]
    patients = [r.patient for r in records]
    if task == "subtype":
        names, pats, mags = class_names(task), np.array(patients), np.array([r.magnification for r in records])
        out = M.multiclass_metrics(y, probs, names)
        boot = bool(n_boot) and len(set(patients)) > 1  # intervals over patients, overall and per magnification
        if boot:
            out["ci"] = intervals.multiclass_ci(y, probs, pats, n_boot=n_boot, seed=seed)
            out["ci_settings"] = intervals.interval_settings(n_boot, seed)
        out["by"] = {} if not groups else {"magnification": {str(m): {**M.multiclass_metrics(y[mags == m], probs[mags == m], names),
                                                **({"ci": intervals.multiclass_ci(y[mags == m], probs[mags == m],
                                                                                  pats[mags == m], n_boot=n_boot,
                                                                                  seed=seed)} if boot else {})}
                                       for m in sorted(set(mags.tolist()))}}
        out = jsonable(out)
    else:
        out = M.summarize(y, probs[:, 1], patients, threshold=threshold, n_boot=n_boot, seed=seed,
                          groups={"magnification": [r.magnification for r in records]} if groups else None)
        cal = C.summary(y, probs[:, 1], patients, n_boot=n_boot, seed=seed)  # ECE and Brier, intervals alike
        out.update({k: v for k, v in cal.items() if k != "ci"})
        if "ci" in cal:
            out["ci"].update(jsonable(cal["ci"]))
    out["loss"] = ev["loss"]
    return out


def prediction_rows(ev: dict, records: list, part: str, task: str, threshold: float = 0.5) -> list[dict]:
    """predictions.csv rows of one partition: the image, its label, p_<class>, the prediction."""
    names = class_names(task)
    rows = []
    for r, y, p in zip(records, ev["labels"], ev["probs"]):
        pred = int(p[1] >= threshold) if task == "binary" else int(np.argmax(p))
        rows.append({"path": r.path, "patient": r.patient, "magnification": r.magnification, "subtype": r.subtype,
                     "label": int(y), **{f"p_{n}": float(v) for n, v in zip(names, p)}, "prediction": pred,
                     "split": part})
    return rows


def finalize(run_dir: Path, data: Prepared | None = None, progress: bool = True,
             images: DeviceImages | None = None, ci: bool = True, draw: bool = True,
             model: torch.nn.Module | None = None) -> dict:
    """Score the best checkpoint on val and test; write metrics.json, predictions.csv and plots/.
    data/images: what training used (see open_run). The figures are those of the raw logits: a
    temperature fitted later (calibration.json) never changes them.
    model: the trained model in memory (fit: the best epoch's weights), instead of loading model.safetensors again.
    ci (the intervals and the per-magnification figures), draw (plots/): off for a tune trial, whose table needs the point figures alone (the same
    numbers): the patient bootstrap (1000 resamples) and five matplotlib figures are most of a
    frozen trial's cost. tune.py finalizes its winner again with both; evaluate.py computes the
    intervals itself and draws a run's plots with --plots."""
    run = open_run(run_dir, data=data, images=images, progress=progress, model=model)
    history = read_csv(run.dir / "history.csv")
    best_rows = [h for h in history if h.get("is_best") == "True"]
    chosen = {k: number(v) for k, v in best_rows[-1].items() if k.startswith("val_")} if best_rows else {}
    # the figures of the checkpoint that is scored (the epoch --select chose), never the best of any epoch
    out: dict = {"best_epoch": int(best_rows[-1]["epoch"]) if best_rows else None, "select": run.cfg.select,
                 "selected": chosen, "best_val_acc": chosen.get("val_acc")}
    rows: list[dict] = []
    evs = {}
    for part in ("val", "test"):
        if run.data.parts[part]:
            evs[part] = run.predict(part, temperature=1.0)
            with sklearn.config_context(skip_parameter_validation=True):  # the same numbers, less overhead
                out[part] = score(evs[part], run.data.parts[part], run.cfg.task, n_boot=N_BOOT if ci else 0, groups=ci)
            rows += prediction_rows(evs[part], run.data.parts[part], part, run.cfg.task)
    write_json(run.dir / "metrics.json", jsonable(out))
    write_csv(run.dir / "predictions.csv", rows)
    if draw:
        save_run_plots(run.dir, history, evs.get("test"), run.cfg.task, (out.get("test") or {}).get("confusion"))
    return out


def save_run_plots(run_dir: Path, history: list[dict], ev: dict | None, task: str, confusion=None,
                   threshold: float = 0.5) -> list[Path]:
    """plots/ of a run: learning curves (history.csv rows), and from one partition's predictions `ev`
    the ROC and PR curves and reliability diagram (binary task) and the confusion matrix (confusion,
    else computed at threshold). Returns the files written."""
    binary = ev is not None and task == "binary"
    return plots.save_plots(run_dir / "plots", [{k: _cell(v) for k, v in h.items()} for h in history],
                            y=ev["labels"] if binary else None, p=ev["probs"][:, 1] if binary else None,
                            class_names=class_names(task), confusion=confusion, threshold=threshold)


def _cell(v):
    """A history.csv cell: its number where it is one, else the text."""
    f = number(v)
    return v if f is None and v not in ("nan", "inf", "-inf") else float(v)
