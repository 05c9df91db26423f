"""One training run, start to finish: data, model, optimiser, loop, save. Shared by train.py and tune.py.

prepare_data(cfg)         index -> decode cache -> duplicates -> patient split
fit(cfg, run_dir)         the loop; a valid run folder after every epoch; finalize() at the end
finalize(run_dir)         best checkpoint -> val/test predictions, metrics.json, predictions.csv, plots
"""
from __future__ import annotations

import dataclasses
import math
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from . import cache as cache_mod
from . import data as data_mod
from . import metrics as M
from . import atomic, runs, splits
from .config import TrainConfig, parse_hw
from .engine import NonFiniteLoss, evaluate, train_one_epoch
from .errors import UserError
from .loader import Augment, DeviceImages, Loader
from .models import amp_dtype, build_model, needs_grad_scaler, prepare_model, resolve_device, set_frozen
from .optim import build_optimizer, build_scheduler, current_lr, step_schedule

PARTS = ("train", "val", "test")
SELECT_MODE = {"val_acc": "max", "val_loss": "min", "val_recall": "max", "val_auroc": "max", "val_f1": "max"}


@dataclass
class Prepared:
    """The data of one run: records per partition and their positions in the shared uint8 cache."""
    root: Path
    cache: cache_mod.Cache
    manifest: dict
    parts: dict[str, list]          # partition -> [Record], magnification filter applied
    positions: dict[str, np.ndarray]  # partition -> (N,) int64 positions into cache.images
    task: str

    def labels(self, part: str) -> np.ndarray:
        return np.array([label_of(r, self.task) for r in self.parts[part]], dtype=np.int64)


def label_of(record, task: str) -> int:
    return record.subtype_index if task == "subtype" else record.label


def class_names(task: str) -> tuple[str, ...]:
    return tuple(data_mod.SUBTYPES) if task == "subtype" else ("benign", "malignant")


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def prepare_data(cfg: TrainConfig, progress: bool = True, whole: bool = False) -> Prepared:
    """Index the tree, load (or build once) the decode cache, drop duplicates, split by patient.

    whole: put every image in "test" (scoring another tree with a trained model).
    """
    root = data_mod.find_root(cfg.data)
    index = data_mod.index_tree(root)
    size = parse_hw(cfg.cache_size, "--cache-size") if cfg.cache_size else cache_mod.default_cache_size(cfg.image_size)
    paths = [r.path for r in index.records]
    cache = cache_mod.build_cache(root, paths, size, cache_dir=cfg.cache_dir or None, workers=cfg.workers,
                                  progress=progress)
    bad = [{"path": p, "error": i.get("error")} for p, i in zip(cache.paths, cache.info) if not i["ok"]]
    if bad and not cfg.skip_bad:
        listing = "; ".join(f"{b['path']} ({b['error']})" for b in bad)
        raise UserError(f"{len(bad)} unreadable image(s) under {root}: {listing}. "
                        f"Replace them, or pass --skip-bad to skip them (recorded in split.json)")
    bad_paths = {b["path"] for b in bad}
    records = [r for r in index.records if r.path not in bad_paths]
    hashes = {p: i["sha1"] for p, i in zip(cache.paths, cache.info) if i["ok"]}
    groups = data_mod.find_duplicates(records, hashes)
    records, dropped = data_mod.drop_duplicates(records, groups, cfg.task)
    if whole:
        manifest = {"train": [], "val": [], "test": [r.path for r in records],
                    "patients": {"train": [], "val": [], "test": sorted({r.patient for r in records})}}
    elif cfg.split_file:
        manifest = splits.load_split(cfg.split_file, records)
    elif cfg.fold:
        manifest = splits.fold_split(root, records, cfg.fold, seed=cfg.split_seed, group=cfg.group)
    else:
        manifest = splits.make_split(records, cfg.split_ratio(), seed=cfg.split_seed, group=cfg.group)
    manifest = {**manifest, "skipped": bad, "dropped": dropped}
    parts = {k: splits.select(records, manifest, k, cfg.magnification) for k in PARTS}
    for k in () if whole else ("train", "val"):
        if not parts[k]:
            raise UserError(f"the {k} partition is empty for --magnification {cfg.magnification} "
                            f"(tree {root}); use more patients or another --split")
    positions = {k: np.array([cache.index_of(r.path) for r in v], dtype=np.int64) for k, v in parts.items()}
    return Prepared(root, cache, manifest, parts, positions, cfg.task)


