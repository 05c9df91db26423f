"""A binary prediction set reduced to patients: the names of its figures, the checks of its inputs, the
per-patient counts, and the figures recomputed from those counts at any patient weights.

Malignant (1) is the positive class; an image counts as malignant when p >= its threshold. A weight
vector w (P,) counts patient j's images w[j] times: all ones give the figures of the set itself, a
bootstrap draw's multiplicities those of the resample, a row of ones with a 0 the leave-one-out
(jackknife) set. The formulas equal scikit-learn's on the weighted images (tests check it) and take
a (B, P) matrix of weights at once, so 1000 resamples cost a fraction of a second.

Why a module of its own: metrics.py (the point figures) and intervals.py (the bootstrap over
patients) both read these counts, and metrics' summaries call intervals, so the counts sit below both.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

POSITIVE = 1  # malignant
# the scalar figures of a binary prediction set, with their column titles: these get intervals and the paired test
IMAGE_TITLES = {"accuracy": "accuracy", "balanced_accuracy": "balanced acc.", "precision": "precision",
                "recall": "recall", "specificity": "specificity", "f1": "F1", "auroc": "AUROC", "aucpr": "AUCPR"}
PATIENT_TITLES = {"patient_recognition_rate": "patient rec. rate", "patient_accuracy": "patient acc."}
TITLES = {**IMAGE_TITLES, **PATIENT_TITLES}
IMAGE_KEYS, PATIENT_KEYS = tuple(IMAGE_TITLES), tuple(PATIENT_TITLES)
CI_KEYS = tuple(TITLES)


def check_binary(y, p) -> tuple[np.ndarray, np.ndarray]:
    """Labels (N,) in {0, 1} as int64 and probabilities (N,) in [0, 1] as float64; a ValueError otherwise."""
    y, p = np.asarray(y), np.asarray(p, dtype=np.float64)
    if y.ndim != 1 or p.ndim != 1 or y.shape != p.shape:
        raise ValueError(f"y and p must be 1-D of the same length, got shapes {y.shape} and {p.shape}")
    if y.size == 0:
        raise ValueError("no samples")
    if not np.isin(y, (0, 1)).all():
        raise ValueError("y must hold 0 (benign) and 1 (malignant) only")
    if not (np.isfinite(p).all() and (p >= 0).all() and (p <= 1).all()):
        raise ValueError("p must be probabilities in [0, 1]")
    return y.astype(np.int64), p


def patient_index(patients, n: int) -> tuple[np.ndarray, np.ndarray]:
    """Sorted patient names (P,) and each image's patient index (N,) into them."""
    patients = np.asarray(patients).astype(str)
    if patients.shape != (n,):
        raise ValueError(f"patients must have one entry per image ({n}), got shape {patients.shape}")
    return np.unique(patients, return_inverse=True)


def image_thresholds(threshold, n: int) -> np.ndarray:
    """A threshold (scalar) or one per image (N,) as an (N,) float64 array (pooled runs carry their own)."""
    t = np.broadcast_to(np.asarray(threshold, dtype=np.float64), (n,))
    if not (np.isfinite(t).all() and (t >= 0).all() and (t <= 1).all()):
        raise ValueError("thresholds must lie in [0, 1]")
    return t


