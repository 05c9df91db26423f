"""Image- and patient-level metrics, bootstrap intervals over patients, the paired test.

Malignant is the positive class. An image counts as malignant when its probability
p >= threshold (scikit-learn's `roc_curve` convention, so a threshold read off that curve
reproduces its recall exactly). Formulas come from scikit-learn; the bootstrap recomputes
the same formulas from per-patient counts so 1000 resamples take a fraction of a second.

Intervals resample PATIENTS with replacement (all images of a drawn patient come along):
images of one patient are not independent, so resampling images would give intervals
that are too narrow.
"""
from __future__ import annotations

import math
import statistics
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
from scipy.stats import norm
from scipy.stats import t as student_t
from sklearn import metrics as skm

from .errors import UserError
from .io import jsonable, number, plain

POSITIVE = 1  # malignant
IMAGE_KEYS = ("accuracy", "balanced_accuracy", "precision", "recall", "specificity", "f1", "auroc", "aucpr")
PATIENT_KEYS = ("patient_recognition_rate", "patient_accuracy")
CI_KEYS = IMAGE_KEYS + PATIENT_KEYS  # the scalar metrics that get intervals and the paired test
THRESHOLD_FORMS = "a number in [0, 1] (e.g. 0.5), 'youden', or 'recall=R' with 0 < R <= 1 (e.g. recall=0.95)"


def _binary(y, p) -> tuple[np.ndarray, np.ndarray]:
    """Check and convert labels (N,) in {0, 1} and probabilities (N,) in [0, 1]."""
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


def _patient_index(patients, n: int) -> tuple[np.ndarray, np.ndarray]:
    """Sorted patient names (P,) and each image's patient index (N,)."""
    patients = np.asarray(patients).astype(str)
    if patients.shape != (n,):
        raise ValueError(f"patients must have one entry per image ({n}), got shape {patients.shape}")
    return np.unique(patients, return_inverse=True)


