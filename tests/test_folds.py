"""All official folds in one command: train.py --folds, the cross-validation row of the logbook, tune.py --folds.

A generated tree with a Folds.csv in the official layout (fold,mag,filename,grp; every fold lists every
image), whose folds, like the official ones, are separate patient splits with overlapping test sides.
"""
import json
import math
import shutil
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from sklearn.metrics import accuracy_score, roc_auc_score
from test_compare import cases, run_json, write_run
from test_intervals import fold_test_by_hand

import evaluate
import train
from breakhis.config import make_config, parse_folds
from breakhis.data import dataset as D
from breakhis.data.prepare import prepare
from breakhis.errors import UserError, guard
from breakhis.io import read_csv, read_json
from breakhis.tuning import experiment as tune_exp
from breakhis.tuning import results as tune_results

pytestmark = pytest.mark.slow  # end to end: train.py --folds and tune.py --folds

FOLDS = 3


def test_folds_spec():
    for text, want in [("1-5", (1, 2, 3, 4, 5)), ("1,2,3,4,5", (1, 2, 3, 4, 5)), ("2-4", (2, 3, 4)), ("3", (3,)),
                       ("5,1-2", (1, 2, 5))]:
        assert parse_folds(text) == want
        assert [c.fold for c in make_config({"folds": text}).per_fold()] == list(want)
        assert all(c.folds == "" for c in make_config({"folds": text}).per_fold())
    for bad in ("0-9", "3-1", "x", "1,1", "1-", "6", "1-2-3", "1-3,2"):
        with pytest.raises(UserError, match="--folds"):
            parse_folds(bad)
    with pytest.raises(UserError, match="--fold 2"):
        make_config({"folds": "1-3", "fold": 2})
    with pytest.raises(UserError, match="--split-file"):
        make_config({"folds": "1-3", "split_file": "s.json"})
    assert make_config({}).per_fold() == [make_config({})]


# --- a tree with an official-style Folds.csv --------------------------------------------------

def fold_tests(patients: list[str]) -> dict[int, set[str]]:
    """Test patients of each fold: two benign and two malignant, shifted by one per fold, so that the
    test sides of neighbouring folds share patients (as the official folds do)."""
    benign = [p for p in patients if "_B_" in p]
    malignant = [p for p in patients if "_M_" in p]
    return {f: {*benign[f - 1:f + 1], *malignant[f - 1:f + 1]} for f in range(1, FOLDS + 1)}


@pytest.fixture(scope="module")
def cv_tree(tmp_path_factory):
    from breakhis.data.demo import make_demo

    root = make_demo(tmp_path_factory.mktemp("cv-demo"), patients=12, images_per_patient=6, size=(96, 64))
    idx = D.index_tree(root)
    tests = fold_tests(idx.patients)
    rows = ["fold,mag,filename,grp"]
    for f, test in tests.items():
        rows += [f"{f},{r.magnification},BreaKHis_v1/{r.path},{'test' if r.patient in test else 'train'}"
                 for r in idx.records]
    (root.parent / "Folds.csv").write_text("\n".join(rows) + "\n")
    return root, tests


def tiny(root, cache, **extra):
    args = {"data": root, "cache-dir": cache, "backbone": "resnet18", "image-size": 32, "batch-size": 16,
            "epochs": 1, "head": 16, "dropout": "0.2", "lr": 1e-3, "milestones": 1, "device": "cpu", **extra}
    return ["--no-pretrained", "--quiet", *(x for k, v in args.items() for x in (f"--{k}", str(v)))]


@pytest.fixture(scope="module")
def cv_runs(cv_tree, tmp_path_factory):
    root, tests = cv_tree
    res, cache = tmp_path_factory.mktemp("cv-results"), tmp_path_factory.mktemp("cv-cache")
    assert guard(train.main, tiny(root, cache, folds="1-3", name="cv") + ["--results", str(res)]) == 0
    return res, cache


