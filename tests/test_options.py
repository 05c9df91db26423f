"""breakhis/options.py: every refusal of evaluate.py's and score.py's options, in one line, before any work."""
import pytest

from breakhis.config import make_config
from breakhis.errors import UserError
from breakhis.options import EvalOptions, ScoreOptions


@pytest.mark.parametrize("kw, n_runs, words", [
    ({"part": "train"}, 1, "--part 'train': choose val or test"),
    ({"by": "slide"}, 1, "--by 'slide': choose one of magnification, subtype, patient"),
    ({"n_boot": 0}, 1, "--n-boot 0: give at least 1 resample"),
    ({"sort": "luck"}, 1, "--sort 'luck': choose one of accuracy"),
    ({"threshold": "bogus"}, 1, "bad threshold rule 'bogus'"),
    ({"threshold": "recall=1.5"}, 1, "recall must be in (0, 1]"),
    ({"cam": -1}, 1, "--cam -1"),
    ({"save_temperature": True}, 1, "--save-temperature saves the temperature --calibrate fits"),
    ({"calibrate": True, "data": "other"}, 1, "--calibrate with --data other"),
    ({"calibrate": True, "part": "val"}, 1, "drop --part val"),
    ({"data": "other", "threshold": "youden"}, 1, "--threshold youden with --data: give a number"),
    ({"include_seen": True}, 1, "--include-seen keeps the run's own patients of another tree: add --data"),
    ({"export": "model.onnx"}, 1, "--export model.onnx: the file name must end in .pt2"),
    ({"trust_model": True}, 1, "--trust-model vouches for the file --model loads: add --model"),
    ({"tta": True, "cam": 2}, 3, "--tta, --cam apply to one run"),
    ({"csv": "book.csv"}, 1, "--csv writes the logbook table of several runs"),
    ({"markdown": "book.md"}, 1, "--markdown writes the logbook table of several runs"),
])
def test_eval_options_refuse_in_one_line(kw, n_runs, words):
    with pytest.raises(UserError) as e:
        EvalOptions(runs=["results/r"], **kw).validate(n_runs=n_runs)
    assert words in str(e.value) and "\n" not in str(e.value)


def test_eval_options_that_fit_pass_and_the_run_rules_see_the_task():
    assert EvalOptions(runs=["a", "b"], csv="book.csv", sort="auroc").validate(n_runs=2).sort == "auroc"
    opts = EvalOptions(runs=["r"], threshold="youden", calibrate=True, save_temperature=True).validate()
    opts.check_run(make_config({"task": "binary"}))  # fine for a binary run
    with pytest.raises(UserError, match="thresholds apply to the binary task only"):
        opts.check_run(make_config({"task": "subtype", "class_weights": "none"}))
    with pytest.raises(UserError, match="--calibrate: the subtype task is not supported"):
        EvalOptions(runs=["r"], calibrate=True).validate().check_run(make_config({"task": "subtype", "class_weights": "none"}))


@pytest.mark.parametrize("kw, words", [
    ({"paths": []}, "no image file given"),
    ({"out": "scores.txt"}, "--out scores.txt: give a file name ending in .csv"),
    ({"cam": -2}, "--cam -2"),
    ({"threshold": "0.5.5"}, "bad threshold rule '0.5.5'"),
])
def test_score_options_refuse_in_one_line(kw, words):
    with pytest.raises(UserError) as e:
        ScoreOptions(**{"run": "results/r", "paths": ["new/"], **kw}).validate()
    assert words in str(e.value) and "\n" not in str(e.value)
    ok = ScoreOptions(run="results/r", paths=["new/"], out="s.CSV", threshold="recall=0.9").validate()
    with pytest.raises(UserError, match="binary task only"):
        ok.check_run(make_config({"task": "subtype", "class_weights": "none"}))
