"""Metrics against scikit-learn and hand-computed values; intervals on cases with known answers."""
import json
import math

import numpy as np
import pytest
from scipy.stats import t as student_t
from sklearn import metrics as skm

from breakhis import metrics as M
from breakhis.errors import UserError


def random_case(seed, n=300, n_patients=20, ties=True):
    """Labels, probabilities correlated with them (rounded: tied scores), patient ids."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 2, n)
    p = np.clip(0.35 * y + 0.65 * rng.random(n), 0, 1)
    if ties:
        p = np.round(p, 2)
    patients = np.array([f"P{k:02d}" for k in rng.integers(0, n_patients, n)])
    return y, p, patients


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
@pytest.mark.parametrize("threshold", [0.3, 0.5])
def test_binary_metrics_equal_sklearn(seed, threshold):
    y, p, _ = random_case(seed)
    m = M.binary_metrics(list(y), list(p), threshold)  # lists are accepted too
    pred = (p >= threshold).astype(int)
    assert m["accuracy"] == pytest.approx(skm.accuracy_score(y, pred))
    assert m["balanced_accuracy"] == pytest.approx(skm.balanced_accuracy_score(y, pred))
    assert m["precision"] == pytest.approx(skm.precision_score(y, pred))
    assert m["recall"] == pytest.approx(skm.recall_score(y, pred))
    assert m["f1"] == pytest.approx(skm.f1_score(y, pred))
    assert m["auroc"] == pytest.approx(skm.roc_auc_score(y, p))
    assert m["aucpr"] == pytest.approx(skm.average_precision_score(y, p))
    assert m["confusion"] == skm.confusion_matrix(y, pred).tolist()
    assert m["n"] == len(y) and m["threshold"] == threshold


def test_specificity_and_confusion_by_hand():
    y = [0, 0, 0, 0, 1, 1, 1]
    p = [0.1, 0.6, 0.7, 0.2, 0.9, 0.4, 0.5]  # negatives: 2 right, 2 wrong; positives: 2 right (0.5 counts), 1 wrong
    m = M.binary_metrics(y, p)
    assert m["confusion"] == [[2, 2], [1, 2]]
    assert m["specificity"] == pytest.approx(2 / 4)
    assert m["recall"] == pytest.approx(2 / 3)
    assert m["balanced_accuracy"] == pytest.approx((2 / 4 + 2 / 3) / 2)


@pytest.mark.parametrize("label", [0, 1])
def test_one_class_gives_nan_areas_not_a_crash(label):
    y = [label] * 5
    p = [0.1, 0.4, 0.6, 0.8, 0.9]
    m = M.binary_metrics(y, p)
    assert math.isnan(m["auroc"]) and math.isnan(m["aucpr"])
    assert m["accuracy"] == pytest.approx(0.6 if label else 0.4)
    assert m["balanced_accuracy"] == pytest.approx(m["accuracy"])  # only the present class counts
    s = M.summarize(y, p, ["a", "a", "b", "b", "c"], n_boot=50)
    assert s["auroc"] is None and s["ci"]["auroc"] == [None, None]
    json.dumps(s, allow_nan=False)


def test_bad_inputs_raise():
    with pytest.raises(ValueError, match="same length"):
        M.binary_metrics([0, 1], [0.5])
    with pytest.raises(ValueError, match="0 .benign."):
        M.binary_metrics([0, 2], [0.5, 0.5])
    with pytest.raises(ValueError, match="probabilities"):
        M.binary_metrics([0, 1], [0.5, 1.5])
    with pytest.raises(ValueError, match="probabilities"):
        M.binary_metrics([0, 1], [0.5, float("nan")])
    with pytest.raises(ValueError, match="no samples"):
        M.binary_metrics([], [])
    with pytest.raises(ValueError, match="one entry per image"):
        M.patient_metrics([0, 1], [0.5, 0.5], ["a"])
    with pytest.raises(ValueError, match="n_boot"):
        M.bootstrap_ci([0, 1], [0.2, 0.8], ["a", "b"], n_boot=0)
    with pytest.raises(ValueError, match="alpha"):
        M.bootstrap_ci([0, 1], [0.2, 0.8], ["a", "b"], alpha=1.5)
    with pytest.raises(ValueError, match="one entry per image"):
        M.breakdown([0, 1], [0.2, 0.8], [40])


def test_patient_recognition_rate_by_hand():
    # A: 2 of 4 right, B: 3 of 3 right, C: 0 of 1 right
    y = [1, 1, 1, 1, 0, 0, 0, 1]
    p = [0.9, 0.8, 0.2, 0.1, 0.1, 0.2, 0.3, 0.4]
    patients = ["A"] * 4 + ["B"] * 3 + ["C"]
    m = M.patient_metrics(y, p, patients)
    assert m["patient_recognition_rate"] == pytest.approx((0.5 + 1 + 0) / 3)
    # mean probabilities: A 0.5 -> malignant (right), B 0.2 -> benign (right), C 0.4 -> benign (wrong)
    assert m["patient_accuracy"] == pytest.approx(2 / 3)
    assert m["n_patients"] == 3


def test_multiclass_metrics_equal_sklearn():
    rng = np.random.default_rng(0)
    names = [f"c{i}" for i in range(8)]
    y = rng.integers(0, 7, 200)  # class 7 absent from y
    probs = rng.random((200, 8)) + 2.0 * np.eye(8)[y]
    m = M.multiclass_metrics(y, probs, names)
    pred = probs.argmax(1)
    assert m["accuracy"] == pytest.approx(skm.accuracy_score(y, pred))
    assert m["macro_f1"] == pytest.approx(skm.f1_score(y, pred, average="macro"))
    assert m["confusion"] == skm.confusion_matrix(y, pred, labels=range(8)).tolist()
    assert sum(c["support"] for c in m["per_class"].values()) == 200
    assert m["per_class"]["c7"]["support"] == 0
    assert m["per_class"]["c3"]["recall"] == pytest.approx(skm.recall_score(y, pred, labels=[3], average=None)[0])
    with pytest.raises(ValueError, match="probs"):
        M.multiclass_metrics(y, probs[:, :7], names)
    with pytest.raises(ValueError, match="class indices"):
        M.multiclass_metrics(np.full(200, 9), probs, names)


@pytest.mark.parametrize("seed", [0, 1])
def test_resampled_metrics_equal_sklearn_on_each_resample(seed):
    """The vectorised per-resample formulas equal binary_metrics on the resampled images."""
    y, p, patients = random_case(seed, n=200, n_patients=12)
    d = M._prepare(y, p, patients, 0.5)
    draws = M._draws(12, 15, seed)
    stats = M._stats(M._multiplicity(draws), d, M.CI_KEYS)
    for b, row in enumerate(draws):
        sel = np.concatenate([d.members[j] for j in row])
        ref = {**M.binary_metrics(y[sel], p[sel]), **M.patient_metrics(y[sel], p[sel], patients[sel])}
        for k in M.IMAGE_KEYS:
            assert stats[k][b] == pytest.approx(ref[k], abs=1e-12, nan_ok=True), k
        # a patient drawn twice counts twice in the resample's mean over patients
        counts = np.bincount(row, minlength=12)
        full = M.patient_metrics(y, p, patients)
        assert stats["patient_recognition_rate"][b] == pytest.approx(counts @ d.fraction / 12)
        assert 0 <= stats["patient_recognition_rate"][b] <= 1 and full["n_patients"] == 12


def test_fast_intervals_equal_the_slow_path_with_sklearn():
    y, p, patients = random_case(5, n=150, n_patients=10)
    fast = M.bootstrap_ci(y, p, patients, n_boot=100, seed=3, method="percentile")

    def image_scalars(yy, pp):
        m = M.binary_metrics(yy, pp)
        return {k: m[k] for k in M.IMAGE_KEYS}

    slow = M.bootstrap_ci(y, p, patients, n_boot=100, seed=3, fn=image_scalars)
    assert set(slow) == set(M.IMAGE_KEYS)
    for k in M.IMAGE_KEYS:
        assert fast[k] == pytest.approx(slow[k], abs=1e-12), k


def test_intervals_are_deterministic_for_a_seed():
    y, p, patients = random_case(1)
    assert M.bootstrap_ci(y, p, patients, n_boot=200, seed=4) == M.bootstrap_ci(y, p, patients, n_boot=200, seed=4)
    assert M.bootstrap_ci(y, p, patients, n_boot=200, seed=4) != M.bootstrap_ci(y, p, patients, n_boot=200, seed=5)


def _wilson_by_hand(k, n, z=1.959963984540054):
    centre, half = (k + z * z / 2) / (n + z * z), z * math.sqrt(k * (n - k) / n + z * z / 4) / (n + z * z)
    return centre - half, min(1.0, centre + half)


def test_perfect_classifier_interval_is_one():
    """Every resample of a perfect classifier says 1.000: the percentile interval has zero width. The default
    interval is then the Wilson interval over the patients that carry the figure (24 patients all correct
    does not prove an accuracy of 1)."""
    y, _, patients = random_case(2, n=200)
    ci = M.bootstrap_ci(y, y.astype(float), patients, n_boot=300, method="percentile")
    for k in ("accuracy", "auroc", "aucpr", "f1", "patient_recognition_rate", "patient_accuracy"):
        assert ci[k] == (1.0, 1.0), k
    ci = M.bootstrap_ci(y, y.astype(float), patients, n_boot=300)
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
    lo, hi = M.bootstrap_ci(y, p, patients, n_boot=1000)["accuracy"]
    assert lo < 0.5 < hi
    analytic = 2 * 1.96 * math.sqrt(acc * (1 - acc) / y.size)  # images independent: clusters change nothing
    assert hi - lo == pytest.approx(analytic, rel=0.2)
    auc_lo, auc_hi = M.bootstrap_ci(y, p, patients, n_boot=300)["auroc"]
    assert auc_lo < 0.5 < auc_hi


def test_intervals_widen_when_images_are_grouped_into_fewer_patients():
    # 400 images; correctness is shared within each of 20 patients (all right or all wrong)
    patient_right = np.tile([True, False], 10)
    right = np.repeat(patient_right, 20)
    y = np.tile([0, 1], 200)
    p = np.where(right, y, 1 - y).astype(float)
    one_per_image = [f"I{i}" for i in range(400)]
    twenty = np.repeat([f"P{i}" for i in range(20)], 20)
    lo_i, hi_i = M.bootstrap_ci(y, p, one_per_image, n_boot=500)["accuracy"]
    lo_p, hi_p = M.bootstrap_ci(y, p, twenty, n_boot=500)["accuracy"]
    assert (hi_p - lo_p) > 3 * (hi_i - lo_i)
    assert hi_i - lo_i == pytest.approx(2 * 1.96 * math.sqrt(0.25 / 400), rel=0.2)
    assert hi_p - lo_p == pytest.approx(2 * 1.96 * math.sqrt(0.25 / 20), rel=0.25)


def test_paired_bootstrap_identical_sets_are_not_different():
    y, p, patients = random_case(3)
    for metric in ("accuracy", "auroc", "patient_recognition_rate"):
        r = M.paired_bootstrap(y, p, p.copy(), patients, metric=metric, n_boot=300)
        assert r["diff"] == 0 and r["ci"] == (0.0, 0.0)
        assert r["significant"] is False and r["p_value"] == 1.0 and r["metric"] == metric


def test_paired_bootstrap_perfect_beats_coin_flip():
    rng = np.random.default_rng(7)
    patients = np.repeat([f"P{i}" for i in range(40)], 6)
    y = np.repeat(rng.integers(0, 2, 40), 6)  # one class per patient, as in BreakHis
    coin = rng.random(y.size)
    r = M.paired_bootstrap(y, y.astype(float), coin, patients, n_boot=1000)
    assert r["diff"] == pytest.approx(1 - M.binary_metrics(y, coin)["accuracy"])
    assert r["significant"] is True and r["ci"][0] > 0.3 and r["p_value"] < 0.01
    r = M.paired_bootstrap(y, coin, y.astype(float), patients, metric="auroc", n_boot=300)
    assert r["diff"] < 0 and r["significant"] is True


def test_paired_bootstrap_unknown_metric_is_a_user_error():
    with pytest.raises(UserError, match="choose one of: accuracy"):
        M.paired_bootstrap([0, 1], [0.2, 0.8], [0.2, 0.8], ["a", "b"], metric="acc")


def youden_by_brute_force(y, p):
    best = max(np.unique(p), key=lambda t: (lambda m: m["recall"] + m["specificity"])(M.binary_metrics(y, p, t)))
    m = M.binary_metrics(y, p, best)
    return m["recall"] + m["specificity"] - 1


def test_choose_threshold_youden():
    y = [0, 0, 0, 0, 1, 1, 1, 1]
    p = [0.1, 0.2, 0.3, 0.35, 0.4, 0.7, 0.8, 0.9]  # separable: the optimum is the lowest positive score
    assert M.choose_threshold(y, p, "youden") == pytest.approx(0.4)
    y, p, _ = random_case(4)
    t = M.choose_threshold(y, p, " Youden ")
    m = M.binary_metrics(y, p, t)
    assert m["recall"] + m["specificity"] - 1 == pytest.approx(youden_by_brute_force(y, p))


@pytest.mark.parametrize("target", [0.95, 0.8, 1.0])
def test_choose_threshold_recall(target):
    y, p, _ = random_case(6, ties=False)
    t = M.choose_threshold(y, p, f"recall={target}")
    assert M.binary_metrics(y, p, t)["recall"] >= target
    higher = p[p > t]
    assert higher.size == 0 or M.binary_metrics(y, p, higher.min())["recall"] < target  # the highest such threshold


def test_choose_threshold_fixed_values():
    assert M.choose_threshold([0, 1], [0.2, 0.8], "0.5") == 0.5
    assert M.choose_threshold([0, 1], [0.2, 0.8], 0.3) == 0.3
    assert M.choose_threshold([0, 1], [0.2, 0.8], "1") == 1.0
    assert M.choose_threshold([], [], "0.7") == 0.7  # a fixed value needs no validation data


@pytest.mark.parametrize("rule", ["", "foo", "1.5", "-0.1", "nan", "inf", "recall=", "recall=0", "recall=1.2", "recall=x"])
def test_choose_threshold_bad_rules_list_the_forms(rule):
    with pytest.raises(UserError, match="youden"):
        M.choose_threshold([0, 1], [0.2, 0.8], rule)


def test_choose_threshold_needs_the_classes_it_uses():
    with pytest.raises(UserError, match="both classes"):
        M.choose_threshold([1, 1], [0.2, 0.8], "youden")
    with pytest.raises(UserError, match="malignant images"):
        M.choose_threshold([0, 0], [0.2, 0.8], "recall=0.9")


def test_breakdown_counts_sum_to_totals():
    y, p, patients = random_case(8)
    mags = np.random.default_rng(8).choice([40, 100, 200, 400], y.size)
    total = M.binary_metrics(y, p)
    for keys in (mags, patients):
        by = M.breakdown(y, p, keys, patients=patients)
        assert list(by) == sorted(by)
        assert sum(m["n"] for m in by.values()) == total["n"]
        assert (np.sum([m["confusion"] for m in by.values()], axis=0) == total["confusion"]).all()
        assert sum(m["n_patients"] for m in by.values()) >= len(set(patients))
    by_mag = M.breakdown(y, p, mags)
    assert list(by_mag) == [40, 100, 200, 400] and isinstance(list(by_mag)[0], int)
    sel = mags == 200
    assert by_mag[200]["accuracy"] == pytest.approx(M.binary_metrics(y[sel], p[sel])["accuracy"])


def test_summarize_is_json_and_complete():
    y, p, patients = random_case(9)
    mags = np.random.default_rng(9).choice(["40", "100"], y.size)
    s = M.summarize(y, p, patients, n_boot=100, groups={"magnification": mags})
    text = json.dumps(s, allow_nan=False)
    back = json.loads(text)
    assert set(M.CI_KEYS) <= set(back) and set(back["ci"]) == set(M.CI_KEYS)
    assert back["n_patients"] == 20 and back["confusion"] == M.binary_metrics(y, p)["confusion"]
    for k, (lo, hi) in back["ci"].items():
        assert lo <= back[k] + 1e-9 or k == "patient_accuracy"
        assert lo <= hi
    assert set(back["by"]["magnification"]) == {"40", "100"}
    assert "ci" not in M.summarize(y, p, patients, n_boot=0)


def test_mean_std_across_seeds():
    runs = [{"test": {"accuracy": 0.8, "auroc": None}}, {"test": {"accuracy": 0.9, "auroc": 0.95}},
            {"test": {"accuracy": 0.85, "auroc": float("nan")}}]
    r = M.mean_std(runs, ["test.accuracy", "test.auroc", "test.missing"])
    assert r["test.accuracy"]["mean"] == pytest.approx(0.85)
    assert r["test.accuracy"]["std"] == pytest.approx(np.std([0.8, 0.9, 0.85], ddof=1))
    assert r["test.accuracy"]["n"] == 3
    assert r["test.auroc"]["mean"] == 0.95 and math.isnan(r["test.auroc"]["std"]) and r["test.auroc"]["n"] == 1
    assert math.isnan(r["test.missing"]["mean"]) and r["test.missing"]["n"] == 0
    flat = M.mean_std([{"f1": 0.5}, {"f1": 0.7}], ["f1"])
    assert flat["f1"]["mean"] == pytest.approx(0.6) and flat["f1"]["std"] == pytest.approx(math.sqrt(0.02))


def test_interval_ignores_resamples_without_a_class():
    """One benign patient among five, all correct: specificity is 1 wherever it is defined."""
    from breakhis.metrics import bootstrap_ci

    patients = np.repeat(["b0", "m1", "m2", "m3", "m4"], 10)
    y = np.array([0] * 10 + [1] * 40)
    p = np.where(y == 1, 0.9, 0.1)
    ci = bootstrap_ci(y, p, patients, n_boot=300, seed=0, method="percentile")
    assert ci["specificity"] == (1.0, 1.0)
    assert ci["recall"] == (1.0, 1.0) and ci["precision"] == (1.0, 1.0)
    ci = bootstrap_ci(y, p, patients, n_boot=300, seed=0)  # one benign patient is one vote, not a certainty
    assert ci["specificity"] == pytest.approx(_wilson_by_hand(1, 1))
    assert ci["recall"] == pytest.approx(_wilson_by_hand(4, 4, z=student_t.ppf(0.975, 3)))


def test_undefined_figures_are_nan_not_zero():
    """A group with only benign images has no recall (hence no F1); one with only malignant images no
    specificity; no malignant calls, no precision. They were shown as 0.000."""
    y = np.array([0, 0, 0, 1, 1, 1])
    p = np.array([0.1, 0.7, 0.2, 0.9, 0.8, 0.3])
    by = M.breakdown(y, p, ["benign-only"] * 3 + ["malignant-only"] * 3, patients=list("aabcdd"))
    benign, malignant = by["benign-only"], by["malignant-only"]
    assert math.isnan(benign["recall"]) and math.isnan(benign["f1"]) and benign["precision"] == 0.0
    assert benign["specificity"] == pytest.approx(2 / 3)  # by hand: 2 of 3 benign images below 0.5
    assert math.isnan(malignant["specificity"]) and malignant["recall"] == pytest.approx(2 / 3)
    none_called = M.binary_metrics(np.array([0, 1]), np.array([0.1, 0.2]))
    assert math.isnan(none_called["precision"]) and none_called["recall"] == 0.0
    assert M.jsonable(benign)["recall"] is None  # null in JSON, '–' in tables


def test_cluster_wilson_by_hand():
    """Specificity of 3 benign patients with 10 images each, 9, 6 and 10 correct: the ratio 25/30, its
    cluster-robust variance, the effective sample size, and Wilson with Student's t at 2 degrees of freedom."""
    from scipy.stats import t as student_t

    num, den = np.array([9.0, 6.0, 10.0]), np.array([10.0, 10.0, 10.0])
    p = 25 / 30
    var = 3 / 2 * ((9 - 10 * p) ** 2 + (6 - 10 * p) ** 2 + (10 - 10 * p) ** 2) / 30 ** 2
    n = p * (1 - p) / var
    z = student_t.ppf(0.975, 2)
    centre, half = (p * n + z * z / 2) / (n + z * z), z * math.sqrt(p * n * (1 - p) + z * z / 4) / (n + z * z)
    assert M._cluster_wilson(num, den, 0.05) == pytest.approx((centre - half, centre + half))