def test_one_run_per_fold_each_what_fold_n_makes(cv_tree, cv_runs, tmp_path):
    root, tests = cv_tree
    res, cache = cv_runs
    assert sorted(p.name for p in res.iterdir()) == ["cv-fold1", "cv-fold2", "cv-fold3"]
    records = {r.path: r for r in D.index_tree(root).records}
    cvs = []
    for f in range(1, FOLDS + 1):
        run = res / f"cv-fold{f}"
        raw = read_json(run / "config.json")
        assert (raw["fold"], raw["folds"], raw["_cv"]["folds"]) == (f, "", [1, 2, 3])
        cvs.append(raw["_cv"]["id"])
        split = read_json(run / "split.json")
        # the test side is the fold's "test" rows of Folds.csv (the reference written above)
        assert set(split["patients"]["test"]) == tests[f]
        assert {records[q].patient for q in split["test"]} == tests[f]
        train_, val_ = set(split["patients"]["train"]), set(split["patients"]["val"])
        assert not train_ & val_ and not (train_ | val_) & tests[f]
        assert train_ | val_ | tests[f] == {r.patient for r in records.values()}
        # and the split is exactly the one --fold f draws
        want = prepare(make_config({"data": str(root), "cache_dir": str(cache), "image_size": 32, "fold": f}),
                       progress=False).manifest
        assert all(split[k] == want[k] for k in ("train", "val", "test"))
    assert len(set(cvs)) == 1  # one cross-validation
    # a --fold 2 run with the same flags is the same run: same settings, same figures
    assert guard(train.main, tiny(root, cache, fold=2, name="single") + ["--results", str(tmp_path)]) == 0
    one, two = read_json(tmp_path / "single" / "config.json"), read_json(res / "cv-fold2" / "config.json")
    assert {k: v for k, v in one.items() if not k.startswith("_")} == {k: v for k, v in two.items() if not k.startswith("_")}
    assert read_json(tmp_path / "single" / "metrics.json")["test"] == read_json(res / "cv-fold2" / "metrics.json")["test"]


def test_logbook_shows_the_folds_as_one_row(cv_tree, cv_runs, capsys):
    root, tests = cv_tree
    res, _ = cv_runs
    assert guard(evaluate.main, [str(res), "--json", "--n-boot", "300"]) == 0
    rows = json.loads(capsys.readouterr().out.strip().splitlines()[-1])["rows"]
    assert len(rows) == 1
    row = rows[0]
    assert (row["run"], row["runs"], row["cv_folds"], row["fold"]) == ("cv (3 folds)", 3, "1,2,3", "1,2,3")
    saved = [read_json(res / f"cv-fold{f}" / "metrics.json")["test"] for f in range(1, FOLDS + 1)]
    for k in ("accuracy", "recall", "specificity", "auroc", "patient_accuracy"):
        xs = np.array([m[k] for m in saved], dtype=float)
        assert row[f"{k}_mean"] == pytest.approx(xs.mean()) and row[f"{k}_std"] == pytest.approx(xs.std(ddof=1))
    # the pooled figures are those of every fold's test rows of predictions.csv taken together
    test = [r for f in range(1, FOLDS + 1) for r in read_csv(res / f"cv-fold{f}" / "predictions.csv") if r["split"] == "test"]
    y = np.array([int(r["label"]) for r in test])
    p = np.array([float(r["p_malignant"]) for r in test])
    assert y.size == sum(len(read_json(res / f"cv-fold{f}" / "split.json")["test"]) for f in range(1, FOLDS + 1))
    assert row["accuracy"] == pytest.approx(accuracy_score(y, p >= 0.5))
    assert row["auroc"] == pytest.approx(roc_auc_score(y, p))
    for k in ("accuracy", "auroc"):
        assert row[f"{k}_lo"] <= row[k] <= row[f"{k}_hi"]
    # patients in more than one fold's test side: their rows travel together in the bootstrap
    assert row["shared_test_patients"] == sum(sum(p in t for t in tests.values()) > 1 for p in set().union(*tests.values()))
    assert row["shared_test_patients"] == 4


