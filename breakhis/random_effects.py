"""Intervals of the thresholded figures from a patient random-effects model of each class's hit rate.

Why a model: a good BreakHis model (image accuracy about 0.97) makes most of its errors in a few
patients. A test set of 24 patients often holds none of those, and every interval built from the set
alone (bootstrap, cluster-robust variance, Wilson) is then narrow around a figure that is too good:
at a patient effect of ICC 0.7 they covered 72-85% and missed on one side (`python -m breakhis.bench
coverage`). The spread of the patients that were drawn tells how likely the ones that were not are.

The model, per class (malignant patients for recall, benign ones for specificity): patient i's images
are hits with probability expit(theta_i), theta_i ~ Normal(beta, sigma^2), and it shows k_i hits of
n_i images (binomial given theta_i). Priors, weakly informative: beta ~ Normal(0, 4^2) (logit scale) and
sigma ~ half-Normal(0, SIGMA_SCALE^2). The class's rate is the population mean E[expit(theta)] (equal
to the image-weighted rate when a patient's image count does not depend on its theta). The posterior
is computed on a grid: a coarse (beta, sigma) grid finds where it lies, a fine one over that region
gives the weights; theta_i is integrated out on a fixed grid of logits (step 0.1, -20 to 25).

The figures follow from one joint draw of (recall, specificity, malignant share of images):
accuracy = pi * recall + (1 - pi) * specificity, precision = pi * recall / (pi * recall + (1 - pi) *
(1 - specificity)), F1, balanced accuracy, and the patient recognition rate (the patient-weighted mean
rate). The malignant share pi is drawn from a patient bootstrap within each class, so that the images
per patient vary as they would in another test set. The interval is the equal-tailed 95% of the draws.
"""
from __future__ import annotations

import math

import numpy as np
from scipy.special import expit, log_expit

SIGMA_SCALE = 3.0  # half-normal scale of sigma (logit units): 1.5 covered 75% at ICC 0.7, 4 was too low at 8 patients
BETA_SD = 4.0  # prior sd of beta (logit units): rates from 0.0003 to 0.9997 within 2 sd
THETA = np.linspace(-20.0, 25.0, 451)  # (G,) patient logits integrated over, step 0.1
SIGMA_MAX = 15.0  # the sigma grid's end (5 prior sd: the prior mass beyond is 1e-6)
DRAWS = 4000  # posterior draws per interval
# the figures this module gives, and the class(es) whose patients each rests on
FIGURES = ("accuracy", "balanced_accuracy", "precision", "recall", "specificity", "f1", "patient_recognition_rate")


def _grid_posterior(lik: np.ndarray, betas: np.ndarray, sigmas: np.ndarray):
    """Log posterior (S,) and population rate (S,) at each (beta, sigma) of the product grid (S = len(betas) *
    len(sigmas)); lik (P, G) each patient's binomial likelihood at THETA (scaled by its maximum)."""
    b, s = (v.ravel() for v in np.meshgrid(betas, sigmas, indexing="ij"))
    step = THETA[1] - THETA[0]
    kernel = np.exp(-0.5 * ((THETA[:, None] - b[None]) / s[None]) ** 2) / (s[None] * math.sqrt(2 * math.pi)) * step
    log_lik = np.log(np.maximum(lik @ kernel, 1e-300)).sum(axis=0)  # (S,)
    log_post = log_lik - 0.5 * (b / BETA_SD) ** 2 - 0.5 * (s / SIGMA_SCALE) ** 2
    rate = expit(THETA) @ kernel / kernel.sum(axis=0)  # (S,) E[expit(theta)] under Normal(beta, sigma^2)
    return b, s, log_post, rate


def rate_draws(k, n, rng: np.random.Generator, draws: int = DRAWS) -> np.ndarray:
    """(draws,) posterior draws of a class's population hit rate from per-patient hits k (P,) of n (P,)
    images (patients with n = 0 are left out); all nan without patients."""
    k, n = np.asarray(k, dtype=np.float64), np.asarray(n, dtype=np.float64)
    keep = n > 0
    k, n = k[keep], n[keep]
    if k.size == 0:
        return np.full(draws, np.nan)
    ll = k[:, None] * log_expit(THETA)[None] + (n - k)[:, None] * log_expit(-THETA)[None]  # (P, G)
    lik = np.exp(ll - ll.max(axis=1, keepdims=True))
    b, s, log_post, _ = _grid_posterior(lik, np.linspace(-10, 16, 53), np.linspace(0.15, SIGMA_MAX, 30))
    seen = np.exp(log_post - log_post.max()) > 1e-6  # where the posterior lies on the coarse grid
    betas = np.linspace(b[seen].min() - 0.3, b[seen].max() + 0.3, 50)
    sigmas = np.linspace(0.15, min(SIGMA_MAX, s[seen].max() + 0.5), 40)
    _, _, log_post, rate = _grid_posterior(lik, betas, sigmas)
    w = np.exp(log_post - log_post.max())
    return rate[rng.choice(rate.size, size=draws, p=w / w.sum())]


def figure_draws(counts: np.ndarray, seed: int = 0, draws: int = DRAWS) -> dict[str, np.ndarray]:
    """(draws,) joint posterior draws of FIGURES from per-patient counts (P, 4) of tp, fp, fn, tn. Recall rests
    on the patients with malignant images, specificity on those with benign ones (in BreakHis a patient has
    one class; a patient with both counts in both)."""
    counts = np.asarray(counts, dtype=np.float64)
    tp, fp, fn, tn = counts.T
    rng = np.random.default_rng(seed)
    recall = rate_draws(tp, tp + fn, rng, draws)
    specificity = rate_draws(tn, tn + fp, rng, draws)
    malignant_images, size = tp + fn, counts.sum(axis=1)
    majority = malignant_images >= size / 2  # (P,) the class a stratified split counted the patient in
    m_img, all_img = np.zeros(draws), np.zeros(draws)
    for group in (majority, ~majority):  # a patient bootstrap within each class: another test set's images
        if group.any():
            pick = rng.integers(0, group.sum(), (draws, group.sum()))
            m_img += malignant_images[group][pick].sum(axis=1)
            all_img += size[group][pick].sum(axis=1)
    pi = m_img / all_img  # (draws,) malignant share of the images
    # the patient recognition rate weights each patient by one: its mean is the patients' share of each class
    share = float((malignant_images / size).mean())
    with np.errstate(invalid="ignore", divide="ignore"):
        precision = pi * recall / (pi * recall + (1 - pi) * (1 - specificity))
        return {"accuracy": pi * recall + (1 - pi) * specificity,
                "balanced_accuracy": (recall + specificity) / 2,
                "precision": precision, "recall": recall, "specificity": specificity,
                "f1": 2 * precision * recall / (precision + recall),
                "patient_recognition_rate": share * recall + (1 - share) * specificity}


def intervals(counts: np.ndarray, alpha: float = 0.05, seed: int = 0) -> dict[str, tuple[float, float]]:
    """Equal-tailed (1 - alpha) intervals of FIGURES (figure_draws); nan where a class has no patients."""
    out = {}
    for key, v in figure_draws(counts, seed).items():
        v = v[np.isfinite(v)]
        out[key] = tuple(float(x) for x in np.percentile(v, [100 * alpha / 2, 100 * (1 - alpha / 2)])) \
            if v.size else (math.nan, math.nan)
    return out
