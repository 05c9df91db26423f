"""Ray Tune searches over the training config: space files, presets, the trial, the results.

A space file (experiments/*.py) is a Python module imported by path, never exec'd as text:
    SPACE    setting -> ray.tune domain (tune.loguniform(1e-5, 1e-2)), or a plain list = a grid;
             the key "preset" picks named override sets: PRESETS of the same file, or "file:NAME"
    BASE     optional settings every trial starts from
    METRIC   optional, what ASHA and the ranking optimise (default val_acc); MODE min or max
    PRESETS  optional, name -> settings (`python train.py --preset logbook:NAME` runs one)
Precedence: TrainConfig defaults < BASE < command-line flags < the SPACE sample.

An experiment lives in results/tune/<name>/: Ray's experiment state and trial folders, tune.json
(what --resume continues), runs/<trial_id>/ (one normal run folder per trial, written by fit),
trials.csv and best.json.
"""
from __future__ import annotations

import dataclasses
import importlib.util
import json
import logging
import math
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from . import atomic, runs
from .config import FIELDS, TrainConfig, coerce, make_config
from .errors import UserError

EXPERIMENTS = Path(__file__).resolve().parent.parent / "experiments"
PRESET = "preset"  # the special SPACE key that expands to a preset's settings
METRICS = ("val_acc", "val_loss", "val_recall", "val_auroc", "val_f1", "train_acc", "train_loss")
PATH_FIELDS = ("data", "cache_dir", "split_file", "weights")  # made absolute: trials run in Ray's trial folders
GRACE_PERIOD = 5  # default epochs before ASHA may stop a trial
TEST_KEYS = ("accuracy", "balanced_accuracy", "precision", "recall", "specificity", "f1", "auroc", "aucpr",
             "patient_recognition_rate", "patient_accuracy", "loss")


# --- space files and presets -----------------------------------------------------------------

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


def default_mode(metric: str) -> str:
    return "min" if metric.endswith("loss") else "max"


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
    if metric is not None and metric not in METRICS:
        raise UserError(f"space file {path}: METRIC {metric!r} is not reported; choose one of {', '.join(METRICS)}")
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


def absolute_paths(cfg: TrainConfig, cwd: str) -> TrainConfig:
    """Path settings relative to the directory tune.py was started in."""
    fix = {k: os.path.abspath(os.path.join(cwd, os.path.expanduser(getattr(cfg, k))))
           for k in PATH_FIELDS if getattr(cfg, k)}
    return dataclasses.replace(cfg, **fix)


def trial_config(base: dict, sample: dict, presets: dict, cwd: str) -> TrainConfig:
    """defaults < base (BASE, flags) < the sample: the trial's resolved, validated config."""
    return absolute_paths(make_config(base, sample_overrides(sample, presets)), cwd)


# --- the experiment's settings (tune.json) ----------------------------------------------------

@dataclass
class Setup:
    """What an experiment runs; saved as tune.json so that --resume continues it unchanged."""
    space: str              # absolute path of the space file
    base: dict              # train overrides under every sample: select, BASE, flags, epochs
    metric: str
    mode: str
    max_epochs: int         # ASHA's max_t and every trial's --epochs
    grace_period: int       # epochs every trial runs before ASHA may stop it
    reduction_factor: int   # ASHA keeps 1/reduction_factor of the trials at each rung
    samples: int            # Ray's num_samples: draws of the domains; grids multiply
    concurrent: int | None  # max_concurrent_trials (None: as many as the resources allow)
    cwd: str                # where relative paths are resolved

    def save(self, exp_dir: Path) -> None:
        atomic.write_json(exp_dir / "tune.json", dataclasses.asdict(self))

    @classmethod
    def load(cls, exp_dir: Path) -> "Setup":
        try:
            return cls(**json.loads((exp_dir / "tune.json").read_text()))
        except (OSError, ValueError, TypeError) as e:
            raise UserError(f"{exp_dir} is not a tune experiment folder (tune.json unreadable: {e})") from None


