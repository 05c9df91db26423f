"""Every interval and test: 95% intervals over patients, the paired bootstrap of two prediction sets on the
same images, and the t-tests between rows of runs with Holm's correction.

Intervals resample PATIENTS with replacement (all images of a drawn patient come along): images of
one patient are not independent, so resampling images would give intervals that are too narrow.
The default rules (method "cluster" of bootstrap_ci; INTERVAL_METHOD says it in one line; which
figure gets which rule, for users: docs/statistics.md) were chosen for BreakHis sizes, 8-40 test
patients with a handful of benign ones (`python -m breakhis.bench coverage` measures them); BCa is
only the fallback where logit-t cannot be formed. The resampled figures come from per-patient
counts (counts.weighted_figures), so 1000 resamples take a fraction of a second.

Tests between rows (what the logbook reports): recipe_test between rows of repeats (their runs and the
test patients), fold_test between two cross-validations over the same folds (the folds' test patients
jointly and the folds' model noise), and Holm's step-down adjustment over the rows compared; welch and
nadeau_bengio are the textbook tests they are measured against (bench coverage). Each gives a difference,
its 95% interval, a two-sided p and a verdict.
"""
from __future__ import annotations

import math
import warnings
from collections.abc import Callable

import numpy as np
from scipy.stats import norm
from scipy.stats import t as student_t
from sklearn import metrics as skm

from . import random_effects
from .counts import CI_KEYS, PatientCounts, check_binary, patient_counts, patient_index, weighted_figures
from .errors import UserError


def patient_draws(n_patients: int, n_boot: int, seed: int) -> np.ndarray:
    """(B, P) patient indices drawn with replacement; the same for a seed and patient count."""
    if n_boot < 1:
        raise ValueError(f"n_boot must be >= 1, got {n_boot}")
    return np.random.default_rng(seed).integers(0, n_patients, size=(n_boot, n_patients))


def multiplicity(draws: np.ndarray) -> np.ndarray:
    """(B, P) how often each patient was drawn in each resample of draws (B, P)."""
    b, n = draws.shape
    flat = (draws + np.arange(b)[:, None] * n).ravel()
    return np.bincount(flat, minlength=b * n).reshape(b, n).astype(np.float64)


def percentile_interval(values: np.ndarray, alpha: float) -> tuple[float, float]:
    """The alpha/2 and 1 - alpha/2 percentiles of resampled figures values (B,), leaving out the resamples
    where the figure is undefined (nan)."""
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


def _units(d: PatientCounts, key: str) -> int:
    tp, fp, fn, tn = d.counts.T
    malignant, benign = int(((tp + fn) > 0).sum()), int(((tn + fp) > 0).sum())
    return {"all": len(d.members), "malignant": malignant, "benign": benign, "fewer": min(malignant, benign),
            "called": int(((tp + fp) > 0).sum())}[_UNITS[key]]


# proportions whose numerator and denominator add up over patients: (numerator, denominator) columns of the
# per-patient counts (tp, fp, fn, tn); where patients mix classes they get a cluster-adjusted Wilson interval
_RATIOS = {"accuracy": ((0, 3), (0, 1, 2, 3)), "precision": ((0,), (0, 1)), "recall": ((0,), (0, 2)),
           "specificity": ((3,), (1, 3))}


def cluster_wilson(num: np.ndarray, den: np.ndarray, alpha: float) -> tuple[float, float]:
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
    names, idx = patient_index(patients, n)
    n_pat = names.size
    return idx, multiplicity(patient_draws(n_pat, n_boot, seed)), np.ones((n_pat, n_pat)) - np.eye(n_pat)


def class_patients(y, patients) -> dict[str, int]:
    """Patients per class (by the majority of their image labels)."""
    y = np.asarray(y)
    names, idx = patient_index(patients, y.size)
    malignant = np.bincount(idx, weights=y.astype(np.float64), minlength=names.size) / np.bincount(idx) >= 0.5
    return {"benign": int((~malignant).sum()), "malignant": int(malignant.sum())}


# fewer patients than this carry a figure (its class, or the scarcer class for AUROC, AUCPR, balanced accuracy): no
# interval ("–" and the reason). At 2 benign patients the specificity interval spans 0.5-0.95 of [0, 1] (bench coverage)
MIN_PATIENTS = 3
INTERVAL_METHOD = ("patient intervals: a per-class patient random-effects model (logit-normal, weakly informative "
                   "priors) for accuracy, balanced accuracy, precision, recall, specificity, F1, patient recognition "
                   "rate; logit +- t * bootstrap SE over patients for AUROC, AUCPR, Brier; debiased ECE with a "
                   "bootstrap interval that reaches 0; Wilson for patient accuracy; none where the figure rests on "
                   f"fewer than {MIN_PATIENTS} patients of a class")
