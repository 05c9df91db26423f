"""Point figures against scikit-learn and hand-computed values; thresholds, breakdowns, summaries."""
import json
import math

import numpy as np
import pytest
from sklearn import metrics as skm

from breakhis import counts
from breakhis import metrics as M
from breakhis.errors import UserError
from breakhis.io import jsonable


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
    assert set(counts.CI_KEYS) <= set(back) and set(back["ci"]) == set(counts.CI_KEYS)
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
    assert jsonable(benign)["recall"] is None  # null in JSON, '–' in tables


def test_few_patients_in_a_class_are_warned_about():
    y = np.array([0] * 6 + [1] * 30)
    patients = np.array(["b0"] * 3 + ["b1"] * 3 + [f"m{i}" for i in range(10) for _ in range(3)])
    out = M.summarize(y, np.where(y == 1, 0.8, 0.2), patients, n_boot=50)
    # 2 benign patients: no interval for what rests on them (the old rule gave specificity [0.34, 1.00]), "–" shown
    assert out["warnings"] == ["only 2 benign patient(s) in this set: no interval for balanced_accuracy, specificity, "
                               "auroc, aucpr (shown as –); an interval over so few patients would span most of [0, 1]"]
    assert out["ci"]["specificity"] == [None, None] and out["ci"]["recall"][0] is not None
    from breakhis import report
    assert report.fmt_ci(out["specificity"], out["ci"]["specificity"]) == "1.000 [–]"
    out = M.summarize(y[6:].tolist() + [0] * 12, np.r_[np.full(30, 0.8), np.full(12, 0.2)],
                      patients[6:].tolist() + [f"b{i}" for i in range(4) for _ in range(3)], n_boot=50)
    assert out["warnings"] == ["only 4 benign patient(s) in this set: figures that rest on them (e.g. specificity) "
                               "have wide, rough intervals"]
    assert out["ci_settings"]["unit"] == "patient" and out["ci_settings"]["resamples"] == 50
