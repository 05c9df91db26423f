"""What a tune experiment shows and leaves behind: the live progress line, trials.csv, best.json, the table.

trials.csv  one row per trial: its sampled settings, status (done, stopped = cut by ASHA, failed,
            unfinished = left by Ctrl-C), epochs run, stopped_early, the best validation value of the
            tuned metric, the test metrics of its best checkpoint, its run folder, its error
best.json   {"config": the best trial's resolved TrainConfig, "metric", "mode", "value", "run", "trial"};
            `python train.py --config best.json` retrains it
"""
from __future__ import annotations

import logging
import math
from collections import Counter
from pathlib import Path
from typing import Any

from ray.tune import Callback
from rich.table import Table

from . import atomic, runs
from .errors import UserError
from .tuning import TEST_KEYS, Setup, best_value

TABLE_TEST = (("accuracy", "test acc"), ("f1", "test F1"), ("auroc", "test AUROC"))


def show(value: Any, width: int = 40) -> str:
    """A setting as one short cell: tuples as 0.5,0.8, floats to 4 significant digits."""
    if isinstance(value, (list, tuple)):
        text = ",".join(show(v) for v in value) or "none"
    elif isinstance(value, float):
        text = f"{value:.4g}"
    elif isinstance(value, dict):
        text = " ".join(f"{k}={show(v)}" for k, v in value.items())
    else:
        text = str(value)
    return text if len(text) <= width else text[: width - 1] + "…"


def short_error(error: BaseException | None) -> str:
    """The trial's own exception in one line (Ray wraps it in a RayTaskError)."""
    if error is None:
        return ""
    cause = getattr(error, "cause", None) or error
    text = str(cause) if isinstance(cause, UserError) else f"{type(cause).__name__}: {cause}"
    lines = [ln for ln in text.strip().splitlines() if ln.strip()]
    return (lines[0] if lines else type(cause).__name__)[:300]


def _float(v: Any) -> float | None:
    try:
        f = float(v)
    except (TypeError, ValueError):
        return None
    return None if math.isnan(f) else f


class ProgressLine(Callback):
    """One rich line per trial report, and one when a trial ends (runs in the driver)."""

    def __init__(self, metric: str, mode: str, max_epochs: int):
        self.metric, self.mode, self.max_epochs = metric, mode, max_epochs
        self.best: dict[str, float | None] = {}

    @staticmethod
    def _counts(trials) -> str:
        c = Counter(t.status for t in trials)
        return (f"{c['RUNNING']} running · {c['TERMINATED']} ended · {c['ERROR']} failed · "
                f"{c['PENDING']} pending")

    def _print(self, text: str) -> None:
        from .report import console

        console.print(text, highlight=False)

    def on_trial_result(self, iteration, trials, trial, result, **info):
        from .report import fmt

        value = _float(result.get(self.metric))
        best = best_value([self.best.get(trial.trial_id), value], self.mode)
        self.best[trial.trial_id] = best
        settings = " ".join(f"{k}={show(v, 24)}" for k, v in (trial.config or {}).items())
        self._print(f"[dim]{self._counts(trials)}[/]  {trial.trial_id}  epoch {result.get('epoch')}/{self.max_epochs}"
                    f"  {self.metric} {fmt(value)} (best {fmt(best)})  {result.get('seconds', 0):.1f}s  [dim]{settings}[/]")

    def on_trial_complete(self, iteration, trials, trial, **info):
        epoch = (trial.last_result or {}).get("epoch") or 0
        how = "finished" if epoch >= self.max_epochs else f"[yellow]stopped early after epoch {epoch}[/]"
        self._print(f"{trial.trial_id} {how}")

    def on_trial_error(self, iteration, trials, trial, **info):
        from ray import cloudpickle

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


def finalize_stopped(run_dir: Path, epochs: int, max_epochs: int) -> str:
    """Score a trial ASHA stopped (its best checkpoint on val and test); '' or the reason it could not."""
    from . import fit as F

    try:
        if not (run_dir / "metrics.json").is_file():
            F.finalize(run_dir, progress=False)
    except UserError as e:
        return f"not scored: {e}"
    if epochs < max_epochs:
        runs.set_status(run_dir, "stopped", epoch=epochs, message=f"stopped early by ASHA after epoch {epochs} of {max_epochs}")
    (run_dir / "last.pt").unlink(missing_ok=True)  # the full training state is only needed to continue
    return ""


