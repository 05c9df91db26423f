"""Search spaces and presets: experiments/*.py files, imported by path (never exec'd as text).

A space file:
    SPACE    setting -> ray.tune domain (tune.loguniform(1e-5, 1e-2)), or a plain list = a grid;
             the key "preset" picks named override sets: PRESETS of the same file, or "file:NAME"
    BASE     optional settings every trial starts from
    METRIC   optional, what ASHA and the ranking optimise (default val_acc); MODE min or max
    PRESETS  optional, name -> settings (`python train.py --preset logbook:NAME` runs one)
Precedence: TrainConfig defaults < BASE < command-line flags < the SPACE sample.

No torch import here (ray.tune only inside param_space): train.py resolves --preset before the
config is validated, in a fraction of a second.
"""
from __future__ import annotations

import importlib.util
import itertools
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..config import FIELDS, coerce, make_config, renamed
from ..errors import UserError
from ..registry import EPOCH_METRICS

EXPERIMENTS = Path(__file__).resolve().parent.parent.parent / "experiments"
PRESET = "preset"  # the special SPACE key that expands to a preset's settings
MAX_CHECKED = 4096  # grid combinations checked one by one before Ray starts (beyond: each value alone)

@dataclass
class Space:
    """A loaded space file."""
    path: Path
    space: dict[str, Any]          # as written: domains, grid lists, constants
    base: dict[str, Any]
    presets: dict[str, dict]
    metric: str | None
    mode: str | None
    doc: str


def shipped(folder: Path = EXPERIMENTS) -> list[str]:
    return sorted(str(p.relative_to(folder.parent)) for p in folder.glob("*.py") if not p.name.startswith("_"))


def _import(path: Path, what: str):
    """The module at path, imported without entering sys.modules (so Ray pickles its lambdas by value)."""
    if not path.is_file():
        raise UserError(f"{what} {path} not found; shipped files: {', '.join(shipped()) or 'none'}")
    spec = importlib.util.spec_from_file_location(f"breakhis_space_{path.stem}", path)
    if spec is None or spec.loader is None:
        raise UserError(f"{what} {path}: not a Python file; give a .py file such as experiments/lr.py")
    module = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(module)
    except Exception as e:  # the user's file: report its own error in one line
        raise UserError(f"{what} {path} failed to import: {type(e).__name__}: {e}") from None
    return module


def check_settings(settings: Any, where: str, extra: tuple[str, ...] = (), values: bool = True) -> dict:
    """settings must be a dict of TrainConfig fields (plus extra keys); values are checked with coerce."""
    if not isinstance(settings, dict):
        raise UserError(f"{where}: expected a dict of settings, got {type(settings).__name__}")
    settings = renamed(settings, where)
    bad = [k for k in settings if k not in FIELDS and k not in extra]
    if bad:
        raise UserError(f"{where}: unknown setting(s) {', '.join(map(repr, bad))}; valid keys: "
                        f"{', '.join([*extra, *FIELDS])}")
    if values:
        for k, v in settings.items():
            if k in FIELDS:
                try:
                    coerce(k, v)
                except UserError as e:
                    raise UserError(f"{where}: {e}") from None
    return settings


def _presets(module, path: Path) -> dict[str, dict]:
    presets = getattr(module, "PRESETS", {})
    if not isinstance(presets, dict):
        raise UserError(f"{path}: PRESETS must be a dict of name -> settings")
    for name, settings in presets.items():
        check_settings(settings, f"{path} PRESETS[{name!r}]")
    return presets


def load_preset(ref: str) -> dict[str, Any]:
    """'logbook:NAME' (experiments/logbook.py) or 'path/to/file.py:NAME' -> that preset's settings."""
    file, sep, name = str(ref).rpartition(":")
    if not sep or not file or not name:
        raise UserError(f"preset {ref!r}: give FILE:NAME, e.g. logbook:resnet50_frozen")
    path = Path(file) if file.endswith(".py") else EXPERIMENTS / f"{file}.py"
    presets = _presets(_import(path, f"preset {ref!r}: preset file"), path)
    if name not in presets:
        raise UserError(f"preset {ref!r}: {path} has no preset {name!r}; its presets: {', '.join(presets) or 'none'}")
    return dict(presets[name])


