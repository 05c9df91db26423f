"""Intervals over patients on cases with known answers (Wilson by hand, scikit-learn on each resample), the
paired bootstrap, and the tests between rows of runs against scipy."""
import math

import numpy as np
import pytest
from scipy.stats import t as student_t
from scipy.stats import ttest_1samp, ttest_ind
from test_metrics import random_case

from breakhis import counts, intervals
from breakhis import metrics as M
from breakhis.errors import UserError


def test_bad_bootstrap_settings_raise():
    with pytest.raises(ValueError, match="n_boot"):
        intervals.bootstrap_ci([0, 1], [0.2, 0.8], ["a", "b"], n_boot=0)
    with pytest.raises(ValueError, match="alpha"):
        intervals.bootstrap_ci([0, 1], [0.2, 0.8], ["a", "b"], alpha=1.5)
    with pytest.raises(ValueError, match="method must be cluster or percentile, not 'bca'"):  # the old name is gone
        intervals.bootstrap_ci([0, 1], [0.2, 0.8], ["a", "b"], method="bca")


@pytest.mark.parametrize("seed", [0, 1])
def test_resampled_metrics_equal_sklearn_on_each_resample(seed):
    """The vectorised per-resample formulas equal binary_metrics on the resampled images."""
    y, p, patients = random_case(seed, n=200, n_patients=12)
    d = counts.patient_counts(y, p, patients, 0.5)
    draws = intervals.patient_draws(12, 15, seed)
    stats = counts.weighted_figures(intervals.multiplicity(draws), d, counts.CI_KEYS)
    for b, row in enumerate(draws):
        sel = np.concatenate([d.members[j] for j in row])
        ref = {**M.binary_metrics(y[sel], p[sel]), **M.patient_metrics(y[sel], p[sel], patients[sel])}
        for k in counts.IMAGE_KEYS:
            assert stats[k][b] == pytest.approx(ref[k], abs=1e-12, nan_ok=True), k
        # a patient drawn twice counts twice in the resample's mean over patients
        times = np.bincount(row, minlength=12)
        full = M.patient_metrics(y, p, patients)
        assert stats["patient_recognition_rate"][b] == pytest.approx(times @ d.fraction / 12)
        assert 0 <= stats["patient_recognition_rate"][b] <= 1 and full["n_patients"] == 12


def test_fast_intervals_equal_the_slow_path_with_sklearn():
    y, p, patients = random_case(5, n=150, n_patients=10)
    fast = intervals.bootstrap_ci(y, p, patients, n_boot=100, seed=3, method="percentile")

    def image_scalars(yy, pp):
        m = M.binary_metrics(yy, pp)
        return {k: m[k] for k in counts.IMAGE_KEYS}

    slow = intervals.bootstrap_ci(y, p, patients, n_boot=100, seed=3, fn=image_scalars)
    assert set(slow) == set(counts.IMAGE_KEYS)
    for k in counts.IMAGE_KEYS:
        assert fast[k] == pytest.approx(slow[k], abs=1e-12), k


def test_intervals_are_deterministic_for_a_seed():
    y, p, patients = random_case(1)
    assert intervals.bootstrap_ci(y, p, patients, n_boot=200, seed=4) == intervals.bootstrap_ci(y, p, patients, n_boot=200, seed=4)
    assert intervals.bootstrap_ci(y, p, patients, n_boot=200, seed=4) != intervals.bootstrap_ci(y, p, patients, n_boot=200, seed=5)


def _wilson_by_hand(k, n, z=1.959963984540054):
    centre, half = (k + z * z / 2) / (n + z * z), z * math.sqrt(k * (n - k) / n + z * z / 4) / (n + z * z)
    return centre - half, min(1.0, centre + half)


