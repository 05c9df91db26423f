"""Do the intervals and the logbook's tests keep their promises where BreakHis models are? A simulation.

    python -m breakhis.bench coverage                      # 100 test sets per regime (about 6 minutes here)
    python -m breakhis.bench coverage --reps 300 --json    # last line: one JSON object

The population (one model, one test population): a patient is benign (30% of patients, as BreakHis)
or malignant, has n images with n log-uniform in 10-120 (3-30 for a per-magnification set), and an
image's score is s = +-mu + u + e, u ~ N(0, ICC) the patient's effect (shared by its images: the
reason intervals resample patients), e ~ N(0, 1 - ICC). The model's malignant probability is the
Bayes posterior of s at a 30% benign prior, p = expit(k * (log(7/3) + 2 mu s)): calibrated at k = 1,
over-confident above. mu is set so that the image accuracy at p >= 0.5 is 0.97 (a good BreakHis
model) or 0.85; ICC 0.1 spreads the errors over many patients, 0.7 concentrates them in a few.

The true figures are those of the infinite population, computed exactly (normal integrals; Monte Carlo
over 400,000 patients for the patient-vote accuracy), at the benign share of the test set's design
(7 of 24). A regime is (accuracy, ICC, test patients, images per patient); each replicate draws one
stratified test set, and every figure's 95% interval is checked against the truth: coverage, the
share of intervals wholly below and wholly above it, and the mean width, for the default rules
(intervals.bootstrap_ci "cluster") next to the plain percentile bootstrap over patients.

ECE: at 24 patients, calibrated and over-confident models (true ECE 0.0001 to 0.1), the interval of
calibration.ece_interval against the percentile interval of the plug-in ECE.

Recipes: two rows of 3 or 5 runs on one shared test set of 24 patients, the same recipe (a true null) or
row a 2 points more accurate, with and without a recipe x patient effect (the rows differ in which
patients they get wrong); share of "significant" verdicts of Welch over the runs and of
intervals.recipe_test (runs and test patients).

Folds: two recipes each cross-validated over the same 5 official-style folds (overlapping random 70/30 patient
splits) of a data set of 82 patients, a true null or recipe a 2 points better, with and without a recipe x
patient effect and a training-set effect (fold_tests); share of "significant" verdicts of the Nadeau-Bengio t
over the folds and of intervals.fold_test (the logbook's test between two cross-validations).
"""
from __future__ import annotations

import argparse
import json
import math
from collections.abc import Sequence

import numpy as np
from rich.console import Console
from rich.table import Table
from scipy.optimize import brentq
from scipy.special import expit
from scipy.stats import norm, ttest_ind

from .. import calibration, intervals
from ..counts import CI_KEYS
from ..errors import UserError
from ..io import jsonable

BENIGN = 0.3  # share of benign patients (BreakHis: 24 of 82) and the model's prior
COMPARED = ("percentile", "cluster")  # intervals.bootstrap_ci methods, in the table's column order
ACCURACIES, ICCS = (0.97, 0.85), (0.1, 0.4, 0.7)
SIZES = {"10-120": (10, 120), "3-30": (3, 30)}  # images per patient: a whole test set, a per-magnification set


def mu_for(accuracy: float) -> float:
    """The class separation mu whose image accuracy at p >= 0.5 is `accuracy` (30% benign)."""
    cut = math.log((1 - BENIGN) / BENIGN) / 2

    def gap(mu: float) -> float:
        t = -cut / mu
        return (1 - BENIGN) * norm.sf(t - mu) + BENIGN * norm.cdf(t + mu) - accuracy
    return brentq(gap, 0.01, 10.0)


def draw(rng: np.random.Generator, mu: float, icc: float, benign: int, malignant: int, images=(10, 120),
         k: float = 1.0):
    """Labels (N,), malignant probabilities (N,) and patient ids (N,) of one test set (module docstring)."""
    n = benign + malignant
    cls = np.r_[np.zeros(benign, int), np.ones(malignant, int)]
    sizes = np.round(np.exp(rng.uniform(math.log(images[0]), math.log(images[1]), n))).astype(int)
    y = np.repeat(cls, sizes)
    s = np.where(y == 1, mu, -mu) + np.repeat(rng.normal(0, math.sqrt(icc), n), sizes)
    s += rng.normal(0, math.sqrt(1 - icc), y.size)
    p = expit(k * (math.log((1 - BENIGN) / BENIGN) + 2 * mu * s))
    return y, p, np.repeat(np.arange(n), sizes)


