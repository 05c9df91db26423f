"""A Ray Tune experiment: its settings (tune.json), the trial, Ray, the Tuner, the sealed state (output.py: what it shows).

An experiment lives in results/tune/<name>/: Ray's experiment state and trial folders, tune.json
(what --resume continues), runs/<trial_id>/ (one normal run folder per trial, written by fit; with
--folds, one per fold: runs/<trial_id>/fold<N>/), trials.csv and best.json (results.py, which reads
what this module leaves; nothing here imports it).

With --folds every trial trains each listed fold in turn (one run each, as train.py --folds) and
reports once, after the last fold: the tuned metric is the mean over folds of each fold's best
validation value (fold_mean). ASHA therefore cannot stop such a trial early, and a search costs
samples x folds full runs.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import os
import re
import shutil
import socket
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import ray
from ray import tune
from ray.tune import ExperimentAnalysis, ResultGrid, Tuner
from ray.tune.schedulers import ASHAScheduler

from .. import runs
from ..config import TrainConfig, make_config
from ..counts import CI_KEYS
from ..data.prepare import Prepared, prepare
from ..errors import UserError
from ..fit import fit
from ..io import number, read_csv, read_json, sha256_of, write_json
from ..registry import EPOCH_METRICS, SELECT_METRICS
from ..seal import seal, verify
from .output import RAY_LOG, ProgressLine, QuietUserErrors, best_value
from .space import Space, check_grid, load_space, param_space, sample_overrides

PATH_FIELDS = ("data", "cache_dir", "split_file", "weights")  # made absolute: trials run in Ray's trial folders
GRACE_PERIOD = 5  # default epochs before ASHA may stop a trial
TEST_KEYS = CI_KEYS + ("loss",)  # the test figures a trial reports (trials.csv's test_* columns)


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
        write_json(exp_dir / "tune.json", dataclasses.asdict(self))

    @classmethod
    def load(cls, exp_dir: Path) -> Setup:
        try:
            return cls(**json.loads((exp_dir / "tune.json").read_text()))
        except (OSError, ValueError, TypeError) as e:
            raise UserError(f"{exp_dir} is not a tune experiment folder (tune.json unreadable: {e})") from None


def make_setup(space: Space, flags: dict, *, metric: str | None, mode: str | None, max_epochs: int | None,
               grace_period: int | None, reduction_factor: int, samples: int, concurrent: int | None) -> Setup:
    """Resolve metric, mode, epochs and grace period (default: 5 epochs, at most max epochs); check them all."""
    metric = metric or space.metric or "val_acc"
    if metric not in EPOCH_METRICS:
        raise UserError(f"--metric {metric!r}: choose one of {', '.join(EPOCH_METRICS)}")
    mode = mode or (space.mode if metric == space.metric and space.mode else EPOCH_METRICS[metric])
    if mode not in ("min", "max"):
        raise UserError(f"--mode {mode!r}: use min or max")
    # a trial keeps its best checkpoint by the tuned metric, unless a setting says otherwise
    select = {"select": metric} if metric in SELECT_METRICS else {}
    base = {**select, **space.base, **flags}
    if "folds" in space.space:
        raise UserError(f"{space.path}: SPACE samples 'folds'; --folds is a setting of the whole search: "
                        f"give it as a flag (tune.py --folds 1-5) or in BASE")
    max_epochs = make_config(base).epochs if max_epochs is None else max_epochs
    if max_epochs < 1:
        raise UserError(f"--max-epochs {max_epochs}: must be at least 1")
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
    check_grid(space, base)  # and so does every grid value it can take
    jsonable = {k: list(v) if isinstance(v, tuple) else v for k, v in base.items()}
    return Setup(str(space.path), jsonable, metric, mode, max_epochs, grace_period, reduction_factor, samples,
                 concurrent, os.getcwd())


# --- the trial (runs in a Ray worker) ---------------------------------------------------------

_PREPARED: dict[str, Prepared] = {}  # per worker process: the data of the trials it ran (reuse_actors)
DATA_FIELDS = ("data", "task", "magnification", "split_ratio", "split_seed", "group", "fold", "val_fraction",
               "split_file", "skip_bad", "image_size", "cache_size", "cache_dir")  # what data.prepare reads
TRIAL_FILE = "trial.json"  # in a trial's run folder: its seconds in its worker, for the sweep's time line


def worker_data(cfg: TrainConfig) -> Prepared:
    """The trial's data (index, decode cache, split), prepared once per worker process for every trial
    that shares the settings prepare reads: a worker runs many trials one after another (reuse_actors),
    and the tree's index, the cache's memory map and the split are the same for all of them."""
    key = json.dumps({k: getattr(cfg, k) for k in DATA_FIELDS}, sort_keys=True, default=list)
    if key not in _PREPARED:
        _PREPARED.clear()  # one tree at a time: a worker holds one memory map, not one per setting seen
        _PREPARED[key] = prepare(cfg, progress=False)
    return _PREPARED[key]


def write_trial_file(run_dir: Path, t0: float, start: float, waited: float) -> None:
    """trial.json: the trial's seconds in its worker (from the trial function's start: model build, data,
    epochs, scoring) and its epochs' own seconds (history.csv), so that the driver can say where the time
    went (output.timeline); waited: of those, the seconds spent in tune.report, which returns once the
    driver has taken the previous report."""
    epochs = sum(number(h.get("seconds")) or 0.0 for h in read_csv(run_dir / "history.csv"))
    write_json(run_dir / TRIAL_FILE, {"seconds": time.perf_counter() - t0, "epoch_seconds": epochs,
                                      "report_seconds": waited, "start": start, "end": time.time(), "pid": os.getpid()})


def trial(config: dict, *, base: dict, presets: dict, exp_dir: str, cwd: str, metric: str = "val_acc",
          mode: str = "max") -> None:
    """One trial: the same fit() as train.py, into runs/<trial_id>/, reporting once per epoch; with
    --folds, one fit() per fold into runs/<trial_id>/fold<N>/, reporting the mean over folds once.

    Scored with point figures only, and no plots (fit's ci, draw): tune.py finalizes its winner again
    with both. When ASHA stops the trial, Ray ends the trial's thread at its next report (a SystemExit
    there); the trial then scores its best checkpoint itself, in its worker, marks the run stopped and
    ends the thread as Ray asked."""
    t0, start = time.perf_counter(), time.time()
    # Ray reuses this worker for the next trial once this one's thread ends, and waits this many seconds for
    # it (read in this process when Ray resets it; Ray's default, 2 s, can cut a stopped trial's scoring short)
    os.environ.setdefault("TUNE_FUNCTION_THREAD_TIMEOUT_S", "60")
    cfg = trial_config(base, config, presets, cwd)  # a bad sampled value fails this trial only
    run_dir = Path(exp_dir) / "runs" / tune.get_context().get_trial_id()
    node = ray.get_runtime_context().get_node_id()  # which Ray node ran it: trials.csv shows the spread
    if cfg.folds:
        fold_trial(cfg, run_dir, node, metric, mode)
        return
    if finished(run_dir):
        # finished on disk although Ray did not see it end (Ctrl-C as it finished): report it, never retrain
        rows = read_csv(run_dir / "history.csv")
        last = {k: v if number(v) is None else float(v) for k, v in rows[-1].items()} if rows else {}
        last["epoch"] = int(last.get("epoch") or cfg.epochs)
        metrics = read_json(run_dir / "metrics.json") or {}
        tune.report({**last, "run": str(run_dir), "node": node,
                     **{f"test_{k}": v for k, v in test_scalars(metrics).items()}})
        return
    resume = start_trial_run(run_dir)
    last: dict = {}
    stopped: list[int] = []
    waited = [0.0]  # seconds in tune.report

    def on_epoch(row: dict) -> bool:
        row = {**row, "run": str(run_dir), "node": node}
        if row["epoch"] >= cfg.epochs:
            last.update(row)  # reported after finalize, so that ASHA's stop at max_t cannot cut it short
            return False
        t = time.perf_counter()
        try:
            tune.report(row)
        except SystemExit:  # ASHA stopped the trial: its loop ends here (fit scores the best checkpoint)
            stopped.append(row["epoch"])
            return True
        finally:
            waited[0] += time.perf_counter() - t
        return False

    # warm: the driver built the decode and feature caches; a continued run reads its own split.json
    metrics = fit(cfg, run_dir, on_epoch=on_epoch, progress=False, resume=resume,
                  data=None if resume else worker_data(cfg), ci=False, draw=False)
    if stopped:
        runs.set_status(run_dir, runs.STOPPED, epoch=stopped[0],
                        message=f"stopped early by ASHA after epoch {stopped[0]} of {cfg.epochs}")
        write_trial_file(run_dir, t0, start, waited[0])
        raise SystemExit(0)  # what Ray's report raised: the thread ends, and the worker takes the next trial
    write_trial_file(run_dir, t0, start, waited[0])
    if last:
        tune.report({**last, **{f"test_{k}": v for k, v in test_scalars(metrics).items()}})


def finished(run_dir: Path) -> bool:
    return runs.status_of(run_dir) == runs.FINISHED and (run_dir / "metrics.json").is_file()


def start_trial_run(run_dir: Path) -> bool:
    """Whether a trial's run folder continues (an interrupted one, from its last.pt and its own split.json,
    as fit(resume=True) reads them); one that never finished an epoch is removed and starts again."""
    resume = (run_dir / "last.pt").is_file() and runs.status_of(run_dir) != runs.FINISHED  # an interrupted experiment
    if run_dir.exists() and not resume:
        shutil.rmtree(run_dir)  # this trial's own folder from a start that never finished an epoch
    run_dir.mkdir(parents=True, exist_ok=True)
    return resume


def fold_mean(values: list[list], mode: str) -> float | None:
    """The mean over folds of each fold's best value (per-epoch values of the tuned metric, best by mode);
    None when a fold has no value: a trial is scored on every fold or not at all."""
    best = [best_value(v, mode) for v in values]
    return None if not best or any(b is None for b in best) else float(sum(best) / len(best))


def fold_runs(trial_dir: Path) -> list[Path]:
    """The fold run folders of a --folds trial (runs/<trial_id>/fold<N>/), in fold order; [] for other trials."""
    return sorted((p for p in trial_dir.glob("fold[1-5]") if runs.is_run(p)), key=lambda p: p.name) \
        if trial_dir.is_dir() else []


def fold_trial(cfg: TrainConfig, trial_dir: Path, node: str, metric: str, mode: str) -> None:
    """Every fold of cfg.folds trained in turn (finished folds kept, an interrupted one continued); one report."""
    cv = {"id": trial_dir.name, "folds": list(cfg.fold_list()), "name": trial_dir.name}
    values, tests, t0 = [], [], time.perf_counter()
    for fold_cfg in cfg.per_fold():
        run_dir = trial_dir / f"fold{fold_cfg.fold}"
        if finished(run_dir):
            metrics = read_json(run_dir / "metrics.json") or {}
        else:
            metrics = fit(fold_cfg, run_dir, progress=False, resume=start_trial_run(run_dir), cv=cv, ci=False, draw=False)
        values.append([number(h.get(metric)) for h in read_csv(run_dir / "history.csv")])
        tests.append(test_scalars(metrics))
    keys = [k for k in TEST_KEYS if all(k in t for t in tests)]
    tune.report({"epoch": cfg.epochs, metric: fold_mean(values, mode), "folds": len(values), "run": str(trial_dir),
                 "node": node, "seconds": time.perf_counter() - t0, **{f"test_{k}": sum(t[k] for t in tests) / len(tests) for k in keys}})


def trial_dirname(trial) -> str:
    """Ray's trial folder is named by the trial id, as is its run folder under runs/."""
    return trial.trial_id


