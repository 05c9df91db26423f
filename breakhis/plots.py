"""PNG plots of a run: learning curves, ROC and precision-recall curves, confusion matrix, reliability diagram.

Figures are built with matplotlib's object API on the Agg canvas (no screen, no pyplot
state, nothing left open) and saved atomically. A plot without data is skipped.
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from sklearn import metrics as skm

from . import calibration
from .io import atomic_path

DPI = 120


def _figure(width: float, height: float) -> Figure:
    fig = Figure(figsize=(width, height), dpi=DPI, layout="constrained")
    FigureCanvasAgg(fig)  # raster backend attached to this figure only
    return fig


def _save(fig: Figure, path: Path) -> Path:
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
    return path


def _value(v) -> float:
    """A history cell as a float; nan for missing or non-numeric cells (CSV gives strings)."""
    try:
        x = float(v)
    except (TypeError, ValueError):
        return math.nan
    return x


def _series(history: list[dict], key: str) -> np.ndarray:
    return np.array([_value(row.get(key)) for row in history])


def _best_epoch(history: list[dict], epochs: np.ndarray) -> float | None:
    """Epoch of the last row flagged is_best (bool, or 'True' as read back from CSV)."""
    best = [e for row, e in zip(history, epochs) if row.get("is_best") in (True, "True", "true", 1, "1")]
    return best[-1] if best else None


def learning_curves(path: Path, history: list[dict]) -> Path | None:
    """Loss, accuracy and learning rate per epoch; None when history has nothing to draw."""
    if not history:
        return None
    epochs = _series(history, "epoch")
    if np.isnan(epochs).any():
        epochs = np.arange(1, len(history) + 1, dtype=float)
    panels = [("loss", ("train_loss", "val_loss")), ("accuracy", ("train_acc", "val_acc")), ("learning rate", ("lr",))]
    drawn = [(title, [(k, _series(history, k)) for k in keys if np.isfinite(_series(history, k)).any()])
             for title, keys in panels]
    drawn = [(title, lines) for title, lines in drawn if lines]
    if not drawn:
        return None
    best = _best_epoch(history, epochs)
    fig = _figure(4.2 * len(drawn), 3.4)
    for ax, (title, lines) in zip(fig.subplots(1, len(drawn), squeeze=False)[0], drawn):
        for key, ys in lines:
            ax.plot(epochs, ys, marker="o" if len(epochs) < 30 else None, markersize=3, label=key)
        if title == "learning rate" and all((ys[np.isfinite(ys)] > 0).all() for _, ys in lines):
            ax.set_yscale("log")
        if best is not None:
            ax.axvline(best, color="grey", linestyle="--", linewidth=1, label=f"best (epoch {best:g})")
        ax.set_title(title)
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
        ax.legend(fontsize="small")
    return _save(fig, path)


def roc_pr_curves(folder: Path, y, p) -> list[Path]:
    """ROC and precision-recall curves of malignant probabilities; none unless both classes are present."""
    y, p = np.asarray(y).astype(int), np.asarray(p, dtype=float)
    if y.size == 0 or np.unique(y).size < 2:
        return []
    fpr, tpr, _ = skm.roc_curve(y, p)
    fig = _figure(4.6, 4.2)
    ax = fig.add_subplot()
    ax.plot(fpr, tpr, label=f"AUROC = {skm.roc_auc_score(y, p):.3f}")
    ax.plot([0, 1], [0, 1], color="grey", linestyle=":", linewidth=1, label="chance")
    ax.set(xlabel="false positive rate (1 - specificity)", ylabel="true positive rate (recall)",
           title="ROC curve (malignant positive)", xlim=(0, 1), ylim=(0, 1.01))
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right")
    written = [_save(fig, folder / "roc.png")]

    precision, recall, _ = skm.precision_recall_curve(y, p)
    prevalence = y.mean()
    fig = _figure(4.6, 4.2)
    ax = fig.add_subplot()
    ax.step(recall, precision, where="post", label=f"AUCPR (AP) = {skm.average_precision_score(y, p):.3f}")
    ax.axhline(prevalence, color="grey", linestyle=":", linewidth=1, label=f"chance ({prevalence:.2f})")
    ax.set(xlabel="recall", ylabel="precision", title="Precision-recall curve (malignant positive)",
           xlim=(0, 1), ylim=(0, 1.01))
    ax.grid(alpha=0.3)
    ax.legend(loc="lower left")
    written.append(_save(fig, folder / "pr.png"))
    return written


def confusion_image(path: Path, confusion, class_names: Sequence[str]) -> Path | None:
    """Confusion matrix (rows: true class, columns: predicted) with counts and row percentages."""
    cm = np.asarray(confusion, dtype=float)
    if cm.ndim != 2 or cm.shape[0] != cm.shape[1] or cm.size == 0 or cm.sum() == 0:
        return None
    names = list(class_names)
    if len(names) != cm.shape[0]:
        raise ValueError(f"{len(names)} class names for a {cm.shape[0]}x{cm.shape[0]} confusion matrix")
    rows = cm.sum(axis=1, keepdims=True)
    share = np.divide(cm, rows, out=np.zeros_like(cm), where=rows > 0)  # fraction of each true class
    side = 2.2 + 0.75 * len(names)
    fig = _figure(side + 1.0, side)
    ax = fig.add_subplot()
    im = ax.imshow(share, cmap="Blues", vmin=0, vmax=1)
    fig.colorbar(im, ax=ax, label="fraction of the true class")
    for i in range(cm.shape[0]):
        for j in range(cm.shape[1]):
            ax.text(j, i, f"{cm[i, j]:.0f}\n{100 * share[i, j]:.0f}%", ha="center", va="center",
                    fontsize="small", color="white" if share[i, j] > 0.6 else "black")
    ticks = np.arange(len(names))
    ax.set_xticks(ticks, names, rotation=45 if len(names) > 2 else 0, ha="right" if len(names) > 2 else "center")
    ax.set_yticks(ticks, names)
    ax.set(xlabel="predicted", ylabel="true", title=f"Confusion matrix (n = {cm.sum():.0f})")
    return _save(fig, path)


def reliability_diagram(path: Path, y, p, n_bins: int = calibration.N_BINS, title: str = "Reliability diagram") -> Path | None:
    """Accuracy against mean confidence of each confidence bin (the top-label bins of calibration.ece),
    the diagonal of perfect calibration, and the images per bin below; None without images."""
    if len(y) == 0:
        return None
    r = calibration.reliability(y, p, n_bins)
    used = r["count"] > 0
    width = 1.0 / n_bins
    centres = r["edges"][:-1] + width / 2
    fig = _figure(4.6, 5.2)
    ax, bar = fig.subplots(2, 1, sharex=True, height_ratios=(3, 1))
    ax.bar(centres[used], r["accuracy"][used], width=width, edgecolor="black", linewidth=0.5, alpha=0.7,
           label="accuracy of the bin")
    ax.plot(r["confidence"][used], r["accuracy"][used], "o", color="C3", markersize=4, label="(mean confidence, accuracy)")
    left = float(r["edges"][np.argmax(used)])  # confidences are >= 0.5: the empty left half is not drawn
    ax.plot([left, 1], [left, 1], color="grey", linestyle=":", linewidth=1, label="perfect calibration")
    ax.set(ylabel="accuracy", xlim=(left, 1), ylim=(0, 1.01),
           title=f"{title}\nECE = {calibration.ece(y, p, n_bins):.3f} ({n_bins} bins), Brier = {calibration.brier(y, p):.3f}")
    ax.grid(alpha=0.3)
    ax.legend(loc="upper left", fontsize="small")
    bar.bar(centres[used], r["count"][used], width=width, edgecolor="black", linewidth=0.5, color="C7")
    for c, k in zip(centres[used], r["count"][used]):
        bar.text(c, k, str(k), ha="center", va="bottom", fontsize="x-small")
    bar.set(xlabel="confidence (probability of the predicted class)", ylabel="images")
    bar.set_ylim(0, max(r["count"].max() * 1.25, 1))
    return _save(fig, path)


def save_plots(folder, history: list[dict], y=None, p=None, class_names: Sequence[str] = ("benign", "malignant"),
               confusion=None, threshold: float = 0.5) -> list[Path]:
    """Write learning_curves.png, roc.png, pr.png, confusion.png and reliability.png into folder; returns the paths written.

    history: one dict per epoch (epoch, lr, train_loss, train_acc, val_loss, val_acc, ...;
    numbers or CSV strings). y (N,) 0/1 and p (N,) malignant probabilities give the ROC and
    PR curves and the reliability diagram. confusion: a square matrix (rows true, columns predicted); when absent it is
    computed from y and p at threshold. Plots without data are skipped.
    """
    folder = Path(folder)
    written = [learning_curves(folder / "learning_curves.png", list(history or []))]
    have_scores = y is not None and p is not None and len(y) > 0
    if have_scores:
        written += roc_pr_curves(folder, y, p)
        if confusion is None:
            pred = (np.asarray(p, dtype=float) >= threshold).astype(int)
            confusion = skm.confusion_matrix(np.asarray(y).astype(int), pred, labels=[0, 1])
    if confusion is not None:
        written.append(confusion_image(folder / "confusion.png", confusion, class_names))
    if have_scores:
        written.append(reliability_diagram(folder / "reliability.png", y, p))
    return [w for w in written if w is not None]