def truth(mu: float, icc: float, benign_share: float, images=(10, 120), k: float = 1.0, seed: int = 0) -> dict:
    """The figures of the infinite population whose patients are benign_share benign (module docstring)."""
    pi = 1 - benign_share  # malignant share of the images: image counts do not depend on the class
    t = -math.log((1 - BENIGN) / BENIGN) / (2 * mu)  # p >= 0.5 where s >= t
    rec, spec = norm.sf(t - mu), norm.cdf(t + mu)
    prec = pi * rec / (pi * rec + (1 - pi) * (1 - spec))
    s = np.linspace(-15, 15, 300_001)
    ds = s[1] - s[0]
    f1, f0 = norm.pdf(s - mu), norm.pdf(s + mu)
    tpr, fpr = norm.sf(s - mu), norm.sf(s + mu)
    ap = float((pi * tpr / np.maximum(pi * tpr + (1 - pi) * fpr, 1e-300) * f1 * ds).sum())
    p = expit(k * (math.log((1 - BENIGN) / BENIGN) + 2 * mu * s))
    post = expit(math.log(pi / (1 - pi)) + 2 * mu * s)  # P(malignant | s) in this population
    w = (pi * f1 + (1 - pi) * f0) * ds
    conf = np.maximum(p, 1 - p)
    hit = np.where(p >= 0.5, post, 1 - post)
    b = np.searchsorted(np.linspace(0, 1, calibration.N_BINS + 1)[1:-1], conf)
    out = {"accuracy": pi * rec + (1 - pi) * spec, "balanced_accuracy": (rec + spec) / 2, "precision": prec,
           "recall": rec, "specificity": spec, "f1": 2 * prec * rec / (prec + rec),
           "auroc": float(norm.cdf(mu * math.sqrt(2))), "aucpr": ap,
           "patient_recognition_rate": benign_share * spec + (1 - benign_share) * rec,
           "ece": float(np.abs(np.bincount(b, weights=w * (hit - conf), minlength=calibration.N_BINS)).sum() / w.sum()),
           "brier": float((w * (post * (1 - p) ** 2 + (1 - post) * p ** 2)).sum() / w.sum())}
    rng = np.random.default_rng(seed)
    votes = []
    for cls in (0, 1):  # the patient vote (mean probability >= 0.5) has no closed form: 200,000 patients each
        y, pp, pats = draw(rng, mu, icc, 0 if cls else 200_000, 200_000 if cls else 0, images, k)
        idx = np.unique(pats, return_inverse=True)[1]
        mean = np.bincount(idx, weights=pp) / np.bincount(idx)
        votes.append(float(((mean >= 0.5) == bool(cls)).mean()))
    out["patient_accuracy"] = benign_share * votes[0] + (1 - benign_share) * votes[1]
    return out


def regimes(patients: Sequence[int]) -> list[tuple[float, float, int, str]]:
    """(accuracy, ICC, test patients, images per patient) swept: every accuracy x ICC x size with 10-120
    images, and the per-magnification set (3-30 images) at the smallest size."""
    out = [(a, i, n, "10-120") for a in ACCURACIES for i in ICCS for n in patients]
    return out + [(a, 0.4, min(patients), "3-30") for a in ACCURACIES]


def _tally(hits: dict, key: str, ci, true: float) -> None:
    lo, hi = ci
    if math.isfinite(lo) and math.isfinite(hi):
        h = hits.setdefault(key, [0, 0, 0, 0.0])  # counted, wholly below the truth, wholly above, summed width
        h[0] += 1
        h[1] += hi < true
        h[2] += lo > true
        h[3] += hi - lo


def _shares(hits: dict) -> dict:
    return {k: {"coverage": 1 - (b + a) / n, "below": b / n, "above": a / n, "width": w / n, "counted": n}
            for k, (n, b, a, w) in hits.items()}