@pytest.mark.parametrize("extra, words", [
    ({"folds": "0-9"}, "--folds '0-9'"),
    ({"folds": "3-1"}, "--folds '3-1'"),
    ({"folds": "1-3", "fold": 2}, "--folds 1-3 with --fold 2"),
    ({"folds": "1-3", "seeds": "0,1"}, "--folds 1-3 with --seeds"),
    ({"folds": "1-4"}, "no rows for fold 4"),  # Folds.csv lists folds 1-3: refused before fold 1 trains
])
def test_bad_folds_are_one_line_and_write_nothing(cv_tree, tmp_path, capsys, extra, words):
    root, _ = cv_tree
    res = tmp_path / "res"
    assert guard(train.main, tiny(root, tmp_path / "cache", **extra) + ["--results", str(res)]) == 2
    err = capsys.readouterr().err
    assert words in err and err.count("\n") == 1 and "Traceback" not in err
    assert not res.exists() or not any(res.iterdir())


def test_a_taken_fold_name_is_refused_before_the_first_fold(cv_tree, tmp_path, capsys):
    root, _ = cv_tree
    (tmp_path / "late-fold3").mkdir()
    assert guard(train.main, tiny(root, tmp_path / "cache", folds="1-3", name="late") + ["--results", str(tmp_path)]) == 2
    assert "late-fold3 already exists" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith("late")) == ["late-fold3"]


# --- the logbook's test between two cross-validations ------------------------------------------

def test_two_cross_validations_are_compared_fold_for_fold(tmp_path, capsys):
    """Two --folds calls on the same three folds: one image set, the fold test (test patients jointly resampled
    over the folds, the folds' model noise apart) computed here by hand, and a single run apart."""
    k, rng = 3, np.random.default_rng(5)
    folders, pairs = [], []
    for f in range(1, k + 1):
        paths, patients, y = cases(n_patients=20, start=5 * f)  # overlapping test sides
        fold = {}
        for name, noise in (("a", 0.45), ("b", 0.6)):
            p = np.clip(np.where(y == 1, 0.75, 0.25) + rng.uniform(-noise, noise, y.size), 0, 1)
            fold[name] = (y, p, patients, 0.5)
            run = write_run(tmp_path / f"{name}-fold{f}", p, paths, patients, y, fold=f, lr=0.1 if name == "a" else 0.2,
                            best_val_acc=0.9 if name == "a" else 0.8, _cv={"id": name, "folds": [1, 2, 3], "name": name})
            (run / "split.json").write_text(json.dumps({"train": ["x"] * 2 * len(paths), "val": [], "test": list(paths)}))
            folders.append(run)
        pairs.append((fold["b"], fold["a"]))
    paths, patients, y = cases()
    single = write_run(tmp_path / "single", np.where(y == 1, 0.9, 0.1), lr=0.3)
    rows = {r["run"]: r for r in run_json([*folders, single], capsys)["rows"]}
    a, b = rows["a (3 folds)"], rows["b (3 folds)"]
    assert a["best"] and b["image_set"] == a["image_set"] != rows["single"]["image_set"]
    diff, p, half = fold_test_by_hand(pairs, 0.5, n_boot=300, seed=0)  # n_test / n_train = 1/2 in every fold
    assert b["vs_best_diff"] == pytest.approx(diff)
    assert b["vs_best_p"] == pytest.approx(p)
    assert (b["vs_best_lo"], b["vs_best_hi"]) == pytest.approx((diff - half, diff + half))
    assert "3 folds, test patients and models (test/train 0.50)" in b["vs_best_test"]


def test_a_run_made_before_folds_existed_still_groups_with_its_repeats(tmp_path, capsys):
    paths, patients, y = cases()
    runs_ = [write_run(tmp_path / f"r-seed{s}", np.where(y == 1, 0.8, 0.3), seed=s) for s in range(2)]
    raw = json.loads((runs_[0] / "config.json").read_text())
    del raw["folds"]  # written before the setting existed
    (runs_[0] / "config.json").write_text(json.dumps(raw))
    rows = run_json(runs_, capsys)["rows"]
    assert len(rows) == 1 and rows[0]["runs"] == 2 and "folds" not in rows[0]


# --- tune.py --folds: the fold-averaging and trials.csv, without Ray --------------------------------

def test_fold_mean_takes_each_folds_best():
    assert tune_exp.fold_mean([[0.5, 0.7, 0.6], [0.8, 0.75], [0.4, None, 0.45]], "max") == pytest.approx((0.7 + 0.8 + 0.45) / 3)
    assert tune_exp.fold_mean([[0.5, 0.3], [0.2, 0.9]], "min") == pytest.approx((0.3 + 0.2) / 2)
    assert tune_exp.fold_mean([[0.5], [None, math.nan]], "max") is None and tune_exp.fold_mean([], "max") is None


