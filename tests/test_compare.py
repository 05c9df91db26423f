"""The logbook (breakhis.compare): fake run folders with controlled predictions, end to end through evaluate.py."""
import csv
import json
import math

import numpy as np
import pytest
from sklearn.metrics import accuracy_score

import evaluate
from breakhis import compare as C
from breakhis import intervals
from breakhis import logbook_table as T
from breakhis import metrics as M
from breakhis.config import TrainConfig
from breakhis.errors import guard
from breakhis.options import EvalOptions


def cases(n_patients=40, per_patient=6, start=0):
    """Image paths, patients and labels: every patient one class, alternating benign/malignant."""
    paths, patients, labels = [], [], []
    for i in range(start, start + n_patients):
        for j in range(per_patient):
            paths.append(f"p{i:03d}/img{j}.png")
            patients.append(f"P{i:03d}")
            labels.append(i % 2)
    return paths, np.array(patients), np.array(labels)


def write_run(folder, p, paths=None, patients=None, labels=None, val="same", best_val_acc=0.9, **settings):
    """A run folder as train.py leaves it, with the given test probabilities of malignant. Its validation
    rows (what the logbook ranks by) are `val` = (labels, p), by default a copy of the test rows."""
    if paths is None:
        paths, patients, labels = cases()
    if isinstance(val, str):
        val = (labels, p)
    folder.mkdir(parents=True)
    config = {**TrainConfig().to_dict(), **settings, "_env": {"host": folder.name}}
    (folder / "config.json").write_text(json.dumps(config))
    (folder / "split.json").write_text(json.dumps({"train": [], "val": [], "test": list(paths)}))
    (folder / "metrics.json").write_text(json.dumps({"best_val_acc": best_val_acc, "best_epoch": 3, "test": {}}))
    (folder / "model.safetensors").write_bytes(b"")
    rows = [("test", q, pat, int(y), float(pm)) for q, pat, y, pm in zip(paths, patients, labels, p)]
    if val is not None:
        rows += [("val", f"val{k}.png", f"V{k}", int(y), float(pm)) for k, (y, pm) in enumerate(zip(*val))]
    with open(folder / "predictions.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["path", "patient", "magnification", "subtype", "label", "p_benign", "p_malignant",
                    "prediction", "split"])
        for split, q, pat, y, pm in rows:
            w.writerow([q, pat, 40, "adenosis", y, 1 - pm, pm, int(pm >= 0.5), split])
    return folder


def args(**kw):
    return EvalOptions(**{"n_boot": 300, "json": True, **kw})


def run_json(paths, capsys, **kw):
    assert evaluate.logbook(args(**kw), paths) == 0
    return json.loads(capsys.readouterr().out.strip().splitlines()[-1])


def perfect_and_coin(tmp_path):
    _, _, y = cases()
    coin = np.random.default_rng(0).uniform(size=y.size)
    return (write_run(tmp_path / "perfect", np.where(y == 1, 0.9, 0.1), lr=1e-3),
            write_run(tmp_path / "coin", coin, lr=1e-2))


def test_identical_predictions_are_not_significant(tmp_path, capsys):
    p = np.random.default_rng(1).uniform(size=cases()[2].size)
    a, b = write_run(tmp_path / "a", p, lr=1e-3), write_run(tmp_path / "b", p, lr=1e-4)
    out = run_json([a, b], capsys)
    best, other = out["rows"]
    assert best["best"] and not other["best"]
    assert other["vs_best_diff"] == 0 and other["significant"] is False
    assert other["vs_best_lo"] <= 0 <= other["vs_best_hi"]


def test_perfect_beats_coin_flip_and_intervals_are_known(tmp_path, capsys):
    perfect, coin = perfect_and_coin(tmp_path)
    out = run_json([coin, perfect], capsys)
    best, other = out["rows"]
    assert best["run"] == "perfect" and best["best"]
    # 40 patients all right: accuracy's interval is the random-effects model's (tested in test_intervals against
    # an independent posterior), below 1; AUROC: Wilson over the 20 patients of the smaller class, by hand
    z = 1.959963984540054
    lo20 = (20 + z * z / 2) / (20 + z * z) - z * math.sqrt(z * z / 4) / (20 + z * z)
    assert best["accuracy"] == 1 and 0.9 < best["accuracy_lo"] < 0.99 and best["accuracy_hi"] > 0.999
    assert best["auroc_lo"] == pytest.approx(lo20)  # 20 patients of the smaller class
    assert other["significant"] is True and other["vs_best_hi"] < 0 and other["vs_best_p"] < 0.01
    y, p = cases()[2], np.random.default_rng(0).uniform(size=cases()[2].size)
    assert other["vs_best_diff"] == pytest.approx(accuracy_score(y, p >= 0.5) - 1)


