"""train.py and evaluate.py end to end on a generated tree (CPU, tiny model and images)."""
import json
import shutil

import numpy as np
import pytest

import breakhis.fit
import evaluate
import train
from breakhis import runs
from breakhis.config import make_config
from breakhis.data.prepare import prepare
from breakhis.errors import guard
from breakhis.fit import fit
from breakhis.io import read_csv, read_json

pytestmark = pytest.mark.slow  # end to end: train.py and evaluate.py on a generated tree


def tiny(demo_root, cache_dir, **extra):
    """Flags for a seconds-long run: resnet18, 32 px, two epochs."""
    args = {"data": demo_root, "cache-dir": cache_dir, "backbone": "resnet18", "image-size": 32, "batch-size": 16,
            "epochs": 2, "head": 32, "dropout": "0.2", "lr": 1e-3, "milestones": 1, "device": "cpu"}
    args.update(extra)
    out = ["--no-pretrained", "--quiet"]
    for k, v in args.items():
        out += [f"--{k}", str(v)]
    return out


@pytest.fixture(scope="module")
def trained(demo_root, tmp_path_factory):
    res = tmp_path_factory.mktemp("results")
    cache = tmp_path_factory.mktemp("cache")
    assert guard(train.main, tiny(demo_root, cache, name="r1") + ["--results", str(res)]) == 0
    return res / "r1", cache


def test_run_folder_is_complete(trained):
    run, _ = trained
    for f in ("config.json", "split.json", "history.csv", "metrics.json", "predictions.csv", "model.safetensors",
              "status.json"):
        assert (run / f).is_file(), f
    assert not (run / "last.pt").exists()
    assert read_json(run / "status.json")["status"] == "finished"
    cfg = read_json(run / "config.json")
    assert cfg["backbone"] == "resnet18" and cfg["_env"]["torch"]
    hist = read_csv(run / "history.csv")
    assert [int(h["epoch"]) for h in hist] == [1, 2]
    assert {"lr", "train_loss", "train_acc", "val_loss", "val_acc", "val_recall", "val_auroc", "img_s",
            "seconds"} <= set(hist[0])
    m = read_json(run / "metrics.json")
    assert m["best_epoch"] in (1, 2) and {"val", "test"} <= set(m)
    for k in ("accuracy", "precision", "recall", "specificity", "f1", "auroc", "aucpr", "patient_recognition_rate"):
        assert k in m["test"], k
    split = read_json(run / "split.json")
    preds = read_csv(run / "predictions.csv")
    assert {p["split"] for p in preds} == {"val", "test"}
    assert len(preds) == len(split["val"]) + len(split["test"])  # magnification "all"
    assert {"path", "patient", "magnification", "subtype", "label", "p_benign", "p_malignant", "prediction"} <= set(preds[0])
    assert any((run / "plots").glob("*.png"))


def test_no_patient_leaks_between_partitions(trained):
    split = read_json(trained[0] / "split.json")
    parts = [set(split["patients"][k]) for k in ("train", "val", "test")]
    assert not (parts[0] & parts[1] or parts[0] & parts[2] or parts[1] & parts[2])


def test_evaluate_recomputes_saved_metrics(trained, capsys):
    run, _ = trained
    assert guard(evaluate.main, [str(run), "--json", "--device", "cpu"]) == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    saved = read_json(run / "metrics.json")["test"]
    for k in ("accuracy", "precision", "recall", "f1", "auroc", "aucpr", "patient_recognition_rate"):
        assert out["test"][k] == pytest.approx(saved[k]), k
    assert out["test"]["ci"]["accuracy"] == pytest.approx(saved["ci"]["accuracy"])


def test_evaluate_options(trained, capsys):
    run, _ = trained
    assert guard(evaluate.main, [str(run), "--tta", "--threshold", "youden", "--by", "magnification", "--json"]) == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert out["tta"] and 0 <= out["threshold"] <= 1
    assert sum(g["n"] for g in out["by"].values()) == out["test"]["n"]


def test_export_and_evaluate_exported(trained, tmp_path, capsys):
    run, _ = trained
    pt2 = tmp_path / "model.pt2"
    assert guard(evaluate.main, [str(run), "--export", str(pt2), "--json"]) == 0
    a = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert pt2.is_file()
    assert guard(evaluate.main, [str(run), "--model", str(pt2), "--json"]) == 0
    b = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert b["test"]["accuracy"] == pytest.approx(a["test"]["accuracy"])
    assert b["test"]["auroc"] == pytest.approx(a["test"]["auroc"], abs=1e-6)