def test_trials_csv_row_and_best_config_of_a_fold_trial(cv_runs, tmp_path):
    """collect() on a --folds trial folder (the fold runs trained above, copied into runs/<trial>/fold<N>/):
    the mean over folds of each fold's best val_loss and of its test figures; best.json retrains all folds."""
    res, _ = cv_runs
    trial_dir = tmp_path / "exp" / "runs" / "t1"
    for f in range(1, FOLDS + 1):
        shutil.copytree(res / f"cv-fold{f}", trial_dir / f"fold{f}")
    setup = tune_exp.Setup(space="s.py", base={"folds": "1-3", "epochs": 1}, metric="val_loss", mode="min",
                           max_epochs=1, grace_period=1, reduction_factor=2, samples=1, concurrent=None, cwd=str(tmp_path))
    t = SimpleNamespace(trial_id="t1", status="TERMINATED", config={"lr": 1e-3})
    (row,) = tune_results.collect([(t, SimpleNamespace(error=None, metrics={"node": "n"}))], setup, tmp_path / "exp")
    hist = [[float(r["val_loss"]) for r in read_csv(res / f"cv-fold{f}" / "history.csv")] for f in range(1, FOLDS + 1)]
    tests = [read_json(res / f"cv-fold{f}" / "metrics.json")["test"] for f in range(1, FOLDS + 1)]
    assert row["status"] == "finished" and row["folds"] == "1,2,3" and row["run"] == str(trial_dir)
    assert row["best_val_loss"] == pytest.approx(np.mean([min(h) for h in hist]))
    assert row["test_accuracy"] == pytest.approx(np.mean([m["accuracy"] for m in tests]))
    best = tune_results.write_results(tmp_path / "exp", [row], setup)
    config = read_json(tmp_path / "exp" / "best.json")["config"]
    assert best is row and (config["folds"], config["fold"]) == ("1,2,3", 0)
    assert [c.fold for c in make_config(config).per_fold()] == [1, 2, 3]
    # a fold missing on disk: the trial did not finish, it is not scored
    shutil.rmtree(trial_dir / "fold3")
    (row,) = tune_results.collect([(t, SimpleNamespace(error=None, metrics={}))], setup, tmp_path / "exp")
    assert row["status"] == "interrupted" and row["best_val_loss"] is None


def test_tune_refuses_folds_in_the_space(tmp_path):
    from breakhis.tuning import space

    path = tmp_path / "s.py"
    path.write_text("SPACE = {'folds': ['1-3', '1-5']}\n")
    with pytest.raises(UserError, match="--folds is a setting of the whole search"):
        tune_exp.make_setup(space.load_space(path), {}, metric=None, mode=None, max_epochs=1, grace_period=None,
                            reduction_factor=2, samples=1, concurrent=None)



def test_tune_py_folds_end_to_end(cv_tree, tmp_path):
    """One trial over folds 1-2 through Ray (about 30 s on a shared 2-core CPU): each fold a run folder of
    the trial, the trial scored by the mean of the folds' best val_acc, best.json retraining both folds."""
    import logging

    import ray

    import tune

    root, _ = cv_tree
    space = tmp_path / "space.py"
    space.write_text('"""One learning rate."""\nSPACE = {"lr": [1e-3]}\n')
    if ray.is_initialized():
        ray.shutdown()
    ray.init(num_cpus=1, include_dashboard=False, logging_level=logging.WARNING)
    try:
        code = tune.main(["--space", str(space), "--name", "cv", "--results", str(tmp_path / "res"), "--max-epochs", "1",
                          "--folds", "1-2", *(x for x in tiny(root, tmp_path / "cache") if x != "--quiet")])
    finally:
        ray.shutdown()
    assert code == 0
    exp = tmp_path / "res" / "tune" / "cv"
    (row,) = read_csv(exp / "trials.csv")
    trial_dir = Path(row["run"])
    assert sorted(p.name for p in trial_dir.iterdir()) == ["fold1", "fold2"] and row["status"] == "finished"
    best = [max(float(h["val_acc"]) for h in read_csv(trial_dir / f"fold{f}" / "history.csv")) for f in (1, 2)]
    assert float(row["best_val_acc"]) == pytest.approx(np.mean(best))
    assert [read_json(trial_dir / f"fold{f}" / "config.json")["_cv"]["folds"] for f in (1, 2)] == [[1, 2], [1, 2]]
    assert read_json(exp / "best.json")["config"]["folds"] == "1,2"