def coverage(patients: Sequence[int], reps: int, n_boot: int, seed: int) -> list[dict]:
    """One entry per regime: the truth and, per method, {figure: coverage, below, above, width, counted}."""
    out = []
    for r_i, (acc, icc, n_pat, images) in enumerate(regimes(patients)):
        benign = max(2, round(n_pat * BENIGN))
        mu = mu_for(acc)
        true = truth(mu, icc, benign / n_pat, SIZES[images], seed=seed + r_i)
        rng = np.random.default_rng([seed, r_i])
        hits = {m: {} for m in COMPARED}
        for r in range(reps):
            y, p, pats = draw(rng, mu, icc, benign, n_pat - benign, SIZES[images])
            for method in COMPARED:
                ci = intervals.bootstrap_ci(y, p, pats, n_boot=n_boot, seed=r, method=method)
                for k in CI_KEYS:
                    _tally(hits[method], k, ci[k], true[k])
        out.append({"accuracy": acc, "icc": icc, "patients": n_pat, "benign": benign, "images": images,
                    "truth": {k: true[k] for k in CI_KEYS}, **{m: _shares(hits[m]) for m in COMPARED}})
    return out


def ece_coverage(reps: int, n_boot: int, seed: int, n_pat: int = 24) -> list[dict]:
    """Coverage of the ECE interval at n_pat patients, calibrated and over-confident models (ICC 0.4)."""
    benign = round(n_pat * BENIGN)
    out = []
    for r_i, (acc, k) in enumerate(((0.97, 1.0), (0.85, 1.0), (0.97, 1.66), (0.85, 1.29), (0.85, 3.0))):
        mu = mu_for(acc)
        true = truth(mu, 0.4, benign / n_pat, k=k)["ece"]
        rng = np.random.default_rng([seed, 100 + r_i])
        hits = {"percentile": {}, "debiased": {}}
        plug = debiased = 0.0
        for r in range(reps):
            y, p, pats = draw(rng, mu, 0.4, benign, n_pat - benign, k=k)
            _tally(hits["percentile"], "ece", calibration.calibration_ci(y, p, pats, n_boot, r, method="percentile")["ece"], true)
            _tally(hits["debiased"], "ece", calibration.ece_interval(y, p, pats, n_boot, r), true)
            plug += calibration.ece(y, p) / reps
            debiased += calibration.debiased_ece(y, p, pats) / reps
        out.append({"accuracy": acc, "k": k, "true_ece": true, "mean_plug_in": plug, "mean_debiased": debiased,
                    **{m: _shares(h)["ece"] for m, h in hits.items()}})
    return out


def recipe_tests(reps: int, n_boot: int, seed: int, n_pat: int = 24, runs: Sequence[int] = (3, 5)) -> list[dict]:
    """Share of 'significant' verdicts between two rows of runs on one test set of n_pat patients, by Welch over
    the runs and by intervals.recipe_test: under a true null (same recipe) and with row a 2 points more
    accurate; without and with a recipe x patient effect (each row's N(0, 0.5) shift of each patient's score,
    shared by its runs: the rows differ in which patients they get wrong). A run adds a seed shift N(0, 0.15)
    to every score and N(0, 0.2) to each patient's."""
    rng = np.random.default_rng([seed, 200])
    benign = round(n_pat * BENIGN)
    out = []
    for n_runs in runs:
        for recipe_patient in (0.0, 0.5):
            for gain in (0.0, 0.02):
                mus = (mu_for(0.85 + gain), mu_for(0.85))
                welch_hits = ours_hits = 0
                for r in range(reps):
                    y, _, pats = draw(rng, mus[1], 0.4, benign, n_pat - benign)
                    base = rng.normal(0, 1, y.size)  # the test set's own scores, shared by every run
                    sign = np.where(y == 1, 1.0, -1.0)
                    rows = []
                    for mu in mus:
                        row_effect = rng.normal(0, recipe_patient, n_pat)[pats]
                        rows.append([(y, expit(math.log((1 - BENIGN) / BENIGN) + 2 * mu * (
                            sign * mu + base + row_effect + rng.normal(0, 0.15) + rng.normal(0, 0.2, n_pat)[pats])),
                            pats, 0.5) for _ in range(n_runs)])
                    acc = [[float(((p >= 0.5) == (yy == 1)).mean()) for yy, p, _, _ in row] for row in rows]
                    welch_hits += ttest_ind(acc[0], acc[1], equal_var=False).pvalue <= 0.05
                    ours_hits += intervals.recipe_test("accuracy", rows[0], rows[1], n_boot, r)["significant"]
                out.append({"runs": n_runs, "recipe_x_patient_sd": recipe_patient, "true_gain": gain,
                            "welch": welch_hits / reps, "ours": ours_hits / reps, "replicates": reps,
                            "patients": n_pat})
    return out


