"""Do the intervals and the logbook's tests keep their promises at BreakHis sizes? A simulation.

    python -m breakhis.bench coverage                      # 200 replicates, 8 / 24 / 40 patients
    python -m breakhis.bench coverage --reps 500 --json    # last line: one JSON object

Test sets are drawn from a known population: each patient is benign or malignant (7 benign in 24,
as in a BreakHis test partition), has 20 to 60 images, and a patient effect u ~ N(0, 1) shifts the
logit of every one of its images (images of one patient are alike: the reason intervals resample
patients); an image's logit is +-1.2 + u + N(0, 1). The population's true figures come from 20,000
patients. For each size, each replicate draws a test set and computes the 95% interval of every
figure by the plain percentile bootstrap over patients and by the default, method "cluster" (intervals.bootstrap_ci:
cluster-adjusted Wilson for ratios, logit-t with the bootstrap standard error for AUROC and the like,
Wilson for per-patient votes); coverage is the share of replicates whose interval holds the true value.

Recipes: two rows trained by the same recipe (three seeds each; a seed shifts a run's logits by
N(0, 0.15) and each patient's by N(0, 0.3)) are compared on one shared test set of 24 patients.
Under this true null, the paired bootstrap of two checkpoints calls a difference "significant"
far more often than 5%; the logbook's recipe test (Welch over the runs) should stay near 5%.
"""
from __future__ import annotations

import argparse
import json
import math
from collections.abc import Sequence

import numpy as np
from rich.console import Console
from rich.table import Table
from scipy.stats import ttest_ind

from .. import intervals
from .. import metrics as M
from ..counts import CI_KEYS
from ..errors import UserError
from ..io import jsonable

BENIGN_SHARE = 7 / 24  # benign patients in a BreakHis test partition (about 7 of 24)
COMPARED = ("percentile", "cluster")  # intervals.bootstrap_ci methods, in the table's column order


def simulate(rng: np.random.Generator, benign: int, malignant: int, run_shift: float = 0.0,
             patient_noise: np.ndarray | None = None, effects: np.ndarray | None = None,
             sizes: np.ndarray | None = None, noise: list | None = None):
    """Labels (N,), malignant probabilities (N,) and patient ids (N,) of one test set (see the docstring).

    effects, sizes and noise fix the patients and images (the same test set seen by another run);
    run_shift and patient_noise are a run's seed effects on the logits."""
    n = benign + malignant
    cls = np.r_[np.zeros(benign, int), np.ones(malignant, int)]
    effects = rng.normal(0, 1, n) if effects is None else effects
    sizes = rng.integers(20, 61, n) if sizes is None else sizes
    noise = [rng.normal(0, 1, k) for k in sizes] if noise is None else noise
    extra = np.zeros(n) if patient_noise is None else patient_noise
    logits = [np.where(c, 1.2, -1.2) + u + e + run_shift + x for c, u, e, x in zip(cls, effects, noise, extra)]
    y = np.repeat(cls, sizes)
    p = 1 / (1 + np.exp(-np.concatenate(logits)))
    patients = np.repeat([f"P{i:05d}" for i in range(n)], sizes)
    return y, p, patients


def truth(rng: np.random.Generator, n: int = 20_000) -> dict[str, float]:
    """The population's figures, from n patients with the same share of benign ones."""
    benign = round(n * BENIGN_SHARE)
    y, p, patients = simulate(rng, benign, n - benign)
    return {**M.binary_metrics(y, p), **M.patient_metrics(y, p, patients)}


def coverage(sizes: Sequence[int], reps: int, n_boot: int, seed: int) -> dict:
    """{size: {method: {metric: share of intervals holding the true value}}}."""
    rng = np.random.default_rng(seed)
    true = truth(rng)
    out = {}
    for size in sizes:
        benign = max(2, round(size * BENIGN_SHARE))
        hits = {m: {k: 0 for k in CI_KEYS} for m in COMPARED}
        counted = {m: {k: 0 for k in CI_KEYS} for m in COMPARED}
        for r in range(reps):
            y, p, patients = simulate(rng, benign, size - benign)
            for method in COMPARED:
                ci = intervals.bootstrap_ci(y, p, patients, n_boot=n_boot, seed=r, method=method)
                for k in CI_KEYS:
                    lo, hi = ci[k]
                    if math.isfinite(lo) and math.isfinite(hi):
                        counted[method][k] += 1
                        hits[method][k] += lo <= true[k] <= hi
        out[size] = {m: {k: hits[m][k] / counted[m][k] if counted[m][k] else math.nan for k in CI_KEYS}
                     for m in hits}
    return {"truth": true, "coverage": out}


