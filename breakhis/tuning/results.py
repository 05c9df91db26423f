"""What a tune experiment leaves behind: trials.csv, best.json and the results table.

trials.csv  one row per trial: its sampled settings, status (runs.STATUSES: finished, stopped = cut
            by ASHA, failed, interrupted = left by Ctrl-C), epochs run, stopped_early, the best
            validation value of the tuned metric, the test metrics of its best checkpoint, its run
            folder, the Ray node id it last ran on, its error. With --folds: the mean over folds of
            each fold's best validation value and of its test metrics, "folds", and the trial folder
            (runs/<trial_id>/, holding fold<N>/; evaluate.py shows it as one cross-validation row)
best.json   {"config": the best trial's resolved TrainConfig, "metric", "mode", "value", "run", "trial",
            "held_out": its test figure with the interval beside the validation value (held_out)};
            `python train.py --config best.json` retrains it
"""
from __future__ import annotations

import dataclasses
from pathlib import Path

from rich.table import Table

from .. import runs
from ..config import make_config
from ..errors import UserError
from ..events import Events
from ..fit import recover_best
from ..io import number, read_csv, read_json, write_csv, write_json
from ..predict import finalize
from ..report import fitted_table, fmt, show
from .experiment import TEST_KEYS, Setup, fold_mean, fold_runs
from .output import best_value, short_error

TABLE_TEST = (("accuracy", "test acc"), ("f1", "test F1"), ("auroc", "test AUROC"))
SCORED = (runs.FINISHED, runs.STOPPED)  # trials whose best checkpoint was scored on val and test


def finalize_stopped(run_dir: Path, epochs: int, max_epochs: int) -> str:
    """Score a trial ASHA stopped (its best checkpoint on val and test); '' or the reason it could not."""
    try:
        if not (run_dir / "metrics.json").is_file():
            # a trial whose worker ended before it could score itself (the experiment's end stops the last ones)
            recover_best(run_dir)  # a frozen trial's best head is in last.pt
            metrics = finalize(run_dir, progress=False, ci=False, draw=False)  # point figures, as every trial
            cfg = runs.load_config(run_dir)
            events = Events(run_dir, cfg.tensorboard)  # the test figures and hparams its worker did not write
            events.end(cfg.to_dict(), metrics)
            events.close()
    except UserError as e:
        return f"not scored: {e}"
    if epochs < max_epochs:
        runs.set_status(run_dir, runs.STOPPED, epoch=epochs, message=f"stopped early by ASHA after epoch {epochs} of {max_epochs}")
    (run_dir / "last.pt").unlink(missing_ok=True)  # the full training state is only needed to continue
    return ""


def collect(pairs: list, setup: Setup, exp_dir: Path) -> list[dict]:
    """One row per trial from Ray's saved trials and the trials' run folders."""
    rows = []
    folds = len(make_config(setup.base).fold_list())  # --folds is a setting of the whole search (make_setup)
    for t, res in pairs:
        run_dir = exp_dir / "runs" / t.trial_id
        if folds:
            rows.append(collect_folds(t, res, setup, run_dir, folds))
            continue
        history = read_csv(run_dir / "history.csv")
        epochs = int(history[-1]["epoch"]) if history else 0
        run_status = runs.status_of(run_dir) if run_dir.is_dir() else None
        error = short_error(res.error) if t.status == "ERROR" else ""
        if t.status == "ERROR":
            status = runs.FAILED
        elif t.status != "TERMINATED":
            status = runs.INTERRUPTED
        elif run_status in SCORED and (run_dir / "metrics.json").is_file():
            status = run_status
        else:
            status = runs.STOPPED
            error = finalize_stopped(run_dir, epochs, setup.max_epochs)
        values = [number(h.get(setup.metric)) for h in history]
        best = best_value(values, setup.mode)
        test = ((read_json(run_dir / "metrics.json") or {}).get("test") or {}) if status in SCORED else {}
        rows.append({
            "trial": t.trial_id, **{k: show(v, 200) for k, v in (t.config or {}).items()},
            "status": status, "epochs": epochs,
            "stopped_early": status in SCORED and epochs < setup.max_epochs,
            f"best_{setup.metric}": best, "best_epoch": int(history[values.index(best)]["epoch"]) if best is not None else None,
            **{f"test_{k}": test.get(k) for k in TEST_KEYS},
            "run": str(run_dir) if run_dir.is_dir() else "", "node": ((res.metrics if res else None) or {}).get("node", ""),
            "error": error})
    return rows


def collect_folds(t, res, setup: Setup, trial_dir: Path, want: int) -> dict:
    """The trials.csv row of a --folds trial: mean over folds of each fold's best validation value and of
    its test metrics; finished only when every fold finished (the trial reports once, after the last)."""
    dirs = fold_runs(trial_dir)
    histories = [read_csv(d / "history.csv") for d in dirs]
    done = [d for d in dirs if runs.status_of(d) == runs.FINISHED and (d / "metrics.json").is_file()]
    error = short_error(res.error) if t.status == "ERROR" else ""
    if t.status == "ERROR":
        status = runs.FAILED
    elif t.status != "TERMINATED" or len(done) < want:
        status = runs.INTERRUPTED
    else:
        status = runs.FINISHED
    tests = [(read_json(d / "metrics.json") or {}).get("test") or {} for d in done] if status == runs.FINISHED else []
    mean = {k: sum(x[k] for x in tests) / len(tests) for k in TEST_KEYS
            if tests and all(isinstance(x.get(k), (int, float)) for x in tests)}
    return {
        "trial": t.trial_id, **{k: show(v, 200) for k, v in (t.config or {}).items()},
        "status": status, "epochs": min((int(h[-1]["epoch"]) for h in histories if h), default=0),
        "stopped_early": False, "folds": ",".join(d.name[4:] for d in dirs),
        f"best_{setup.metric}": fold_mean([[number(r.get(setup.metric)) for r in h] for h in histories], setup.mode)
        if status == runs.FINISHED else None,
        "best_epoch": None, **{f"test_{k}": mean.get(k) for k in TEST_KEYS},
        "run": str(trial_dir) if trial_dir.is_dir() else "", "node": ((res.metrics if res else None) or {}).get("node", ""),
        "error": error}