def test_few_patients_in_a_class_are_warned_about():
    y = np.array([0] * 6 + [1] * 30)
    patients = np.array(["b0"] * 3 + ["b1"] * 3 + [f"m{i}" for i in range(10) for _ in range(3)])
    out = M.summarize(y, np.where(y == 1, 0.8, 0.2), patients, n_boot=50)
    assert out["warnings"] == ["only 2 benign patient(s) in this set: figures that rest on them (e.g. specificity) "
                               "have wide, rough intervals"]
    assert out["ci_settings"]["unit"] == "patient" and out["ci_settings"]["resamples"] == 50


def test_breakdowns_and_the_subtype_task_have_intervals():
    """Every figure has an interval: per-magnification groups (over that group's patients) and the
    8-class task (accuracy as a cluster-adjusted Wilson interval, by hand)."""
    from scipy.stats import t as student_t

    y, p, patients = random_case(5, n=400)
    mags = np.array([40, 100] * 200)
    by = M.breakdown(y, p, mags, patients=patients, n_boot=100, seed=1)
    for v in (40, 100):
        m = mags == v
        assert by[v]["ci"] == M.bootstrap_ci(y[m], p[m], patients[m], n_boot=100, seed=1)
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 8, 200)
    pat = np.array([f"P{i % 20}" for i in range(200)])
    probs = rng.dirichlet(np.ones(8), 200)
    probs[np.arange(200), labels] += 0.3 * rng.random(200)
    ci = M.multiclass_ci(labels, probs, pat, n_boot=100)
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
