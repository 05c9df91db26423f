"""The epoch loop of one run: model, optimiser, schedule, loop, checkpoints, resume. Shared by train.py and tune.py.

    fit(cfg, run_dir, data=prepare(cfg))   a valid run folder after every epoch; predict.finalize() at the end

The data come from data.prepare (the one pipeline); everything after training (predictions,
metrics.json, plots) is predict.py's.
"""
from __future__ import annotations

import contextlib
import dataclasses
import math
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import sklearn
import torch

from . import metrics as M
from . import runs, stain
from .config import TrainConfig
from .data.dataset import class_names
from .data.prepare import Prepared, prepare
from .device import amp_dtype, needs_grad_scaler, prepare_model, resolve_device, seed_everything
from .engine import NonFiniteLoss, evaluate, make_loss, train_one_epoch
from .errors import UserError
from .events import Events
from .features import FeatureLoader, part_batches, run_features
from .io import write_csv
from .loader import DeviceImages, Loader
from .models import check_timm, check_weights, input_spec, is_timm, model_for, set_frozen
from .optim import Schedule, build_optimizer, build_schedule, current_lr
from .predict import finalize
from .registry import EPOCH_METRICS
from .report import TrainProgress


def val_metrics(ev: dict, task: str) -> dict:
    """The validation figures of one epoch (history.csv columns; registry.SELECT_METRICS names them).
    scikit-learn's argument checks are skipped (same numbers): at ~20 ms per epoch they cost more than
    an epoch of a head on cached features."""
    with sklearn.config_context(skip_parameter_validation=True):
        return _val_metrics(ev, task)


def _val_metrics(ev: dict, task: str) -> dict:
    y, probs = ev["labels"], ev["probs"]
    if task == "subtype":
        m = M.multiclass_metrics(y, probs, class_names(task))
        return {"val_loss": ev["loss"], "val_acc": m["accuracy"], "val_recall": m["balanced_accuracy"],
                "val_auroc": float("nan"), "val_f1": m["macro_f1"]}
    m = M.binary_metrics(y, probs[:, 1])
    return {"val_loss": ev["loss"], "val_acc": m["accuracy"], "val_recall": m["recall"],
            "val_auroc": m["auroc"], "val_f1": m["f1"]}