def test_ctrl_c_in_a_fold_names_the_folds_not_started(cv_tree, tmp_path, capsys, monkeypatch):
    import breakhis.fit

    real, calls = breakhis.fit.train_one_epoch, []

    def second_interrupted(*a, **k):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(*a, **k)

    monkeypatch.setattr(breakhis.fit, "train_one_epoch", second_interrupted)
    root, _ = cv_tree
    assert guard(train.main, tiny(root, tmp_path / "cache", folds="1-3", name="c") + ["--results", str(tmp_path / "r")]) == 130
    err = capsys.readouterr().err
    assert "nothing was saved" in err and "folds 3 were not started" in err
    assert sorted(p.name for p in (tmp_path / "r").iterdir()) == ["c-fold1"]


def test_a_fold_trial_keeps_its_finished_folds(cv_runs, tmp_path, monkeypatch):
    """tune's trial with --folds after an interruption: finished folds are read back, never retrained."""
    res, _ = cv_runs
    exp = tmp_path / "exp"
    for f in (1, 2):
        shutil.copytree(res / f"cv-fold{f}", exp / "runs" / "t1" / f"fold{f}")
    reported = []
    monkeypatch.setattr(tune_exp.tune, "get_context", lambda: type("C", (), {"get_trial_id": lambda self: "t1"})())
    monkeypatch.setattr(tune_exp.tune, "report", reported.append)
    monkeypatch.setattr(tune_exp, "fit", lambda *a, **k: pytest.fail("a finished fold was trained again"))
    base = {**read_json(res / "cv-fold1" / "config.json"), "fold": 0, "folds": "1-2"}
    base = {k: v for k, v in base.items() if not k.startswith("_")}
    tune_exp.trial({}, base=base, presets={}, exp_dir=str(exp), cwd=str(tmp_path), metric="val_loss", mode="min")
    best = [min(float(h["val_loss"]) for h in read_csv(res / f"cv-fold{f}" / "history.csv")) for f in (1, 2)]
    assert len(reported) == 1 and reported[0]["folds"] == 2 and reported[0]["val_loss"] == pytest.approx(np.mean(best))
    tests = [read_json(res / f"cv-fold{f}" / "metrics.json")["test"]["accuracy"] for f in (1, 2)]
    assert reported[0]["test_accuracy"] == pytest.approx(np.mean(tests))


def test_the_demo_writes_official_style_folds_that_train_reads(tmp_path):
    """python -m breakhis.data.demo OUT --folds: OUT/Folds.csv lists every image in each of 5 folds, with
    round(30%) of each class's patients (at least one) on the test side, a patient never on both sides;
    --fold N reads it (the counts are taken from the CSV with the csv module)."""
    import csv

    from breakhis.data import demo
    from breakhis.data.splits import fold_split

    assert demo.main([str(tmp_path), "--patients", "10", "--images-per-patient", "4", "--size", "96x64", "--folds"]) == 0
    root = tmp_path / "BreaKHis_v1"
    rows = list(csv.DictReader(open(tmp_path / "Folds.csv")))
    images = sorted(str(p.relative_to(tmp_path)) for p in root.rglob("*.png"))
    records = D.index_tree(root).records
    patient_of = {r.path: r.patient for r in records}
    for f in range(1, 6):
        fold = [r for r in rows if r["fold"] == str(f)]
        assert sorted(r["filename"] for r in fold) == images
        sides = {}
        for r in fold:
            sides.setdefault(patient_of[r["filename"].split("/", 1)[1]], set()).add(r["grp"])
        assert all(len(s) == 1 for s in sides.values())
        test = {p for p, s in sides.items() if s == {"test"}}
        for cls in ("_B_", "_M_"):
            assert len([p for p in test if cls in p]) == round(0.3 * 5)  # 5 patients per class
        manifest = fold_split(root, records, f)
        assert set(manifest["patients"]["test"]) == test
