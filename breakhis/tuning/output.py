"""What a sweep shows the user while it runs: the live progress line, failed trials in one line, and
Ray's own log lines kept out of the terminal (RESULTS/tune/<name>/ray.log unless --verbose).

Runs in the driver. experiment.py attaches ProgressLine and QuietUserErrors to the Tuner;
tune.py wraps Ray's start and the run in ray_log.
"""
from __future__ import annotations

import contextlib
import logging
import math
from collections import Counter
from pathlib import Path

from ray import cloudpickle
from ray.tune import Callback
from rich.markup import escape

from ..errors import UserError
from ..io import number, read_json
from ..report import console, fmt, show

RAY_LOG = "ray.log"  # in the experiment folder: Ray's own log lines (unless --verbose)


@contextlib.contextmanager
def ray_log(exp_dir: Path, verbose: bool):
    """Ray's own log lines (its "ray" loggers: start-up notes, Tune's warnings and tracebacks) go to
    exp_dir/ray.log instead of the terminal, unless verbose. What matters to the user is said by
    this package in one line (no GPU for a GPU request, a failed trial); the rest is there to read."""
    if verbose:
        yield
        return
    ray_logger = logging.getLogger("ray")
    saved = ray_logger.handlers[:], ray_logger.propagate
    to_file = logging.FileHandler(exp_dir / RAY_LOG, encoding="utf-8")
    to_file.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    # ray.init(configure_logging=False) clears the "ray" logger's handlers: ours sit one level up (root), for ray only
    to_file.addFilter(logging.Filter("ray"))
    ray_logger.handlers.clear()
    ray_logger.propagate = True
    root = logging.getLogger()
    root.addHandler(to_file)
    try:
        yield
    finally:
        root.removeHandler(to_file)
        to_file.close()
        ray_logger.handlers[:], ray_logger.propagate = saved


def best_value(values: list, mode: str) -> float | None:
    vals = [v for v in values if v is not None and not math.isnan(v)]
    return (max(vals) if mode == "max" else min(vals)) if vals else None


def short_error(error: BaseException | None) -> str:
    """The trial's own exception in one line (Ray wraps it in a RayTaskError)."""
    if error is None:
        return ""
    cause = getattr(error, "cause", None) or error
    text = str(cause) if isinstance(cause, UserError) else f"{type(cause).__name__}: {cause}"
    lines = [ln for ln in text.strip().splitlines() if ln.strip()]
    return (lines[0] if lines else type(cause).__name__)[:300]


# --- what the driver shows while trials run ---------------------------------------------------

