"""Point figures of a prediction set on scikit-learn: image- and patient-level binary metrics, the subtype
task's metrics, the decision threshold, per-group breakdowns, the summary metrics.json stores, and the
mean and std of figures across runs.

Malignant is the positive class. An image counts as malignant when its probability
p >= threshold (scikit-learn's `roc_curve` convention, so a threshold read off that curve
reproduces its recall exactly). Patient-level figures read the per-patient counts of counts.py,
the same counts every resample of intervals.py recomputes; intervals (95%, over patients) come
from intervals.py.
"""
from __future__ import annotations

import math
import statistics
import warnings
from collections.abc import Sequence

import numpy as np
from sklearn import metrics as skm

from . import intervals
from .counts import check_binary, image_thresholds, patient_counts
from .errors import UserError
from .io import jsonable, number, plain

THRESHOLD_FORMS = "a number in [0, 1] (e.g. 0.5), 'youden', or 'recall=R' with 0 < R <= 1 (e.g. recall=0.95)"


def _shown_threshold(t: np.ndarray) -> float | None:
    """The threshold of a prediction set: one value, or None when images carry different ones (pooled runs)."""
    return float(t[0]) if t.size and (t == t[0]).all() else None


def binary_metrics(y, p, threshold=0.5) -> dict:
    """Image-level metrics of malignant probabilities p (N,) against labels y (N,).

    threshold: one value, or one per image (N,) when runs chosen at their own thresholds are
    pooled; an image is called malignant when p >= its threshold. A figure that is undefined
    for these images is nan (shown as '–', null in JSON), never 0: recall, and so F1, without
    malignant images; specificity without benign ones; precision without malignant calls; auroc
    and aucpr (average precision) without both classes.
    """
    y, p = check_binary(y, p)
    t = image_thresholds(threshold, y.size)
    pred = (p >= t).astype(np.int64)
    tn, fp, fn, tp = (int(v) for v in skm.confusion_matrix(y, pred, labels=[0, 1]).ravel())
    both = 0 < int(y.sum()) < y.size
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # one class in y, both in pred: sklearn warns, result is defined
        balanced = skm.balanced_accuracy_score(y, pred)
    has_pos = tp + fn > 0
    return {
        "accuracy": float(skm.accuracy_score(y, pred)),
        "balanced_accuracy": float(balanced),
        "precision": float(skm.precision_score(y, pred, zero_division=np.nan)),
        "recall": float(skm.recall_score(y, pred, zero_division=np.nan)),
        "specificity": float(tn / (tn + fp)) if tn + fp else math.nan,
        "f1": float(skm.f1_score(y, pred, zero_division=np.nan)) if has_pos else math.nan,
        "auroc": float(skm.roc_auc_score(y, p)) if both else math.nan,
        "aucpr": float(skm.average_precision_score(y, p)) if both else math.nan,
        "confusion": [[tn, fp], [fn, tp]],
        "n": int(y.size),
        "threshold": _shown_threshold(t),
    }


def patient_metrics(y, p, patients, threshold=0.5) -> dict:
    """Patient-level figures.

    patient_recognition_rate: mean over patients of the fraction of that patient's images
    classified correctly (the BreakHis literature's PRR). patient_accuracy: each patient's
    mean probability, against its threshold (the mean of its images' thresholds: the run's
    threshold), compared with its label (the majority of its image labels; in BreakHis every
    patient has one class).
    """
    d = patient_counts(y, p, patients, threshold)
    return {
        "patient_recognition_rate": float(d.fraction.mean()),
        "patient_accuracy": float(d.patient_correct.mean()),
        "n_patients": int(d.fraction.size),
    }