FEW_PATIENTS = 10  # fewer patients than this in a class: the intervals are rough, and the output says so


def worst_average_precision(n_pos: float, n_neg: float) -> float:
    """The average precision of the worst ranking of n_pos positive and n_neg negative images (every positive
    below every negative): sum over k = 1..n_pos of k / (n_neg + k), over n_pos. No ranking scores less."""
    n_pos, n_neg = int(round(n_pos)), int(round(n_neg))
    if n_pos <= 0:
        return math.nan
    k = np.arange(1, n_pos + 1, dtype=np.float64)
    return float((k / (n_neg + k)).mean())


# the interval rules of bootstrap_ci and calibration.calibration_ci: "cluster" the default (INTERVAL_METHOD),
# "percentile" the plain percentile bootstrap, kept to compare coverage (python -m breakhis.bench coverage)
METHODS = ("cluster", "percentile")


def check_method(method: str) -> None:
    """A ValueError unless method is one of METHODS."""
    if method not in METHODS:
        raise ValueError(f"method must be {' or '.join(METHODS)}, not {method!r}")


def bootstrap_ci(y, p, patients, fn: Callable[[np.ndarray, np.ndarray], dict] | None = None, n_boot: int = 1000,
                 seed: int = 0, alpha: float = 0.05, threshold=0.5,
                 method: str = "cluster") -> dict[str, tuple[float, float]]:
    """Intervals (1 - alpha) by resampling patients with replacement (all images of a drawn patient come along).

    method "cluster" (the default; rules for patient-clustered data, measured over the regimes of
    `python -m breakhis.bench coverage`: 8-40 test patients, about 30% benign, errors spread or concentrated):
      accuracy, balanced accuracy, precision, recall, specificity, F1, patient recognition rate: the
        patient random-effects model of each class's hit rate (random_effects.py);
      AUROC, AUCPR: logit(estimate) +- t * bootstrap standard error over patients (_logit_t); at 0 or 1,
        BCa (bias-corrected and accelerated, jackknife over patients); AUCPR never below the average
        precision of the worst ranking of the set (worst_average_precision);
      patient accuracy (one vote per patient): Wilson score interval;
      where patients mix classes (not BreakHis): accuracy, precision, recall, specificity by the
        cluster-adjusted Wilson interval (cluster_wilson), the others by logit-t;
      any figure carried by fewer than MIN_PATIENTS patients of a class (the scarcer one where it needs
        both): (nan, nan), shown as "–" with the reason (metrics.summarize).
    method "percentile": the plain percentile interval (kept to compare coverage: bench coverage).
    Default figures: every key of CI_KEYS, computed vectorised from per-patient counts. With fn,
    fn(y, p) -> dict of scalars is called on each resample's images (slower, percentile only); the
    draws are the same for the same seed either way.
    """
    if not 0 < alpha < 1:
        raise ValueError(f"alpha must be in (0, 1), got {alpha}")
    check_method(method)
    d = patient_counts(y, p, patients, threshold)
    n_pat = len(d.members)
    draws = patient_draws(n_pat, n_boot, seed)
    if fn is None and method == "cluster":
        dist = weighted_figures(multiplicity(draws), d, CI_KEYS)
        point = {k: float(v[0]) for k, v in weighted_figures(np.ones((1, n_pat)), d, CI_KEYS).items()}
        jack = weighted_figures(np.ones((n_pat, n_pat)) - np.eye(n_pat), d, CI_KEYS) if n_pat > 1 else \
            {k: np.zeros(0) for k in CI_KEYS}
        # the random-effects model takes a patient's images to be of one class (as in BreakHis); where patients
        # mix classes, recall and specificity rest on the same patients: the cluster rules of before
        one_class = bool((np.minimum(d.counts[:, [0, 2]].sum(1), d.counts[:, [1, 3]].sum(1)) == 0).all())
        modelled = random_effects.intervals(d.counts, alpha, seed) if one_class else {}
        out = {}
        for k in CI_KEYS:
            units = _units(d, k)
            if units < MIN_PATIENTS:
                lo, hi = (math.nan, math.nan)
            elif k in modelled:
                lo, hi = modelled[k]
            elif k in _RATIOS:
                a, b = _RATIOS[k]
                lo, hi = cluster_wilson(d.counts[:, list(a)].sum(1), d.counts[:, list(b)].sum(1), alpha)
            elif k == "patient_accuracy":
                lo, hi = wilson(point[k] * units, units, alpha)
            else:
                lo, hi = smooth_interval(point[k], dist[k], jack[k], units, n_pat, alpha)
            out[k] = (lo, hi)
        if math.isfinite(out["aucpr"][0]):  # never below what the worst ranking of these images gives
            floor = worst_average_precision(*(d.counts[:, [0, 2]].sum(), d.counts[:, [1, 3]].sum()))
            out["aucpr"] = (max(out["aucpr"][0], floor), max(out["aucpr"][1], floor))
        return out
    if fn is None:
        dist = weighted_figures(multiplicity(draws), d, CI_KEYS)
    else:
        y, p = check_binary(y, p)
        rows = []
        for row in draws:
            sel = np.concatenate([d.members[j] for j in row])
            rows.append(fn(y[sel], p[sel]))
        keys = [k for k, v in rows[0].items() if isinstance(v, (int, float, np.number)) and not isinstance(v, bool)]
        dist = {k: np.array([r[k] for r in rows], dtype=np.float64) for k in keys}
    return {k: percentile_interval(v, alpha) for k, v in dist.items()}


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
    da = patient_counts(y, p_a, patients, threshold)
    db = patient_counts(y, p_b, patients, threshold if threshold_b is None else threshold_b)
    ones = np.ones((1, len(da.members)))
    diff = float(weighted_figures(ones, da, [metric])[metric][0] - weighted_figures(ones, db, [metric])[metric][0])
    w = multiplicity(patient_draws(len(da.members), n_boot, seed))
    d = weighted_figures(w, da, [metric])[metric] - weighted_figures(w, db, [metric])[metric]
    d = d[np.isfinite(d)]
    lo, hi = percentile_interval(d, 0.05)
    if d.size:
        tail = min((d <= 0).sum(), (d >= 0).sum())
        p_value = min(1.0, 2 * (1 + tail) / (1 + d.size))
    else:
        p_value = math.nan
    return {"metric": metric, "diff": diff, "ci": (lo, hi), "p_value": float(p_value),
            "significant": bool(lo > 0 or hi < 0)}