class ProgressLine(Callback):
    """One rich line per trial report, and one when a trial ends (runs in the driver)."""

    def __init__(self, metric: str, mode: str, max_epochs: int):
        self.metric, self.mode, self.max_epochs = metric, mode, max_epochs
        self.best: dict[str, float | None] = {}
        self.stopped: set[str] = set()  # trials ASHA stopped before max epochs

    def _counts(self, trials) -> str:
        """Where the sweep stands: trials done, stopped by ASHA, running, failed, pending, and the best
        validation value so far (a point value: intervals are computed once, for the winner, at the end)."""
        c = Counter(t.status for t in trials)
        done = c["TERMINATED"] - len(self.stopped)
        lead = best_value(list(self.best.values()), self.mode)
        who = next((k for k, v in self.best.items() if v == lead), None) if lead is not None else None
        return (f"{done} done · {len(self.stopped)} stopped by ASHA · {c['RUNNING']} running · {c['ERROR']} failed · "
                f"{c['PENDING']} pending · best {self.metric} {fmt(lead)}" + (f" ({who})" if who else ""))

    def _print(self, text: str) -> None:
        console.print(text, highlight=False, soft_wrap=True)  # never a line break inside a setting or a path

    def on_trial_result(self, iteration, trials, trial, result, **info):
        value = number(result.get(self.metric))
        best = best_value([self.best.get(trial.trial_id), value], self.mode)
        self.best[trial.trial_id] = best
        self._print(self.line(trial.trial_id, trial.config or {}, result, value, best, self._counts(trials)))

    def line(self, trial_id: str, config: dict, result: dict, value, best, counts: str, width: int | None = None) -> str:
        """One report as one line: the trial, its epoch, the metric and the swept settings in full, always;
        the trial counts and the epoch's seconds give way when the line would wrap at `width` (the terminal)."""
        width = width or console.width
        core = f"{trial_id}  epoch {result.get('epoch')}/{self.max_epochs}  {self.metric} {fmt(value)} (best {fmt(best)})"
        settings = "  ".join(f"{k}={show(v)}" for k, v in config.items())
        seconds = f"{result.get('seconds', 0):.1f}s"
        for show_counts, show_seconds in ((True, True), (False, True), (False, False)):
            plain = "  ".join(x for x in (counts * show_counts, core, seconds * show_seconds, settings) if x)
            if len(plain) <= width:
                break
        return "  ".join(x for x in (f"[dim]{escape(counts)}[/]" * show_counts, escape(core), seconds * show_seconds,
                                     escape(settings)) if x)

    def on_trial_complete(self, iteration, trials, trial, **info):
        epoch = (trial.last_result or {}).get("epoch") or 0
        if epoch < self.max_epochs:
            self.stopped.add(trial.trial_id)
        how = "finished" if epoch >= self.max_epochs else f"[yellow]stopped early after epoch {epoch}[/]"
        self._print(f"{trial.trial_id} {how}")

    def on_trial_error(self, iteration, trials, trial, **info):
        try:  # Ray pickles the trial's exception beside it before calling back
            with open(trial.pickled_error_file, "rb") as f:
                error = short_error(cloudpickle.load(f))
        except (OSError, TypeError, EOFError, cloudpickle.pickle.UnpicklingError):
            error = "see the traceback"
        self._print(f"[red]{trial.trial_id} failed:[/] {error}  [dim](traceback: {trial.error_file})[/]")


class QuietUserErrors(logging.Filter):
    """Drop Ray's traceback of a trial that failed with a UserError (a bad setting): one line says it all."""

    def filter(self, record: logging.LogRecord) -> bool:
        error = record.exc_info[1] if record.exc_info else None
        return not isinstance(getattr(error, "cause", None), UserError)


# --- where the time went (the end of a sweep) --------------------------------------------------

def timeline(exp_dir: Path, phases: dict[str, float]) -> dict:
    """The sweep's seconds: the driver's phases (driver setup: imports, index, decode and feature caches;
    Ray start; the trials, wall clock; the results: trials.csv, the winner's intervals and plots) and,
    summed over the trials from their trial.json, the trials' epochs (history.csv's seconds) and their
    overhead (everything else a trial did in its worker: model build, data, checkpoints, scoring).
    Trials that left no trial.json (failed, older, or cut short when the experiment ended and scored by the
    driver) are not in the sums; `trials_timed` counts those that are."""
    own = [read_json(p) or {} for p in sorted(exp_dir.glob("runs/*/trial.json"))]
    own = [t for t in own if isinstance(t.get("seconds"), (int, float)) and isinstance(t.get("epoch_seconds"), (int, float))]
    over = sorted(t["seconds"] - t["epoch_seconds"] for t in own)
    return {**phases, "trials_timed": len(own), "trial_epochs": sum(t["epoch_seconds"] for t in own),
            "trial_overhead": sum(over), "trial_overhead_median": over[len(over) // 2] if over else None,
            "trial_overhead_max": over[-1] if over else None}


def timeline_line(t: dict) -> str:
    """timeline() as one line for the terminal."""
    parts = [f"{name} {t[key]:.1f} s" for key, name in (("driver_setup", "driver setup"), ("ray_start", "Ray start"),
                                                         ("trials", "trials"), ("results", "results")) if key in t]
    line = "time: " + " · ".join(parts)
    if t.get("trials_timed"):
        line += (f"; in the {t['trials_timed']} trials: epochs {t['trial_epochs']:.1f} s, overhead {t['trial_overhead']:.1f} s "
                 f"(per trial median {t['trial_overhead_median']:.2f} s, max {t['trial_overhead_max']:.2f} s)")
    return line