def improved(value: float, best: float | None, select: str) -> bool:
    """Whether value beats best in the direction registry.EPOCH_METRICS gives for `select`."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return False
    if best is None:
        return True
    return value < best if EPOCH_METRICS[select] == "min" else value > best


def preflight(cfg: TrainConfig) -> torch.device:
    """What a run needs of this machine, checked before any work: the device, the AMP dtype on it, the
    --weights file, a timm backbone's name (or its hub), and the --stain-ref image (readable, with
    tissue: it is fitted here, a fraction of a second). Returns the device.
    (TrainConfig.validate() checks the settings themselves, without torch. The files are checked
    here, not there: a finished run is evaluated from its own folder, stain.json included, even
    after the reference image has gone.)"""
    device = resolve_device(cfg.device)
    amp_dtype(cfg.amp, device)
    if cfg.weights and not Path(cfg.weights).expanduser().is_file():
        raise UserError(f"--weights {cfg.weights}: file not found; give a .safetensors, .bin or .pth state dict, "
                        f"or use --no-pretrained")
    if is_timm(cfg.backbone):
        check_timm(cfg.backbone, cfg.pretrained, cfg.weights)
    if cfg.weights:  # the file fits the architecture (missing and unexpected keys named), before any data work
        check_weights(cfg.backbone, cfg.weights, cfg.num_classes, cfg.head, cfg.dropout, cfg.image_size)
    if cfg.stain_norm != "none" and cfg.stain_ref:
        stain.fit_reference(cfg)
    return device


def with_inputs(cfg: TrainConfig, keep_size: bool = True) -> TrainConfig:
    """cfg with the backbone's own input normalisation (--mean/--std when empty) and, unless
    keep_size (--image-size was given), its expected input side: what config.json records."""
    spec = input_spec(cfg.backbone, cfg.pretrained)
    return dataclasses.replace(cfg, mean=tuple(cfg.mean) or spec["mean"], std=tuple(cfg.std) or spec["std"],
                               image_size=cfg.image_size if keep_size else spec["size"]).validate()


def build_features(cfg: TrainConfig, prep: Prepared, device: torch.device) -> None:
    """Compute the feature cache a frozen run of cfg reads (tune.py: once in the driver, before the
    trials): the model fit() starts from (models.model_for), over the images it trains on."""
    cfg = with_inputs(cfg)
    model = model_for(cfg)
    images = DeviceImages.for_run(prep.cache.images, cfg, device, stain.fit_run(cfg, prep))
    run_features(model.backbone, prep, cfg, device, amp_dtype(cfg.amp, device), images)


def check_data(prep: Prepared, cfg: TrainConfig) -> None:
    """The partitions fit the batch: at least one training batch (with drop_last), a validation image."""
    n = len(prep.parts["train"])
    if cfg.drop_last and n < cfg.batch_size:
        raise UserError(f"the training partition has {n} images, fewer than one batch of {cfg.batch_size}; "
                        f"lower --batch-size or pass --no-drop-last")


def fit(cfg: TrainConfig, run_dir: Path, *, on_epoch: Callable[[dict], bool | None] | None = None,
        data: Prepared | None = None, progress: bool = True, resume: bool = False, repeats: dict | None = None,
        cv: dict | None = None, ci: bool = True, draw: bool = True) -> dict:
    """Train one run into run_dir and finalize it; returns the metrics dict (as metrics.json).

    Everything that can be refused (device, data, model, weights) is built before the folder is
    written to. If anything fails, the folder is not left saying "running": an empty one is removed,
    a started one is marked failed with the message (runs.abandon). Ctrl-C marks it interrupted, or
    removes it when no epoch was saved. "finished" is written last, after the scoring.
    repeats / cv: the record of the --seeds / --folds call this run is one of (runs.start_run).
    on_epoch(row) after each epoch's checkpoint: a true return ends the loop there (a tune trial ASHA
    stopped), and the run is scored as at its last epoch. ci / draw: the intervals and plots of the
    final scoring (predict.finalize; off in tune trials).
    A config with --folds is several runs: expand it with cfg.per_fold() first.
    """
    if cfg.folds:
        raise ValueError(f"fit() trains one run; expand folds {cfg.folds!r} with cfg.per_fold() first")
    run_dir = Path(run_dir)
    try:
        return _fit(cfg, run_dir, on_epoch=on_epoch, data=data, progress=progress, resume=resume, repeats=repeats,
                    cv=cv, ci=ci, draw=draw)
    except Exception as e:
        runs.abandon(run_dir, e)
        raise
    except KeyboardInterrupt:  # Ctrl-C before the folder held a run (the data or feature pass): no folder left
        if not resume and runs.unstarted(run_dir):
            shutil.rmtree(run_dir, ignore_errors=True)
        raise


@contextlib.contextmanager
def _finally(action: Callable[[], None]):
    """Run action when the block ends, however it ends (an exception, Ctrl-C, a trial's stop)."""
    try:
        yield
    finally:
        action()


@dataclass
class Progress:
    """Where the epoch loop stands: what last.pt keeps beside the weights, optimiser and schedule."""
    history: list[dict] = field(default_factory=list)  # history.csv rows, one per finished epoch
    best: float | None = None  # the best value of --select so far
    best_epoch: int = 0
    stale: int = 0             # epochs since it improved (--patience)
    epoch: int = 0             # the last finished epoch
    best_head: dict | None = None  # head_only runs: the head's tensors at the best epoch (CPU)
    saved: bool = True             # head_only runs: best_head is in model.safetensors


def head_only(cfg: TrainConfig) -> bool:
    """Whether the backbone stays frozen for the whole run, so that only the head ever changes: then last.pt
    holds the head alone, and model.safetensors (backbone + best head) is written once, when the loop ends,
    instead of at every improvement (for resnet18 each write is 45 MB; for a head on cached features the
    writes cost more than the epochs)."""
    return cfg.freeze and not cfg.unfreeze_at


def restore(run_dir: Path, model, optimizer, schedule, scaler) -> Progress:
    """Continue an interrupted run: everything back as last.pt saved it after its last finished epoch."""
    runs.remove_temps(run_dir)  # e.g. a last.pt write cut off by SIGKILL
    st = runs.load_state(run_dir / "last.pt")
    if st.get("head_only"):  # the backbone is the initial one (frozen throughout): only the head was saved
        model.head.load_state_dict(st["model"])
    else:
        model.load_state_dict(st["model"])
    optimizer.load_state_dict(st["optimizer"])
    schedule.load_state_dict(st["schedule"])
    scaler.load_state_dict(st["scaler"])
    torch.set_rng_state(st["rng"])
    runs.set_status(run_dir, runs.RUNNING, epoch=st["epoch"], message="resumed")
    return Progress(st["history"], st["best"], st["best_epoch"], st["stale"], st["epoch"], st.get("best_head"),
                    saved=st.get("best_head") is None)


def checkpoint(run_dir: Path, row: dict, select: str, state: Progress, model, optimizer, schedule, scaler,
               lean: bool = False) -> None:
    """After an epoch: the best weights when --select improved, history.csv, last.pt, status.json.
    lean (head_only runs): the best head is kept in memory and in last.pt; save_best writes it."""
    if improved(row[select], state.best, select):
        state.best, state.best_epoch, state.stale = row[select], row["epoch"], 0
        if lean:
            state.best_head = {k: v.detach().to("cpu", copy=True) for k, v in model.head.state_dict().items()}
            state.saved = False
        else:
            runs.save_weights(model, run_dir / "model.safetensors")
        row["is_best"] = True
    else:
        state.stale += 1
        row["is_best"] = False
    row["best_value"] = state.best
    state.history.append(row)
    state.epoch = row["epoch"]
    write_csv(run_dir / "history.csv", state.history)
    runs.save_state(run_dir / "last.pt", {
        "model": model.head.state_dict() if lean else model.state_dict(), "head_only": lean,
        "best_head": state.best_head, "optimizer": optimizer.state_dict(), "schedule": schedule.state_dict(),
        "scaler": scaler.state_dict(), "rng": torch.get_rng_state(), "history": state.history, "best": state.best,
        "best_epoch": state.best_epoch, "stale": state.stale, "epoch": state.epoch})
    runs.set_status(run_dir, runs.RUNNING, epoch=state.epoch)


def save_best(run_dir: Path, model, state: Progress) -> None:
    """head_only runs: model.safetensors, the whole Classifier (a complete checkpoint, as every run has)
    with the best epoch's head, once the loop ends for whatever reason; nothing before a first best."""
    if state.best_head is not None and not state.saved:
        runs.save_weights(model, run_dir / "model.safetensors", head=state.best_head)
        state.saved = True


def recover_best(run_dir: Path) -> None:
    """A head_only run stopped before its loop ended without a chance to write model.safetensors (a killed
    process): the file from last.pt's best head and the run's initial backbone (frozen throughout), so that
    the run can be scored. Nothing for other runs, or when the file is there."""
    if (run_dir / "model.safetensors").is_file() or not (run_dir / "last.pt").is_file():
        return
    st = runs.load_state(run_dir / "last.pt")
    if st.get("head_only") and st.get("best_head") is not None:
        cfg = runs.load_config(run_dir)  # resolved: the backbone's own normalisation and size
        runs.save_weights(model_for(cfg, shared=cfg.cached_features), run_dir / "model.safetensors", head=st["best_head"])


@dataclass
class Training:
    """What one run trains with, built before its folder is written to (so that a refusal leaves nothing)."""
    cfg: TrainConfig       # resolved: the backbone's own input normalisation and size
    device: torch.device
    amp: torch.dtype | None
    prep: Prepared
    stain_params: stain.StainParams | None  # the run's fitted (or, resumed, saved) stain normalisation
    images: DeviceImages   # prep's fields on the device, stain-normalised
    model: torch.nn.Module  # the Classifier: what model.safetensors and last.pt hold
    net: torch.nn.Module   # what runs each batch: the head on cached features, or the (compiled) model
    train: Loader | FeatureLoader  # training batches
    val: Loader | FeatureLoader    # validation batches, the same kind
    optimizer: torch.optim.Optimizer
    schedule: Schedule
    scaler: torch.amp.GradScaler
    loss: torch.nn.Module

    @property
    def state(self) -> list:
        """What restore() and checkpoint() save and load beside the loop's Progress."""
        return [self.model, self.optimizer, self.schedule, self.scaler]


def build(cfg: TrainConfig, run_dir: Path, data: Prepared | None, resume: bool, progress: bool) -> Training:
    """Device, data (the run's own split.json when it continues), stain, model, batches (cached features or
    images: features.part_batches decides), optimiser, schedule, loss."""
    device = preflight(cfg)
    cfg = with_inputs(cfg)
    seed_everything(cfg.seed)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    prep = data or prepare(runs.own_split(cfg, run_dir) if resume else cfg, progress=progress)
    check_data(prep, cfg)
    # the stain reference: the run's own on resume, else fitted now (training images only), before the folder is written
    stain_params = stain.load(run_dir, cfg) if resume else stain.fit_run(cfg, prep)
    images = DeviceImages.for_run(prep.cache.images, cfg, device, stain_params)
    model = model_for(cfg, shared=cfg.cached_features)  # a backbone that never trains: built once per process
    set_frozen(model, cfg.freeze)
    model.to(device)
    fast = prepare_model(model, device, cfg.channels_last, cfg.compile, cfg.compile_mode)
    net, train = part_batches(model, prep, "train", cfg, device, images, net=fast)
    _, val = part_batches(model, prep, "val", cfg, device, images, net=fast)
    amp = amp_dtype(cfg.amp, device)
    optimizer = build_optimizer(model.parameters(), cfg.optimizer, cfg.lr, cfg.weight_decay, cfg.momentum, cfg.nesterov)
    return Training(cfg, device, amp, prep, stain_params, images, model, net, train, val, optimizer,
                    build_schedule(optimizer, cfg, steps_per_epoch=len(train)),
                    torch.amp.GradScaler(device.type, enabled=needs_grad_scaler(amp)),
                    make_loss(cfg.class_weights, cfg.label_smoothing, device))


def _fit(cfg: TrainConfig, run_dir: Path, *, on_epoch: Callable[[dict], bool | None] | None, data: Prepared | None,
         progress: bool, resume: bool, repeats: dict | None, cv: dict | None, ci: bool, draw: bool) -> dict:
    t = build(cfg, run_dir, data, resume, progress)
    cfg = t.cfg
    lean = head_only(cfg)

    # --- the run folder: from here on it describes the run ---
    if resume:
        done = restore(run_dir, *t.state)
    else:
        runs.start_run(run_dir, cfg, t.prep.manifest, t.device, repeats=repeats, cv=cv, stain_params=t.stain_params)
        done = Progress()

    # --- loop ---
    epoch, scoring = done.epoch, False
    bar = TrainProgress(cfg.epochs, len(t.train), enabled=progress)
    events = Events(run_dir, cfg.tensorboard, resume_at=done.epoch + 1 if resume else None)
    try:
        with bar, _finally(lambda: save_best(run_dir, t.model, done) if lean else None):
            bar.skip_to(epoch)
            for epoch in range(done.epoch + 1, cfg.epochs + 1):
                if cfg.patience and done.stale >= cfg.patience:  # checked first: a resumed early stop stays stopped
                    bar.note(f"early stop: no {cfg.select} improvement for {cfg.patience} epochs")
                    break
                if cfg.freeze and cfg.unfreeze_at and epoch >= cfg.unfreeze_at:
                    set_frozen(t.model, False)
                t0 = time.perf_counter()
                lr = current_lr(t.optimizer)
                t.train.set_epoch(epoch)
                try:
                    tr = train_one_epoch(t.net, bar.batches(t.train), t.optimizer, t.schedule, t.loss, amp=t.amp,
                                         scaler=t.scaler)
                except NonFiniteLoss as e:
                    runs.set_status(run_dir, runs.FAILED, epoch=epoch - 1, message=str(e))
                    raise UserError(f"{e} at epoch {epoch} of run {run_dir}: training stopped. Lower --lr, "
                                    f"or use --amp off / bf16; the best checkpoint so far is kept") from None
                ev = evaluate(t.net, t.val, t.loss, amp=t.amp)
                row = {"epoch": epoch, "lr": lr, "train_loss": tr["loss"], "train_acc": tr["acc"],
                       **val_metrics(ev, cfg.task), "img_s": tr["img_s"], "seconds": time.perf_counter() - t0}
                t.schedule.step_epoch(ev["loss"])
                checkpoint(run_dir, row, cfg.select, done, *t.state, lean=lean)
                events.epoch(row)
                bar.epoch_done(row, cfg.select)
                if on_epoch and on_epoch(row):
                    break
        # --- score the best checkpoint; the run is finished only once its figures exist ---
        runs.set_status(run_dir, runs.RUNNING, epoch=done.epoch, message="scoring the best checkpoint")
        scoring = True
        best = None
        if lean and done.best_head is not None:  # the weights save_best wrote, still in memory: not read back
            t.model.head.load_state_dict(done.best_head)
            best = t.model
        metrics = finalize(run_dir, t.prep, progress=progress, images=t.images, ci=ci, draw=draw, model=best)
        events.end(cfg.to_dict(), metrics)
    except KeyboardInterrupt:
        if not done.epoch and not resume:
            shutil.rmtree(run_dir, ignore_errors=True)  # nothing was saved: no folder that promises a resume
            raise
        runs.set_status(run_dir, runs.INTERRUPTED, epoch=done.epoch,
                        message=f"Ctrl-C during {'the scoring' if scoring else f'epoch {epoch}'}; "
                                f"continue with: python train.py --resume {run_dir}")
        raise
    finally:
        events.close()
    runs.set_status(run_dir, runs.FINISHED, epoch=done.epoch)
    (run_dir / "last.pt").unlink(missing_ok=True)
    runs.remove_temps(run_dir)
    return metrics