MULTICLASS_CI_KEYS = ("accuracy", "balanced_accuracy", "macro_f1")


def multiclass_ci(y, probs, patients, n_boot: int = 1000, seed: int = 0, alpha: float = 0.05) -> dict:
    """Intervals over patients of the subtype task's accuracy (cluster-adjusted Wilson), balanced
    accuracy and macro F1 (logit-t with the bootstrap standard error; see bootstrap_ci)."""
    y, probs = np.asarray(y), np.asarray(probs, dtype=np.float64)
    names, idx = patient_index(patients, y.size)
    pred = probs.argmax(axis=1)
    correct = np.bincount(idx, weights=(pred == y).astype(np.float64), minlength=names.size)
    size = np.bincount(idx, minlength=names.size).astype(np.float64)
    members = [np.flatnonzero(idx == j) for j in range(names.size)]
    draws = patient_draws(names.size, n_boot, seed)
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
    out = {"accuracy": cluster_wilson(correct, size, alpha)}
    for k in MULTICLASS_CI_KEYS[1:]:
        lo, hi = _logit_t(float(point[k]), boots[k], names.size, names.size, alpha)
        out[k] = (lo, hi) if math.isfinite(lo) else percentile_interval(boots[k], alpha)
    return out


def interval_settings(n_boot: int, seed: int, alpha: float = 0.05) -> dict:
    """How the intervals beside the figures were made: recorded with every interval (metrics.json, --json)."""
    return {"method": INTERVAL_METHOD, "unit": "patient", "resamples": int(n_boot), "seed": int(seed),
            "level": 1 - alpha}


# ---------------------------------------------------------------- tests between rows of runs


def t_verdict(metric: str, diff: float, se: float, df: float, test: str) -> dict:
    """A difference with its standard error and t degrees of freedom -> the two-sided p, the 95% interval
    and the verdict (p <= 0.05). A zero se (every run of both rows scored alike, e.g. 23/24 three times
    against 22/24 three times) measures no run-to-run variance at all: p is nan and no verdict, never 0."""
    if se == 0:
        p_value, ci = (1.0 if diff == 0 else math.nan), (math.nan, math.nan)
    else:
        p_value = float(2 * student_t.sf(abs(diff) / se, df))
        half = float(student_t.ppf(0.975, df)) * se
        ci = (diff - half, diff + half)
    return {"metric": metric, "diff": diff, "ci": ci, "p_value": p_value, "significant": bool(p_value <= 0.05),
            "test": test}