def make_loader(prep: Prepared, images: DeviceImages, part: str, cfg: TrainConfig, *, train: bool,
                dtype: torch.dtype) -> Loader:
    return Loader(images, prep.positions[part], prep.labels(part), batch_size=cfg.batch_size,
                  image_size=cfg.image_size, train=train, augment=Augment.from_config(cfg) if train else None,
                  balanced=cfg.balanced_sampling and train, drop_last=cfg.drop_last and train, seed=cfg.seed,
                  dtype=dtype, channels_last=cfg.channels_last)


def make_loss(cfg: TrainConfig, device: torch.device) -> torch.nn.Module:
    weight = torch.tensor(cfg.class_weights, dtype=torch.float32, device=device) if cfg.class_weights else None
    return torch.nn.CrossEntropyLoss(weight=weight, label_smoothing=cfg.label_smoothing)


def val_metrics(ev: dict, task: str) -> dict:
    """The validation figures of one epoch (history.csv columns)."""
    y, probs = ev["labels"], ev["probs"]
    if task == "subtype":
        m = M.multiclass_metrics(y, probs, class_names(task))
        return {"val_loss": ev["loss"], "val_acc": m["accuracy"], "val_recall": m["balanced_accuracy"],
                "val_auroc": float("nan"), "val_f1": m["macro_f1"]}
    m = M.binary_metrics(y, probs[:, 1])
    return {"val_loss": ev["loss"], "val_acc": m["accuracy"], "val_recall": m["recall"],
            "val_auroc": m["auroc"], "val_f1": m["f1"]}


def improved(value: float, best: float | None, select: str) -> bool:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return False
    if best is None:
        return True
    return value < best if SELECT_MODE[select] == "min" else value > best


