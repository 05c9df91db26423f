"""TensorBoard event files of a run, beside its history.csv: `tensorboard --logdir results/`.

    events = Events(run_dir, enabled=cfg.tensorboard, resume_at=epoch + 1)
    events.epoch(row)              # one history.csv row: losses, accuracy, AUROC, lr, images/s
    events.end(cfg, metrics)       # the test figures, and the run's settings as TensorBoard hparams
    events.close()

Every run writes them (train.py and each tune trial, into its own run folder), so `--logdir
results/tune/<name>` shows a sweep's trials side by side while it runs, and its HParams view filters
them by any setting. The scalar tags are TAGS (history.csv column -> tag), steps are epochs.

TensorBoard is optional for training: imported only when a run writes events, and any failure to
import it or to write (a missing package, a full disk) turns the events of that run off with one
note on stderr; the run itself goes on, and history.csv stays the record.
"""
from __future__ import annotations

import math
import sys
from pathlib import Path

# history.csv column -> TensorBoard tag; "<figure>/<partition>" puts train and val of a figure in one chart
TAGS = {"train_loss": "loss/train", "val_loss": "loss/val", "train_acc": "accuracy/train", "val_acc": "accuracy/val",
        "val_auroc": "auroc/val", "val_recall": "recall/val", "val_f1": "f1/val", "lr": "lr", "img_s": "images_per_s",
        "seconds": "epoch_seconds"}
TEST_TAGS = ("accuracy", "balanced_accuracy", "auroc", "aucpr", "f1", "recall", "specificity", "precision",
             "patient_accuracy", "patient_recognition_rate", "ece", "brier", "loss", "macro_f1")


def hparam_value(v):
    """A setting as TensorBoard hparams take it: bool, int, float or str (tuples as '0.5,0.8')."""
    if isinstance(v, (list, tuple)):
        return ",".join(map(str, v))
    return v if isinstance(v, (bool, int, float, str)) else str(v)


class Events:
    """The event file writer of one run, or nothing (disabled, or after its first failure)."""

    def __init__(self, run_dir: Path, enabled: bool = True, resume_at: int | None = None):
        self.writer = None
        if not enabled:
            return
        try:
            from torch.utils.tensorboard import SummaryWriter  # needs the tensorboard package (requirements.txt)

            # purge_step: a resumed run drops what an earlier writer logged past its last saved epoch
            self.writer = SummaryWriter(log_dir=str(run_dir), purge_step=resume_at, flush_secs=10)
        except Exception as e:  # noqa: BLE001 - events are optional; the run goes on without them
            self._off(e)

    def _off(self, error: BaseException) -> None:
        print(f"note: TensorBoard events are off for this run ({type(error).__name__}: {error}); "
              f"history.csv has every epoch (pip install tensorboard, or --no-tensorboard)", file=sys.stderr)
        self.close()

    def epoch(self, row: dict) -> None:
        """The scalars of one history.csv row at step row["epoch"]; nan cells (no AUROC) are left out."""
        if self.writer is None:
            return
        try:
            for key, tag in TAGS.items():
                v = row.get(key)
                if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v):
                    self.writer.add_scalar(tag, v, row["epoch"])
            self.writer.flush()  # live: a sweep's trials are read while they run
        except Exception as e:  # noqa: BLE001
            self._off(e)

    def end(self, settings: dict, metrics: dict) -> None:
        """The test figures (tags test/<figure>) and the run's settings as hparams with those figures as
        the metrics, written into this run's own event file so that each run is one HParams session."""
        if self.writer is None:
            return
        try:
            from torch.utils.tensorboard.summary import hparams

            test = metrics.get("test") or {}
            figures = {f"test/{k}": float(test[k]) for k in TEST_TAGS
                       if isinstance(test.get(k), (int, float)) and math.isfinite(test[k])}
            if isinstance(metrics.get("best_val_acc"), (int, float)):
                figures["best_val_acc"] = float(metrics["best_val_acc"])
            params = {k: hparam_value(v) for k, v in settings.items() if not k.startswith("_")}
            exp, ssi, sei = hparams(params, figures)
            for summary in (exp, ssi, sei):
                self.writer.file_writer.add_summary(summary)
            step = int(metrics.get("best_epoch") or 0)
            for tag, v in figures.items():
                self.writer.add_scalar(tag, v, step)
            self.writer.flush()
        except Exception as e:  # noqa: BLE001
            self._off(e)

    def close(self) -> None:
        if self.writer is not None:
            try:
                self.writer.close()
            except Exception:  # noqa: BLE001 - closing a writer that already failed
                pass
            self.writer = None
