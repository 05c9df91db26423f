"""Calibration of the binary task: expected calibration error, Brier score, NLL, temperature scaling.

ECE here is the top-label ECE of Guo et al. 2017 ("On calibration of modern neural networks"),
15 equal-width bins: each image's confidence is the probability of the class it is called
(max(p, 1 - p) for a malignant probability p; called malignant when p >= 0.5, the house rule),
its outcome is 1 when that call is right; the confidences are cut at 0, 1/15, ..., 1 into bins
(lo, hi] (the first [0, 1/15]: scikit-learn's calibration_curve binning), and

    ECE = sum over bins b of (n_b / N) * |accuracy_b - mean confidence_b|.

In terms of the malignant probability, a confidence bin (lo, hi] above 0.5 holds the images with
p in (lo, hi] and those with p in [1 - hi, 1 - lo): the two mirror bins of p. Confidences lie in
[0.5, 1], so at most 8 of the 15 bins are used. The Brier score is mean (p - y)^2 of the malignant
probability (scikit-learn's brier_score_loss); the NLL is mean -log p(true class), natural log.

The plug-in ECE is biased upward: noise adds to every |acc - conf|, so a calibrated model scores
0.013 at 24 test patients (the true ECE 0.0001). debiased_ece takes each bin's noise out, and
ece_interval gives an interval of the true ECE that reaches 0 when the data do not exclude
calibration (the old logit-t interval covered a true ECE of 0.001 in 3% of test sets; this one
88-93%, `python -m breakhis.bench coverage`). The Brier score's interval is logit-t with the
patient bootstrap's SE (intervals.smooth_interval); method "percentile" the plain percentile one.

Temperature scaling divides the logits by one scalar T > 0 fitted on validation predictions by
minimising their NLL. The engine returns probabilities, not logits; log p = logits - logsumexp(logits)
differs from the logits by a constant per image, which softmax ignores, so softmax(log p / T) is
exactly softmax(logits / T) and no model needs to run again.
"""
from __future__ import annotations

import math

import numpy as np
from scipy.optimize import minimize_scalar
from scipy.special import log_softmax, softmax
from scipy.stats import norm

from . import intervals
from .counts import check_binary

N_BINS = 15
T_RANGE = (0.01, 1000.0)  # the temperatures searched; a fitted T at either end is reported as such (at_limit)
# float32 softmax (the engine's) underflows to 0 below ~1e-45: log p is floored there, the largest
# log-probability gap a float32 model can show (~103), rather than -inf
FLOOR = 1e-45