def false_positives(reps: int, n_boot: int, seed: int, patients: int = 24, runs: int = 3) -> dict:
    """Share of 'significant' verdicts between two rows of the same recipe (a true null), by test."""
    rng = np.random.default_rng(seed + 1)
    benign = round(patients * BENIGN_SHARE)
    checkpoint = recipe = 0
    for r in range(reps):
        effects, sizes = rng.normal(0, 1, patients), rng.integers(20, 61, patients)
        noise = [rng.normal(0, 1, k) for k in sizes]

        def run(effects=effects, sizes=sizes, noise=noise):
            return simulate(rng, benign, patients - benign, run_shift=rng.normal(0, 0.15),
                            patient_noise=rng.normal(0, 0.3, patients), effects=effects, sizes=sizes, noise=noise)

        a, b = [run() for _ in range(runs)], [run() for _ in range(runs)]
        y, patients_ = a[0][0], a[0][2]
        test = intervals.paired_bootstrap(y, a[0][1], b[0][1], patients_, metric="accuracy", n_boot=n_boot, seed=r)
        checkpoint += test["significant"]
        acc_a = [M.binary_metrics(y, p)["accuracy"] for _, p, _ in a]
        acc_b = [M.binary_metrics(y, p)["accuracy"] for _, p, _ in b]
        recipe += ttest_ind(acc_a, acc_b, equal_var=False).pvalue <= 0.05
    return {"checkpoints (paired bootstrap, 1 run each)": checkpoint / reps,
            f"recipes (Welch over {runs} runs each)": recipe / reps, "replicates": reps, "patients": patients}


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m breakhis.bench coverage", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--reps", type=int, default=200, help="simulated test sets per size (default 200)")
    ap.add_argument("--boot", type=int, default=500, help="bootstrap resamples per interval (default 500)")
    ap.add_argument("--patients", default="8,24,40", help="test-set sizes in patients (default 8,24,40)")
    ap.add_argument("--seed", type=int, default=0, help="seed of the simulation")
    ap.add_argument("--json", action="store_true", help="print one JSON object as the last line")
    a = ap.parse_args(argv)
    try:
        sizes = [int(v) for v in a.patients.split(",") if v.strip()]
    except ValueError:
        raise UserError(f"--patients {a.patients!r}: give whole numbers, e.g. 8,24,40") from None
    if not sizes or min(sizes) < 4 or a.reps < 1 or a.boot < 10:
        raise UserError("--patients: at least 4 each; --reps at least 1; --boot at least 10")
    console = Console(stderr=a.json)
    cov = coverage(sizes, a.reps, a.boot, a.seed)
    fp = false_positives(a.reps, a.boot, a.seed)
    table = Table(title=f"Coverage of nominal 95% intervals, {a.reps} simulated test sets per size, {a.boot} resamples")
    table.add_column("figure")
    for size in sizes:
        table.add_column(f"{size} patients\npercentile", justify="right")
        table.add_column(f"{size} patients\nours", justify="right")
    for k in CI_KEYS:
        table.add_row(k, *(f"{cov['coverage'][s][m][k]:.1%}" for s in sizes for m in COMPARED))
    console.print(table)
    t2 = Table(title="False positives under a true null (same recipe, other seeds; nominal 5%)")
    t2.add_column("test")
    t2.add_column("significant", justify="right")
    for k, v in fp.items():
        if isinstance(v, float):
            t2.add_row(k, f"{v:.1%}")
    console.print(t2)
    if a.json:
        print(json.dumps(jsonable({"coverage": cov["coverage"], "truth": cov["truth"], "false_positives": fp,
                                     "reps": a.reps, "boot": a.boot})))
    return 0