def test_perfect_classifier_interval_is_one():
    """Every resample of a perfect classifier says 1.000: the percentile interval has zero width. The default
    interval is then the Wilson interval over the patients that carry the figure (24 patients all correct
    does not prove an accuracy of 1)."""
    y, _, patients = random_case(2, n=200)
    ci = intervals.bootstrap_ci(y, y.astype(float), patients, n_boot=300, method="percentile")
    for k in ("accuracy", "auroc", "aucpr", "f1", "patient_recognition_rate", "patient_accuracy"):
        assert ci[k] == (1.0, 1.0), k
    ci = intervals.bootstrap_ci(y, y.astype(float), patients, n_boot=300)
    names = np.unique(patients)
    n_all = len(names)
    n_mal = sum((y[patients == q] == 1).any() for q in names)  # patients with a malignant image
    n_ben = sum((y[patients == q] == 0).any() for q in names)
    units = {"accuracy": n_all, "patient_recognition_rate": n_all, "patient_accuracy": n_all, "f1": n_mal,
             "auroc": min(n_mal, n_ben), "aucpr": min(n_mal, n_ben)}
    for k, n in units.items():
        if k == "accuracy":  # a ratio over patients: Student's t with P - 1 degrees of freedom
            assert ci[k] == pytest.approx(_wilson_by_hand(n, n, z=student_t.ppf(0.975, n - 1))), k
        else:
            assert ci[k] == pytest.approx(_wilson_by_hand(n, n)), k


def test_coin_flip_interval_contains_half_with_the_analytic_width():
    rng = np.random.default_rng(11)
    n_patients, per = 200, 5
    y = rng.integers(0, 2, n_patients * per)
    p = rng.random(n_patients * per)  # independent of y: each image right with probability 1/2
    patients = np.repeat([f"P{i}" for i in range(n_patients)], per)
    acc = M.binary_metrics(y, p)["accuracy"]
    lo, hi = intervals.bootstrap_ci(y, p, patients, n_boot=1000)["accuracy"]
    assert lo < 0.5 < hi
    analytic = 2 * 1.96 * math.sqrt(acc * (1 - acc) / y.size)  # images independent: clusters change nothing
    assert hi - lo == pytest.approx(analytic, rel=0.2)
    auc_lo, auc_hi = intervals.bootstrap_ci(y, p, patients, n_boot=300)["auroc"]
    assert auc_lo < 0.5 < auc_hi


def test_intervals_widen_when_images_are_grouped_into_fewer_patients():
    # 400 images; correctness is shared within each of 20 patients (all right or all wrong)
    patient_right = np.tile([True, False], 10)
    right = np.repeat(patient_right, 20)
    y = np.tile([0, 1], 200)
    p = np.where(right, y, 1 - y).astype(float)
    one_per_image = [f"I{i}" for i in range(400)]
    twenty = np.repeat([f"P{i}" for i in range(20)], 20)
    lo_i, hi_i = intervals.bootstrap_ci(y, p, one_per_image, n_boot=500)["accuracy"]
    lo_p, hi_p = intervals.bootstrap_ci(y, p, twenty, n_boot=500)["accuracy"]
    assert (hi_p - lo_p) > 3 * (hi_i - lo_i)
    assert hi_i - lo_i == pytest.approx(2 * 1.96 * math.sqrt(0.25 / 400), rel=0.2)
    assert hi_p - lo_p == pytest.approx(2 * 1.96 * math.sqrt(0.25 / 20), rel=0.25)


def test_paired_bootstrap_identical_sets_are_not_different():
    y, p, patients = random_case(3)
    for metric in ("accuracy", "auroc", "patient_recognition_rate"):
        r = intervals.paired_bootstrap(y, p, p.copy(), patients, metric=metric, n_boot=300)
        assert r["diff"] == 0 and r["ci"] == (0.0, 0.0)
        assert r["significant"] is False and r["p_value"] == 1.0 and r["metric"] == metric


def test_paired_bootstrap_perfect_beats_coin_flip():
    rng = np.random.default_rng(7)
    patients = np.repeat([f"P{i}" for i in range(40)], 6)
    y = np.repeat(rng.integers(0, 2, 40), 6)  # one class per patient, as in BreakHis
    coin = rng.random(y.size)
    r = intervals.paired_bootstrap(y, y.astype(float), coin, patients, n_boot=1000)
    assert r["diff"] == pytest.approx(1 - M.binary_metrics(y, coin)["accuracy"])
    assert r["significant"] is True and r["ci"][0] > 0.3 and r["p_value"] < 0.01
    r = intervals.paired_bootstrap(y, coin, y.astype(float), patients, metric="auroc", n_boot=300)
    assert r["diff"] < 0 and r["significant"] is True