def _div(a, b) -> np.ndarray:
    """a / b, 0 where b == 0 (scikit-learn's zero_division=0)."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    return np.divide(a, b, out=np.zeros(np.broadcast(a, b).shape), where=b > 0)


@dataclass
class PatientCounts:
    """One prediction set reduced to what the weighted figures need."""

    counts: np.ndarray  # (P, 4) per-patient tp, fp, fn, tn at the threshold
    fraction: np.ndarray  # (P,) fraction of each patient's images classified correctly
    patient_correct: np.ndarray  # (P,) 1.0 where the patient's mean probability gives its label
    patient_of_sorted: np.ndarray  # (N,) patient index of each image, images in ascending p
    positive_sorted: np.ndarray  # (N,) bool, label of each image in ascending p
    starts: np.ndarray  # (U,) first position of each distinct p value in the sorted order
    members: list[np.ndarray]  # image indices of each patient


def patient_counts(y, p, patients, threshold) -> PatientCounts:
    """Labels y (N,), malignant probabilities p (N,), patient ids (N,) and a threshold (scalar or (N,)) as
    per-patient counts. A patient's label is the majority of its image labels; its vote is its mean
    probability against the mean of its images' thresholds (the run's threshold)."""
    y, p = check_binary(y, p)
    t = image_thresholds(threshold, y.size)
    names, idx = patient_index(patients, y.size)
    n_pat = names.size
    pred = p >= t
    pos = y == POSITIVE

    def per_patient(w):
        return np.bincount(idx, weights=w.astype(np.float64), minlength=n_pat)

    counts = np.stack([per_patient(pos & pred), per_patient(~pos & pred),
                       per_patient(pos & ~pred), per_patient(~pos & ~pred)], axis=1)
    size = np.bincount(idx, minlength=n_pat)
    label = per_patient(y) / size >= 0.5
    patient_pred = per_patient(p) / size >= per_patient(t) / size
    order = np.argsort(p, kind="stable")
    ps = p[order]
    return PatientCounts(
        counts=counts,
        fraction=(counts[:, 0] + counts[:, 3]) / size,
        patient_correct=(label == patient_pred).astype(np.float64),
        patient_of_sorted=idx[order],
        positive_sorted=pos[order],
        starts=np.flatnonzero(np.r_[True, ps[1:] != ps[:-1]]),
        members=[np.flatnonzero(idx == j) for j in range(n_pat)],
    )


def _ranked(w: np.ndarray, d: PatientCounts) -> tuple[np.ndarray, np.ndarray]:
    """AUROC and average precision (B,) with images weighted by their patient's multiplicity.

    Equal to scikit-learn's roc_auc_score / average_precision_score on the resampled images
    (tests check it); tied scores are grouped as scikit-learn groups them.
    """
    n_img = d.patient_of_sorted.size
    chunk = max(1, 4_000_000 // n_img)  # bounds the (chunk, N) float64 work arrays to ~32 MB
    auroc, aucpr = np.empty(w.shape[0]), np.empty(w.shape[0])
    for s in range(0, w.shape[0], chunk):
        wi = w[s:s + chunk][:, d.patient_of_sorted]  # (c, N) image weights, ascending p
        wp = np.add.reduceat(wi * d.positive_sorted, d.starts, axis=1)  # (c, U) positive weight per distinct p
        wn = np.add.reduceat(wi * ~d.positive_sorted, d.starts, axis=1)
        n_pos, n_neg = wp.sum(axis=1), wn.sum(axis=1)
        below = np.cumsum(wn, axis=1) - wn  # negative weight strictly below each distinct p
        auroc[s:s + chunk] = _div((wp * (below + 0.5 * wn)).sum(axis=1), n_pos * n_neg)
        wp_desc, wn_desc = wp[:, ::-1], wn[:, ::-1]
        tp, fp = np.cumsum(wp_desc, axis=1), np.cumsum(wn_desc, axis=1)
        aucpr[s:s + chunk] = _div((wp_desc * _div(tp, tp + fp)).sum(axis=1), n_pos)
        undefined = (n_pos == 0) | (n_neg == 0)
        auroc[s:s + chunk][undefined] = np.nan
        aucpr[s:s + chunk][undefined] = np.nan
    return auroc, aucpr


def weighted_figures(w: np.ndarray, d: PatientCounts, keys: Sequence[str]) -> dict[str, np.ndarray]:
    """The figures `keys` (of CI_KEYS), each (B,), at patient weights w (B, P)."""
    tp, fp, fn, tn = (w @ d.counts).T
    has_pos, has_neg = tp + fn > 0, tn + fp > 0
    # in a resample without a class, its recall is undefined (nan: left out of the interval), not 0
    recall = np.where(has_pos, _div(tp, tp + fn), np.nan)
    specificity = np.where(has_neg, _div(tn, tn + fp), np.nan)
    out = {
        "accuracy": (tp + tn) / (tp + fp + fn + tn),
        # balanced accuracy averages the recalls of the classes present in y, as sklearn does
        "balanced_accuracy": np.where(has_pos & has_neg, (recall + specificity) / 2,
                                      np.where(has_pos, recall, specificity)),
        "precision": np.where(tp + fp > 0, _div(tp, tp + fp), np.nan),
        "recall": recall,
        "specificity": specificity,
        "f1": np.where(has_pos, _div(2 * tp, 2 * tp + fp + fn), np.nan),
        "patient_recognition_rate": w @ d.fraction / w.sum(axis=1),
        "patient_accuracy": w @ d.patient_correct / w.sum(axis=1),
    }
    if "auroc" in keys or "aucpr" in keys:
        out["auroc"], out["aucpr"] = _ranked(w, d)
    return {k: out[k] for k in keys}