def _bins(y, p, n_bins: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Each image's bin (N,) in 0..n_bins-1, confidence (N,) and correctness (N,) 0/1 (see the module docstring)."""
    y, p = check_binary(y, p)
    conf = np.maximum(p, 1 - p)
    correct = ((p >= 0.5).astype(np.int64) == y).astype(np.float64)
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    return np.searchsorted(edges[1:-1], conf), conf, correct  # searchsorted left: bins (lo, hi], as sklearn


def reliability(y, p, n_bins: int = N_BINS) -> dict:
    """The reliability diagram's data: per bin (n_bins,) count, mean confidence and accuracy (nan where
    empty), and the bin edges (n_bins + 1,). Malignant probabilities p (N,), labels y (N,)."""
    b, conf, correct = _bins(y, p, n_bins)
    count = np.bincount(b, minlength=n_bins).astype(np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean_conf = np.bincount(b, weights=conf, minlength=n_bins) / count
        accuracy = np.bincount(b, weights=correct, minlength=n_bins) / count
    return {"count": count.astype(np.int64), "confidence": mean_conf, "accuracy": accuracy,
            "edges": np.linspace(0.0, 1.0, n_bins + 1)}


def ece(y, p, n_bins: int = N_BINS) -> float:
    """Top-label expected calibration error (Guo et al. 2017) of malignant probabilities p (N,), in [0, 1]."""
    b, conf, correct = _bins(y, p, n_bins)
    return float(np.abs(np.bincount(b, weights=correct - conf, minlength=n_bins)).sum() / b.size)


def brier(y, p) -> float:
    """Brier score: mean (p - y)^2 of the malignant probability, in [0, 1] (lower is better)."""
    y, p = check_binary(y, p)
    return float(np.mean((p - y) ** 2))


def nll(y, probs) -> float:
    """Mean negative log-likelihood (nats) of labels y (N,) under class probabilities probs (N, C)."""
    probs = np.asarray(probs, dtype=np.float64)
    y = np.asarray(y).astype(np.int64)
    return float(-np.mean(np.log(np.maximum(probs[np.arange(y.size), y], FLOOR))))


# E|N(r, 1)| at r = _R: increasing from sqrt(2/pi) at 0; inverted by interpolation to undo the |.| of a noisy gap
_R = np.linspace(0.0, 12.0, 2401)
_FOLDED = np.sqrt(2 / np.pi) * np.exp(-_R ** 2 / 2) + _R * (1 - 2 * norm.cdf(-_R))


def unfold(gap: np.ndarray, sd: np.ndarray) -> np.ndarray:
    """d >= 0 with E|N(d, sd^2)| = |gap| (elementwise): the size of a bin's true gap whose noisy estimate has,
    on average, the size seen; 0 when |gap| is within what noise alone gives (sd * sqrt(2/pi))."""
    gap, sd = np.abs(np.asarray(gap, dtype=np.float64)), np.asarray(sd, dtype=np.float64)
    ratio = np.divide(gap, sd, out=np.full(gap.shape, np.inf), where=sd > 0)
    d = np.interp(ratio, _FOLDED, _R, left=0.0, right=np.nan)
    return np.where(np.isnan(d), gap, d * sd)  # beyond the table the noise no longer biases |gap|


def _bin_gaps(y, p, patients, n_bins: int):
    """Per patient (P, K) summed (correct - confidence) and image counts per bin, and each image's patient."""
    b, conf, correct = _bins(y, p, n_bins)
    names, idx = intervals.patient_index(patients, b.size)
    gap, count = np.zeros((names.size, n_bins)), np.zeros((names.size, n_bins))
    np.add.at(gap, (idx, b), correct - conf)
    np.add.at(count, (idx, b), 1.0)
    return gap, count, idx


def _gap_noise(gap: np.ndarray, count: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Each bin's gap (K,) as a share of all images, its standard error over patients (K,) and the per-patient
    residuals (P, K) behind it: cluster-robust with the jackknife's leverage factor 1 / (1 - h) per patient
    (h its share of the bin's images; without it the errors were 25% too small at 24 patients, bench coverage)."""
    n_pat, n = gap.shape[0], count.sum()
    per_bin = count.sum(axis=0)
    rate = np.divide(gap.sum(axis=0), per_bin, out=np.zeros(gap.shape[1]), where=per_bin > 0)
    lever = np.divide(count, per_bin, out=np.zeros_like(count), where=per_bin > 0)
    resid = (gap - rate * count) / np.maximum(1 - lever, 0.05)
    sd = np.sqrt(n_pat / max(n_pat - 1, 1) * (resid ** 2).sum(axis=0)) / n
    return gap.sum(axis=0) / n, sd, resid / n


def debiased_ece(y, p, patients, n_bins: int = N_BINS) -> float:
    """ECE with the noise of each bin taken out: sum over bins of unfold(gap_b, se_b), the gap as a share of all
    images and se_b its standard error over patients (_gap_noise). The plug-in ECE of a calibrated model is the
    noise itself (0.013 at 24 patients and accuracy 0.97 where the truth is 0.0001); this one is 0.008 there
    and within 0.001 of the truth from 0.0135 up (bench coverage). In the spirit of Kumar et al. 2019
    ("Verified uncertainty calibration"), whose debiased estimator removes the same bias by a Gaussian model."""
    g, sd, _ = _gap_noise(*_bin_gaps(y, p, patients, n_bins)[:2])
    return float(unfold(g, sd).sum())


def ece_interval(y, p, patients, n_boot: int = 1000, seed: int = 0, alpha: float = 0.05,
                 n_bins: int = N_BINS) -> tuple[float, float]:
    """(1 - alpha) interval of the true ECE around debiased_ece, one that can reach 0.

    Noise draws: a wild bootstrap over patients (each patient's residual gaps times a random sign), added to
    the debiased gaps and debiased again: the basic bootstrap interval [2d - q_hi, 2d - q_lo], clipped at 0.
    When the plug-in ECE is within the (1 - alpha) quantile of the plug-in ECE of a perfectly calibrated model
    with this noise (the noise draws alone), the data do not exclude calibration: the interval starts at 0."""
    gap, count, _ = _bin_gaps(y, p, patients, n_bins)
    g, sd, resid = _gap_noise(gap, count)
    n_pat = gap.shape[0]
    if n_pat < 2:
        return (math.nan, math.nan)
    signs = np.random.default_rng(seed).choice([-1.0, 1.0], size=(n_boot, n_pat)) * math.sqrt(n_pat / (n_pat - 1))
    noise = signs @ resid  # (B, K) what the gaps would be off by in another set of patients
    d = np.sign(g) * unfold(g, sd)
    est = float(np.abs(d).sum())
    again = unfold(d + noise, sd).sum(axis=1)  # (B,)
    q_lo, q_hi = np.percentile(again, [100 * alpha / 2, 100 * (1 - alpha / 2)])
    lo, hi = max(0.0, 2 * est - q_hi), max(0.0, 2 * est - q_lo)
    if np.abs(g).sum() <= np.percentile(np.abs(noise).sum(axis=1), 100 * (1 - alpha)):
        lo, hi = 0.0, max(hi, float(q_hi))
    return (lo, hi)


def calibration_ci(y, p, patients, n_boot: int = 1000, seed: int = 0, alpha: float = 0.05,
                   method: str = "cluster", n_bins: int = N_BINS) -> dict[str, tuple[float, float]]:
    """Intervals (1 - alpha) of "ece" and "brier" over patients.

    method "cluster" (bootstrap_ci's default): ECE by ece_interval (around debiased_ece, can reach 0); Brier
    by logit-t with the bootstrap SE, BCa at 0 (intervals.smooth_interval); "percentile": the percentile
    interval of the resampled plug-in figures (bootstrap_ci's draws).
    """
    intervals.check_method(method)
    b, conf, correct = _bins(y, p, n_bins)
    y, p = check_binary(y, p)
    idx, boot_w, jack_w = intervals.patient_weights(patients, y.size, n_boot, seed)
    n_pat = boot_w.shape[1]
    size = np.bincount(idx, minlength=n_pat).astype(np.float64)  # (P,) images per patient
    sq = np.bincount(idx, weights=(p - y) ** 2, minlength=n_pat)  # (P,) summed squared error
    gap = np.zeros((n_pat, n_bins))  # (P, K) summed (correct - confidence) per patient and bin
    np.add.at(gap, (idx, b), correct - conf)

    def figures(w: np.ndarray) -> dict[str, np.ndarray]:  # w (R, P) patient weights -> (R,) each
        with np.errstate(invalid="ignore", divide="ignore"):
            n = w @ size
            return {"ece": np.abs(w @ gap).sum(axis=1) / n, "brier": (w @ sq) / n}

    dist, point = figures(boot_w), figures(np.ones((1, n_pat)))
    if method == "percentile":
        return {k: intervals.percentile_interval(dist[k], alpha) for k in dist}
    jack = figures(jack_w) if n_pat > 1 else {k: np.zeros(0) for k in dist}
    return {"ece": ece_interval(y, p, patients, n_boot, seed, alpha, n_bins),
            "brier": intervals.smooth_interval(float(point["brier"][0]), dist["brier"], jack["brier"], n_pat, n_pat,
                                               alpha)}


def summary(y, p, patients, n_boot: int = 1000, seed: int = 0) -> dict:
    """ECE (plug-in), its debiased estimate, and Brier of one prediction set, with "ci"
    {ece_debiased, brier: (lo, hi)} when n_boot > 0 (the interval of the true ECE is shown beside the debiased
    estimate: the plug-in sits above it by the noise)."""
    out: dict = {"ece": ece(y, p), "ece_debiased": debiased_ece(y, p, patients), "brier": brier(y, p),
                 "ece_bins": N_BINS}
    if n_boot:
        ci = calibration_ci(y, p, patients, n_boot=n_boot, seed=seed)
        out["ci"] = {"ece_debiased": ci["ece"], "brier": ci["brier"]}  # the interval stands beside its estimate
    return out


# ---------------------------------------------------------------- temperature scaling


def scale(probs, temperature: float) -> np.ndarray:
    """softmax(log probs / T) (N, C): the probabilities of logits divided by T (see the module docstring)."""
    return softmax(np.log(np.maximum(np.asarray(probs, dtype=np.float64), FLOOR)) / temperature, axis=1)


def fit_temperature(probs, y) -> float:
    """The temperature T > 0 minimising the mean NLL of labels y (N,) under softmax(log probs / T), probs (N, C).

    The NLL is convex in 1/T (a log-sum-exp of functions linear in 1/T, minus one of them), so it has
    one minimum along log T, found by a bounded Brent search over T in T_RANGE (to 1e-6 in log T).
    """
    logp = np.log(np.maximum(np.asarray(probs, dtype=np.float64), FLOOR))  # logits up to a per-image constant
    y = np.asarray(y).astype(np.int64)
    rows = np.arange(y.size)
    if y.size == 0:
        raise ValueError("no predictions to fit a temperature on")

    def loss(log_t: float) -> float:
        return float(-log_softmax(logp / math.exp(log_t), axis=1)[rows, y].mean())

    res = minimize_scalar(loss, bounds=tuple(math.log(t) for t in T_RANGE), method="bounded",
                          options={"xatol": 1e-6})
    return float(math.exp(res.x))


def is_fitted_temperature(t) -> bool:
    """Whether t is a temperature this toolkit can have written: a finite number within T_RANGE (what the fit
    searches; -1 would invert every prediction, 1e308 flatten them). Read-back files are checked with it."""
    return isinstance(t, (int, float)) and not isinstance(t, bool) and math.isfinite(t) and T_RANGE[0] <= t <= T_RANGE[1]


def at_limit(temperature: float) -> bool:
    """True when a fitted temperature sits at an end of T_RANGE: the NLL still fell there (e.g. validation
    probabilities saturated at 0 and 1 in float32, so log p no longer carries the logits)."""
    return not T_RANGE[0] * 1.001 < temperature < T_RANGE[1] / 1.001