def test_resume_equals_uninterrupted(demo_root, cache_dir, tmp_path):
    cfg = make_config({"data": str(demo_root), "cache_dir": str(cache_dir), "backbone": "resnet18", "pretrained": False,
                       "image_size": 32, "batch_size": 16, "epochs": 3, "head": (16,), "dropout": (0.3,),
                       "lr": 1e-3, "milestones": (2,), "device": "cpu"})
    prep = prepare(cfg, progress=False)
    full = tmp_path / "full"
    full.mkdir()
    fit(cfg, full, data=prep, progress=False)

    cut = tmp_path / "cut"
    cut.mkdir()

    def stop(row):
        if row["epoch"] == 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        fit(cfg, cut, data=prep, progress=False, on_epoch=stop)
    assert read_json(cut / "status.json")["status"] == "interrupted"
    assert (cut / "last.pt").is_file()
    assert guard(train.main, ["--resume", str(cut), "--quiet"]) == 0
    a, b = read_csv(full / "history.csv"), read_csv(cut / "history.csv")
    assert len(a) == len(b) == 3
    for ra, rb in zip(a, b):
        assert float(ra["train_loss"]) == pytest.approx(float(rb["train_loss"]), rel=1e-6)
        assert float(ra["val_loss"]) == pytest.approx(float(rb["val_loss"]), rel=1e-6)
    ma, mb = read_json(full / "metrics.json"), read_json(cut / "metrics.json")
    assert ma["test"]["accuracy"] == mb["test"]["accuracy"]
    assert guard(train.main, ["--resume", str(cut)]) == 2  # finished runs are not resumed


def test_seeds_make_one_run_each(demo_root, cache_dir, tmp_path):
    res = tmp_path / "res"
    assert guard(train.main, tiny(demo_root, cache_dir, epochs=1, name="rep") + ["--results", str(res),
                                                                                  "--seeds", "0,1"]) == 0
    got = sorted(p.name for p in res.iterdir())
    assert got == ["rep-seed0", "rep-seed1"]
    s0, s1 = (read_json(res / n / "split.json") for n in got)
    assert s0["test"] == s1["test"]  # same split unless --resplit
    assert [read_json(res / n / "config.json")["seed"] for n in got] == [0, 1]