def _div(a, b) -> np.ndarray:
    """a / b, 0 where b == 0 (scikit-learn's zero_division=0)."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    return np.divide(a, b, out=np.zeros(np.broadcast(a, b).shape), where=b > 0)


def _thresholds(threshold, n: int) -> np.ndarray:
    """A threshold (scalar) or one per image (N,) as an (N,) float64 array."""
    t = np.broadcast_to(np.asarray(threshold, dtype=np.float64), (n,))
    if not (np.isfinite(t).all() and (t >= 0).all() and (t <= 1).all()):
        raise ValueError("thresholds must lie in [0, 1]")
    return t


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
    y, p = _binary(y, p)
    t = _thresholds(threshold, y.size)
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
    d = _prepare(y, p, patients, threshold)
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


# ---------------------------------------------------------------- bootstrap over patients


@dataclass
class _PatientCounts:
    """One prediction set reduced to what the resampled metrics need."""

    counts: np.ndarray  # (P, 4) per-patient tp, fp, fn, tn at the threshold
    fraction: np.ndarray  # (P,) fraction of each patient's images classified correctly
    patient_correct: np.ndarray  # (P,) 1.0 where the patient's mean probability gives its label
    patient_of_sorted: np.ndarray  # (N,) patient index of each image, images in ascending p
    positive_sorted: np.ndarray  # (N,) bool, label of each image in ascending p
    starts: np.ndarray  # (U,) first position of each distinct p value in the sorted order
    members: list[np.ndarray]  # image indices of each patient


def _prepare(y, p, patients, threshold) -> _PatientCounts:
    y, p = _binary(y, p)
    t = _thresholds(threshold, y.size)
    names, idx = _patient_index(patients, y.size)
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
    return _PatientCounts(
        counts=counts,
        fraction=(counts[:, 0] + counts[:, 3]) / size,
        patient_correct=(label == patient_pred).astype(np.float64),
        patient_of_sorted=idx[order],
        positive_sorted=pos[order],
        starts=np.flatnonzero(np.r_[True, ps[1:] != ps[:-1]]),
        members=[np.flatnonzero(idx == j) for j in range(n_pat)],
    )


def _draws(n_patients: int, n_boot: int, seed: int) -> np.ndarray:
    """(B, P) patient indices drawn with replacement; the same for a seed and patient count."""
    if n_boot < 1:
        raise ValueError(f"n_boot must be >= 1, got {n_boot}")
    return np.random.default_rng(seed).integers(0, n_patients, size=(n_boot, n_patients))


def _multiplicity(draws: np.ndarray) -> np.ndarray:
    """(B, P) how often each patient was drawn in each resample."""
    b, n = draws.shape
    flat = (draws + np.arange(b)[:, None] * n).ravel()
    return np.bincount(flat, minlength=b * n).reshape(b, n).astype(np.float64)


def _ranked(w: np.ndarray, d: _PatientCounts) -> tuple[np.ndarray, np.ndarray]:
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


def _stats(w: np.ndarray, d: _PatientCounts, keys: Sequence[str]) -> dict[str, np.ndarray]:
    """The CI_KEYS metrics (B,) for resamples given as patient multiplicities w (B, P)."""
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


def _interval(values: np.ndarray, alpha: float) -> tuple[float, float]:
    """Percentile interval, ignoring resamples where the metric is undefined (nan)."""
    values = values[np.isfinite(values)]
    if values.size == 0:
        return (math.nan, math.nan)
    lo, hi = np.percentile(values, [100 * alpha / 2, 100 * (1 - alpha / 2)])
    return (float(lo), float(hi))


def wilson(k: float, n: float, alpha: float = 0.05, z: float | None = None) -> tuple[float, float]:
    """Wilson score interval of a proportion k/n (n units, each one vote): never of zero width.
    z: the quantile (default the normal one; a t quantile widens it for few clusters)."""
    if n <= 0:
        return (math.nan, math.nan)
    z = float(norm.ppf(1 - alpha / 2)) if z is None else z
    centre = (k + z * z / 2) / (n + z * z)
    half = z * math.sqrt(max(k * (n - k) / n, 0.0) + z * z / 4) / (n + z * z)
    return (max(0.0, centre - half), 1.0 if k >= n else min(1.0, centre + half))


def _bca(estimate: float, boots: np.ndarray, jack: np.ndarray, alpha: float) -> tuple[float, float]:
    """Bias-corrected and accelerated percentile interval (Efron 1987) from bootstrap values (B,) and
    leave-one-patient-out jackknife values (P,); resamples where the metric is undefined are left out."""
    boots, jack = boots[np.isfinite(boots)], jack[np.isfinite(jack)]
    if boots.size == 0 or not math.isfinite(estimate):
        return (math.nan, math.nan)
    below = (np.sum(boots < estimate) + 0.5 * np.sum(boots == estimate)) / boots.size
    z0 = float(norm.ppf(np.clip(below, 1 / (2 * boots.size), 1 - 1 / (2 * boots.size))))
    dev = jack.mean() - jack if jack.size else np.zeros(1)
    scale = 6 * float((dev ** 2).sum()) ** 1.5
    acc = float((dev ** 3).sum()) / scale if scale > 0 else 0.0
    z = norm.ppf([alpha / 2, 1 - alpha / 2])
    levels = norm.cdf(z0 + (z0 + z) / (1 - acc * (z0 + z)))
    lo, hi = np.percentile(boots, 100 * np.nan_to_num(levels, nan=0.5))
    return (float(lo), float(hi))


# for a figure whose bootstrap values do not vary (every resample says 1.000), the patients that carry
# it, counted as votes: the Wilson interval of its value over that many patients replaces a zero width
_UNITS = {"accuracy": "all", "balanced_accuracy": "fewer", "precision": "called", "recall": "malignant",
          "specificity": "benign", "f1": "malignant", "auroc": "fewer", "aucpr": "fewer",
          "patient_recognition_rate": "all", "patient_accuracy": "all"}


def _units(d: _PatientCounts, key: str) -> int:
    tp, fp, fn, tn = d.counts.T
    malignant, benign = int(((tp + fn) > 0).sum()), int(((tn + fp) > 0).sum())
    return {"all": len(d.members), "malignant": malignant, "benign": benign, "fewer": min(malignant, benign),
            "called": int(((tp + fp) > 0).sum())}[_UNITS[key]]


# proportions whose numerator and denominator add up over patients: (numerator, denominator) columns of the
# per-patient counts (tp, fp, fn, tn); they get a cluster-adjusted Wilson interval (see _cluster_wilson)
_RATIOS = {"accuracy": ((0, 3), (0, 1, 2, 3)), "precision": ((0,), (0, 1)), "recall": ((0,), (0, 2)),
           "specificity": ((3,), (1, 3))}


def _cluster_wilson(num: np.ndarray, den: np.ndarray, alpha: float) -> tuple[float, float]:
    """Wilson interval of a ratio of sums over patients (num (P,), den (P,) per patient), with the effective
    sample size of clustered data and a t quantile for few patients.

    The ratio's variance is the cluster-robust (linearised) one with the small-sample factor P/(P-1);
    the effective number of images is p(1-p)/variance (at most the images; the number of patients when
    every patient agrees), and z is Student's t with P-1 degrees of freedom. At 7 benign patients the
    percentile bootstrap's specificity interval covered 80%; this one keeps near 95% (bench coverage)."""
    keep = den > 0
    num, den = num[keep], den[keep]
    n_clusters = int(keep.sum())
    if n_clusters == 0:
        return (math.nan, math.nan)
    est = num.sum() / den.sum()
    if n_clusters == 1:
        return wilson(est, 1, alpha)
    var = n_clusters / (n_clusters - 1) * float(((num - est * den) ** 2).sum()) / float(den.sum()) ** 2
    n_eff = min(float(den.sum()), est * (1 - est) / var) if var > 0 else float(n_clusters)
    n_eff = max(n_eff, 1.0)
    return wilson(est * n_eff, n_eff, alpha, z=float(student_t.ppf(1 - alpha / 2, n_clusters - 1)))