def multiclass_metrics(y, probs, class_names: Sequence[str]) -> dict:
    """Subtype task: y (N,) class indices, probs (N, C) class probabilities; prediction = argmax.

    macro_f1 averages over the classes present in y or the predictions (scikit-learn's
    default); per_class lists every class, with support 0 for absent ones.
    """
    names = [str(c) for c in class_names]
    y, probs = np.asarray(y), np.asarray(probs, dtype=np.float64)
    if y.ndim != 1 or probs.shape != (y.size, len(names)) or y.size == 0:
        raise ValueError(f"need y (N,) and probs (N, {len(names)}), got shapes {y.shape} and {probs.shape}")
    if not np.isin(y, np.arange(len(names))).all():
        raise ValueError(f"y must hold class indices 0..{len(names) - 1}")
    y, pred, labels = y.astype(np.int64), probs.argmax(axis=1), np.arange(len(names))
    prec, rec, f1, support = skm.precision_recall_fscore_support(y, pred, labels=labels, zero_division=0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # predicted classes absent from y
        balanced = skm.balanced_accuracy_score(y, pred)
    return {
        "accuracy": float(skm.accuracy_score(y, pred)),
        "balanced_accuracy": float(balanced),
        "macro_f1": float(skm.f1_score(y, pred, average="macro", zero_division=0)),
        "confusion": skm.confusion_matrix(y, pred, labels=labels).tolist(),
        "per_class": {
            n: {"precision": float(prec[i]), "recall": float(rec[i]), "f1": float(f1[i]), "support": int(support[i])}
            for i, n in enumerate(names)
        },
        "n": int(y.size),
    }


# ---------------------------------------------------------------- thresholds and summaries


def _number(text: str, rule) -> float:
    v = number(text)
    if v is None:
        raise UserError(f"bad threshold rule {rule!r}: use {THRESHOLD_FORMS}")
    return v


def check_threshold_rule(rule: str | float) -> str:
    """The rule, if it is a number in [0, 1], 'youden' or 'recall=R' with 0 < R <= 1; else a UserError.
    Checked before any prediction is made (choose_threshold applies it)."""
    text = str(rule).strip().lower()
    if text == "youden":
        return text
    value = _number(text[len("recall="):] if text.startswith("recall=") else text, rule)
    if text.startswith("recall=") and not 0 < value <= 1:
        raise UserError(f"bad threshold rule {rule!r}: recall must be in (0, 1]; use {THRESHOLD_FORMS}")
    if not text.startswith("recall=") and not 0 <= value <= 1:
        raise UserError(f"bad threshold rule {rule!r}: a fixed threshold must be in [0, 1]; use {THRESHOLD_FORMS}")
    return text


def choose_threshold(y_val, p_val, rule: str | float) -> float:
    """The decision threshold from a rule, chosen on validation data.

    '0.5' or any number in [0, 1]: that value. 'youden': the threshold maximising
    tpr - fpr (the highest one on ties). 'recall=R': the highest threshold whose
    recall on validation is >= R.
    """
    text = str(rule).strip().lower()
    if text == "youden" or text.startswith("recall="):
        target = 0.0
        if text != "youden":
            target = _number(text[len("recall="):], rule)
            if not 0 < target <= 1:
                raise UserError(f"bad threshold rule {rule!r}: recall must be in (0, 1]; use {THRESHOLD_FORMS}")
        y, p = check_binary(y_val, p_val)
        n_pos = int(y.sum())
        if n_pos == 0 or (text == "youden" and n_pos == y.size):
            need = "both classes" if text == "youden" else "malignant images"
            raise UserError(f"threshold rule {rule!r} needs {need} in the validation split; use a fixed threshold such as 0.5")
        fpr, tpr, thr = skm.roc_curve(y, p, drop_intermediate=False)  # thr descending, thr[0] = inf
        if text == "youden":
            k = 1 + int(np.argmax((tpr - fpr)[1:]))
        else:
            k = int(np.flatnonzero(tpr >= target - 1e-12)[0])
        return float(thr[k])
    value = _number(text, rule)
    if not 0 <= value <= 1:
        raise UserError(f"bad threshold rule {rule!r}: a fixed threshold must be in [0, 1]; use {THRESHOLD_FORMS}")
    return value


def breakdown(y, p, keys, threshold=0.5, patients=None, n_boot: int = 0, seed: int = 0) -> dict:
    """Metrics per group value, e.g. keys = each image's magnification, subtype or patient.

    Returns {value: binary_metrics (+ patient_metrics when patients are given)}, values
    sorted; the groups' counts sum to the totals. With patients and n_boot, each group of more
    than one patient also gets "ci" (bootstrap_ci over that group's patients); a group of one
    patient (--by patient) has no interval over patients.
    """
    y, p = check_binary(y, p)
    t = image_thresholds(threshold, y.size)
    keys = np.asarray(keys, dtype=object)
    if keys.shape != y.shape:
        raise ValueError(f"keys must have one entry per image ({y.size}), got shape {keys.shape}")
    pats = None if patients is None else np.asarray(patients).astype(str)
    given = [plain(k) for k in keys]
    values = set(given)
    try:
        values = sorted(values)
    except TypeError:
        values = sorted(values, key=str)
    out = {}
    for v in values:
        m = np.array([k == v for k in given])
        out[v] = binary_metrics(y[m], p[m], t[m])
        if pats is not None:
            out[v].update(patient_metrics(y[m], p[m], pats[m], t[m]))
            if n_boot and len(set(pats[m])) > 1:
                out[v]["ci"] = intervals.bootstrap_ci(y[m], p[m], pats[m], n_boot=n_boot, seed=seed, threshold=t[m])
    return out



def class_warnings(per_class: dict[str, int], ci: dict) -> list[str]:
    """One line per class with few patients (per_class {"benign": n, "malignant": n}): which figures have no
    interval (ci (nan, nan): fewer than intervals.MIN_PATIENTS carry them), or that theirs are rough."""
    out = []
    for c, k in per_class.items():
        if k >= intervals.FEW_PATIENTS:
            continue
        missing = [key for key, (lo, _) in ci.items() if not math.isfinite(lo)]
        if k < intervals.MIN_PATIENTS and missing:
            out.append(f"only {k} {c} patient(s) in this set: no interval for {', '.join(missing)} (shown as –); "
                       f"an interval over so few patients would span most of [0, 1]")
        else:
            out.append(f"only {k} {c} patient(s) in this set: figures that rest on them (e.g. "
                       f"{'specificity' if c == 'benign' else 'recall'}) have wide, rough intervals")
    return out


def summarize(y, p, patients, threshold=0.5, n_boot: int = 1000, seed: int = 0,
              groups: dict[str, Sequence] | None = None) -> dict:
    """One JSON-able dict: binary_metrics + patient_metrics + "ci" {metric: [lo, hi]} and
    "ci_settings" (interval_settings; both omitted when n_boot is 0) + "by" {group: {value: metrics}}
    for per-image groups such as {"magnification": [...]}. nan becomes None; group values become strings."""
    out = {**binary_metrics(y, p, threshold), **patient_metrics(y, p, patients, threshold)}
    if n_boot:
        out["ci"] = intervals.bootstrap_ci(y, p, patients, n_boot=n_boot, seed=seed, threshold=threshold)
        out["ci_settings"] = intervals.interval_settings(n_boot, seed)
        out["warnings"] = class_warnings(intervals.class_patients(y, patients), out["ci"])
        if not out["warnings"]:
            del out["warnings"]
    if groups:
        out["by"] = {name: breakdown(y, p, vals, threshold, patients, n_boot=n_boot, seed=seed)
                     for name, vals in groups.items()}
    return jsonable(out)


def _lookup(row: dict, key: str):
    """row[key], following dotted paths such as 'test.accuracy'; None when absent."""
    for part in key.split("."):
        if not isinstance(row, dict) or part not in row:
            return None
        row = row[part]
    return row


def mean_std(values: Sequence[dict], keys: Sequence[str]) -> dict:
    """Mean and sample standard deviation (ddof 1) of each metric across runs (a seed group).

    keys may be dotted paths ('test.accuracy'); missing, None or nan values are left out
    and n says how many runs counted. std is nan with fewer than two runs.
    """
    out = {}
    for key in keys:
        xs = [float(v) for v in (_lookup(r, key) for r in values)
              if isinstance(v, (int, float, np.number)) and not isinstance(v, bool) and math.isfinite(float(v))]
        out[key] = {
            "mean": statistics.fmean(xs) if xs else math.nan,
            "std": statistics.stdev(xs) if len(xs) > 1 else math.nan,
            "n": len(xs),
        }
    return out