def test_paired_bootstrap_unknown_metric_is_a_user_error():
    with pytest.raises(UserError, match="choose one of: accuracy"):
        intervals.paired_bootstrap([0, 1], [0.2, 0.8], [0.2, 0.8], ["a", "b"], metric="acc")


def test_interval_ignores_resamples_without_a_class():
    """One benign patient among five, all correct: specificity is 1 wherever it is defined."""
    patients = np.repeat(["b0", "m1", "m2", "m3", "m4"], 10)
    y = np.array([0] * 10 + [1] * 40)
    p = np.where(y == 1, 0.9, 0.1)
    ci = intervals.bootstrap_ci(y, p, patients, n_boot=300, seed=0, method="percentile")
    assert ci["specificity"] == (1.0, 1.0)
    assert ci["recall"] == (1.0, 1.0) and ci["precision"] == (1.0, 1.0)
    ci = intervals.bootstrap_ci(y, p, patients, n_boot=300, seed=0)
    # one benign patient is one vote, not a certainty, and no interval at all: the old rule gave Wilson's [0.21, 1]
    for k in ("specificity", "balanced_accuracy", "auroc", "aucpr"):
        assert all(math.isnan(v) for v in ci[k]), k
    lo, hi = _posterior_rate_reference(np.full(4, 10), np.full(4, 10))  # four malignant patients, 10 of 10 each
    assert ci["recall"][1] == 1.0 or ci["recall"][1] == pytest.approx(hi, abs=0.01)
    assert ci["recall"][0] == pytest.approx(lo, abs=0.015)


def _posterior_rate_reference(k, n, samples=50_000, seed=5):
    """The 95% posterior interval of a class's population rate E[expit(theta)], theta ~ N(beta, sigma^2), by
    importance sampling from the priors (beta ~ N(0, 4^2), sigma ~ half-N(0, 3^2)), each patient's binomial
    likelihood and the rate integrated by the trapezoid rule over theta in [-40, 50] (not the module's grids)."""
    from scipy.special import expit, log_expit
    from scipy.stats import norm as normal
    k, n = np.asarray(k, dtype=float), np.asarray(n, dtype=float)
    rng = np.random.default_rng(seed)
    beta, sigma = rng.normal(0, 4, samples), np.maximum(np.abs(rng.normal(0, 3, samples)), 0.1)
    theta = np.linspace(-40, 50, 1801)
    ll = k[:, None] * log_expit(theta)[None] + (n - k)[:, None] * log_expit(-theta)[None]  # (P, G)
    rows, times = np.unique(ll, axis=0, return_counts=True)  # patients with equal counts share a likelihood
    lik = np.exp(rows - rows.max(axis=1, keepdims=True))
    log_w, rate = np.zeros(samples), np.zeros(samples)
    for c in range(0, samples, 2000):
        dens = normal.pdf(theta[None], beta[c:c + 2000, None], sigma[c:c + 2000, None])
        dens /= dens.sum(axis=1, keepdims=True)
        log_w[c:c + 2000] = (times[:, None] * np.log(np.maximum(lik @ dens.T, 1e-300))).sum(axis=0)
        rate[c:c + 2000] = dens @ expit(theta)
    wt = np.exp(log_w - log_w.max())
    order = np.argsort(rate)
    cdf = np.cumsum(wt[order]) / wt.sum()
    return tuple(float(rate[order][np.searchsorted(cdf, q)]) for q in (0.025, 0.975))


