"""Plots: PNG files written atomically, skipped when there is nothing to draw."""
import numpy as np
import pytest
from PIL import Image

from breakhis import plots

PNG = b"\x89PNG\r\n\x1a\n"


def history(n=5, as_csv=False):
    rows = []
    for e in range(1, n + 1):
        row = {"epoch": e, "lr": 1e-4 * 0.5 ** e, "train_loss": 1 / e, "train_acc": 1 - 0.5 / e,
               "val_loss": 1.2 / e, "val_acc": 0.9 - 0.4 / e, "val_auroc": float("nan"), "is_best": e == 3}
        rows.append({k: str(v) for k, v in row.items()} if as_csv else row)
    return rows


def assert_png(path):
    assert path.read_bytes()[:8] == PNG
    with Image.open(path) as im:
        im.verify()
        assert im.size[0] > 100 and im.size[1] > 100


def test_all_plots_written_as_png(tmp_path):
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 100)
    p = np.clip(0.4 * y + 0.6 * rng.random(100), 0, 1)
    out = plots.save_plots(tmp_path / "plots", history(), y=y, p=p)
    assert sorted(f.name for f in out) == ["confusion.png", "learning_curves.png", "pr.png", "reliability.png", "roc.png"]
    for f in out:
        assert f.parent == tmp_path / "plots"
        assert_png(f)
    assert sorted(f.name for f in (tmp_path / "plots").iterdir()) == sorted(f.name for f in out)  # no temp files


def test_history_read_back_from_csv_strings(tmp_path):
    out = plots.save_plots(tmp_path, history(as_csv=True))
    assert [f.name for f in out] == ["learning_curves.png"]
    assert_png(out[0])


def test_nothing_written_without_data(tmp_path):
    assert plots.save_plots(tmp_path / "plots", []) == []
    assert plots.save_plots(tmp_path / "plots", [{"epoch": 1, "note": "x"}], y=[], p=[]) == []
    assert not (tmp_path / "plots").exists() or not any((tmp_path / "plots").iterdir())


def test_one_class_gives_no_curves_but_a_confusion_matrix_and_a_reliability_diagram(tmp_path):
    out = plots.save_plots(tmp_path, [], y=[1, 1, 1], p=[0.2, 0.7, 0.9])
    assert [f.name for f in out] == ["confusion.png", "reliability.png"]
    for f in out:
        assert_png(f)


def test_given_multiclass_confusion_is_drawn_and_names_must_match(tmp_path):
    names = [f"subtype{i}" for i in range(8)]
    cm = np.random.default_rng(1).integers(0, 20, (8, 8))
    out = plots.save_plots(tmp_path, [], class_names=names, confusion=cm.tolist())
    assert [f.name for f in out] == ["confusion.png"]
    assert_png(out[0])
    with pytest.raises(ValueError, match="class names"):
        plots.save_plots(tmp_path, [], class_names=("benign", "malignant"), confusion=cm)
    assert plots.save_plots(tmp_path / "empty", [], confusion=[[0, 0], [0, 0]]) == []