def test_scalars(metrics: dict) -> dict[str, float]:
    test = metrics.get("test") or {}
    return {k: test[k] for k in TEST_KEYS if isinstance(test.get(k), (int, float))}


# --- running it (the driver) ------------------------------------------------------------------

PROBE_S = 5.0  # seconds to wait for a TCP answer at --address (Ray itself retries for minutes)


def probe_address(address: str, timeout_s: float = PROBE_S) -> None:
    """Refuse an --address where nothing accepts a TCP connection, before any folder is made or data
    prepared: ray.init would print connection warnings for minutes. "auto" (Ray finds the cluster from
    RAY_ADDRESS or this machine's session) is left to Ray."""
    if address == "auto":
        return
    host, _, port = address.split("://", 1)[-1].rpartition(":")
    if not host or not port.isdigit():
        raise UserError(f"--address {address!r}: give the head's HOST:PORT, e.g. 10.0.0.5:6379, or auto")
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=timeout_s).close()
    except OSError as e:
        raise UserError(f"--address {address}: nothing answers at {host}:{port} ({e.strerror or e}); start the head "
                        f"there with `ray start --head --port {port}`, or leave --address out to start Ray on this "
                        f"machine") from None


def start_ray(address: str | None, verbose: bool = False) -> None:
    """Start a local Ray (dashboard off) or join the cluster at address; no-op when Ray is up. Not verbose:
    Ray's logging is left to ray_log, and trial processes' own output is not forwarded to the terminal
    (it stays in Ray's session logs)."""
    if ray.is_initialized():
        return
    kw: dict[str, Any] = {"include_dashboard": False, "logging_level": logging.WARNING}
    if not verbose:
        kw.update(configure_logging=False, log_to_driver=False)
    if address:
        # other nodes import this package from the job's runtime env; the data must be visible to them
        kw.update(address=address, runtime_env={"py_modules": [str(Path(__file__).resolve().parent)]})
    try:
        ray.init(**kw)
    except ConnectionError as e:
        raise UserError(f"--address {address}: cannot reach a Ray cluster there ({e}); start one with `ray start --head`") from None