def fit(cfg: TrainConfig, run_dir: Path, *, on_epoch: Callable[[dict], None] | None = None,
        data: Prepared | None = None, progress: bool = True, resume: bool = False) -> dict:
    """Train one run into run_dir and finalize it; returns the metrics dict (as metrics.json)."""
    from . import report

    run_dir = Path(run_dir)
    device = resolve_device(cfg.device)
    seed_everything(cfg.seed)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True

    # --- data ---
    prep = data or prepare_data(cfg, progress=progress)
    if not resume:
        runs.start_run(run_dir, cfg, prep.manifest, device)
    images = DeviceImages(prep.cache.images, device, budget_gb=cfg.device_cache_gb)
    amp = amp_dtype(cfg.amp, device)
    train_loader = make_loader(prep, images, "train", cfg, train=True, dtype=amp or torch.float32)
    val_loader = make_loader(prep, images, "val", cfg, train=False, dtype=amp or torch.float32)
    if len(train_loader) == 0:
        raise UserError(f"the training partition has {len(prep.parts['train'])} images, fewer than one batch of "
                        f"{cfg.batch_size}; lower --batch-size or pass --no-drop-last")

    # --- model, optimiser, loss ---
    model = build_model(cfg.backbone, cfg.num_classes, cfg.head, cfg.dropout, cfg.pretrained, cfg.weights)
    set_frozen(model, cfg.freeze)
    model.to(device)
    fast = prepare_model(model, device, cfg.channels_last, cfg.compile, cfg.compile_mode)
    optimizer = build_optimizer(model.parameters(), cfg.optimizer, cfg.lr, cfg.weight_decay, cfg.momentum, cfg.nesterov)
    schedule = build_scheduler(optimizer, cfg.scheduler, epochs=cfg.epochs, steps_per_epoch=len(train_loader),
                               step_size=cfg.step_size, milestones=cfg.milestones, gamma=cfg.gamma,
                               pct_start=cfg.pct_start, plateau_patience=cfg.plateau_patience,
                               plateau_factor=cfg.plateau_factor, min_lr=cfg.min_lr, warmup_epochs=cfg.warmup_epochs)
    scaler = torch.amp.GradScaler(device.type, enabled=needs_grad_scaler(amp))
    loss_fn = make_loss(cfg, device)

    # --- resume ---
    history: list[dict] = []
    best, best_epoch, start, stale = None, 0, 1, 0
    if resume:
        st = runs.load_state(run_dir / "last.pt")
        model.load_state_dict(st["model"])
        optimizer.load_state_dict(st["optimizer"])
        schedule.load_state_dict(st["schedule"])
        scaler.load_state_dict(st["scaler"])
        torch.set_rng_state(st["rng"])
        history, best, best_epoch, stale = st["history"], st["best"], st["best_epoch"], st["stale"]
        start = st["epoch"] + 1
        runs.set_status(run_dir, "running", epoch=st["epoch"], message="resumed")

    # --- loop ---
    epoch = start - 1
    bar = report.TrainProgress(cfg.epochs, len(train_loader), enabled=progress)
    try:
        with bar:
            bar.skip_to(epoch)
            for epoch in range(start, cfg.epochs + 1):
                if cfg.freeze and cfg.unfreeze_at and epoch >= cfg.unfreeze_at:
                    set_frozen(model, False)
                t0 = time.perf_counter()
                lr = current_lr(optimizer)
                train_loader.set_epoch(epoch)
                try:
                    tr = train_one_epoch(fast, bar.batches(train_loader), optimizer, schedule, loss_fn,
                                         amp=amp, scaler=scaler)
                except NonFiniteLoss as e:
                    runs.set_status(run_dir, "failed", epoch=epoch - 1, message=str(e))
                    raise UserError(f"{e} at epoch {epoch} of run {run_dir}: training stopped. Lower --lr, "
                                    f"or use --amp off / bf16; the best checkpoint so far is kept") from None
                ev = evaluate(fast, val_loader, loss_fn, amp=amp)
                row = {"epoch": epoch, "lr": lr, "train_loss": tr["loss"], "train_acc": tr["acc"],
                       **val_metrics(ev, cfg.task), "img_s": tr["img_s"], "seconds": time.perf_counter() - t0}
                step_schedule(schedule, "epoch", val_loss=ev["loss"])
                is_best = improved(row[cfg.select], best, cfg.select)
                if is_best:
                    best, best_epoch, stale = row[cfg.select], epoch, 0
                    runs.save_weights(model, run_dir / "model.safetensors")
                else:
                    stale += 1
                row.update(is_best=is_best, best_value=best)
                history.append(row)
                runs.write_csv(run_dir / "history.csv", history)
                runs.save_state(run_dir / "last.pt", {
                    "model": model.state_dict(), "optimizer": optimizer.state_dict(),
                    "schedule": schedule.state_dict(), "scaler": scaler.state_dict(), "rng": torch.get_rng_state(),
                    "history": history, "best": best, "best_epoch": best_epoch, "stale": stale, "epoch": epoch})
                runs.set_status(run_dir, "running", epoch=epoch)
                bar.epoch_done(row, cfg.select)
                if on_epoch:
                    on_epoch(row)
                if cfg.patience and stale >= cfg.patience:
                    bar.note(f"early stop: no {cfg.select} improvement for {cfg.patience} epochs")
                    break
    except KeyboardInterrupt:
        done = history[-1]["epoch"] if history else 0
        runs.set_status(run_dir, "interrupted", epoch=done,
                        message=f"Ctrl-C during epoch {epoch}; continue with: python train.py --resume {run_dir}")
        raise
    runs.set_status(run_dir, "finished", epoch=history[-1]["epoch"] if history else 0)
    (run_dir / "last.pt").unlink(missing_ok=True)
    return finalize(run_dir, prep, progress=progress)


# --- after training ---------------------------------------------------------------------------