def official_folds(rng: np.random.Generator, cls: np.ndarray, k: int = 5, test_share: float = 0.3) -> list[np.ndarray]:
    """k official-style folds of the patients whose classes are cls (P,): each a seeded random test side of
    round(test_share x patients) of each class, drawn afresh per fold (BreakHis's folds overlap: a patient can be
    on the test side of several folds or of none), as (P,) bool test masks."""
    folds = []
    for _ in range(k):
        test = np.zeros(cls.size, bool)
        for c in (0, 1):
            members = np.flatnonzero(cls == c)
            test[rng.choice(members, round(test_share * members.size), replace=False)] = True
        folds.append(test)
    return folds


def fold_tests(reps: int, n_boot: int, seed: int, n_pat: int = 82, k: int = 5,
               training_sds: Sequence[float] = (0.0, 0.3, 0.6, 1.0)) -> list[dict]:
    """Share of 'significant' verdicts between two recipes each cross-validated over the same k official-style
    folds of one data set of n_pat patients (BreakHis: 82, 24 benign), by the Nadeau-Bengio t over the folds
    and by intervals.fold_test (patients and models): under a true null (the same recipe) and with recipe a
    2 points more accurate. Each replicate draws a new data set. An image's score is the class separation
    plus its patient's effect (ICC 0.4) and its own noise, the same for every fold and recipe; each recipe adds
    a recipe x patient effect N(0, sd) (0 or 0.5: the recipes differ in which patients they get wrong); each
    fold's model adds a seed shift N(0, 0.15), a per-patient shift N(0, 0.2) and a training-set effect of sd 0 to
    1: the mean of the training patients' own N(0, 1) value for the recipe, scaled so that its sd over training
    sets is that, so folds whose training sides overlap get alike models (Nadeau-Bengio's concern). Each regime
    records the fold-to-fold sd of a recipe's accuracy it gives (about 3.5 to 7 points: BreakHis papers report
    2-7)."""
    rng = np.random.default_rng([seed, 300])
    benign = round(n_pat * BENIGN)
    cls = np.r_[np.zeros(benign, int), np.ones(n_pat - benign, int)]
    out = []
    for recipe_patient in (0.0, 0.5):
        for training_sd in training_sds:
            for gain in (0.0, 0.02):
                mus = (mu_for(0.85 + gain), mu_for(0.85))
                nb_hits = ours_hits = 0
                spread = []
                for r in range(reps):
                    sizes = np.round(np.exp(rng.uniform(math.log(10), math.log(120), n_pat))).astype(int)
                    pats = np.repeat(np.arange(n_pat), sizes)
                    y = cls[pats]
                    sign = np.where(y == 1, 1.0, -1.0)
                    base = rng.normal(0, math.sqrt(0.4), n_pat)[pats] + rng.normal(0, math.sqrt(0.6), y.size)
                    folds = official_folds(rng, cls, k)
                    per_recipe = []
                    for mu in mus:
                        shift = base + rng.normal(0, recipe_patient, n_pat)[pats]
                        teach = rng.normal(0, 1, n_pat)
                        runs = []
                        for test in folds:
                            train = ~test
                            model = (rng.normal(0, 0.15) + rng.normal(0, 0.2, n_pat)[pats]
                                     + training_sd * teach[train].sum() / math.sqrt(train.sum()))
                            p = expit(math.log((1 - BENIGN) / BENIGN) + 2 * mu * (sign * mu + shift + model))
                            on = test[pats]
                            runs.append((y[on], p[on], pats[on], 0.5))
                        per_recipe.append(runs)
                    ratio = float(np.mean([t.sum() / (~t).sum() for t in folds]))
                    acc = [np.array([((p >= 0.5) == (yy == 1)).mean() for yy, p, _, _ in runs]) for runs in per_recipe]
                    spread.append(acc[1].std(ddof=1))
                    nb_hits += intervals.nadeau_bengio("accuracy", acc[0] - acc[1], ratio)["significant"]
                    ours_hits += intervals.fold_test("accuracy", list(zip(*per_recipe)), ratio, n_boot, r)["significant"]
                out.append({"folds": k, "patients": n_pat, "recipe_x_patient_sd": recipe_patient,
                            "training_set_sd": training_sd, "fold_accuracy_sd": float(np.mean(spread)),
                            "true_gain": gain, "nadeau_bengio": nb_hits / reps,
                            "ours": ours_hits / reps, "replicates": reps})
    return out