def test_single_run_interval_equals_metrics_bootstrap(tmp_path, capsys):
    paths, patients, y = cases()
    p = np.clip(y * 0.6 + np.random.default_rng(2).uniform(0, 0.5, y.size), 0, 1)
    a, b = write_run(tmp_path / "a", p, lr=1e-3), write_run(tmp_path / "b", 1 - p, lr=1e-4)
    row = next(r for r in run_json([a, b], capsys, n_boot=200)["rows"] if r["run"] == "a")
    ref = intervals.bootstrap_ci(y, p, patients, n_boot=200, seed=0)
    for k in ("accuracy", "f1", "auroc", "patient_recognition_rate"):
        assert (row[f"{k}_lo"], row[f"{k}_hi"]) == pytest.approx(ref[k])
    assert row["precision"] == pytest.approx(M.binary_metrics(y, p)["precision"])


def test_differing_test_splits_are_not_comparable(tmp_path, capsys):
    _, _, y = cases()
    a = write_run(tmp_path / "a", np.where(y == 1, 0.8, 0.2), lr=1e-3)
    b = write_run(tmp_path / "b", np.full(y.size, 0.7), lr=1e-4)
    paths2, patients2, y2 = cases(start=100)
    c = write_run(tmp_path / "c", np.where(y2 == 1, 0.9, 0.1), paths2, patients2, y2, lr=1e-5)
    rows = {r["run"]: r for r in run_json([a, b, c], capsys)["rows"]}
    assert rows["a"]["image_set"] == rows["b"]["image_set"] != rows["c"]["image_set"]
    assert rows["a"]["best"] and rows["b"]["vs_best_diff"] is not None
    assert not rows["c"]["best"] and rows["c"]["vs_best_diff"] is None and "not ranked" in rows["c"]["note"]


def test_same_paths_with_other_labels_are_not_comparable(tmp_path, capsys):
    paths, patients, y = cases()
    a = write_run(tmp_path / "a", np.full(y.size, 0.6), paths, patients, y, lr=1e-3)
    b = write_run(tmp_path / "b", np.full(y.size, 0.6), paths, patients, 1 - y, lr=1e-4)
    rows = run_json([a, b], capsys)["rows"]
    assert rows[0]["image_set"] != rows[1]["image_set"] and not any(r["best"] for r in rows)


def test_seed_repeats_form_one_row_with_mean_and_std(tmp_path, capsys):
    paths, patients, y = cases()
    rng = np.random.default_rng(3)
    probs = [np.clip(y * 0.5 + rng.uniform(0, 0.55, y.size), 0, 1) for _ in range(3)]
    group = [write_run(tmp_path / f"r50-seed{s}", probs[s], seed=s, best_val_acc=0.8 + s / 100, backbone="resnet50")
             for s in range(3)]
    other = write_run(tmp_path / "r18", np.where(y == 1, 0.7, 0.3), backbone="resnet18")
    rows = {r["run"]: r for r in run_json([*group, other], capsys)["rows"]}
    assert set(rows) == {"r50", "r18"}
    g = rows["r50"]
    assert g["runs"] == 3 and g["seed"] == "0,1,2" and rows["r18"]["seed"] == "0"
    accs = [accuracy_score(y, p >= 0.5) for p in probs]
    assert g["accuracy_mean"] == pytest.approx(np.mean(accs)) and g["accuracy_std"] == pytest.approx(np.std(accs, ddof=1))
    assert g["best_val_acc_mean"] == pytest.approx(0.81) and g["best_val_acc_std"] == pytest.approx(0.01)
    pooled = np.concatenate(probs)
    assert g["accuracy"] == pytest.approx(accuracy_score(np.tile(y, 3), pooled >= 0.5))
    ref = intervals.bootstrap_ci(np.tile(y, 3), pooled, np.tile(patients, 3), n_boot=300, seed=0)
    assert (g["accuracy_lo"], g["accuracy_hi"]) == pytest.approx(ref["accuracy"])
    # the paired test of the group against the best pools its three runs against the one run
    assert rows["r18"]["best"] and g["vs_best_diff"] == pytest.approx(np.mean(accs) - 1)