# half-widths beyond this on the logit scale (odds spanning e^40) mean the estimate sits within rounding of
# 0 or 1 while resamples do not: the delta method has broken down (and exp() would overflow past 709)
MAX_LOGIT_HALF = 20.0


def _logit_t(estimate: float, boots: np.ndarray, units: int, n_pat: int, alpha: float) -> tuple[float, float]:
    """estimate +- t * se on the logit scale: se is the bootstrap standard deviation over patients, times
    sqrt(P/(P-1)) (the bootstrap's small-sample bias); t's degrees of freedom lie halfway between the
    patients of the scarcer class that carries the figure and all patients, minus one (the scarcer class
    alone, 1 df at 2 benign patients, covered 100% with absurd widths). Percentile and BCa intervals of
    AUROC covered 72% at 8 patients and 86-89% at 24; this one 91% and 94% (bench coverage)."""
    boots = boots[np.isfinite(boots)]
    if boots.size < 2 or not 0 < estimate < 1 or units < 2:
        return (math.nan, math.nan)
    se = float(boots.std(ddof=1)) * math.sqrt(n_pat / max(n_pat - 1, 1)) / (estimate * (1 - estimate))
    half = float(student_t.ppf(1 - alpha / 2, max(units - 1, (units + n_pat) // 2 - 1))) * se
    if not half <= MAX_LOGIT_HALF:  # an estimate within rounding of 0 or 1 (a Brier score of 1e-9): BCa instead
        return (math.nan, math.nan)
    centre = math.log(estimate / (1 - estimate))
    return (1 / (1 + math.exp(-(centre - half))), 1 / (1 + math.exp(-(centre + half))))


def smooth_interval(estimate: float, boots: np.ndarray, jack: np.ndarray, units: int, n_pat: int,
                    alpha: float) -> tuple[float, float]:
    """The interval of a figure in [0, 1] that is not a ratio of counts (balanced accuracy, F1, AUROC, ECE,
    Brier...): logit-t with the bootstrap SE (_logit_t); at 0 or 1 (all resamples agree), or with too few
    patients, BCa from the jackknife values jack (P,); an interval of zero width becomes the Wilson interval
    of the estimate over `units` patients (the patients that carry the figure)."""
    lo, hi = _logit_t(estimate, boots, units, n_pat, alpha)
    if not math.isfinite(lo):
        lo, hi = _bca(estimate, boots, jack, alpha)
    if math.isfinite(lo) and hi - lo < 1e-12 and units:
        lo, hi = wilson(estimate * units, units, alpha)
    return (lo, hi)


def patient_weights(patients, n: int, n_boot: int, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """For a figure computed from per-patient sums: each image's patient index (N,), the bootstrap
    multiplicities (B, P) (the very draws bootstrap_ci makes for this seed and these patients) and the
    jackknife weights (P, P) (all ones, patient j left out in row j). A figure at weights w (P,) is the
    figure of the images of patient j counted w[j] times."""
    names, idx = _patient_index(patients, n)
    n_pat = names.size
    return idx, _multiplicity(_draws(n_pat, n_boot, seed)), np.ones((n_pat, n_pat)) - np.eye(n_pat)


def class_patients(y, patients) -> dict[str, int]:
    """Patients per class (by the majority of their image labels)."""
    y = np.asarray(y)
    names, idx = _patient_index(patients, y.size)
    malignant = np.bincount(idx, weights=y.astype(np.float64), minlength=names.size) / np.bincount(idx) >= 0.5
    return {"benign": int((~malignant).sum()), "malignant": int(malignant.sum())}


INTERVAL_METHOD = ("patient-cluster intervals: Wilson (cluster-adjusted, t quantile) for accuracy, precision, "
                   "recall, specificity; logit +- t * bootstrap SE for balanced accuracy, F1, AUROC, AUCPR, "
                   "patient recognition rate, ECE, Brier; Wilson for patient accuracy")
FEW_PATIENTS = 10  # fewer patients than this in a class: the intervals are rough, and the output says so


def bootstrap_ci(y, p, patients, fn: Callable[[np.ndarray, np.ndarray], dict] | None = None, n_boot: int = 1000,
                 seed: int = 0, alpha: float = 0.05, threshold=0.5,
                 method: str = "bca") -> dict[str, tuple[float, float]]:
    """Intervals (1 - alpha) by resampling patients with replacement (all images of a drawn patient come along).

    method "bca" (the default; the name of its fallback): intervals whose coverage holds at BreakHis
    sizes (8-40 test patients, a handful of benign ones; `python -m breakhis.bench coverage`):
      accuracy, precision, recall, specificity (ratios of sums over patients): cluster-adjusted Wilson
        with a t quantile (_cluster_wilson);
      balanced accuracy, F1, AUROC, AUCPR, patient recognition rate: logit(estimate) +- t * bootstrap
        standard error over patients (_logit_t); at 0 or 1, BCa (bias-corrected and accelerated,
        jackknife over patients);
      patient accuracy (one vote per patient): Wilson score interval;
      any figure whose resamples never vary: the Wilson interval over the patients that carry it,
        never a zero-width interval.
    method "percentile": the plain percentile interval (kept to compare coverage: bench coverage).
    Default figures: every key of CI_KEYS, computed vectorised from per-patient counts. With fn,
    fn(y, p) -> dict of scalars is called on each resample's images (slower, percentile only); the
    draws are the same for the same seed either way.
    """
    if not 0 < alpha < 1:
        raise ValueError(f"alpha must be in (0, 1), got {alpha}")
    if method not in ("bca", "percentile"):
        raise ValueError(f"method must be bca or percentile, not {method!r}")
    d = _prepare(y, p, patients, threshold)
    n_pat = len(d.members)
    draws = _draws(n_pat, n_boot, seed)
    if fn is None and method == "bca":
        dist = _stats(_multiplicity(draws), d, CI_KEYS)
        point = {k: float(v[0]) for k, v in _stats(np.ones((1, n_pat)), d, CI_KEYS).items()}
        jack = _stats(np.ones((n_pat, n_pat)) - np.eye(n_pat), d, CI_KEYS) if n_pat > 1 else \
            {k: np.zeros(0) for k in CI_KEYS}
        out = {}
        for k in CI_KEYS:
            units = _units(d, k)
            if k in _RATIOS:
                a, b = _RATIOS[k]
                lo, hi = _cluster_wilson(d.counts[:, list(a)].sum(1), d.counts[:, list(b)].sum(1), alpha)
            elif k == "patient_accuracy":
                lo, hi = wilson(point[k] * units, units, alpha)
            else:
                lo, hi = smooth_interval(point[k], dist[k], jack[k], units, n_pat, alpha)
            out[k] = (lo, hi)
        return out
    if fn is None:
        dist = _stats(_multiplicity(draws), d, CI_KEYS)
    else:
        y, p = _binary(y, p)
        rows = []
        for row in draws:
            sel = np.concatenate([d.members[j] for j in row])
            rows.append(fn(y[sel], p[sel]))
        keys = [k for k, v in rows[0].items() if isinstance(v, (int, float, np.number)) and not isinstance(v, bool)]
        dist = {k: np.array([r[k] for r in rows], dtype=np.float64) for k in keys}
    return {k: _interval(v, alpha) for k, v in dist.items()}


def paired_bootstrap(y, p_a, p_b, patients, metric: str = "accuracy", n_boot: int = 2000, seed: int = 0,
                     threshold=0.5, threshold_b=None) -> dict:
    """Is prediction set a better than b on the same test images? Patients resampled jointly.

    diff = metric(a) - metric(b) on all images; ci: 95% percentile interval of the
    resampled differences; p_value: two-sided, twice the smaller tail of the resampled
    differences beyond 0 (add-one smoothed, capped at 1); significant: ci excludes 0.
    threshold applies to a, threshold_b to b (default: the same); each a scalar or one per image.
    """
    if metric not in CI_KEYS:
        raise UserError(f"unknown metric {metric!r} for the paired bootstrap; choose one of: {', '.join(CI_KEYS)}")
    da = _prepare(y, p_a, patients, threshold)
    db = _prepare(y, p_b, patients, threshold if threshold_b is None else threshold_b)
    ones = np.ones((1, len(da.members)))
    diff = float(_stats(ones, da, [metric])[metric][0] - _stats(ones, db, [metric])[metric][0])
    w = _multiplicity(_draws(len(da.members), n_boot, seed))
    d = _stats(w, da, [metric])[metric] - _stats(w, db, [metric])[metric]
    d = d[np.isfinite(d)]
    lo, hi = _interval(d, 0.05)
    if d.size:
        tail = min((d <= 0).sum(), (d >= 0).sum())
        p_value = min(1.0, 2 * (1 + tail) / (1 + d.size))
    else:
        p_value = math.nan
    return {"metric": metric, "diff": diff, "ci": (lo, hi), "p_value": float(p_value),
            "significant": bool(lo > 0 or hi < 0)}


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
        y, p = _binary(y_val, p_val)
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
    y, p = _binary(y, p)
    t = _thresholds(threshold, y.size)
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
                out[v]["ci"] = bootstrap_ci(y[m], p[m], pats[m], n_boot=n_boot, seed=seed, threshold=t[m])
    return out


MULTICLASS_CI_KEYS = ("accuracy", "balanced_accuracy", "macro_f1")


def multiclass_ci(y, probs, patients, n_boot: int = 1000, seed: int = 0, alpha: float = 0.05) -> dict:
    """Intervals over patients of the subtype task's accuracy (cluster-adjusted Wilson), balanced
    accuracy and macro F1 (logit-t with the bootstrap standard error; see bootstrap_ci)."""
    y, probs = np.asarray(y), np.asarray(probs, dtype=np.float64)
    names, idx = _patient_index(patients, y.size)
    pred = probs.argmax(axis=1)
    correct = np.bincount(idx, weights=(pred == y).astype(np.float64), minlength=names.size)
    size = np.bincount(idx, minlength=names.size).astype(np.float64)
    members = [np.flatnonzero(idx == j) for j in range(names.size)]
    draws = _draws(names.size, n_boot, seed)
    labels = np.arange(probs.shape[1])
    boots = {k: np.empty(n_boot) for k in MULTICLASS_CI_KEYS[1:]}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        for b, row in enumerate(draws):
            sel = np.concatenate([members[j] for j in row])
            boots["balanced_accuracy"][b] = skm.balanced_accuracy_score(y[sel], pred[sel])
            boots["macro_f1"][b] = skm.f1_score(y[sel], pred[sel], labels=labels[np.isin(labels, np.r_[y[sel], pred[sel]])],
                                                average="macro", zero_division=0)
        point = {"balanced_accuracy": skm.balanced_accuracy_score(y, pred),
                 "macro_f1": skm.f1_score(y, pred, average="macro", zero_division=0)}
    out = {"accuracy": _cluster_wilson(correct, size, alpha)}
    for k in MULTICLASS_CI_KEYS[1:]:
        lo, hi = _logit_t(float(point[k]), boots[k], names.size, names.size, alpha)
        out[k] = (lo, hi) if math.isfinite(lo) else _interval(boots[k], alpha)
    return out


def interval_settings(n_boot: int, seed: int, alpha: float = 0.05) -> dict:
    """How the intervals beside the figures were made: recorded with every interval (metrics.json, --json)."""
    return {"method": INTERVAL_METHOD, "unit": "patient", "resamples": int(n_boot), "seed": int(seed),
            "level": 1 - alpha}


def summarize(y, p, patients, threshold=0.5, n_boot: int = 1000, seed: int = 0,
              groups: dict[str, Sequence] | None = None) -> dict:
    """One JSON-able dict: binary_metrics + patient_metrics + "ci" {metric: [lo, hi]} and
    "ci_settings" (interval_settings; both omitted when n_boot is 0) + "by" {group: {value: metrics}}
    for per-image groups such as {"magnification": [...]}. nan becomes None; group values become strings."""
    out = {**binary_metrics(y, p, threshold), **patient_metrics(y, p, patients, threshold)}
    if n_boot:
        out["ci"] = bootstrap_ci(y, p, patients, n_boot=n_boot, seed=seed, threshold=threshold)
        out["ci_settings"] = interval_settings(n_boot, seed)
        few = {c: k for c, k in class_patients(y, patients).items() if k < FEW_PATIENTS}
        if few:
            out["warnings"] = [f"only {k} {c} patient(s) in this set: figures that rest on them (e.g. "
                               f"{'specificity' if c == 'benign' else 'recall'}) have wide, rough intervals"
                               for c, k in few.items()]
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
