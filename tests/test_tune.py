"""tune.py: space files, presets, precedence, and real Ray Tune runs with ASHA on a generated tree (CPU)."""
import csv
import json
import os
import signal
import threading
import time
from pathlib import Path

import pytest

import train
import tune
from breakhis import runs
from breakhis.config import FIELDS, TrainConfig, make_config
from breakhis.errors import UserError, guard
from breakhis.io import read_csv, read_json
from breakhis.tuning import experiment as tune_exp
from breakhis.tuning import space

EXPERIMENTS = Path(__file__).resolve().parents[1] / "experiments"


def write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


# --- space files ------------------------------------------------------------------------------

GOOD = '''"""Asks which lr and head."""
from ray import tune
SPACE = {"lr": tune.loguniform(1e-5, 1e-2), "head": [(64,), (64, 32)], "augment": False}
BASE = {"batch_size": 16, "lr": 1e-3}
METRIC = "val_loss"
MODE = "min"
'''


def test_good_space_file(tmp_path):
    from ray import tune as rt

    s = space.load_space(write(tmp_path / "good.py", GOOD))
    assert s.doc == "Asks which lr and head." and s.metric == "val_loss" and s.mode == "min"
    assert s.base == {"batch_size": 16, "lr": 1e-3}
    ps = space.param_space(s)
    assert ps["head"] == rt.grid_search([(64,), (64, 32)])  # a plain list is a grid
    assert isinstance(ps["lr"], rt.search.sample.Domain) and ps["augment"] is False


@pytest.mark.parametrize("text, needle", [
    ("X = 1\n", "defines no SPACE"),
    ("SPACE = {}\n", "defines no SPACE"),
    ("SPACE = [1]\n", "defines no SPACE"),
    ("SPACE = {'lr': [1e-3], 'learning_rate': [1]}\n", "unknown setting(s) 'learning_rate'"),
    ("SPACE = {'lr': []}\n", "empty list"),
    ("SPACE = {'lr': [1e-3]}\nBASE = {'bogus': 1}\n", "BASE: unknown setting(s) 'bogus'"),
    ("SPACE = {'lr': [1e-3]}\nBASE = {'batch_size': 'many'}\n", "--batch-size 'many': expected int"),
    ("SPACE = {'lr': [1e-3]}\nMETRIC = 'val_accuracy'\n", "METRIC 'val_accuracy' is not reported"),
    ("SPACE = {'lr': [1e-3]}\nMODE = 'up'\n", "MODE 'up'"),
    ("SPACE = {'preset': ['nope']}\nPRESETS = {'a': {'lr': 1e-3}}\n", "unknown preset 'nope'; presets: a"),
    ("SPACE = {'lr': [1e-3]}\nPRESETS = {'a': {'lr': 'fast'}}\n", "PRESETS['a']: --lr 'fast': expected float"),
    ("SPACE = {'lr': [1e-3]\n", "failed to import: SyntaxError"),
    ("import not_a_module_anywhere\n", "failed to import: ModuleNotFoundError"),
])
def test_bad_space_files(tmp_path, text, needle):
    with pytest.raises(UserError) as e:
        space.load_space(write(tmp_path / "bad.py", text))
    assert needle in str(e.value)
    assert str(tmp_path / "bad.py") in str(e.value)  # says where


def test_unknown_key_lists_valid_keys(tmp_path):
    with pytest.raises(UserError) as e:
        space.load_space(write(tmp_path / "bad.py", "SPACE = {'learning_rate': [1]}\n"))
    listed = str(e.value).split("valid keys: ")[1].split(", ")
    assert listed == ["preset", *FIELDS]


def test_missing_or_non_python_space_file(tmp_path):
    with pytest.raises(UserError, match="not found; shipped files: .*experiments/lr.py"):
        space.load_space(tmp_path / "nope.py")
    with pytest.raises(UserError, match="not a Python file"):
        space.load_space(write(tmp_path / "space.txt", "SPACE = {}"))