def test_resplit_groups_compare_with_each_other_not_with_a_single_run(tmp_path, capsys):
    folders = []
    for arch in ("resnet50", "resnet18"):
        for s in range(2):
            paths, patients, y = cases(start=10 * s)
            p = np.where(y == 1, 0.9, 0.1) if arch == "resnet50" else np.full(y.size, 0.6)  # 0.6: all malignant
            folders.append(write_run(tmp_path / f"{arch}-seed{s}", p, paths, patients, y, seed=s, split_seed=s,
                                     backbone=arch, _repeats={"id": arch, "seeds": [0, 1], "resplit": True}))
    paths, patients, y = cases()
    folders.append(write_run(tmp_path / "single", np.where(y == 1, 0.9, 0.1), backbone="vgg11"))
    rows = {r["run"]: r for r in run_json(folders, capsys)["rows"]}
    assert rows["resnet50"]["runs"] == 2 and rows["resnet50"]["split_seed"] == "0,1"
    assert rows["resnet50"]["best"] and rows["resnet18"]["image_set"] == rows["resnet50"]["image_set"]
    assert rows["resnet18"]["vs_best_diff"] == pytest.approx(-0.5) and rows["resnet18"]["significant"]
    assert rows["single"]["image_set"] != rows["resnet50"]["image_set"] and rows["single"]["vs_best_diff"] is None


def test_only_differing_settings_become_columns(tmp_path, capsys):
    _, _, y = cases()
    a = write_run(tmp_path / "a", np.full(y.size, 0.3), lr=1e-3, device="cpu", workers=1, cache_dir="/x")
    b = write_run(tmp_path / "b", np.full(y.size, 0.6), lr=1e-4, device="cuda", workers=4, cache_dir="/y",
                  data="data/./BreaKHis_v1")
    md = tmp_path / "log.md"
    assert evaluate.logbook(args(json=False, markdown=str(md)), [a, b]) == 0
    header = md.read_text().splitlines()[0]
    cols = [c.strip() for c in header.strip("|").split("|")]
    assert cols[:2] == ["run", "lr"] and "accuracy" in cols
    for hidden in ("backbone", "device", "workers", "cache_dir", "data", "seed", "_env", "host"):
        assert hidden not in cols
    assert C.differing_settings([{"head": [1000], "x": 1}, {"head": (1000,), "x": 2}]) == ["x"]


def test_csv_and_markdown_exports_hold_the_rows(tmp_path, capsys, monkeypatch):
    from breakhis import report

    monkeypatch.setattr(report.console, "width", 250)
    perfect, coin = perfect_and_coin(tmp_path)
    out_csv, out_md = tmp_path / "t" / "log.csv", tmp_path / "log.md"
    assert evaluate.logbook(args(json=False, csv=str(out_csv), markdown=str(out_md)), [perfect, coin]) == 0
    printed = capsys.readouterr().out
    assert "Logbook" in printed and "perfect" in printed
    with open(out_csv, newline="") as f:
        rows = list(csv.DictReader(f))
    assert [r["run"] for r in rows] == ["perfect", "coin"] and rows[0]["lr"] == "0.001"
    assert float(rows[0]["accuracy"]) == 1.0 and rows[1]["significant"] == "True"
    md = out_md.read_text().splitlines()
    assert md[0].startswith("| run | lr |") and md[1].startswith("| --- |")
    assert md[2].startswith("| perfect ★ |") and f"1.000 [{float(rows[0]['accuracy_lo']):.3f}, 1.000]" in md[2]
    assert md[3].startswith("| coin |") and "*" in md[3].split("|")[-2]
    assert not list(tmp_path.glob("**/.tmp-*"))