def load_run_model(run_dir: Path, cfg: TrainConfig, device: torch.device) -> torch.nn.Module:
    """The run's best checkpoint, rebuilt from its own files (no download)."""
    model = build_model(cfg.backbone, cfg.num_classes, cfg.head, cfg.dropout, pretrained=False)
    runs.load_weights(model, run_dir / "model.safetensors")
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


def load_exported(path: str | Path) -> torch.nn.Module:
    """A model written by `evaluate.py --export` (torch.export program)."""
    p = Path(path)
    if not p.is_file():
        raise UserError(f"--model {p}: file not found (write one with evaluate.py RUN --export {p.name})")
    try:
        program = torch.export.load(str(p))
    except Exception as e:  # a damaged or foreign file: say so in the user's words
        raise UserError(f"--model {p}: not a torch.export program ({type(e).__name__}: {e})") from None
    return Exported(program.module())


def predict(model: torch.nn.Module, prep: Prepared, part: str, cfg: TrainConfig, device: torch.device,
            *, tta: bool = False, images: DeviceImages | None = None) -> dict:
    """Probabilities for one partition, aligned with prep.parts[part]."""
    images = images or DeviceImages(prep.cache.images, device, budget_gb=cfg.device_cache_gb)
    amp = amp_dtype(cfg.amp, device)
    loader = make_loader(prep, images, part, cfg, train=False, dtype=amp or torch.float32)
    ev = evaluate(model, loader, make_loss(cfg, device), amp=amp, tta=tta)
    assert np.array_equal(ev["idx"], prep.positions[part]), "evaluation must iterate in order"
    return ev


def score(ev: dict, records: list, task: str, threshold: float = 0.5, n_boot: int = 1000) -> dict:
    """Metrics of one partition's predictions: image level, patient level, intervals, per magnification."""
    y, probs = ev["labels"], ev["probs"]
    patients = [r.patient for r in records]
    if task == "subtype":
        out = M.multiclass_metrics(y, probs, class_names(task))
    else:
        out = M.summarize(y, probs[:, 1], patients, threshold=threshold, n_boot=n_boot,
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


def finalize(run_dir: Path, data: Prepared | None = None, progress: bool = True) -> dict:
    """Score the best checkpoint on val and test; write metrics.json, predictions.csv and plots/."""
    from . import plots

    run_dir = runs.check_run(run_dir)
    cfg = runs.load_config(run_dir)
    device = resolve_device(cfg.device if cfg.device != "auto" else "auto")
    prep = data or prepare_data(dataclasses.replace(cfg, split_file=str(run_dir / "split.json")), progress=progress)
    model = load_run_model(run_dir, cfg, device)
    images = DeviceImages(prep.cache.images, device, budget_gb=cfg.device_cache_gb)
    history = runs.read_csv(run_dir / "history.csv")
    best_rows = [h for h in history if h.get("is_best") == "True"]
    best_epoch = int(best_rows[-1]["epoch"]) if best_rows else None
    out: dict = {"best_epoch": best_epoch,
                 "best_val_acc": max((float(h["val_acc"]) for h in history), default=None)}
    rows: list[dict] = []
    evs = {}
    for part in ("val", "test"):
        if not prep.parts[part]:
            continue
        evs[part] = predict(model, prep, part, cfg, device, images=images)
        out[part] = score(evs[part], prep.parts[part], cfg.task)
        rows += prediction_rows(evs[part], prep.parts[part], part, cfg.task)
    atomic.write_json(run_dir / "metrics.json", M.jsonable(out))
    runs.write_csv(run_dir / "predictions.csv", rows)
    test = evs.get("test")
    plots.save_plots(run_dir / "plots", [{k: _num(v) for k, v in h.items()} for h in history],
                     y=None if test is None or cfg.task != "binary" else test["labels"],
                     p=None if test is None or cfg.task != "binary" else test["probs"][:, 1],
                     class_names=class_names(cfg.task),
                     confusion=(out.get("test") or {}).get("confusion"))
    return out


def _num(v):
    try:
        return float(v)
    except (TypeError, ValueError):
        return v
