"""TensorBoard event files (breakhis/events.py), read back with TensorBoard's own EventAccumulator."""
import builtins
import math

import pytest

from breakhis.config import make_config
from breakhis.events import TAGS, Events, hparam_value
from breakhis.fit import fit
from breakhis.io import read_csv, read_json


def read_events(run_dir):
    """(scalars {tag: [(step, value)]}, hparams {name: value}) of a run folder's event files."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.plugins.hparams import plugin_data_pb2

    acc = EventAccumulator(str(run_dir), size_guidance={"scalars": 0})
    acc.Reload()
    scalars = {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}
    content = acc.PluginTagToContent("hparams").get("_hparams_/session_start_info")
    hparams = {}
    if content:
        info = plugin_data_pb2.HParamsPluginData.FromString(content).session_start_info
        for name, v in info.hparams.items():
            kind = v.WhichOneof("kind")
            hparams[name] = getattr(v, kind)
    return scalars, hparams


def expected_hparams(config: dict) -> dict:
    """config.json's settings as TensorBoard stores hparams: numbers as floats, tuples as 'a,b'."""
    out = {}
    for k, v in config.items():
        if k.startswith("_"):
            continue
        v = hparam_value(tuple(v) if isinstance(v, list) else v)
        out[k] = float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else v
    return out


def check_run_events(run_dir):
    """The event files of a finished run equal its history.csv epoch by epoch, and its hparams its config.json."""
    scalars, hparams = read_events(run_dir)
    history = read_csv(run_dir / "history.csv")
    for column, tag in TAGS.items():
        want = [(int(h["epoch"]), float(h[column])) for h in history if math.isfinite(float(h[column]))]
        assert [s for s, _ in scalars.get(tag, [])] == [s for s, _ in want], tag
        assert [v for _, v in scalars.get(tag, [])] == pytest.approx([v for _, v in want], rel=1e-6), tag
    assert hparams == expected_hparams(read_json(run_dir / "config.json"))
    test = read_json(run_dir / "metrics.json")["test"]
    assert scalars["test/accuracy"][0][1] == pytest.approx(test["accuracy"], rel=1e-6)


@pytest.mark.slow  # two frozen runs on a generated tree (~8 s)
def test_event_files_equal_history_and_config(demo_root, tmp_path):
    settings = {"data": str(demo_root), "cache_dir": str(tmp_path / "cache"), "backbone": "resnet18", "pretrained": False,
                "image_size": 32, "batch_size": 16, "epochs": 3, "head": (32,), "dropout": (0.2,), "lr": 1e-3,
                "freeze": True, "augment": False, "device": "cpu", "milestones": (2,)}
    run = tmp_path / "on"
    run.mkdir()
    fit(make_config(settings), run, progress=False)
    check_run_events(run)
    off = tmp_path / "off"
    off.mkdir()
    fit(make_config({**settings, "tensorboard": False}), off, progress=False)
    assert not list(off.glob("events.out.tfevents.*")) and (off / "history.csv").is_file()


def test_events_without_tensorboard_say_so_once_and_training_goes_on(tmp_path, monkeypatch, capsys):
    real = builtins.__import__

    def no_tensorboard(name, *a, **kw):
        if name.startswith("torch.utils.tensorboard"):
            raise ImportError("No module named 'tensorboard'")
        return real(name, *a, **kw)

    monkeypatch.setattr(builtins, "__import__", no_tensorboard)
    events = Events(tmp_path, enabled=True)
    events.epoch({"epoch": 1, "train_loss": 0.5})
    events.end({"lr": 0.1}, {"test": {"accuracy": 0.9}})
    events.close()
    err = capsys.readouterr().err
    assert err.count("TensorBoard events are off") == 1 and "No module named 'tensorboard'" in err
    assert not list(tmp_path.iterdir())


def test_events_in_a_folder_that_cannot_be_made_turn_off(tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    events = Events(blocker / "run", enabled=True)
    events.epoch({"epoch": 1, "train_loss": 0.5})
    events.close()
    assert "TensorBoard events are off" in capsys.readouterr().err


def test_disabled_events_write_nothing(tmp_path):
    events = Events(tmp_path, enabled=False)
    events.epoch({"epoch": 1, "train_loss": 0.5})
    events.end({}, {})
    events.close()
    assert not list(tmp_path.iterdir())


def test_hparam_values_are_what_tensorboard_takes():
    assert hparam_value((0.5, 0.8)) == "0.5,0.8" and hparam_value(()) == ""
    assert hparam_value(True) is True and hparam_value(3) == 3 and hparam_value("adamw") == "adamw"
    assert hparam_value(None) == "None"