def welch(metric: str, xa, xb, test: str = "Welch t") -> dict:
    """Welch's t-test of mean(xa) - mean(xb): xa (n_a,), xb (n_b,) the finite figures of two rows' runs
    (repeats over seeds or splits), so that the run-to-run variance is part of the verdict (t_verdict's dict)."""
    xa, xb = np.asarray(xa, dtype=np.float64), np.asarray(xb, dtype=np.float64)
    diff = float(xa.mean() - xb.mean())
    va, vb = xa.var(ddof=1) / xa.size, xb.var(ddof=1) / xb.size
    df = (va + vb) ** 2 / (va ** 2 / (xa.size - 1) + vb ** 2 / (xb.size - 1)) if va + vb > 0 else math.nan
    return t_verdict(metric, diff, math.sqrt(va + vb), df, test)


def _joint_figures(metric: str, groups: list[list[tuple]], n_boot: int, seed: int):
    """Each run's figure and the same figure at every joint patient draw: patients of every run of every group
    are resampled together (one draw for all, so a patient several runs score moves them all at once).
    groups: lists of runs (y, p, patients, threshold) -> ([(points (R,), draws (R, B)) per group], patients (U,))."""
    everyone = np.unique(np.concatenate([np.asarray(r[2]).astype(str) for g in groups for r in g]))
    weights = multiplicity(patient_draws(everyone.size, n_boot, seed))  # (B, U)
    out = []
    for runs in groups:
        points, draws = [], []
        for y, p, patients, threshold in runs:
            d = patient_counts(y, p, patients, threshold)
            cols = np.searchsorted(everyone, np.unique(np.asarray(patients).astype(str)))
            points.append(float(weighted_figures(np.ones((1, cols.size)), d, [metric])[metric][0]))
            draws.append(weighted_figures(weights[:, cols], d, [metric])[metric])
        out.append((np.array(points), np.array(draws).reshape(len(runs), n_boot)))
    return out, everyone


def recipe_test(metric: str, runs_a: list[tuple], runs_b: list[tuple], n_boot: int = 1000, seed: int = 0,
                test: str = "recipes: runs and test patients") -> dict:
    """Is recipe a better than recipe b, counting both the runs' seeds and the test patients? runs_a, runs_b:
    each run as (y, p, patients, threshold) on its test images (the rows' runs may share them or not).

    The difference is mean(run figures of a) - mean(run figures of b). Its variance adds the run-to-run
    variance of each row (var/n, as Welch) and the test-patient sampling variance: patients of all runs
    are resampled together (the same draw for every run, so that a patient both rows get wrong counts
    once) and the difference recomputed at each draw. Recipes that differ in WHICH patients they get
    wrong then differ on this test set by chance, and Welch over their runs alone called that
    significant in 14-24% of true nulls (bench coverage). t with Satterthwaite's degrees of freedom
    over the three parts (patients - 1, runs of a - 1, runs of b - 1); t_verdict's dict."""
    ((xa, ba), (xb, bb)), everyone = _joint_figures(metric, [runs_a, runs_b], n_boot, seed)
    diff = float(xa.mean() - xb.mean())
    drawn = ba.mean(0) - bb.mean(0)
    drawn = drawn[np.isfinite(drawn)]
    parts = [(float(drawn.var(ddof=1)) if drawn.size > 1 else 0.0, everyone.size - 1)]
    parts += [(float(x.var(ddof=1)) / x.size, x.size - 1) for x in (xa, xb) if x.size > 1]
    var = sum(v for v, _ in parts)
    df = var ** 2 / sum(v ** 2 / max(k, 1) for v, k in parts) if var > 0 else math.nan
    return t_verdict(metric, diff, math.sqrt(var), df, test)