def best_config(run: Path) -> dict:
    """The config that retrains a trial: its run's, or for a --folds trial its first fold's with --folds again."""
    if runs.is_run(run):
        return runs.load_config(run).to_dict()
    dirs = fold_runs(run)
    folds = ",".join(d.name[4:] for d in dirs)
    return dataclasses.replace(runs.load_config(dirs[0]), fold=0, folds=folds).validate().to_dict()


def pick_best(rows: list[dict], setup: Setup) -> dict | None:
    key = f"best_{setup.metric}"
    ok = [r for r in rows if r["status"] in SCORED and r[key] is not None]
    if not ok:
        return None
    return (max if setup.mode == "max" else min)(ok, key=lambda r: r[key])


# the test figure beside a tuned validation metric (the winner's held-out counterpart); others show test accuracy
HELD_OUT = {"val_acc": "accuracy", "val_recall": "recall", "val_auroc": "auroc", "val_f1": "f1"}


def held_out(best: dict, rows: list[dict], setup: Setup) -> dict:
    """The winner's validation figure next to its test figure (with the interval over test patients of its run's
    metrics.json, written when the winner is completed; the mean over folds and no interval for a --folds
    trial), and why they differ: the validation figure is the best of the scored trials, each at its best
    epoch, so it is optimistic by that selection; the test patients chose nothing."""
    figure = HELD_OUT.get(setup.metric, "accuracy")
    run = Path(best["run"])
    test = ((read_json(run / "metrics.json") or {}).get("test") or {}) if runs.is_run(run) else {}
    ci = (test.get("ci") or {}).get(figure)
    n = sum(r["status"] in SCORED and r[f"best_{setup.metric}"] is not None for r in rows)
    return {"validation": best[f"best_{setup.metric}"], "test_figure": figure, "test": best.get(f"test_{figure}"),
            "test_ci": list(ci) if ci and ci[0] is not None else None, "trials": n,
            "note": f"the validation {setup.metric} is the best of {n} trials (each at its best epoch): optimistic "
                    f"by that selection. The test {figure} chose nothing; for an unbiased estimate of the recipe, "
                    f"retrain it on a new split (python train.py --config best.json --split-seed N) or with --folds"}


def write_results(exp_dir: Path, rows: list[dict], setup: Setup) -> dict | None:
    """trials.csv always; best.json once no trial is left unfinished, with the winner's held-out figure
    (held_out). Returns the best row."""
    write_csv(exp_dir / "trials.csv", rows)
    best = pick_best(rows, setup)
    if best and not any(r["status"] == runs.INTERRUPTED for r in rows):
        write_json(exp_dir / "best.json", {
            "config": best_config(Path(best["run"])), "metric": setup.metric, "mode": setup.mode,
            "value": best[f"best_{setup.metric}"], "run": best["run"], "trial": best["trial"],
            "held_out": held_out(best, rows, setup)})
    return best


def results_table(rows: list[dict], setup: Setup, keys: list[str], title: str, width: int | None = None) -> Table:
    """Trials sorted by the tuned metric; the best starred, early stops marked, failures with their error.

    The swept settings (`keys`) are the point of the table: they are shown whole, always; on a narrow
    terminal the test figures, then epochs and status, give way first (report.fitted_table), and the
    caption names them (all of them are in trials.csv)."""
    metric = f"best_{setup.metric}"
    sign = -1 if setup.mode == "max" else 1
    order = sorted(rows, key=lambda r: (r[metric] is None, sign * (r[metric] or 0)))
    best = pick_best(rows, setup)
    failed = [f"[red]{r['trial']} failed:[/] {r['error']}" for r in order if r["status"] == runs.FAILED]
    tests = [name for _, name in TABLE_TEST]
    columns = ["trial", *keys, f"best {setup.metric}", "epochs", "status", *tests]
    cells, best_rows = [], set()
    for i, r in enumerate(order):
        status = {runs.FINISHED: "finished", runs.STOPPED: "[yellow]stopped early[/]",
                  runs.INTERRUPTED: "[dim]interrupted[/]", runs.FAILED: "[red]failed[/]"}[r["status"]]
        if r["status"] == runs.FINISHED and r["stopped_early"]:
            status = "[yellow]finished (patience)[/]"
        if best is not None and r["trial"] == best["trial"]:
            best_rows.add(i)
        cells.append([("★ " if i in best_rows else "") + r["trial"], *(str(r.get(k, "")) for k in keys), fmt(r[metric]),
                      str(r["epochs"]), status, *(fmt(r[f"test_{k}"]) for k, _ in TABLE_TEST)])
    return fitted_table(columns, cells, title, caption="\n".join(failed), best=best_rows,
                        drop_order=[*reversed(tests), "epochs", "status"], width=width, whole=tuple(keys),
                        left=("status", *keys), elsewhere="trials.csv")