def resolve_preset(value: Any, presets: dict[str, dict], where: str) -> dict[str, Any]:
    """A preset value of a sample: a name in presets, 'file:NAME', or a dict of settings."""
    if isinstance(value, dict):
        return check_settings(value, where)
    if isinstance(value, str):
        if value in presets:
            return dict(presets[value])
        if ":" in value:
            return load_preset(value)
        raise UserError(f"{where}: unknown preset {value!r}; presets: {', '.join(presets) or 'none (define PRESETS)'}")
    raise UserError(f"{where}: a preset is a name or a dict of settings, got {value!r}")


def load_space(path: str | Path) -> Space:
    """Load and check a space file; every mistake is a UserError naming the file and the valid keys."""
    path = Path(path)
    module = _import(path, "space file")
    space = getattr(module, "SPACE", None)
    if space is None and isinstance(getattr(module, "PRESETS", None), dict):
        raise UserError(f"{path} holds presets for train.py, not a search space (no SPACE); run one with "
                        f"python train.py --preset {path.stem}:NAME (its presets: {', '.join(module.PRESETS)})")
    if not isinstance(space, dict) or not space:
        raise UserError(f"space file {path} defines no SPACE dict (or an empty one); write e.g. "
                        f"SPACE = {{'lr': tune.loguniform(1e-5, 1e-2), 'freeze': [True, False]}}")
    check_settings(space, f"space file {path} SPACE", extra=(PRESET,), values=False)
    for k, v in space.items():
        if isinstance(v, list) and not v:
            raise UserError(f"space file {path} SPACE[{k!r}] is an empty list; give at least one value")
    base = check_settings(getattr(module, "BASE", {}), f"space file {path} BASE")
    presets = _presets(module, path)
    if PRESET in space:
        choices = space[PRESET]
        for v in choices if isinstance(choices, list) else getattr(choices, "categories", []):
            resolve_preset(v, presets, f"space file {path} SPACE['preset']")
    metric, mode = getattr(module, "METRIC", None), getattr(module, "MODE", None)
    if metric is not None and metric not in EPOCH_METRICS:
        raise UserError(f"space file {path}: METRIC {metric!r} is not reported; choose one of {', '.join(EPOCH_METRICS)}")
    if mode is not None and mode not in ("min", "max"):
        raise UserError(f"space file {path}: MODE {mode!r}: use 'min' or 'max'")
    return Space(path.resolve(), space, dict(base), presets, metric, mode, (module.__doc__ or "").strip())


def param_space(space: Space) -> dict[str, Any]:
    """Ray's param_space: plain lists become grids, domains and constants pass through."""
    from ray import tune

    return {k: tune.grid_search(v) if isinstance(v, list) else v for k, v in space.space.items()}


def sample_overrides(sample: dict[str, Any], presets: dict[str, dict]) -> dict[str, Any]:
    """One trial's sample as settings: the preset first, the sample's other keys over it."""
    out: dict[str, Any] = {}
    if PRESET in sample:
        out.update(resolve_preset(sample[PRESET], presets, "preset"))
    out.update({k: v for k, v in sample.items() if k != PRESET})
    return out


def enumerable(value: Any) -> list | None:
    """The values a grid list or a choice domain (tune.choice) can take; None for other domains."""
    if isinstance(value, list):
        return value
    categories = getattr(value, "categories", None)
    return list(categories) if categories is not None else None


def check_grid(space: Space, base: dict[str, Any]) -> int:
    """Validate every combination of the grid and choice values over `base` (TrainConfig.validate),
    before Ray starts; random domains keep base's value. Returns how many were checked.

    A bad value fails here with the space file, the key and the value named, not in every trial."""
    keys = [k for k, v in space.space.items() if enumerable(v) is not None]
    values = [enumerable(space.space[k]) for k in keys]
    total = 1
    for v in values:
        total *= len(v)
    combos = itertools.product(*values) if total <= MAX_CHECKED else \
        ((v if j == i else vals[0] for j, vals in enumerate(values)) for i, vs in enumerate(values) for v in vs)
    n = 0
    for combo in combos:
        sample = dict(zip(keys, combo))
        try:
            make_config(base, sample_overrides(sample, space.presets))
        except UserError as e:
            shown = ", ".join(f"{k}={v!r}" for k, v in sample.items())
            raise UserError(f"space file {space.path}: the trial {shown} would fail: {e}") from None
        n += 1
    return n