def collect(pairs: list, setup: Setup, exp_dir: Path) -> list[dict]:
    """One row per trial from Ray's saved trials and the trials' run folders."""
    rows = []
    for t, res in pairs:
        run_dir = exp_dir / "runs" / t.trial_id
        history = runs.read_csv(run_dir / "history.csv")
        epochs = int(history[-1]["epoch"]) if history else 0
        run_status = (runs.read_json(run_dir / "status.json") or {}).get("status")
        error = short_error(res.error) if t.status == "ERROR" else ""
        if t.status == "ERROR":
            status = "failed"
        elif t.status != "TERMINATED":
            status = "unfinished"
        elif run_status in ("finished", "stopped") and (run_dir / "metrics.json").is_file():
            status = "done" if run_status == "finished" else "stopped"
        else:
            status = "stopped"
            error = finalize_stopped(run_dir, epochs, setup.max_epochs)
        values = [_float(h.get(setup.metric)) for h in history]
        best = best_value(values, setup.mode)
        test = ((runs.read_json(run_dir / "metrics.json") or {}).get("test") or {}) if status in ("done", "stopped") else {}
        rows.append({
            "trial": t.trial_id, **{k: show(v, 200) for k, v in (t.config or {}).items()},
            "status": status, "epochs": epochs,
            "stopped_early": status not in ("failed", "unfinished") and epochs < setup.max_epochs,
            f"best_{setup.metric}": best, "best_epoch": int(history[values.index(best)]["epoch"]) if best is not None else None,
            **{f"test_{k}": test.get(k) for k in TEST_KEYS},
            "run": str(run_dir) if run_dir.is_dir() else "", "error": error})
    return rows


def pick_best(rows: list[dict], setup: Setup) -> dict | None:
    key = f"best_{setup.metric}"
    ok = [r for r in rows if r["status"] in ("done", "stopped") and r[key] is not None]
    if not ok:
        return None
    return (max if setup.mode == "max" else min)(ok, key=lambda r: r[key])


def write_results(exp_dir: Path, rows: list[dict], setup: Setup) -> dict | None:
    """trials.csv always; best.json once no trial is left unfinished. Returns the best row."""
    runs.write_csv(exp_dir / "trials.csv", rows)
    best = pick_best(rows, setup)
    if best and not any(r["status"] == "unfinished" for r in rows):
        cfg = runs.load_config(Path(best["run"]))
        atomic.write_json(exp_dir / "best.json", {
            "config": cfg.to_dict(), "metric": setup.metric, "mode": setup.mode,
            "value": best[f"best_{setup.metric}"], "run": best["run"], "trial": best["trial"]})
    return best


def results_table(rows: list[dict], setup: Setup, keys: list[str], title: str) -> Table:
    """Trials sorted by the tuned metric; the best highlighted, early stops marked, failures with their error."""
    from .report import fmt

    metric = f"best_{setup.metric}"
    sign = -1 if setup.mode == "max" else 1
    order = sorted(rows, key=lambda r: (r[metric] is None, sign * (r[metric] or 0)))
    best = pick_best(rows, setup)
    failed = [f"[red]{r['trial']} failed:[/] {r['error']}" for r in order if r["status"] == "failed"]
    table = Table(title=title, caption="\n".join(failed) or None, caption_justify="left")
    for col in ["#", "trial", *keys, "epochs", "status", f"best {setup.metric}", *(name for _, name in TABLE_TEST)]:
        table.add_column(col, justify="left" if col in ("trial", "status", *keys) else "right",
                         no_wrap=col in ("trial", "status"))
    for i, r in enumerate(order, 1):
        status = {"done": "done", "stopped": "[yellow]stopped early[/]", "unfinished": "[dim]unfinished[/]",
                  "failed": "[red]failed[/]"}[r["status"]]
        if r["status"] == "done" and r["stopped_early"]:
            status = "[yellow]done (patience)[/]"
        is_best = best is not None and r["trial"] == best["trial"]
        table.add_row(str(i), ("★ " if is_best else "") + r["trial"], *(str(r.get(k, "")) for k in keys),
                      str(r["epochs"]), status, fmt(r[metric]), *(fmt(r[f"test_{k}"]) for k, _ in TABLE_TEST),
                      style="bold green" if is_best else None)
    return table