@pytest.mark.parametrize("path", sorted(EXPERIMENTS.glob("*.py")), ids=lambda p: p.name)
def test_shipped_spaces_give_valid_configs(path):
    """Every grid value and preset of every shipped file resolves to a valid TrainConfig; a presets-only file
    (experiments/eva.py, for train.py --protocol eva) is refused by tune.py with the train.py command instead."""
    import itertools

    if "SPACE" not in path.read_text():
        with pytest.raises(UserError, match=f"holds presets for train.py.*python train.py --preset {path.stem}:NAME"):
            space.load_space(path)
        module = space._import(path, "preset file")
        presets = module.PRESETS
        assert presets and f"--preset {path.stem}:" in module.__doc__
        for name in presets:
            assert isinstance(make_config(space.load_preset(f"{path.stem}:{name}")), TrainConfig)
        return
    s = space.load_space(path)
    assert s.doc and "python tune.py --space experiments/" in s.doc
    grids = {k: v for k, v in s.space.items() if isinstance(v, list)}
    for combo in itertools.product(*grids.values()):
        sample = dict(zip(grids, combo))
        if path.name == "dropout.py":  # a sample_from: draw it for this head, many times
            for _ in range(50):
                sample["dropout"] = s.space["dropout"].func({"head": sample["head"]})
                assert 1 <= len(sample["dropout"]) <= min(3, len(sample["head"]) + 1)
                tune_exp.trial_config({}, sample, s.presets, "/")
        else:
            assert isinstance(tune_exp.trial_config({}, sample, s.presets, "/"), TrainConfig)


def test_shipped_grids_cover_the_logbook():
    weights = space.load_space(EXPERIMENTS / "weights.py").space["class_weights"]
    assert weights[0] == (0.5, 0.5) and weights[-1] == (0.5, 0.85)
    backbones = space.load_space(EXPERIMENTS / "backbones.py")
    picked = [tune_exp.trial_config({}, {"preset": p}, backbones.presets, "/") for p in backbones.space["preset"]]
    assert len({c.backbone for c in picked if not c.backbone.startswith("timm:")}) == 7
    assert {c.freeze for c in picked} == {False, True}
    sched = space.load_space(EXPERIMENTS / "schedulers.py")
    kinds = {tune_exp.trial_config({}, {"preset": p}, sched.presets, "/").scheduler for p in sched.space["preset"]}
    assert kinds == {"none", "step", "multistep", "exponential", "onecycle", "plateau"}
    milestones = {tune_exp.trial_config({}, {"preset": p}, sched.presets, "/").milestones
                  for p in ("multistep_20_40_60", "multistep_10_30_50")}
    assert milestones == {(20, 40, 60), (10, 30, 50)}