@pytest.mark.slow
def test_random_effects_rate_matches_an_independent_posterior():
    """The grid posterior of random_effects.rate_draws against importance sampling and the trapezoid rule
    on a spread class (hits 9/10, 20/20, 3/12, 15/15, 7/8) and a near-perfect one."""
    from breakhis import random_effects
    for k, n in (([9, 20, 3, 15, 7], [10, 20, 12, 15, 8]), ([30, 29, 40, 12, 25, 33], [30, 30, 40, 12, 25, 33])):
        draws = random_effects.rate_draws(np.array(k), np.array(n), np.random.default_rng(0), draws=40_000)
        lo, hi = _posterior_rate_reference(k, n)
        assert np.percentile(draws, 2.5) == pytest.approx(lo, abs=0.012)
        assert np.percentile(draws, 97.5) == pytest.approx(hi, abs=0.012)


@pytest.mark.slow
def test_concentrated_errors_widen_the_interval_downward():
    """24 patients of one good model, 7 benign: the errors sit in two malignant patients (the rest perfect).
    The interval of recall must reach well below what the perfect patients alone suggest, and hold the
    pooled value, as an independent computation of the model's posterior does."""
    sizes = np.r_[[40] * 7, [60] * 17]
    y = np.repeat(np.r_[[0] * 7, [1] * 17], sizes)
    patients = np.repeat([f"P{i}" for i in range(24)], sizes)
    p = np.where(y == 1, 0.9, 0.1)
    for name in ("P7", "P8"):  # 30 of the 60 images of each wrong
        p[np.flatnonzero(patients == name)[:30]] = 0.2
    ci = intervals.bootstrap_ci(y, p, patients, n_boot=500)
    recall = 1 - 60 / (17 * 60)
    assert ci["recall"][0] < recall < ci["recall"][1]
    lo, hi = _posterior_rate_reference([60 - 30, 60 - 30] + [60] * 15, [60] * 17)
    assert ci["recall"] == pytest.approx((lo, hi), abs=0.015)


def test_cluster_wilson_by_hand():
    """Specificity of 3 benign patients with 10 images each, 9, 6 and 10 correct: the ratio 25/30, its
    cluster-robust variance, the effective sample size, and Wilson with Student's t at 2 degrees of freedom."""
    num, den = np.array([9.0, 6.0, 10.0]), np.array([10.0, 10.0, 10.0])
    p = 25 / 30
    var = 3 / 2 * ((9 - 10 * p) ** 2 + (6 - 10 * p) ** 2 + (10 - 10 * p) ** 2) / 30 ** 2
    n = p * (1 - p) / var
    z = student_t.ppf(0.975, 2)
    centre, half = (p * n + z * z / 2) / (n + z * z), z * math.sqrt(p * n * (1 - p) + z * z / 4) / (n + z * z)
    assert intervals.cluster_wilson(num, den, 0.05) == pytest.approx((centre - half, centre + half))


def test_breakdowns_and_the_subtype_task_have_intervals():
    """Every figure has an interval: per-magnification groups (over that group's patients) and the
    8-class task (accuracy as a cluster-adjusted Wilson interval, by hand)."""
    y, p, patients = random_case(5, n=400)
    mags = np.array([40, 100] * 200)
    by = M.breakdown(y, p, mags, patients=patients, n_boot=100, seed=1)
    for v in (40, 100):
        m = mags == v
        assert by[v]["ci"] == intervals.bootstrap_ci(y[m], p[m], patients[m], n_boot=100, seed=1)
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 8, 200)
    pat = np.array([f"P{i % 20}" for i in range(200)])
    probs = rng.dirichlet(np.ones(8), 200)
    probs[np.arange(200), labels] += 0.3 * rng.random(200)
    ci = intervals.multiclass_ci(labels, probs, pat, n_boot=100)
    right = probs.argmax(1) == labels
    num = np.array([right[pat == q].sum() for q in np.unique(pat)], float)
    den = np.array([(pat == q).sum() for q in np.unique(pat)], float)
    est = num.sum() / den.sum()
    var = 20 / 19 * ((num - est * den) ** 2).sum() / den.sum() ** 2
    n, z = min(den.sum(), est * (1 - est) / var), student_t.ppf(0.975, 19)
    centre, half = (est * n + z * z / 2) / (n + z * z), z * math.sqrt(est * n * (1 - est) + z * z / 4) / (n + z * z)
    assert ci["accuracy"] == pytest.approx((centre - half, centre + half))
    for k in ("balanced_accuracy", "macro_f1"):
        lo, hi = ci[k]
        assert 0 <= lo < hi <= 1


