"""The config dataclass: flag generation, precedence, coercion and validation errors."""
import argparse
import dataclasses
import json

import pytest

from breakhis.config import FIELDS, TrainConfig, add_flags, coerce, load_config_file, make_config, overrides_from_args
from breakhis.errors import UserError
from breakhis.registry import BACKBONES, OPTIMIZERS, SCHEDULERS, SELECT_METRICS


def parse(argv):
    ap = argparse.ArgumentParser()
    add_flags(ap)
    return overrides_from_args(ap.parse_args(argv))


def test_defaults_are_the_logbook_best_entry():
    c = TrainConfig()
    assert (c.backbone, c.head, c.dropout, c.optimizer, c.lr, c.weight_decay) == \
        ("resnet152", (1000,), (0.5, 0.5), "adamw", 1e-4, 0.01)
    assert (c.scheduler, c.milestones, c.gamma, c.class_weights, c.split_ratio) == \
        ("multistep", (10, 30, 50), 0.1, (0.5, 0.8), "60:10:30")
    assert c.pretrained and not c.freeze


def test_every_field_has_a_flag_and_help():
    ap = argparse.ArgumentParser()
    add_flags(ap)
    flags = {s for a in ap._actions for s in a.option_strings}
    for name, f in FIELDS.items():
        assert "--" + name.replace("_", "-") in flags
        assert f.metadata["help"]


def test_only_given_flags_are_overrides():
    assert parse([]) == {}
    o = parse(["--backbone", "resnet50", "--freeze", "--head", "1000,512,128", "--dropout", "0.5,0.5,0.5",
               "--class-weights", "0.5,0.85", "--no-pretrained", "--lr", "3e-4"])
    assert o == {"backbone": "resnet50", "freeze": True, "head": (1000, 512, 128), "dropout": (0.5, 0.5, 0.5),
                 "class_weights": (0.5, 0.85), "pretrained": False, "lr": 3e-4}


def test_precedence_defaults_then_layers_in_order():
    c = make_config({"lr": 1e-3, "epochs": 5}, {"lr": 2e-3})
    assert c.lr == 2e-3 and c.epochs == 5 and c.backbone == "resnet152"


def test_head_none_and_grid_values():
    assert coerce("head", "none") == ()
    assert coerce("milestones", [20, 40, 60]) == (20, 40, 60)
    assert coerce("class_weights", (0.5, 0.8)) == (0.5, 0.8)
    assert coerce("freeze", "true") is True
    assert coerce("epochs", 3.0) == 3


@pytest.mark.parametrize("layer, words", [
    ({"lr": 0}, "--lr"),
    ({"lr": -1e-3}, "positive"),
    ({"class_weights": (0.5, 0.8, 0.9)}, "one positive weight per class"),
    ({"class_weights": (0.5, -1)}, "positive"),
    ({"dropout": (0.5, 0.5, 0.5)}, "at most one rate per linear layer"),
    ({"dropout": (1.5,)}, "[0, 1)"),
    ({"split": "70:20"}, "summing to 100"),
    ({"split": "70:10:10"}, "summing to 100"),
    ({"split": "a:b:c"}, "--split"),
    ({"magnification": "300"}, "choose one of"),
    ({"task": "grade"}, "choose one of"),
    ({"epochs": 0}, "at least 1"),
    ({"epochs": 2.5}, "--epochs"),
    ({"head": "10,x"}, "--head"),
    ({"cache_size": "256"}, "HxW"),
    ({"crop_scale": (0.5, 0.2)}, "--crop-scale"),
    ({"fold": 7}, "1..5"),
    ({"bogus": 1}, "valid settings"),
])
def test_bad_values_are_user_errors(layer, words):
    with pytest.raises(UserError, match=None) as e:
        make_config(layer)
    assert words in str(e.value)


def test_subtype_task_needs_eight_weights():
    with pytest.raises(UserError, match="8 classes"):
        make_config({"task": "subtype"})
    assert make_config({"task": "subtype", "class_weights": "none"}).num_classes == 8


def test_config_file_round_trip_and_errors(tmp_path):
    c = make_config({"backbone": "resnet50", "head": (512,)})
    p = tmp_path / "config.json"
    p.write_text(json.dumps({**c.to_dict(), "_env": {"torch": "x"}}))
    assert make_config(load_config_file(p)) == c
    p.write_text(json.dumps({**c.to_dict(), "colour": "red"}))
    with pytest.raises(UserError, match="colour"):
        load_config_file(p)
    p.write_text(json.dumps({"config": c.to_dict(), "metric": "val_acc"}))
    assert make_config(load_config_file(p)) == c
    with pytest.raises(UserError, match="not found"):
        load_config_file(tmp_path / "missing.json")
    (tmp_path / "bad.json").write_text("{")
    with pytest.raises(UserError, match="not valid JSON"):
        load_config_file(tmp_path / "bad.json")


def test_renamed_key_still_loads(tmp_path, capsys):
    """A config.json written before split became split_ratio loads, with a note; the flag keeps its old name too."""
    p = tmp_path / "config.json"
    p.write_text(json.dumps({"split": "70:10:20", "backbone": "resnet50"}))
    c = make_config(load_config_file(p))
    assert c.split_ratio == "70:10:20" and c.split_percentages() == (70, 10, 20)
    assert parse(["--split", "80:0:20"]) == {"split_ratio": "80:0:20"}
    assert parse(["--split-ratio", "80:0:20"]) == {"split_ratio": "80:0:20"}


@pytest.mark.parametrize("layer, words", [
    ({"backbone": "resnet999"}, "--backbone 'resnet999': choose one of resnet18"),
    ({"optimizer": "lbfgs"}, "--optimizer 'lbfgs': choose one of adam, adamw, sgd"),
    ({"scheduler": "cosmic"}, "--scheduler 'cosmic': choose one of none"),
    ({"select": "val_speed"}, "--select 'val_speed': choose one of val_acc"),
    ({"lr": float("inf")}, "--lr inf"),
    ({"weight_decay": -1}, "--weight-decay"),
    ({"device": "gpu"}, "--device 'gpu'"),
    ({"scheduler": "plateau", "plateau_factor": 1.5}, "--plateau-factor"),
    ({"scheduler": "onecycle", "pct_start": 1.0}, "--pct-start"),
    ({"scheduler": "step", "step_size": 0}, "--step-size"),
    ({"val_fraction": 1.0}, "--val-fraction"),
])
def test_validate_checks_registry_names_and_every_rule(layer, words):
    with pytest.raises(UserError) as e:
        make_config(layer)
    assert words in str(e.value)


@pytest.mark.parametrize("key, valid", [("backbone", BACKBONES), ("optimizer", OPTIMIZERS),
                                        ("scheduler", SCHEDULERS), ("select", SELECT_METRICS)])
def test_validate_itself_refuses_unknown_registry_names(key, valid):
    # validate() is the only check (the model, optimizer and schedule builders trust it), so it must
    # refuse a name that never went through coerce(): a config built with dataclasses.replace
    cfg = dataclasses.replace(TrainConfig(), **{key: "nonesuch"})
    with pytest.raises(UserError) as e:
        cfg.validate()
    assert f"'nonesuch': choose one of {', '.join(valid)}" in str(e.value)