def test_nan_loss_stops_with_a_clear_message(demo_root, cache_dir, tmp_path, monkeypatch, capsys):
    import torch

    class NaNLoss(torch.nn.Module):
        def forward(self, logits, y):
            return (logits * float("nan")).sum()

    monkeypatch.setattr(breakhis.fit, "make_loss", lambda weights, smoothing, device: NaNLoss())
    assert guard(train.main, tiny(demo_root, cache_dir, name="nan") + ["--results", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "training loss is nan" in err and "Traceback" not in err
    assert read_json(tmp_path / "nan" / "status.json")["status"] == "failed"


@pytest.mark.parametrize("extra, words", [
    (["--backbone", "resnet9000"], "resnet9000"),
    (["--optimizer", "adagrad"], "adagrad"),
    (["--scheduler", "warm"], "warm"),
    (["--class-weights", "1,2,3"], "class"),
    (["--dropout", "0.1,0.1,0.1"], "dropout"),
    (["--lr", "0"], "--lr"),
    (["--weights", "/nonexistent/w.pth"], "w.pth"),
])
def test_train_user_errors(demo_root, cache_dir, tmp_path, extra, words, capsys):
    assert guard(train.main, tiny(demo_root, cache_dir) + ["--results", str(tmp_path)] + extra) == 2
    err = capsys.readouterr().err
    assert words in err and "Traceback" not in err


def test_missing_data_root_and_existing_name(demo_root, cache_dir, trained, tmp_path, capsys):
    assert guard(train.main, tiny(tmp_path / "nowhere", cache_dir)) == 2
    assert "breakhis.data.demo" in capsys.readouterr().err
    run, _ = trained
    before = (run / "model.safetensors").read_bytes()
    assert guard(train.main, tiny(demo_root, cache_dir, name="r1") + ["--results", str(run.parent)]) == 2
    assert "already exists" in capsys.readouterr().err
    assert (run / "model.safetensors").read_bytes() == before


def test_a_run_that_fails_after_its_folder_exists_is_marked_failed(demo_root, cache_dir, tmp_path, capsys,
                                                                    monkeypatch):
    """A missing --weights file is refused before any folder exists; a failure once the run has started
    leaves the folder saying failed, with the message, never running; a folder never written is removed."""
    args = tiny(demo_root, cache_dir, name="late") + ["--results", str(tmp_path), "--weights", str(tmp_path / "no.pth")]
    assert guard(train.main, args) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: --weights") and "no.pth: file not found" in err and not (tmp_path / "late").exists()

    def broken(*a, **k):
        raise RuntimeError("boom")

    cfg = make_config({"data": str(demo_root), "cache_dir": str(cache_dir), "backbone": "resnet18", "image_size": 32,
                       "batch_size": 16, "epochs": 2, "head": (8,), "dropout": (), "pretrained": False, "device": "cpu"})
    monkeypatch.setattr(breakhis.fit, "evaluate", broken)  # fails in epoch 1, after the folder was started
    with pytest.raises(RuntimeError, match="boom"):
        fit(cfg, tmp_path / "started", progress=False)
    status = read_json(tmp_path / "started" / "status.json")
    assert status["status"] == "failed" and status["message"] == "RuntimeError: boom"
    empty = tmp_path / "empty"
    empty.mkdir()
    runs.abandon(empty, RuntimeError("boom"))
    assert not empty.exists()


def test_evaluate_user_errors(tmp_path, trained, capsys):
    assert guard(evaluate.main, [str(tmp_path)]) == 2
    assert guard(evaluate.main, [str(tmp_path / "missing")]) == 2
    assert guard(evaluate.main, [str(trained[0]), "--threshold", "bogus"]) == 2
    assert guard(evaluate.main, [str(trained[0]), "--model", str(tmp_path / "none.pt2")]) == 2
    assert "Traceback" not in capsys.readouterr().err


def test_config_file_retrains_same_settings(trained, demo_root, cache_dir, tmp_path):
    run, _ = trained
    assert guard(train.main, ["--config", str(run / "config.json"), "--epochs", "1", "--quiet", "--name", "again0",
                              "--results", str(tmp_path)]) == 0  # a run's own config.json (its _env is skipped)
    cfg = {k: v for k, v in read_json(run / "config.json").items() if not k.startswith("_")}
    (tmp_path / "best.json").write_text(json.dumps({"config": cfg}))
    assert guard(train.main, ["--config", str(tmp_path / "best.json"), "--epochs", "1", "--quiet", "--name",
                              "again", "--results", str(tmp_path)]) == 0
    assert read_json(tmp_path / "again" / "config.json")["head"] == [32]
    assert np.isfinite(read_json(tmp_path / "again" / "metrics.json")["test"]["accuracy"])


def test_evaluate_other_tree_leaves_out_seen_patients(trained, demo_root, capsys):
    """Scoring the run's own tree as 'another tree' used to report the training patients as test."""
    run, _ = trained
    split = read_json(run / "split.json")
    test_patients = set(split["patients"]["test"])
    assert guard(evaluate.main, [str(run), "--data", str(demo_root), "--json"]) == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    seen = [p for part in ("train", "val") for p in split["patients"][part]]
    assert out["test"]["n_patients"] == len(test_patients)  # only the run's test patients are left
    assert out["left_out"]["patients"] == len(seen) and out["left_out"]["images"] == len(split["train"]) + len(split["val"])
    assert "not_a_test_figure" not in out
    assert guard(evaluate.main, [str(run), "--data", str(demo_root), "--include-seen", "--json"]) == 0
    everything = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert everything["test"]["n_patients"] == len(test_patients) + len(seen) and everything["not_a_test_figure"]


def test_metrics_json_records_the_selected_checkpoint_and_the_intervals(trained, demo_root, tmp_path, capsys):
    """The validation figures are those of the epoch --select chose, not the best of any epoch; every
    interval says how it was made."""
    import shutil

    from breakhis.predict import finalize

    run, _ = trained
    copy = tmp_path / "copy"
    shutil.copytree(run, copy)
    history = read_csv(copy / "history.csv")
    history[0].update(val_acc="0.99", is_best="False")  # a higher accuracy at an epoch that was not chosen
    history[-1].update(val_acc="0.5", is_best="True")
    from breakhis.io import write_csv

    write_csv(copy / "history.csv", history)
    m = finalize(copy, progress=False)
    assert m["best_val_acc"] == 0.5 and m["best_epoch"] == int(history[-1]["epoch"]) and m["select"] == "val_acc"
    settings = m["test"]["ci_settings"]
    assert (settings["unit"], settings["resamples"], settings["seed"], settings["level"]) == ("patient", 1000, 0, 0.95)
    assert settings["method"].startswith("patient intervals: a per-class patient random-effects model")
    assert guard(evaluate.main, [str(copy), "--n-boot", "50", "--boot-seed", "7", "--json"]) == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert out["test"]["ci_settings"]["resamples"] == 50 and out["test"]["ci_settings"]["seed"] == 7


@pytest.mark.parametrize("backbone", ["timm:vit_tiny_patch16_224", "timm:convnext_atto"])
def test_timm_backbone_trains_evaluates_exports_and_joins_the_logbook(backbone, demo_root, cache_dir, tmp_path, capsys):
    """A random-init timm model end to end: config.json records its own normalisation; evaluate
    --tta, --export and --model agree; the logbook lists it; Grad-CAM only where there is a map."""
    import timm
    res = tmp_path / "res"
    assert guard(train.main, tiny(demo_root, cache_dir, backbone=backbone, epochs=1, name="t")
                 + ["--results", str(res)]) == 0
    run = res / "t"
    cfg = read_json(run / "config.json")
    own = timm.create_model(backbone[5:], pretrained=False).pretrained_cfg
    assert tuple(cfg["mean"]) == tuple(own["mean"]) and tuple(cfg["std"]) == tuple(own["std"])
    assert cfg["image_size"] == 32 and cfg["_env"]["timm"] == timm.__version__
    pt2 = tmp_path / "m.pt2"
    capsys.readouterr()
    assert guard(evaluate.main, [str(run), "--tta", "--export", str(pt2), "--json"]) == 0
    a = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert guard(evaluate.main, [str(run), "--tta", "--model", str(pt2), "--json"]) == 0
    b = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert b["test"]["auroc"] == pytest.approx(a["test"]["auroc"], abs=1e-6)
    shutil.copytree(run, res / "t-copy")  # the logbook compares several runs
    assert guard(evaluate.main, [str(res), "--csv", str(tmp_path / "log.csv")]) == 0
    rows = read_csv(tmp_path / "log.csv")  # the same run twice: one row, the copy counted once
    assert [(r["run"], r["identical"]) for r in rows] == [("t", "t-copy")]
    cam = guard(evaluate.main, [str(run), "--cam", "2"])
    assert cam == (2 if "vit" in backbone else 0)
    if "vit" in backbone:
        assert "no spatial feature map" in capsys.readouterr().err


def test_timm_bad_input_is_one_line_and_writes_nothing(demo_root, cache_dir, tmp_path, capsys):
    import torch
    from safetensors.torch import save_file

    from breakhis.models import build_model
    state = build_model("timm:convnext_atto", pretrained=False).backbone.state_dict()
    bad = {k: v.contiguous() for k, v in state.items() if not k.startswith("stem.")} | {"extra.w": torch.zeros(1)}
    save_file(bad, str(tmp_path / "bad.safetensors"))
    res = tmp_path / "res"
    for extra in ({"backbone": "timm:convnext_atoo"}, {"feature-views": 2},
                  {"backbone": "timm:convnext_atto", "weights": tmp_path / "bad.safetensors"}):
        assert guard(train.main, tiny(demo_root, cache_dir, **extra) + ["--results", str(res)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 3 and "close matches: timm:convnext_atto" in err[0] and "--freeze" in err[1]
    assert "missing: stem.0.weight" in err[2] and "unexpected: extra.w" in err[2]
    assert not res.exists() and not any(cache_dir.iterdir())  # refused before any folder or decode cache


# a frozen run (REF_SETTINGS on REF_TREE) as the code before issue 21 computed it: lean checkpoints and the
# per-worker caches must leave its history and figures as they were
REF_TREE = {"patients": 12, "images_per_patient": 6, "size": (64, 48)}
REF_SETTINGS = {"backbone": "resnet18", "pretrained": False, "image_size": 32, "batch_size": 8, "epochs": 4, "head": (32,),
                "dropout": (0.2,), "lr": 1e-3, "freeze": True, "augment": False, "device": "cpu", "milestones": (2,)}
REF_LOSSES = [(0.659979772567749, 0.7263847390810648), (0.6635612487792969, 0.7379026512304941),
              (0.6479551792144775, 0.7313975592454275), (0.6260631561279297, 0.7258389492829641)]  # (train, val)
REF_TEST = {"accuracy": 0.3333333333333333, "auroc": 0.5416666666666667, "f1": 0.5, "loss": 0.8901022242175208,
            "ece": 0.3757513297928704, "brier": 0.3626061585633834}
# the interval changed with issue 19 (the random-effects model; the old cluster Wilson gave [0.0113, 0.9562]):
# the training and the point figures above are those of the code before issue 21
REF_CI_ACCURACY = [0.12599571131572962, 0.6368929605802796]


def test_frozen_run_equals_the_reference_and_lean_scoring_the_same_point_figures(tmp_path, capsys):
    """train.py's frozen run: history, test figures and intervals as before; a trial's lean scoring (no
    intervals, no plots) gives the same point figures; evaluate.py --plots draws them; a full finalize
    afterwards adds the intervals and leaves the point figures."""
    from breakhis.data.demo import make_demo
    from breakhis.predict import finalize

    tree = make_demo(tmp_path / "tree", **REF_TREE)
    cfg = make_config({**REF_SETTINGS, "data": str(tree), "cache_dir": str(tmp_path / "cache")})
    full, lean = tmp_path / "full", tmp_path / "lean"
    full.mkdir()
    lean.mkdir()
    m = fit(cfg, full, progress=False)
    history = read_csv(full / "history.csv")
    assert [(float(h["train_loss"]), float(h["val_loss"])) for h in history] == pytest.approx(REF_LOSSES, rel=1e-5)
    assert {k: m["test"][k] for k in REF_TEST} == pytest.approx(REF_TEST, rel=1e-5)
    assert m["test"]["ci"]["accuracy"] == pytest.approx(REF_CI_ACCURACY, rel=1e-5) and m["best_epoch"] == 1
    assert len(list((full / "plots").glob("*.png"))) == 5

    points = fit(cfg, lean, progress=False, ci=False, draw=False)
    assert "ci" not in points["test"] and "by" not in points["test"] and not (lean / "plots").exists()
    for part in ("val", "test"):
        assert {k: v for k, v in points[part].items() if k != "ci_settings"} == \
            {k: v for k, v in m[part].items() if k not in ("ci", "ci_settings", "by", "warnings")}
    assert read_csv(lean / "predictions.csv") == read_csv(full / "predictions.csv")
    assert guard(evaluate.main, [str(lean), "--plots"]) == 0
    assert sorted(p.name for p in (lean / "plots").glob("*.png")) == sorted(p.name for p in (full / "plots").glob("*.png"))
    capsys.readouterr()
    again = finalize(lean, progress=False)
    assert again == m


def test_frozen_run_keeps_the_head_alone_in_last_pt_and_resumes_as_uninterrupted(tmp_path):
    """A backbone frozen for the whole run: last.pt holds the head (and the best head), model.safetensors is
    written when the loop ends, Ctrl-C included; the resumed run equals the uninterrupted one."""
    import torch
    from safetensors.torch import load_file

    from breakhis.data.demo import make_demo

    tree = make_demo(tmp_path / "tree", **REF_TREE)
    cfg = make_config({**REF_SETTINGS, "data": str(tree), "cache_dir": str(tmp_path / "cache"), "milestones": (3,)})
    whole, cut = tmp_path / "whole", tmp_path / "cut"
    whole.mkdir()
    cut.mkdir()
    m = fit(cfg, whole, progress=False)

    def stop_after_two(row):
        if row["epoch"] == 2:
            state = torch.load(cut / "last.pt", weights_only=True)
            assert state["head_only"] and all(k.split(".")[0].isdigit() for k in state["model"])
            assert not (cut / "model.safetensors").exists()  # not written at every improvement
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        fit(cfg, cut, progress=False, on_epoch=stop_after_two)
    assert read_json(cut / "status.json")["status"] == "interrupted"
    assert set(load_file(str(cut / "model.safetensors"))) == set(load_file(str(whole / "model.safetensors")))
    resumed = fit(runs.load_config(cut), cut, progress=False, resume=True)
    cols = ("epoch", "lr", "train_loss", "train_acc", "val_loss", "val_acc", "is_best", "best_value")
    assert [{k: h[k] for k in cols} for h in read_csv(cut / "history.csv")] == \
        [{k: h[k] for k in cols} for h in read_csv(whole / "history.csv")]
    assert resumed["test"] == m["test"]
    a, b = load_file(str(whole / "model.safetensors")), load_file(str(cut / "model.safetensors"))
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)