# ---------------------------------------------------------------- tests between rows of runs


def test_welch_equals_scipy():
    rng = np.random.default_rng(0)
    xa, xb = rng.normal(0.90, 0.02, 3), rng.normal(0.87, 0.03, 4)
    v = intervals.welch("accuracy", list(xa), list(xb), "recipes")
    ref = ttest_ind(xa, xb, equal_var=False)
    assert v["diff"] == pytest.approx(xa.mean() - xb.mean())
    assert v["p_value"] == pytest.approx(ref.pvalue)
    assert v["ci"] == pytest.approx(tuple(ref.confidence_interval(0.95)))
    assert v["significant"] == bool(ref.pvalue <= 0.05) and v["metric"] == "accuracy" and v["test"] == "recipes"


def test_t_verdict_without_variance():
    """Every run of both rows gives the same figure (patient accuracy 23/24 three times against 22/24 three
    times): the runs show no run-to-run variance, which is no evidence of a difference. The old rule said
    p = 0, "significant"; now no difference is p 1, any other difference no verdict (p nan)."""
    same = intervals.welch("f1", [0.8, 0.8], [0.8, 0.8])
    assert same["p_value"] == 1.0 and same["significant"] is False
    apart = intervals.welch("patient_accuracy", [23 / 24] * 3, [22 / 24] * 3)
    assert math.isnan(apart["p_value"]) and apart["significant"] is False
    assert intervals.holm([apart["p_value"], 0.01]) == [pytest.approx(math.nan, nan_ok=True), 0.02]


def test_nadeau_bengio_is_the_paired_t_with_a_wider_variance():
    d = np.array([0.02, 0.01, 0.035, -0.005, 0.015])
    ref = ttest_1samp(d, 0.0)  # scipy's paired t over folds: variance / k
    for ratio in (0.0, math.nan):  # no correction: scipy's test exactly
        v = intervals.nadeau_bengio("auroc", d, ratio)
        assert v["p_value"] == pytest.approx(ref.pvalue) and v["ci"] == pytest.approx(tuple(ref.confidence_interval(0.95)))
    ratio = 0.43  # test / train images: variance * (1/k + 0.43) instead of variance / k
    t = d.mean() / math.sqrt(d.var(ddof=1) * (1 / d.size + ratio))
    v = intervals.nadeau_bengio("auroc", d, ratio)
    assert v["diff"] == pytest.approx(d.mean()) and v["p_value"] == pytest.approx(2 * student_t.sf(abs(t), d.size - 1))
    assert v["p_value"] > ref.pvalue
    one = intervals.nadeau_bengio("auroc", d[:1], ratio)
    assert math.isnan(one["p_value"]) and one["significant"] is False and one["diff"] == pytest.approx(d[0])


def fold_test_by_hand(pairs, test_train, n_boot, seed):
    """intervals.fold_test's rule written out with loops: the joint patient draws default_rng(seed).integers(0, U,
    (B, U)) over the sorted patient names, each run's accuracy at those weights, the patient variance of the mean
    fold difference, the across-fold variance of each draw's deviations, the model part scaled for folds whose
    training sides overlap by f = 1 / (1 + test_train), Satterthwaite's df and scipy's t. -> (diff, p, half-width)"""
    names = sorted({str(q) for pair in pairs for run in pair for q in run[2]})
    u, k = len(names), len(pairs)
    w = np.zeros((n_boot, u))
    draws = np.random.default_rng(seed).integers(0, u, (n_boot, u))
    for b in range(n_boot):
        np.add.at(w[b], draws[b], 1)

    def acc(run, weights):
        yy, p, pats, t = run
        pats = pats.astype(str)
        right = np.array([((p[pats == q] >= t) == (yy[pats == q] == 1)).sum() for q in names])
        size = np.array([(pats == q).sum() for q in names])
        return weights @ right / (weights @ size)

    d = np.array([acc(a, np.ones(u)) - acc(b, np.ones(u)) for a, b in pairs])
    dd = np.array([acc(a, w) - acc(b, w) for a, b in pairs])  # (k, B)
    v_pat = dd.mean(0).var(ddof=1)
    dev = dd - dd.mean(1, keepdims=True)
    within = np.mean([dev[:, b].var(ddof=1) for b in range(n_boot)])
    f = 1 / (1 + test_train)
    v_model = max(0.0, d.var(ddof=1) - within) * (1 / k + (1 - 1 / k) * f) / (1 - f)
    var = v_pat + v_model
    df = var ** 2 / (v_pat ** 2 / (u - 1) + v_model ** 2 / (k - 1))
    se = math.sqrt(var)
    return d.mean(), 2 * student_t.sf(abs(d.mean()) / se, df), student_t.ppf(0.975, df) * se