def trial_resources(gpus_per_trial: float | None, cpus_per_trial: float) -> tuple[dict[str, float], str]:
    """Ray resources of one trial, and a note when GPUs were asked for but the cluster has none."""
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
    space = load_space(setup.space)
    trainable = tune.with_resources(
        tune.with_parameters(trial, base=setup.base, presets=space.presets, exp_dir=str(exp_dir), cwd=setup.cwd,
                             metric=setup.metric, mode=setup.mode),
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
    log = logging.getLogger("ray.tune.execution.tune_controller")
    if not any(isinstance(f, QuietUserErrors) for f in log.filters):
        log.addFilter(QuietUserErrors())
    # Ray's newer console output prints its own banner even when silent; ProgressLine is ours
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")
    # no CSV, JSON and TensorBoard copies of every report in Ray's trial folders: the driver writes them per
    # report while the trial waits for it, and each run folder holds its own history.csv and event files
    # (a second set of event files would show every trial twice in `tensorboard --logdir results/tune/<name>`)
    os.environ.setdefault("TUNE_DISABLE_AUTO_CALLBACK_LOGGERS", "1")
    restore = resume and Tuner.can_restore(str(exp_dir))
    tuner = make_tuner(setup, exp_dir, resources, resume=restore,
                       callbacks=[ProgressLine(setup.metric, setup.mode, setup.max_epochs)])
    tuner.fit()
    # Ray marks every trial TERMINATED in memory when interrupted; the saved state tells them apart
    analysis = ExperimentAnalysis(str(exp_dir), default_metric=setup.metric, default_mode=setup.mode)
    return list(zip(analysis.trials, ResultGrid(analysis)))


STATE_DIGESTS = "state.sha256.json"  # ours: SHA-256 of Ray's experiment files as the last tune.py run left them, sealed
OWN_FILES = {"tune.json", "trials.csv", "best.json", "timing.json", STATE_DIGESTS, RAY_LOG}


def _ray_state_files(exp_dir: Path) -> list[Path]:
    """The files Tuner.restore reads from the experiment folder (pickles, and JSON holding pickles)."""
    return sorted(p for p in exp_dir.iterdir() if p.is_file() and p.name not in OWN_FILES)


def _state_message(files: dict) -> tuple:
    return "tune-state", json.dumps(files, sort_keys=True)


def seal_state(exp_dir: Path) -> None:
    """Record the SHA-256 of Ray's experiment state under this user's seal (an HMAC, seal.py), so that
    --resume can tell it is what this user's tune.py left: a digest anyone can rewrite proves nothing."""
    files = {p.name: sha256_of(p) for p in _ray_state_files(exp_dir)}
    write_json(exp_dir / STATE_DIGESTS, {"files": files, "hmac": seal(*_state_message(files))})


def check_state(exp_dir: Path, trust: bool) -> None:
    """Before Tuner.restore unpickles the experiment state: it must be the state this user's tune.py sealed
    when it last stopped (a crafted file could run code), unless the user trusts it (--trust-state)."""
    if trust:
        return
    stored = read_json(exp_dir / STATE_DIGESTS)
    sealed = stored.get("files") if isinstance(stored, dict) else None
    now = {p.name: sha256_of(p) for p in _ray_state_files(exp_dir)}
    if not isinstance(sealed, dict):
        why = f"no {STATE_DIGESTS}, or not one tune.py wrote"
    elif not verify(stored.get("hmac"), *_state_message(sealed)):
        why = f"{STATE_DIGESTS} does not carry your seal: it was rewritten, or written by someone else"
    elif sealed != now:
        why = "changed: " + ", ".join(sorted(k for k in set(now) | set(sealed) if sealed.get(k) != now.get(k))[:3])
    else:
        return
    raise UserError(f"--resume: Ray's experiment state in {exp_dir} is not what your tune.py left there "
                    f"({why}; a killed tune.py cannot record it). Restoring it unpickles these files, which can run "
                    f"code: pass --trust-state if this experiment is your own")


def new_experiment(results: Path, name: str) -> Path:
    """Create results/tune/<name>/; an existing one is never overwritten."""
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