def _cell(d: dict) -> str:
    return f"{d['coverage']:.0%} ({d['below']:.0%}/{d['above']:.0%}) {d['width']:.3f}" if d else "–"


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m breakhis.bench coverage", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--reps", type=int, default=100, help="simulated test sets per regime (default 100)")
    ap.add_argument("--fold-reps", type=int, default=200, help="simulated data sets per fold-test regime (default 200)")
    ap.add_argument("--boot", type=int, default=300, help="bootstrap resamples per interval (default 300)")
    ap.add_argument("--patients", default="8,24,40", help="test-set sizes in patients (default 8,24,40)")
    ap.add_argument("--seed", type=int, default=0, help="seed of the simulation")
    ap.add_argument("--json", action="store_true", help="print one JSON object as the last line")
    a = ap.parse_args(argv)
    try:
        sizes = [int(v) for v in a.patients.split(",") if v.strip()]
    except ValueError:
        raise UserError(f"--patients {a.patients!r}: give whole numbers, e.g. 8,24,40") from None
    if not sizes or min(sizes) < 4 or a.reps < 1 or a.fold_reps < 1 or a.boot < 10:
        raise UserError("--patients: at least 4 each; --reps and --fold-reps at least 1; --boot at least 10")
    console = Console(stderr=a.json)
    cov = coverage(sizes, a.reps, a.boot, a.seed)
    for reg in cov:
        t = Table(title=f"accuracy {reg['accuracy']}, ICC {reg['icc']}, {reg['patients']} patients "
                        f"({reg['benign']} benign), {reg['images']} images each: coverage (below/above) width")
        t.add_column("figure")
        t.add_column("truth", justify="right")
        for m in COMPARED:
            t.add_column("ours" if m == "cluster" else m, justify="right")
        for k in CI_KEYS:
            t.add_row(k, f"{reg['truth'][k]:.4f}", *(_cell(reg[m].get(k)) for m in COMPARED))
        console.print(t)
    ece = ece_coverage(a.reps, a.boot, a.seed)
    t = Table(title="ECE at 24 patients: coverage (below/above) width")
    for col in ("model", "true ECE", "mean plug-in", "mean debiased", "percentile (plug-in)", "ours"):
        t.add_column(col, justify="right")
    for e in ece:
        t.add_row(f"acc {e['accuracy']}, k {e['k']}", f"{e['true_ece']:.4f}", f"{e['mean_plug_in']:.4f}",
                  f"{e['mean_debiased']:.4f}", _cell(e["percentile"]), _cell(e["debiased"]))
    console.print(t)
    tests = recipe_tests(a.reps, a.boot, a.seed)
    t2 = Table(title="Recipe tests on one test set of 24 patients: share called significant "
                     "(true gain 0: false positives, nominal 5%; 0.02: power)")
    for col in ("runs per row", "recipe x patient sd", "true gain", "Welch over runs", "ours (runs + patients)"):
        t2.add_column(col, justify="right")
    for e in tests:
        t2.add_row(str(e["runs"]), str(e["recipe_x_patient_sd"]), str(e["true_gain"]), f"{e['welch']:.1%}",
                   f"{e['ours']:.1%}")
    console.print(t2)
    folds = fold_tests(a.fold_reps, a.boot, a.seed)
    t3 = Table(title="Fold tests: two recipes over the same 5 official-style folds of 82 patients, share called "
                     "significant (true gain 0: false positives, nominal 5%; 0.02: power)")
    for col in ("recipe x patient sd", "training-set sd", "fold accuracy sd", "true gain", "Nadeau-Bengio t",
                "ours (patients + models)"):
        t3.add_column(col, justify="right")
    for e in folds:
        t3.add_row(str(e["recipe_x_patient_sd"]), str(e["training_set_sd"]), f"{e['fold_accuracy_sd']:.3f}", str(e["true_gain"]),
                   f"{e['nadeau_bengio']:.1%}", f"{e['ours']:.1%}")
    console.print(t3)
    if a.json:
        print(json.dumps(jsonable({"regimes": cov, "ece": ece, "recipe_tests": tests, "fold_tests": folds,
                                   "reps": a.reps, "boot": a.boot})))
    return 0