def make_setup(space: Space, flags: dict, *, metric: str | None, mode: str | None, max_epochs: int | None,
               grace_period: int | None, reduction_factor: int, samples: int, concurrent: int | None) -> Setup:
    """Resolve metric, mode, epochs and grace period (default: 5 epochs, at most max epochs); check them all."""
    metric = metric or space.metric or "val_acc"
    if metric not in METRICS:
        raise UserError(f"--metric {metric!r}: choose one of {', '.join(METRICS)}")
    mode = mode or (space.mode if metric == space.metric and space.mode else default_mode(metric))
    if mode not in ("min", "max"):
        raise UserError(f"--mode {mode!r}: use min or max")
    # a trial keeps its best checkpoint by the tuned metric, unless a setting says otherwise
    select = {"select": metric} if metric in FIELDS["select"].metadata["choices"] else {}
    base = {**select, **space.base, **flags}
    max_epochs = max_epochs or make_config(base).epochs
    base["epochs"] = max_epochs
    grace_period = min(GRACE_PERIOD, max_epochs) if grace_period is None else grace_period
    make_config(base)  # a bad flag or BASE value fails here, before Ray starts
    if max_epochs < 1 or not 1 <= grace_period <= max_epochs:
        raise UserError(f"--grace-period {grace_period} / --max-epochs {max_epochs}: need 1 <= grace period <= max epochs")
    if reduction_factor < 2:
        raise UserError(f"--reduction-factor {reduction_factor}: must be at least 2 (ASHA keeps 1/factor per rung)")
    if samples < 1:
        raise UserError(f"--samples {samples}: must be at least 1")
    if concurrent is not None and concurrent < 1:
        raise UserError(f"--concurrent {concurrent}: must be at least 1")
    jsonable = {k: list(v) if isinstance(v, tuple) else v for k, v in base.items()}
    return Setup(str(space.path), jsonable, metric, mode, max_epochs, grace_period, reduction_factor, samples,
                 concurrent, os.getcwd())


# --- the trial (runs in a Ray worker) ---------------------------------------------------------

def trial(config: dict, *, base: dict, presets: dict, exp_dir: str, cwd: str) -> None:
    """One trial: the same fit() as train.py, into runs/<trial_id>/, reporting once per epoch."""
    from ray import tune

    from . import fit as F

    cfg = trial_config(base, config, presets, cwd)  # a bad sampled value fails this trial only
    run_dir = Path(exp_dir) / "runs" / tune.get_context().get_trial_id()
    status = (runs.read_json(run_dir / "status.json") or {}).get("status")
    resume = (run_dir / "last.pt").is_file() and status != "finished"  # an interrupted experiment resumed
    if run_dir.exists() and not resume:
        shutil.rmtree(run_dir)  # this trial's own folder from a start that never finished an epoch
    run_dir.mkdir(parents=True, exist_ok=True)
    data_cfg = dataclasses.replace(cfg, split_file=str(run_dir / "split.json")) if resume else cfg
    data = F.prepare_data(data_cfg, progress=False)  # warm: the driver built the cache
    last: dict = {}

    def on_epoch(row: dict) -> None:
        row = {**row, "run": str(run_dir)}
        if row["epoch"] >= cfg.epochs:
            last.update(row)  # reported after finalize, so that ASHA's stop at max_t cannot cut it short
        else:
            tune.report(row)

    metrics = F.fit(cfg, run_dir, on_epoch=on_epoch, data=data, progress=False, resume=resume)
    if last:
        tune.report({**last, **{f"test_{k}": v for k, v in test_scalars(metrics).items()}})


def trial_dirname(trial) -> str:
    """Ray's trial folder is named by the trial id, as is its run folder under runs/."""
    return trial.trial_id


def test_scalars(metrics: dict) -> dict[str, float]:
    test = metrics.get("test") or {}
    return {k: test[k] for k in TEST_KEYS if isinstance(test.get(k), (int, float))}


# --- running it (the driver) ------------------------------------------------------------------

def start_ray(address: str | None) -> None:
    """Start a local Ray (dashboard off) or join the cluster at address; no-op when Ray is up."""
    import ray

    if ray.is_initialized():
        return
    kw: dict[str, Any] = {"include_dashboard": False, "logging_level": logging.WARNING}
    if address:
        # other nodes import this package from the job's runtime env; the data must be visible to them
        kw.update(address=address, runtime_env={"py_modules": [str(Path(__file__).resolve().parent)]})
    try:
        ray.init(**kw)
    except ConnectionError as e:
        raise UserError(f"--address {address}: cannot reach a Ray cluster there ({e}); start one with `ray start --head`") from None


def trial_resources(gpus_per_trial: float | None, cpus_per_trial: float) -> tuple[dict[str, float], str]:
    """Ray resources of one trial, and a note when GPUs were asked for but the cluster has none."""
    import ray

    if cpus_per_trial <= 0:
        raise UserError(f"--cpus-per-trial {cpus_per_trial}: must be positive")
    if gpus_per_trial is not None and (gpus_per_trial < 0 or (gpus_per_trial > 1 and gpus_per_trial != int(gpus_per_trial))):
        raise UserError(f"--gpus-per-trial {gpus_per_trial}: give a fraction in (0, 1] (trials share a GPU) or a whole number")
    have = ray.cluster_resources().get("GPU", 0)
    if not have:
        note = "no GPU in the Ray cluster: trials run on the CPU" + (" (--gpus-per-trial ignored)" if gpus_per_trial else "")
        return {"cpu": cpus_per_trial, "gpu": 0}, note
    gpus = 1.0 if gpus_per_trial is None else gpus_per_trial
    return {"cpu": cpus_per_trial, "gpu": gpus}, f"{have:g} GPU(s); {gpus:g} per trial"