def fold_test(metric: str, pairs: list[tuple[tuple, tuple]], test_train: float, n_boot: int = 1000, seed: int = 0,
              test: str = "folds: patients and models") -> dict:
    """Is recipe a better than recipe b over the same cross-validation folds? pairs: per fold, (run of a, run of b)
    on that fold's test images, each run (y, p, patients, threshold); test_train: n_test / n_train of the folds.

    The difference is the mean over the k folds of d_j = figure_a,j - figure_b,j, as Nadeau-Bengio's. The official
    folds are overlapping random splits of one set of patients: a patient sits in several test folds, and most of
    the fold-to-fold spread of d_j is test-patient sampling (each fold scores ~25 patients), which the
    Nadeau-Bengio t scales by (1/k + n_test/n_train) over k - 1 = 4 degrees of freedom. Here the two sources are
    measured apart:
    - patients: every test patient of every fold resampled jointly (a patient's images in all its folds move
      together) and the mean difference recomputed at each draw: V_p, over patients - 1 df;
    - models: what the spread of d_j holds beyond the patient sampling (the across-fold variance of the draws'
      deviations, which counts the folds' shared test patients), S_m = max(0, var_j(d_j) - that): the training
      noise of each fold's pair of models. Two folds' training sides share a share f = 1 / (1 + test_train) of
      the patients, so their models may be alike: as k values correlated by f, whose sample variance is
      sigma^2 (1 - f) and whose mean's is sigma^2 (1/k + (1 - 1/k) f), V_m = S_m (1/k + (1 - 1/k) f) / (1 - f),
      over k - 1 df. Exact when the models' spread is all training-set composition, conservative when it is
      seed noise; nan test_train: f = 0 (independent models).
    t on V_p + V_m with Satterthwaite's degrees of freedom; t_verdict's dict. Fewer than two folds: nan p.
    Measured in bench coverage's fold part (82 patients, 5 folds, two seeds of 200 data sets): false positives
    1-6% with and without a recipe x patient effect while the models' training-set effect leaves a fold accuracy
    sd of up to 5 points, 5-9% at 6.5-7 points (Nadeau-Bengio: 3-6.5%); power at +2 points 6-37% against
    Nadeau-Bengio's 3-10.5%, most where the recipes differ little in which patients they get wrong."""
    k = len(pairs)
    if k < 2:
        return {"metric": metric, "diff": math.nan, "ci": (math.nan, math.nan), "p_value": math.nan,
                "significant": False, "test": test}
    ((xa, ba), (xb, bb)), everyone = _joint_figures(metric, [[a for a, _ in pairs], [b for _, b in pairs]], n_boot, seed)
    d, dd = xa - xb, ba - bb  # (k,), (k, B)
    diff = float(d.mean())
    drawn = dd.mean(0)
    drawn = drawn[np.isfinite(drawn)]
    v_pat = float(drawn.var(ddof=1)) if drawn.size > 1 else 0.0
    dev = dd - np.nanmean(dd, axis=1, keepdims=True)  # each fold's patient-sampling deviation at each draw
    ok = np.isfinite(dev).all(0)
    within = float(dev[:, ok].var(axis=0, ddof=1).mean()) if ok.any() else 0.0
    f = 1 / (1 + test_train) if math.isfinite(test_train) and test_train > 0 else 0.0  # two folds' training overlap
    scale = (1 / k + (1 - 1 / k) * f) / (1 - f)
    v_model = max(0.0, float(d.var(ddof=1)) - within) * scale
    parts = [(v_pat, everyone.size - 1), (v_model, k - 1)]
    var = v_pat + v_model
    df = var ** 2 / sum(v ** 2 / n for v, n in parts if v > 0) if var > 0 else math.nan
    return t_verdict(metric, diff, math.sqrt(var), df, test)


def nadeau_bengio(metric: str, diffs, test_train: float, test: str = "Nadeau-Bengio t") -> dict:
    """A paired t over k folds of the differences diffs (k,), with the Nadeau-Bengio correction: the
    official folds are repeated random splits whose training and test sides overlap, so the fold-to-fold
    variance understates the variance of the mean difference; it is scaled by (1/k + n_test/n_train)
    instead of 1/k (Nadeau & Bengio 2003, "Inference for the generalization error"), with k - 1 degrees
    of freedom. test_train: n_test/n_train of the folds (nan: unknown, no correction). Fewer than two
    folds: nan p, no verdict."""
    d = np.asarray(diffs, dtype=np.float64)
    k = d.size
    diff = float(d.mean()) if k else math.nan
    if not k > 1:
        return {"metric": metric, "diff": diff, "ci": (math.nan, math.nan), "p_value": math.nan, "significant": False,
                "test": test}
    var = d.var(ddof=1) * (1 / k + (test_train if math.isfinite(test_train) else 0.0))
    return t_verdict(metric, diff, math.sqrt(var), k - 1, test)


def holm(p_values: list[float]) -> list[float]:
    """Holm-adjusted p-values (step-down, monotone, capped at 1) of m comparisons, in the given order;
    nan stays nan (and still counts in m)."""
    m = len(p_values)
    order = sorted(range(m), key=lambda i: (math.isnan(p_values[i]), p_values[i]))
    adjusted, running = [math.nan] * m, 0.0
    for rank_, i in enumerate(order):
        if math.isnan(p_values[i]):
            continue
        running = max(running, min(1.0, (m - rank_) * p_values[i]))
        adjusted[i] = running
    return adjusted