def folds_case(seed: int, k: int = 4, gain: float = 0.0):
    """k overlapping test sides of 10-14 of 20 patients (string ids), two recipes' runs on each."""
    rng = np.random.default_rng(seed)
    names = np.array([f"P{i:02d}" for i in range(20)])
    sizes, cls = rng.integers(3, 20, 20), np.r_[[0] * 6, [1] * 14]
    pairs = []
    for _ in range(k):
        on = np.sort(rng.choice(20, rng.integers(10, 15), replace=False))
        pats, y = np.repeat(names[on], sizes[on]), np.repeat(cls[on], sizes[on])
        pairs.append(tuple((y, np.clip(0.3 + 0.4 * y + rng.normal(g, 0.3, y.size), 0, 1), pats, 0.5)
                           for g in (gain, 0.0)))
    return pairs


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_fold_test_by_hand(seed):
    pairs = folds_case(seed)
    got = intervals.fold_test("accuracy", pairs, 0.42, n_boot=300, seed=seed + 3)
    diff, p, half = fold_test_by_hand(pairs, 0.42, 300, seed + 3)
    assert got["diff"] == pytest.approx(diff)
    assert got["p_value"] == pytest.approx(p)
    assert got["ci"] == pytest.approx((diff - half, diff + half))


def test_fold_test_counts_what_nadeau_bengio_counts_twice():
    """Two recipes whose fold models differ by per-image noise only (no shift of a fold's model as a whole): the
    spread of the fold differences is mostly the test patients each fold scores, which Nadeau-Bengio scales up
    by (1/k + n_test/n_train) over 4 df; fold_test measures the patients jointly, and its interval is narrower."""
    pairs = folds_case(5, k=5, gain=0.03)
    ours = intervals.fold_test("accuracy", pairs, 0.42, n_boot=400, seed=0)
    d = [((a[1] >= 0.5) == (a[0] == 1)).mean() - ((b[1] >= 0.5) == (b[0] == 1)).mean() for a, b in pairs]
    nb = intervals.nadeau_bengio("accuracy", d, 0.42)
    assert ours["diff"] == pytest.approx(nb["diff"])
    assert ours["ci"][1] - ours["ci"][0] < nb["ci"][1] - nb["ci"][0]
    one = intervals.fold_test("accuracy", pairs[:1], 0.42)
    assert math.isnan(one["p_value"]) and one["significant"] is False


@pytest.mark.parametrize("p", [[0.01, 0.04, 0.03, 0.5], [0.2, 0.01, 0.2], [0.3, 0.6, 0.9], [0.001]])
def test_holm_equals_the_textbook_step_down(p):
    """adjusted p of the i-th smallest: max over j <= i of min(1, (m - j + 1) p_(j)), in the given order."""
    p = np.array(p)
    order = np.argsort(p, kind="stable")
    steps = np.minimum(1.0, np.maximum.accumulate((p.size - np.arange(p.size)) * p[order]))
    ref = np.empty(p.size)
    ref[order] = steps
    assert intervals.holm(list(p)) == pytest.approx(list(ref))


def test_holm_leaves_nan_as_nan_and_counts_it():
    adjusted = intervals.holm([math.nan, 0.02, 0.3])
    assert math.isnan(adjusted[0]) and adjusted[1:] == pytest.approx([3 * 0.02, 2 * 0.3])