def test_threshold_rule_is_chosen_on_each_runs_validation_rows(tmp_path, capsys):
    _, _, y = cases()
    p = np.where(y == 1, 0.35, 0.2)  # all benign at 0.5; youden on val puts the cut between 0.2 and 0.35
    val = ([0, 0, 1, 1], [0.2, 0.2, 0.35, 0.35])
    a = write_run(tmp_path / "a", p, val=val, lr=1e-3)
    b = write_run(tmp_path / "b", p, val=val, lr=1e-4)
    at_half = {r["run"]: r for r in run_json([a, b], capsys)["rows"]}
    youden = {r["run"]: r for r in run_json([a, b], capsys, threshold="youden")["rows"]}
    assert at_half["a"]["accuracy"] == 0.5 and youden["a"]["accuracy"] == 1.0
    assert youden["a"]["auroc"] == at_half["a"]["auroc"] == 1.0


def test_patient_accuracy_at_a_chosen_threshold_uses_raw_probabilities(tmp_path, capsys):
    """The patient vote is the mean raw probability against the run's threshold: a mapping that puts the
    threshold at 0.5 and then averages is not the same (the logbook once showed 1.000 for 0.833)."""
    paths, patients, y = cases(n_patients=6, per_patient=2)
    # P003's mean raw probability (0.0 + 0.61) / 2 = 0.305 is above the threshold 0.3 (a correct vote),
    # while the mean of the values mapped to put 0.3 at 0.5 is (0 + 0.721) / 2 = 0.361 < 0.5 (a wrong one)
    p = np.array([0.1, 0.1, 0.9, 0.29, 0.1, 0.1, 0.0, 0.61, 0.1, 0.1, 0.9, 0.29])
    val = ([0, 0, 0, 1, 1, 1], [0.1, 0.2, 0.25, 0.3, 0.6, 0.9])  # youden on val: 0.3
    a = write_run(tmp_path / "a", p, paths, patients, y, val=val, lr=1e-3)
    b = write_run(tmp_path / "b", np.where(y == 1, 0.8, 0.1), paths, patients, y, val=val, lr=1e-4)
    row = {r["run"]: r for r in run_json([a, b], capsys, threshold="youden")["rows"]}["a"]
    t = 0.3
    means = {q: p[patients == q].mean() for q in np.unique(patients)}
    label = {q: y[patients == q][0] for q in means}
    reference = np.mean([(means[q] >= t) == label[q] for q in means])  # numpy, by hand
    assert row["patient_accuracy"] == pytest.approx(reference) and reference == 1.0
    assert row["accuracy"] == pytest.approx(np.mean((p >= t) == y))
    assert row["thresholds"] == "0.3"


def test_subtype_and_unfinished_runs_are_listed_not_ranked(tmp_path, capsys):
    perfect, coin = perfect_and_coin(tmp_path)
    sub = write_run(tmp_path / "sub", np.full(cases()[2].size, 0.5), task="subtype", class_weights=[])
    (sub / "metrics.json").write_text(json.dumps({"best_val_acc": 0.7, "test": {"accuracy": 0.61, "macro_f1": 0.42}}))
    unfinished = write_run(tmp_path / "unf", np.full(cases()[2].size, 0.5), lr=0.5)
    (unfinished / "predictions.csv").unlink()
    rows = {r["run"]: r for r in run_json([perfect, coin, sub, unfinished], capsys)["rows"]}
    assert rows["sub"]["accuracy"] == 0.61 and rows["sub"]["macro_f1"] == 0.42 and "subtype" in rows["sub"]["note"]
    assert "unfinished" in rows["unf"]["note"] and rows["unf"]["accuracy"] is None
    assert rows["perfect"]["best"] and not rows["sub"]["best"]
    md = tmp_path / "log.md"
    assert evaluate.logbook(args(json=False, markdown=str(md)), [perfect, coin, sub, unfinished]) == 0
    lines = md.read_text().splitlines()
    assert "task" in lines[0] and lines[4].startswith("| sub | subtype |") and "macro F1 0.420" in lines[4]
    assert lines[5].startswith("| unf |") and "unfinished" in lines[5]


def test_group_names():
    assert C._group_name(["r50-seed0", "r50-seed1"]) == "r50"
    assert C._group_name(["a", "b"]) == "a + b"
    assert C.run_names([C.Path("/x/res/a"), C.Path("/x/res/b/c")]) == ["a", "b/c"]