def test_foundation_entry_is_skipped_without_its_weights_and_runs_with_them(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("BREAKHIS_UNI_WEIGHTS", str(tmp_path / "absent.bin"))
    s = space.load_space(EXPERIMENTS / "backbones.py")
    assert "uni_frozen" not in s.space["preset"] and len(s.space["preset"]) == 14
    assert "skipping uni_frozen: no UNI weights" in capsys.readouterr().err
    (tmp_path / "uni.bin").write_bytes(b"")  # only its presence is asked here
    monkeypatch.setenv("BREAKHIS_UNI_WEIGHTS", str(tmp_path / "uni.bin"))
    s = space.load_space(EXPERIMENTS / "backbones.py")
    cfg = tune_exp.trial_config({}, {"preset": "uni_frozen"}, s.presets, "/")
    assert cfg.backbone == "timm:hf-hub:MahmoodLab/UNI" and cfg.freeze and cfg.weights == str(tmp_path / "uni.bin")


# --- presets ----------------------------------------------------------------------------------

def test_load_preset():
    assert space.load_preset("logbook:resnet50_frozen") == {"backbone": "resnet50", "freeze": True}
    assert space.load_preset(f"{EXPERIMENTS / 'logbook.py'}:deep_head")["head"] == (1000, 512, 128)
    best = make_config(space.load_preset("logbook:best"))
    assert best == TrainConfig()  # the logbook's best entry is train.py's default
    assert (best.backbone, best.lr, best.milestones, best.class_weights) == ("resnet152", 1e-4, (10, 30, 50), (0.5, 0.8))
    logbook = space.load_space(EXPERIMENTS / "logbook.py")
    assert logbook.space == {"preset": list(logbook.presets)} and 10 <= len(logbook.presets) <= 20


@pytest.mark.parametrize("ref, needle", [
    ("logbook:nope", "has no preset 'nope'; its presets: best, resnet50_frozen"),
    ("nofile:best", "not found; shipped files:"),
    ("logbook", "give FILE:NAME"),
    ("logbook:", "give FILE:NAME"),
])
def test_preset_errors(ref, needle):
    with pytest.raises(UserError) as e:
        space.load_preset(ref)
    assert needle in str(e.value)


def test_train_py_runs_a_preset(monkeypatch):
    a = train.parse(["--preset", "logbook:deep_head", "--lr", "3e-4"])
    cfg = train.resolve(a)
    assert cfg.head == (1000, 512, 128) and cfg.dropout == (0.5, 0.5, 0.5) and cfg.lr == 3e-4


def test_sample_overrides_expand_presets():
    presets = {"a": {"lr": 1e-3, "freeze": True}}
    assert space.sample_overrides({"preset": "a", "lr": 5e-4}, presets) == {"lr": 5e-4, "freeze": True}
    assert space.sample_overrides({"preset": {"seed": 3}}, presets) == {"seed": 3}
    assert space.sample_overrides({"preset": "logbook:alexnet"}, presets) == {"backbone": "alexnet"}
    with pytest.raises(UserError, match="unknown preset 'b'; presets: a"):
        space.sample_overrides({"preset": "b"}, presets)


# --- precedence and the experiment's settings -------------------------------------------------

def test_precedence_defaults_base_flags_sample(tmp_path):
    s = space.load_space(write(tmp_path / "s.py", GOOD))
    setup = tune_exp.make_setup(s, {"batch_size": 4, "image_size": 64}, metric=None, mode=None, max_epochs=7,
                              grace_period=1, reduction_factor=2, samples=1, concurrent=None)
    assert (setup.metric, setup.mode) == ("val_loss", "min")  # from the file
    cfg = tune_exp.trial_config(setup.base, {"image_size": 48, "head": [64, 32]}, s.presets, str(tmp_path))
    assert cfg.lr == 1e-3                # BASE over the default
    assert cfg.batch_size == 4           # flag over BASE
    assert cfg.image_size == 48          # sample over flag
    assert cfg.head == (64, 32) and cfg.epochs == 7 and cfg.select == "val_loss"
    assert cfg.weight_decay == TrainConfig().weight_decay
    assert cfg.data == str(tmp_path / "data/BreaKHis_v1")  # relative paths are made absolute


def test_make_setup_defaults_and_errors(tmp_path):
    s = space.load_space(write(tmp_path / "s.py", "SPACE = {'lr': [1e-3]}\n"))
    kw = dict(metric=None, mode=None, max_epochs=None, grace_period=None, reduction_factor=2, samples=1, concurrent=None)
    setup = tune_exp.make_setup(s, {"epochs": 9}, **kw)
    assert (setup.metric, setup.mode, setup.max_epochs, setup.base["select"]) == ("val_acc", "max", 9, "val_acc")
    assert setup.grace_period == 5 and tune_exp.make_setup(s, {"epochs": 3}, **kw).grace_period == 3
    assert tune_exp.make_setup(s, {}, **{**kw, "metric": "train_loss"}).mode == "min"
    assert "select" not in tune_exp.make_setup(s, {}, **{**kw, "metric": "train_acc"}).base
    for change, needle in [({"metric": "acc"}, "--metric 'acc'"), ({"grace_period": 10, "max_epochs": 5}, "--grace-period"),
                           ({"reduction_factor": 1}, "--reduction-factor 1"), ({"samples": 0}, "--samples 0"),
                           ({"concurrent": 0}, "--concurrent 0")]:
        with pytest.raises(UserError, match=needle):
            tune_exp.make_setup(s, {}, **{**kw, **change})
    with pytest.raises(UserError, match="--lr"):
        tune_exp.make_setup(s, {"lr": -1.0}, **kw)  # a bad flag fails before Ray starts
    setup.save(tmp_path)
    assert tune_exp.Setup.load(tmp_path) == setup
    with pytest.raises(UserError, match="not a tune experiment folder"):
        tune_exp.Setup.load(tmp_path / "nothing")


def test_cli_errors_before_ray(tmp_path):
    res = ["--results", str(tmp_path)]
    with pytest.raises(UserError, match="--space FILE is required"):
        tune.main(res)
    with pytest.raises(UserError, match="needs --name"):
        tune.main(["--resume", *res])
    with pytest.raises(UserError, match="no experiment"):
        tune.main(["--resume", "--name", "x", *res])
    (tmp_path / "tune" / "x").mkdir(parents=True)
    tune_exp.Setup(str(EXPERIMENTS / "lr.py"), {}, "val_acc", "max", 2, 1, 2, 1, None, "/").save(tmp_path / "tune" / "x")
    with pytest.raises(UserError, match="stored settings .*drop --samples --lr"):
        tune.main(["--resume", "--name", "x", "--samples", "2", "--lr", "1e-3", *res])
    with pytest.raises(UserError, match="already exists; finished experiments are never overwritten"):
        tune.main(["--space", str(EXPERIMENTS / "lr.py"), "--name", "x", *res])
    assert guard(tune.main, ["--space", str(tmp_path / "missing.py"), *res]) == 2


def test_short_error_unwraps_ray_errors():
    from breakhis.tuning.output import short_error

    class Wrapped(Exception):
        cause = UserError("--dropout has 3 rates but the head has only 2 linear layer(s)")

    assert short_error(Wrapped("traceback...")) == "--dropout has 3 rates but the head has only 2 linear layer(s)"
    assert short_error(ValueError("bad\nmore")) == "ValueError: bad"
    assert short_error(None) == ""


# --- real Ray Tune runs -----------------------------------------------------------------------

FLAGS = ["--backbone", "resnet18", "--no-pretrained", "--image-size", "32", "--batch-size", "8", "--head", "32",
         "--dropout", "0.2", "--device", "cpu"]
ASHA = ["--grace-period", "1", "--reduction-factor", "2"]
# val_loss stays near ln 2 at lr 1e-7 and blows up at lr 5e-3 on a randomly initialised resnet18
# (eval-mode BatchNorm statistics lag behind): a gap ASHA cannot miss at its first rung
MAIN_SPACE = '''"""Calm against wild learning rates, and a trial whose batch does not fit its data (found only in the trial)."""
PRESETS = {"calm": {"lr": 1e-7}, "broken": {"batch_size": 100000},
           "calm2": {"lr": 1e-7, "seed": 1}, "wild": {"lr": 5e-3}}
SPACE = {"preset": ["calm", "broken", "calm2", "wild"]}
METRIC = "val_loss"
'''


@pytest.fixture(scope="module")
def ray_cluster():
    import logging

    import ray

    if ray.is_initialized():  # left by another module's test: this module wants its own 2-CPU Ray
        ray.shutdown()
    ray.init(num_cpus=2, include_dashboard=False, logging_level=logging.WARNING)
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def tree(tmp_path_factory):
    from breakhis.data.demo import make_demo

    return make_demo(tmp_path_factory.mktemp("tune-demo"), patients=12, images_per_patient=6, size=(64, 48))


@pytest.fixture(scope="module")
def experiment(ray_cluster, tree, tmp_path_factory):
    """One 4-trial experiment: two calm trials, one wild (ASHA stops it), one broken (fails)."""
    tmp = tmp_path_factory.mktemp("tune")
    space = write(tmp / "space.py", MAIN_SPACE)
    cache = tmp / "cache"
    argv = ["--space", str(space), "--data", str(tree), "--cache-dir", str(cache), "--results", str(tmp / "results"),
            "--name", "main", "--max-epochs", "3", "--concurrent", "2", *ASHA, *FLAGS]
    t0 = time.perf_counter()
    code = tune.main(argv)
    print(f"4-trial experiment: {time.perf_counter() - t0:.1f} s")
    exp = tmp / "results" / "tune" / "main"
    with open(exp / "trials.csv") as f:
        rows = {r["preset"]: r for r in csv.DictReader(f)}
    return code, exp, rows, argv, cache


@pytest.mark.slow  # end to end: Ray trials on a generated tree
def test_trials_csv(experiment):
    code, exp, rows, _, _ = experiment
    assert code == 0
    assert set(rows) == {"calm", "calm2", "wild", "broken"}
    for col in ("trial", "status", "epochs", "stopped_early", "best_val_loss", "best_epoch", "test_accuracy",
                "test_auroc", "test_f1", "run", "error"):
        assert col in rows["calm"]
    wild = rows["wild"]
    assert (wild["status"], wild["epochs"], wild["stopped_early"]) == ("stopped", "1", "True")
    assert float(wild["best_val_loss"]) > 2 * float(rows["calm"]["best_val_loss"])
    for name in ("calm", "calm2"):
        assert rows[name]["status"] in ("finished", "stopped") and rows[name]["error"] == ""
    assert rows["calm"]["status"] == "finished" and rows["calm"]["epochs"] == "3" and rows["calm"]["stopped_early"] == "False"
    broken = rows["broken"]
    assert broken["status"] == "failed" and broken["stopped_early"] == "False"
    assert "fewer than one batch of 100000" in broken["error"]
    # every finished or stopped trial is a complete run folder, scored on the test set
    for name in ("calm", "calm2", "wild"):
        run = Path(rows[name]["run"])
        assert run.parent == exp / "runs" and runs.is_run(run) and (run / "metrics.json").is_file()
        assert not (run / "last.pt").exists()
        metrics = json.loads((run / "metrics.json").read_text())
        assert float(rows[name]["test_accuracy"]) == pytest.approx(metrics["test"]["accuracy"])
        history = read_csv(run / "history.csv")
        assert [int(h["epoch"]) for h in history] == list(range(1, int(rows[name]["epochs"]) + 1))
        assert float(rows[name]["best_val_loss"]) == pytest.approx(min(float(h["val_loss"]) for h in history))
    assert read_json(Path(wild["run"]) / "status.json")["status"] == "stopped"


@pytest.mark.slow  # end to end: Ray trials on a generated tree
def test_best_json_is_retrained_by_train_py(experiment, tmp_path):
    _, exp, rows, _, cache = experiment
    best = json.loads((exp / "best.json").read_text())
    calm = [rows[n] for n in ("calm", "calm2") if rows[n]["status"] in ("finished", "stopped")]
    winner = min(calm, key=lambda r: float(r["best_val_loss"]))
    assert (best["metric"], best["trial"], best["run"]) == ("val_loss", winner["trial"], winner["run"])
    assert best["value"] == pytest.approx(float(winner["best_val_loss"]))
    assert best["config"] == runs.load_config(Path(winner["run"])).to_dict()
    assert best["config"]["lr"] == 1e-7 and best["config"]["epochs"] == 3 and best["config"]["select"] == "val_loss"
    # the winner's curse: its test figure, with the interval of its completed metrics.json, beside the validation one
    test = json.loads((Path(winner["run"]) / "metrics.json").read_text())["test"]
    held = best["held_out"]
    assert held["validation"] == best["value"] and held["test_figure"] == "accuracy"
    assert held["test"] == pytest.approx(test["accuracy"]) and held["test_ci"] == pytest.approx(test["ci"]["accuracy"])
    scored = sum(r["status"] in ("finished", "stopped") and r["best_val_loss"] != "" for r in rows.values())
    assert held["trials"] == scored and f"best of {scored} trials" in held["note"] and "--folds" in held["note"]
    code = guard(train.main, ["--config", str(exp / "best.json"), "--epochs", "1", "--results", str(tmp_path),
                              "--name", "again", "--quiet"])
    assert code == 0
    again = runs.load_config(tmp_path / "again")
    assert again.to_dict() == {**best["config"], "epochs": 1}


@pytest.mark.slow  # end to end: Ray trials on a generated tree
def test_finished_experiment_is_not_overwritten(experiment):
    _, exp, _, argv, _ = experiment
    before = (exp / "trials.csv").read_text()
    assert guard(tune.main, argv) == 2
    assert (exp / "trials.csv").read_text() == before


@pytest.mark.slow  # end to end: Ray trials on a generated tree
def test_results_table_marks_best_stopped_and_failed(experiment):
    from rich.console import Console

    from breakhis.tuning.results import results_table

    _, exp, rows, _, _ = experiment
    setup = tune_exp.Setup.load(exp)
    with open(exp / "trials.csv") as f:
        table_rows = [{**r, "epochs": int(r["epochs"]), "stopped_early": r["stopped_early"] == "True",
                       "best_val_loss": float(r["best_val_loss"]) if r["best_val_loss"] else None,
                       **{k: float(r[k]) if r[k] else None for k in r if k.startswith("test_")}}
                      for r in csv.DictReader(f)]
    console = Console(width=250, record=True)
    console.print(results_table(table_rows, setup, ["preset"], "t"))
    text = console.export_text()
    lines = [ln for ln in text.splitlines() if "│" in ln]
    best = json.loads((exp / "best.json").read_text())["trial"]
    assert "★ " + best in lines[0]  # sorted by val_loss (min): the best first
    assert "stopped early" in next(ln for ln in lines if "wild" in ln)
    assert "broken" in lines[-1] and "failed" in lines[-1]
    assert f"{rows['broken']['trial']} failed: the training partition has" in text


def _interrupt_after_first_epoch(exp: Path):
    """Send Ctrl-C to this process once a trial has finished its first epoch."""
    def watch():
        for _ in range(6000):
            if any(len(read_csv(p)) >= 1 for p in exp.glob("runs/*/history.csv")):
                os.kill(os.getpid(), signal.SIGINT)
                return
            time.sleep(0.05)
    threading.Thread(target=watch, daemon=True).start()


@pytest.mark.slow  # end to end: Ray trials on a generated tree
def test_resume_after_interruption(ray_cluster, tree, tmp_path):
    space = write(tmp_path / "space.py", 'SPACE = {"seed": [0, 1]}\nBASE = {"lr": 1e-7}\n')
    res = ["--results", str(tmp_path / "results")]
    argv = ["--space", str(space), "--data", str(tree), "--cache-dir", str(tmp_path / "cache"), *res, "--name", "r",
            "--max-epochs", "2", "--concurrent", "1", *ASHA, *FLAGS]
    exp = tmp_path / "results" / "tune" / "r"
    _interrupt_after_first_epoch(exp)
    assert tune.main(argv) == 130
    with open(exp / "trials.csv") as f:
        assert "interrupted" in {r["status"] for r in csv.DictReader(f)}
    assert not (exp / "best.json").exists()
    # what the interrupted trials had done: epochs with their measured seconds, and the state to continue from
    done = {p.parent.name: read_csv(p) for p in exp.glob("runs/*/history.csv")}
    assert any(done.values())
    for trial_id in done:
        if read_json(exp / "runs" / trial_id / "status.json")["status"] != "finished":
            assert (exp / "runs" / trial_id / "last.pt").is_file()
    assert guard(tune.main, argv) == 2  # an interrupted experiment is not restarted from scratch either

    assert tune.main(["--name", "r", "--resume", *res]) == 0
    with open(exp / "trials.csv") as f:
        rows = list(csv.DictReader(f))
    assert [r["seed"] for r in rows] == ["0", "1"]
    for r in rows:
        assert (r["status"], r["epochs"]) in {("finished", "2"), ("stopped", "1")}
        history = read_csv(Path(r["run"]) / "history.csv")
        assert [int(h["epoch"]) for h in history] == list(range(1, int(r["epochs"]) + 1))
        before = done.get(r["trial"], [])
        assert history[:len(before)] == before  # continued from its last epoch, not redone
    assert (exp / "best.json").is_file()


def test_grid_values_are_checked_before_ray(tmp_path):
    """Settings that do not fit together fail when the experiment is set up, naming the trial, not in Ray."""
    s = space.load_space(write(tmp_path / "s.py", '''PRESETS = {"ok": {}, "broken": {"head": (64,), "dropout": (0.5, 0.5, 0.5)}}
SPACE = {"preset": ["ok", "broken"], "backbone": ["resnet18", "resnet999"]}
'''))
    kw = dict(metric=None, mode=None, max_epochs=2, grace_period=1, reduction_factor=2, samples=1, concurrent=None)
    with pytest.raises(UserError, match="resnet999"):
        tune_exp.make_setup(s, {}, **kw)
    s = space.load_space(write(tmp_path / "t.py", '''PRESETS = {"ok": {}, "broken": {"head": (64,), "dropout": (0.5, 0.5, 0.5)}}
SPACE = {"preset": ["ok", "broken"]}
'''))
    with pytest.raises(UserError, match="preset='broken' would fail: --dropout has 3 rates"):
        tune_exp.make_setup(s, {}, **kw)
    assert space.check_grid(space.load_space(EXPERIMENTS / "logbook.py"), {}) == len(space.load_space(EXPERIMENTS / "logbook.py").presets)


@pytest.mark.slow  # end to end: Ray trials on a generated tree
def test_frozen_sweep_reads_features_the_driver_computed_once(ray_cluster, tree, tmp_path):
    """tune.py --freeze: the driver computes the backbone's features once; the trials (class weights
    here) share them, so the feature folder holds one file per partition (test too: the trials score on
    them), not one per trial."""
    space = write(tmp_path / "space.py", '"""Two class weights on a frozen backbone."""\n'
                                         'SPACE = {"class_weights": [(0.5, 0.5), (0.5, 0.8)]}\n')
    cache = tmp_path / "cache"
    argv = ["--space", str(space), "--data", str(tree), "--cache-dir", str(cache), "--results", str(tmp_path / "res"),
            "--name", "frozen", "--max-epochs", "2", "--concurrent", "2", "--freeze", "--no-augment", *ASHA, *FLAGS]
    assert tune.main(argv) == 0
    with open(tmp_path / "res" / "tune" / "frozen" / "trials.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 2 and all(r["status"] in ("finished", "stopped") for r in rows)
    assert sorted(p.name.split("-")[-2] for p in (cache / "features").glob("*.npy")) == ["test", "train", "val"]


NARROW_SPACE = '''"""Which class weights and dropout."""
SPACE = {"class_weights": [(0.5, 0.5), (0.5, 0.85)], "dropout": [(0.25, 0.125)]}
'''


@pytest.mark.slow  # end to end: tune.py in its own process with Ray trials
def test_a_newcomer_at_80_columns_sees_the_swept_values_whole_and_no_ray_noise(tree, tmp_path):
    """tune.py in a fresh process (its own Ray) at COLUMNS=80: every swept value is whole in the table and the
    progress lines, Ray's own log lines go to the experiment's ray.log, paths are relative to where the user
    stands, and the retrain line is one copyable line."""
    import subprocess
    import sys

    write(tmp_path / "narrow.py", NARROW_SPACE)
    argv = ["--space", "narrow.py", "--data", str(tree), "--cache-dir", str(tmp_path / "cache"), "--name", "n",
            "--max-epochs", "1", "--concurrent", "1", "--workers", "1", *FLAGS]
    env = {**os.environ, "COLUMNS": "80", "PYTHONPATH": str(Path(tune.__file__).resolve().parent)}
    out = subprocess.run([sys.executable, str(Path(tune.__file__).resolve()), *argv], cwd=tmp_path, env=env,
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    text = out.stdout + out.stderr
    rows = [ln for ln in out.stdout.splitlines() if "│" in ln]
    for whole in ("0.5,0.5", "0.5,0.85", "0.25,0.125"):  # the swept values, never cut or wrapped
        assert any(whole in ln for ln in rows), (whole, out.stdout)
    assert all(len(ln) <= 80 for ln in rows), out.stdout
    progress = [ln for ln in out.stdout.splitlines() if "epoch 1/1" in ln]
    assert len(progress) == 2 and all(ln.endswith("dropout=0.25,0.125") for ln in progress)
    assert sorted(ln.split("class_weights=")[1].split()[0] for ln in progress) == ["0.5,0.5", "0.5,0.85"]
    assert not [ln for ln in text.splitlines() if "WARNING" in ln or "Token authentication" in ln or "(raylet" in ln]
    exp = tmp_path / "results" / "tune" / "n"
    assert (exp / "ray.log").is_file()
    assert "retrain it: python train.py --config results/tune/n/best.json\n" in out.stdout
    assert "trials.csv: results/tune/n/trials.csv\n" in out.stdout


# trials.csv of LR_SPACE's sweep (LR_ARGV) as the code before issue 21 wrote it (every trial with intervals and
# plots, stopped ones scored in the driver); ASHA's decisions and the point figures must not change
LR_SPACE = '"""Four learning rates of a frozen head."""\nSPACE = {"lr": [1e-4, 3e-3, 3e-2, 3e-1]}\n'
LR_REFERENCE = {  # lr: (status, epochs, best_val_loss, test_accuracy, test_auroc, test_loss)
    "0.0001": ("finished", 4, 0.6858559648195902, 0.3333333333333333, 0.5138888888888888, 0.7452902793884277),
    "0.003": ("stopped", 1, 0.7206866343816122, 0.3333333333333333, 0.5833333333333334, 0.8780099617110358),
    "0.03": ("stopped", 1, 0.9287446190913519, 0.3333333333333333, 0.6388888888888888, 1.273568919963307),
    "0.3": ("stopped", 1, 12.958567301432291, 0.3333333333333333, 0.5, 18.774635314941406),
}


@pytest.mark.slow  # end to end: Ray trials on a generated tree
def test_frozen_trials_are_lean_complete_and_decide_as_before(ray_cluster, tmp_path):
    """A frozen sweep, one trial at a time (ASHA's decisions then depend on the values alone): trials.csv and
    best.json as the code before issue 21 wrote them; every trial a complete run folder with point figures,
    events equal to its history.csv and hparams equal to its config.json, and trial.json; the winner alone
    with intervals and plots; the sweep's time line in timing.json."""
    from test_events import check_run_events

    from breakhis.data.demo import make_demo

    tree = make_demo(tmp_path / "tree", patients=12, images_per_patient=6, size=(64, 48))  # as LR_REFERENCE's
    space_file = write(tmp_path / "space.py", LR_SPACE)
    argv = ["--space", str(space_file), "--data", str(tree), "--cache-dir", str(tmp_path / "cache"),
            "--results", str(tmp_path / "res"), "--name", "lr", "--max-epochs", "4", "--concurrent", "1", "--freeze",
            "--no-augment", "--grace-period", "1", "--reduction-factor", "2", "--seed", "0", "--metric", "val_loss",
            *FLAGS]
    assert tune.main(argv) == 0
    exp = tmp_path / "res" / "tune" / "lr"
    with open(exp / "trials.csv") as f:
        rows = {r["lr"]: r for r in csv.DictReader(f)}
    assert set(rows) == set(LR_REFERENCE)
    for lr, (status, epochs, best, acc, auroc, loss) in LR_REFERENCE.items():
        r = rows[lr]
        assert (r["status"], int(r["epochs"]), r["error"]) == (status, epochs, ""), lr
        got = [float(r[k]) for k in ("best_val_loss", "test_accuracy", "test_auroc", "test_loss")]
        assert got == pytest.approx([best, acc, auroc, loss], rel=1e-5), lr
    best_json = json.loads((exp / "best.json").read_text())
    assert (best_json["value"], best_json["config"]["lr"]) == (pytest.approx(0.6858559648195902, rel=1e-5), 1e-4)

    winner = Path(best_json["run"])
    for r in rows.values():
        run = Path(r["run"])
        assert runs.is_run(run) and (run / "model.safetensors").is_file() and not (run / "last.pt").exists()
        assert read_json(run / "status.json")["status"] == r["status"]
        check_run_events(run)
        own = read_json(run / "trial.json")  # absent when the experiment's end cut the trial's worker short
        assert own is None or own["seconds"] >= own["epoch_seconds"] > 0
        test = read_json(run / "metrics.json")["test"]
        assert test["accuracy"] == pytest.approx(float(r["test_accuracy"]))
        if run == winner:
            assert "ci" in test and len(list((run / "plots").glob("*.png"))) == 5
        else:
            assert "ci" not in test and not (run / "plots").exists()
    timing = read_json(exp / "timing.json")
    assert {"driver_setup", "ray_start", "trials", "results", "trial_epochs", "trial_overhead"} <= set(timing)
    assert timing["trials_timed"] == len(list(exp.glob("runs/*/trial.json"))) >= 3
    assert not list(exp.glob("*/events.out.tfevents.*"))  # no second copy of the events in Ray's trial folders