def make_tuner(setup: Setup, exp_dir: Path, resources: dict, *, resume: bool, callbacks: list):
    """A new Tuner for the experiment, or the interrupted one restored from exp_dir."""
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler

    space = load_space(setup.space)
    trainable = tune.with_resources(
        tune.with_parameters(trial, base=setup.base, presets=space.presets, exp_dir=str(exp_dir), cwd=setup.cwd),
        resources)
    if resume:
        # errored trials stay failed (their error is a property of their settings); unfinished ones continue
        return tune.Tuner.restore(str(exp_dir), trainable=trainable, resume_unfinished=True, resume_errored=False,
                                  param_space=param_space(space))
    # epochs are ASHA's unit: trials report their "epoch" once per epoch. reuse_actors: the next trial runs
    # in a finished trial's process (torch imported, CUDA up), saving a process start per trial; a stopped
    # trial's thread leaves at its next report, and Ray starts a fresh process if it has not within 2 s
    asha = ASHAScheduler(time_attr="epoch", max_t=setup.max_epochs, grace_period=setup.grace_period,
                         reduction_factor=setup.reduction_factor)
    return tune.Tuner(
        trainable, param_space=param_space(space),
        tune_config=tune.TuneConfig(metric=setup.metric, mode=setup.mode, scheduler=asha, num_samples=setup.samples,
                                    max_concurrent_trials=setup.concurrent, trial_dirname_creator=trial_dirname,
                                    reuse_actors=True),
        run_config=tune.RunConfig(name=exp_dir.name, storage_path=str(exp_dir.parent), verbose=0,
                                  failure_config=tune.FailureConfig(max_failures=0), callbacks=callbacks))


def run_experiment(setup: Setup, exp_dir: Path, resources: dict, *, resume: bool = False) -> list:
    """Run (or continue) the experiment; return Ray's trials as saved on disk, with their results.

    Returns [(trial, result)]: trial.status is TERMINATED, ERROR, or PENDING for a trial that an
    interruption (Ctrl-C) left unfinished.
    """
    from ray.tune import ExperimentAnalysis, ResultGrid, Tuner

    from .tuning_results import ProgressLine, QuietUserErrors

    log = logging.getLogger("ray.tune.execution.tune_controller")
    if not any(isinstance(f, QuietUserErrors) for f in log.filters):
        log.addFilter(QuietUserErrors())
    # Ray's newer console output prints its own banner even when silent; ProgressLine is ours
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")
    restore = resume and Tuner.can_restore(str(exp_dir))
    tuner = make_tuner(setup, exp_dir, resources, resume=restore,
                       callbacks=[ProgressLine(setup.metric, setup.mode, setup.max_epochs)])
    tuner.fit()
    # Ray marks every trial TERMINATED in memory when interrupted; the saved state tells them apart
    analysis = ExperimentAnalysis(str(exp_dir), default_metric=setup.metric, default_mode=setup.mode)
    return list(zip(analysis.trials, ResultGrid(analysis)))


def new_experiment(results: Path, name: str) -> Path:
    """Create results/tune/<name>/; an existing one is never overwritten."""
    import re

    if not re.fullmatch(r"[\w.\-]+", name):
        raise UserError(f"--name {name!r}: use letters, digits, '-', '_' and '.' only")
    exp_dir = results / name
    if exp_dir.exists():
        raise UserError(f"experiment {exp_dir} already exists; finished experiments are never overwritten: choose "
                        f"another --name, or continue an interrupted one with --name {name} --resume")
    exp_dir.mkdir(parents=True)
    return exp_dir


def find_experiment(results: Path, name: str | None) -> Path:
    """The experiment folder --resume continues."""
    have = sorted(p.name for p in results.glob("*") if (p / "tune.json").is_file()) if results.is_dir() else []
    if not name:
        raise UserError(f"--resume needs --name of the experiment to continue; experiments under {results}: "
                        f"{', '.join(have) or 'none'}")
    exp_dir = results / name
    if not (exp_dir / "tune.json").is_file():
        raise UserError(f"--resume: no experiment {exp_dir} (no tune.json); experiments under {results}: "
                        f"{', '.join(have) or 'none'}")
    return exp_dir


def best_value(values: list, mode: str) -> float | None:
    vals = [v for v in values if v is not None and not math.isnan(v)]
    return (max(vals) if mode == "max" else min(vals)) if vals else None