def test_evaluate_cli_end_to_end(tmp_path, capsys):
    perfect, coin = perfect_and_coin(tmp_path)
    assert evaluate.main([str(perfect), str(coin), "--boot", "200", "--sort", "auroc", "--json"]) == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert out["sort"] == "auroc" and [r["run"] for r in out["rows"]] == ["perfect", "coin"]
    assert guard(evaluate.main, [str(tmp_path), "--boot", "50"]) == 0  # a folder holding runs
    assert "Logbook: 2 runs" in capsys.readouterr().out
    empty = tmp_path / "empty"
    empty.mkdir()
    assert guard(evaluate.main, [str(empty)]) == 2
    assert "holds no run folders" in capsys.readouterr().err


@pytest.mark.parametrize("extra, message", [
    (["--sort", "speed"], "--sort 'speed': choose one of"),
    (["--boot", "0"], "--n-boot 0"),
    (["--tta"], "--tta apply to one run"),
    (["--cam", "3"], "--cam apply to one run"),
    (["--threshold", "youden"], "no validation predictions"),
    (["--threshold", "1.5"], "threshold"),
])
def test_user_errors(tmp_path, capsys, extra, message):
    perfect, coin = perfect_and_coin(tmp_path)
    _, _, y = cases()
    coin = write_run(tmp_path / "coin-no-val", np.full(y.size, 0.5), val=None, lr=1e-2)  # no validation rows
    assert guard(evaluate.main, [str(perfect), str(coin), *extra]) == 2
    assert message in capsys.readouterr().err


def test_damaged_predictions_file(tmp_path, capsys):
    perfect, coin = perfect_and_coin(tmp_path)
    (coin / "predictions.csv").write_text("path,label\nx.png,1\n")
    assert guard(evaluate.main, [str(perfect), str(coin)]) == 2
    assert "lacks the column(s) p_malignant, patient, split" in capsys.readouterr().err


def test_undefined_metric_ranks_last():
    undefined, defined = C.Row([], "u", val={"auroc": math.nan}), C.Row([], "d", val={"auroc": 0.1})
    assert C._key(undefined, "auroc") < C._key(defined, "auroc")


def test_run_names_never_wrap_and_columns_give_way(tmp_path):
    """At 120 columns '20261129-142733-resnet18' used to break over two lines; now whole columns go instead."""
    import io

    from rich.console import Console

    _, _, y = cases()
    rng = np.random.default_rng(5)
    folders = [write_run(tmp_path / f"20261129-14273{i}-resnet18", np.clip(y * 0.4 + rng.uniform(0, 0.6, y.size), 0, 1),
                         lr=10.0 ** -(i + 3)) for i in range(3)]
    book = C.logbook(folders, n_boot=50)
    for width in (120, 80):
        out = io.StringIO()
        Console(file=out, width=width, record=True).print(T.render(book, width=width))
        text = out.getvalue()
        for f in folders:
            assert f.name in text  # whole, on one line
        assert max(len(line) for line in text.splitlines()) <= width
    assert "Left out to fit 80 columns: AUCPR" in text


def test_identical_runs_count_once_and_other_splits_are_not_pooled(tmp_path, capsys):
    """Two runs with the same seed (the same predictions) were shown as '2 runs, 0.953 ± 0.000'; a run with
    its own --split-seed was merged into the seed repeats of split 0."""
    _, _, y = cases()
    rng = np.random.default_rng(4)
    p0, p1 = (np.clip(y * 0.5 + rng.uniform(0, 0.55, y.size), 0, 1) for _ in range(2))
    twice = [write_run(tmp_path / f"again{i}", p0, seed=0, backbone="resnet50") for i in range(2)]
    other_seed = write_run(tmp_path / "again-seed1", p1, seed=1, backbone="resnet50")
    paths2, patients2, y2 = cases(start=100)
    other_split = write_run(tmp_path / "own-split", np.where(y2 == 1, 0.8, 0.2), paths2, patients2, y2, seed=2,
                            split_seed=5, backbone="resnet50")
    rows = run_json([*twice, other_seed, other_split], capsys)["rows"]
    pooled = next(r for r in rows if "again0" in r["folders"])
    assert pooled["runs"] == 2 and pooled["identical"] == "again1"  # seeds 0 and 1; the second seed-0 run left out
    assert pooled["accuracy_std"] is not None and pooled["accuracy_std"] > 0
    alone = next(r for r in rows if "own-split" in r["folders"])
    assert alone["runs"] == 1 and alone["image_set"] != pooled["image_set"]