def test_recipe_test_by_hand():
    """Two rows of three runs on one test set of 12 patients. By hand with numpy: the patient draws are
    default_rng(seed).integers(0, P, (B, P)) over the sorted patients (intervals.patient_draws' documented
    rule), each run's accuracy at those weights, the variance of the rows' mean difference over the draws
    plus each row's run variance over its runs, Satterthwaite's df, and scipy's t."""
    rng = np.random.default_rng(4)
    sizes = rng.integers(5, 30, 12)
    names = np.array([f"P{i:02d}" for i in range(12)])
    patients = np.repeat(names, sizes)
    y = np.repeat(rng.integers(0, 2, 12), sizes)
    rows = [[(y, rng.random(y.size) * 0.6 + 0.4 * y, patients, 0.5) for _ in range(3)] for _ in range(2)]
    got = intervals.recipe_test("accuracy", rows[0], rows[1], n_boot=400, seed=9)

    w = np.zeros((400, 12))
    draws = np.random.default_rng(9).integers(0, 12, (400, 12))
    for b in range(400):
        np.add.at(w[b], draws[b], 1)
    def correct(run):
        yy, p, pats, t = run
        return np.array([((p[pats == q] >= t) == (yy[pats == q] == 1)).sum() for q in names])
    def acc(run, weights):
        return weights @ correct(run) / (weights @ sizes)
    x = [np.array([acc(r, np.ones(12)) for r in row]) for row in rows]
    boot = np.mean([acc(r, w) for r in rows[0]], axis=0) - np.mean([acc(r, w) for r in rows[1]], axis=0)
    parts = [(boot.var(ddof=1), 11), (x[0].var(ddof=1) / 3, 2), (x[1].var(ddof=1) / 3, 2)]
    var = sum(v for v, _ in parts)
    df = var ** 2 / sum(v ** 2 / k for v, k in parts)
    diff = x[0].mean() - x[1].mean()
    assert got["diff"] == pytest.approx(diff)
    assert got["p_value"] == pytest.approx(2 * student_t.sf(abs(diff) / math.sqrt(var), df))
    assert got["ci"][1] - got["ci"][0] == pytest.approx(2 * student_t.ppf(0.975, df) * math.sqrt(var))


def test_aucpr_interval_never_below_the_worst_ranking():
    """7 patients (3 benign) of a weak model: the logit-t interval of AUCPR reached below what the worst
    ranking of these images can score (the old rule); the floor is checked against scikit-learn."""
    from sklearn.metrics import average_precision_score
    rng = np.random.default_rng(0)
    sizes = rng.integers(3, 15, 7)
    y = np.repeat(np.r_[[0] * 3, [1] * 4], sizes)
    patients = np.repeat(np.arange(7), sizes)
    p = np.clip(rng.normal(0.5 + 0.05 * (y - 0.5) + np.repeat(rng.normal(0, 0.3, 7), sizes), 0.2), 0, 1)
    ranks = np.argsort(np.argsort(rng.random(y.size))) / y.size  # distinct scores: no ties for sklearn to group
    worst = average_precision_score(y, np.where(y == 1, ranks, 1 + ranks))  # every malignant image below every benign
    assert intervals.worst_average_precision((y == 1).sum(), (y == 0).sum()) == pytest.approx(worst)
    lo, hi = intervals.bootstrap_ci(y, p, patients, n_boot=300, seed=0)["aucpr"]
    assert lo >= worst - 1e-12 and hi > lo
    # the rule before the floor: logit-t from the same draws, which fell below it
    d = counts.patient_counts(y, p, patients, 0.5)
    w = intervals.multiplicity(intervals.patient_draws(7, 300, 0))
    boots = counts.weighted_figures(w, d, ["aucpr"])["aucpr"]
    jack = counts.weighted_figures(np.ones((7, 7)) - np.eye(7), d, ["aucpr"])["aucpr"]
    old_lo, _ = intervals.smooth_interval(average_precision_score(y, p), boots, jack, 3, 7, 0.05)
    assert old_lo < worst