def test_rows_of_repeats_are_compared_as_recipes(tmp_path, capsys):
    """Two recipes with three seeds each: the recipe test over the runs and the test patients (intervals.recipe_test,
    checked by hand there) on the runs' own figures; a pair of single runs is a verdict on those checkpoints only."""
    from breakhis import intervals

    _, _, y = cases()
    rng = np.random.default_rng(11)
    acc, probs = {}, {}
    folders = []
    for arch, shift in (("resnet50", 0.0), ("resnet18", -0.02)):
        acc[arch], probs[arch] = [], []
        for s in range(3):
            p = np.clip(y * 0.5 + rng.uniform(0, 0.55, y.size) + shift, 0, 1)
            acc[arch].append(accuracy_score(y, p >= 0.5))
            probs[arch].append(p)
            folders.append(write_run(tmp_path / f"{arch}-seed{s}", p, seed=s, backbone=arch))
    rows = {r["run"]: r for r in run_json(folders, capsys)["rows"]}
    best = next(r for r in rows.values() if r["best"])
    other = next(r for r in rows.values() if not r["best"])
    patients = np.asarray(cases()[1])
    ref = intervals.recipe_test("accuracy", *([(y, p, patients, 0.5) for p in probs[r["run"]]] for r in (other, best)),
                                n_boot=1000, seed=0)
    assert other["vs_best_test"].startswith("recipes") and other["vs_best_p"] == pytest.approx(ref["p_value"], abs=0.005)  # predictions.csv rounds p
    assert other["vs_best_diff"] == pytest.approx(np.mean(acc[other["run"]]) - np.mean(acc[best["run"]]))
    single = run_json(folders[:1] + folders[3:4], capsys)["rows"]
    assert single[1]["vs_best_test"].startswith("checkpoints")


def test_ranked_and_picked_on_validation_with_holm_corrected_p_values(tmp_path, capsys):
    """The star went to the best row by the test metric; it now goes to the best by validation, and the
    p-values of the comparisons with it are Holm-corrected (by hand: sorted p times m, m-1, ..., running max)."""
    paths, patients, y = cases()
    good = np.where(y == 1, 0.9, 0.1)
    rng = np.random.default_rng(9)
    noisy = [np.clip(np.where(y == 1, 0.62, 0.38) + rng.normal(0, 0.2, y.size), 0, 1) for _ in range(3)]
    a = write_run(tmp_path / "val-best", noisy[0], val=(y, good), lr=1e-3)  # best on validation, not on test
    b = write_run(tmp_path / "test-best", good, val=(y, noisy[1]), lr=1e-4)
    c = write_run(tmp_path / "third", noisy[2], val=(y, noisy[2]), lr=1e-5)
    rows = {r["run"]: r for r in run_json([a, b, c], capsys)["rows"]}
    assert rows["val-best"]["best"] and not rows["test-best"]["best"]
    assert rows["test-best"]["accuracy"] > rows["val-best"]["accuracy"]  # reported, not used to pick
    ps = {k: rows[k]["vs_best_p"] for k in ("test-best", "third")}
    lo_k, hi_k = sorted(ps, key=ps.get)
    holm_lo = min(1, 2 * ps[lo_k])
    holm_hi = max(holm_lo, min(1, ps[hi_k]))
    assert rows[lo_k]["vs_best_p_holm"] == pytest.approx(holm_lo) and rows[hi_k]["vs_best_p_holm"] == pytest.approx(holm_hi)
    assert rows[lo_k]["significant"] == (holm_lo <= 0.05)


def test_the_verdict_label_survives_rich_markup(tmp_path):
    """'[these checkpoints only]' was read by rich as a style tag and vanished from the terminal table."""
    import io

    from rich.console import Console

    perfect, coin = perfect_and_coin(tmp_path)
    out = io.StringIO()
    Console(file=out, width=400).print(T.render(C.logbook([perfect, coin], n_boot=50), width=400))
    text = out.getvalue()
    assert "(these checkpoints only)" in text and "the recipe test (their" in text
