"""Terminal output: progress bars, value formatting, and rich tables of metrics.

Progress goes to stderr (stdout stays clean for --json) except the training bars, which share
the console with the per-epoch lines.
"""
from __future__ import annotations

import contextlib
import math
import sys
from collections.abc import Callable, Iterable, Iterator
from typing import Any

from rich.console import Console
from rich.progress import (
    BarColumn,
    DownloadColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
    TransferSpeedColumn,
)
from rich.table import Table

console = Console()


def fmt(v, digits: int = 3) -> str:
    """A figure for a table cell: floats to `digits` places, None and nan as '–'."""
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "–"
    if isinstance(v, float):
        return f"{v:.{digits}f}"
    return str(v)


def show(value: Any, width: int | None = None) -> str:
    """A setting as one short cell: tuples as 0.5,0.8 (empty: none), floats to 4 significant digits,
    None as '–'; cut to `width` characters with an ellipsis."""
    if isinstance(value, (list, tuple)):
        text = ",".join(show(v) for v in value) or "none"
    elif isinstance(value, float):
        text = f"{value:.4g}"
    elif isinstance(value, dict):
        text = " ".join(f"{k}={show(v)}" for k, v in value.items())
    elif value is None:
        text = "–"
    else:
        text = str(value)
    return text if width is None or len(text) <= width else text[: width - 1] + "…"


@contextlib.contextmanager
def progress_bar(on: bool, what: str, total: int | None, *, done: int = 0, unit: str = "items",
                 transient: bool = True, tty_only: bool = True) -> Iterator[Callable[[int], None]]:
    """A rich progress bar on stderr; yields `advance(k)`. Silent when off (or, with tty_only, when
    stderr is not a terminal). unit "bytes" shows sizes and speed, anything else counts items."""
    if not on or (tty_only and not sys.stderr.isatty()):
        yield lambda k: None
        return
    cols = [DownloadColumn(), TransferSpeedColumn()] if unit == "bytes" else [MofNCompleteColumn(), TimeElapsedColumn()]
    bar = Progress(TextColumn(what), BarColumn(), *cols, TimeRemainingColumn(), transient=transient,
                   console=Console(stderr=True))
    with bar:
        task = bar.add_task(what, total=total, completed=done)
        yield lambda k: bar.advance(task, k)


def fmt_ci(value, ci) -> str:
    """'0.898 [0.861, 0.930]'; '0.998 [–]' where the interval was left out (too few patients: the warnings say)."""
    if not ci:
        return fmt(value)
    if ci[0] is None or (isinstance(ci[0], float) and math.isnan(ci[0])):
        return f"{fmt(value)} [–]"
    return f"{fmt(value)} [{fmt(ci[0])}, {fmt(ci[1])}]"


class TrainProgress:
    """Two bars (epochs, batches of the current epoch) and one summary line per epoch."""

    def __init__(self, epochs: int, batches: int, enabled: bool = True):
        self.enabled = enabled
        self.epochs, self.n_batches = epochs, batches
        self.progress = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                                 TimeElapsedColumn(), TimeRemainingColumn(), console=console, transient=True,
                                 disable=not enabled)

    def __enter__(self):
        self.progress.__enter__()
        self.epoch_task = self.progress.add_task("epochs", total=self.epochs)
        self.batch_task = self.progress.add_task("batches", total=self.n_batches)
        return self

    def __exit__(self, *exc):
        return self.progress.__exit__(*exc)

    def skip_to(self, epoch: int) -> None:
        self.progress.update(self.epoch_task, completed=epoch)

    def batches(self, loader: Iterable) -> Iterator:
        self.progress.reset(self.batch_task, total=self.n_batches)
        for b in loader:
            yield b
            self.progress.advance(self.batch_task)

    def epoch_done(self, row: dict, select: str) -> None:
        self.progress.advance(self.epoch_task)
        if self.enabled:
            star = " [bold green]*best[/]" if row.get("is_best") else ""
            console.print(
                f"ep {row['epoch']:>3} lr {row['lr']:.1e} │ train {fmt(row['train_loss'])} {fmt(row['train_acc'])} "
                f"│ val {fmt(row['val_loss'])} acc {fmt(row['val_acc'])} rec {fmt(row['val_recall'])} "
                f"auc {fmt(row['val_auroc'])} │ {row['img_s']:.0f} img/s {row['seconds']:.0f}s{star}",
                highlight=False, soft_wrap=True)

    def note(self, text: str) -> None:
        if self.enabled:
            console.print(text)


ROWS = [("accuracy", "Test accuracy"), ("balanced_accuracy", "Balanced accuracy"), ("precision", "Precision"),
        ("recall", "Recall (sensitivity)"), ("specificity", "Specificity"), ("f1", "F1"), ("auroc", "AUROC"),
        ("aucpr", "AUCPR"), ("patient_recognition_rate", "Patient recognition rate"),
        ("patient_accuracy", "Patient accuracy"), ("ece", "ECE (15 bins, top-label)"), ("ece_debiased", "ECE debiased"), ("brier", "Brier score")]


def evaluation_table(metrics: dict, split: str = "test", title: str = "Model Evaluation") -> Table:
    """The "Model Evaluation" table of one run: figures with 95% intervals over patients."""
    m = metrics.get(split) or {}
    t = Table(title=title, title_style="bold")
    t.add_column("metric")
    t.add_column(f"{split} value [95% interval over patients]", justify="right")
    if metrics.get("best_val_acc") is not None:
        how = f"epoch {metrics['best_epoch']}" if metrics.get("best_epoch") else ""
        how += f", chosen by {metrics['select']}" if metrics.get("select") else ""
        t.add_row(f"Validation accuracy ({how})" if how else "Validation accuracy", fmt(metrics["best_val_acc"]))
    ci = m.get("ci") or {}
    for key, label in ROWS:
        if key in m:
            name = label.replace("Test", split.capitalize()) if key == "accuracy" else label
            t.add_row(name, fmt_ci(m[key], ci.get(key)))
    if "macro_f1" in m:
        t.add_row("Macro F1", fmt_ci(m["macro_f1"], ci.get("macro_f1")))
    if "threshold" in m:
        t.add_row("Threshold", fmt(m["threshold"]))
    if metrics.get("temperature"):
        t.add_row("Temperature (calibration.json)", fmt(metrics["temperature"]))
    if "n" in m:
        t.add_row("Images / patients", f"{m['n']} / {m.get('n_patients', '–')}")
    settings = m.get("ci_settings")
    if settings:
        t.caption = (f"95% intervals over patients ({settings['resamples']} resamples, seed {settings['seed']}): "
                     f"{settings['method']}")
    for w in m.get("warnings") or ():
        t.add_row("[yellow]warning[/]", f"[yellow]{w}[/]")
    return t


def calibration_table(metrics: dict, split: str = "test", title: str = "Calibration") -> Table:
    """evaluate.py --calibrate: the figures before and after temperature scaling, side by side."""
    c = metrics["calibration"]
    t = Table(title=title, title_style="bold")
    t.add_column("metric")
    t.add_column(f"{split}, before (T = 1)", justify="right")
    t.add_column(f"{split}, after (T = {fmt(c['temperature'])})", justify="right")
    before, after = c["before"], c["after"]
    for key, label in [*ROWS, ("nll", "NLL (nats)"), ("loss", "Loss (the run's criterion)")]:
        if key in before:
            name = label.replace("Test", split.capitalize()) if key == "accuracy" else label
            t.add_row(name, fmt_ci(before[key], (before.get("ci") or {}).get(key)),
                      fmt_ci(after[key], (after.get("ci") or {}).get(key)))
    t.add_row("Threshold", fmt(before.get("threshold")), fmt(after.get("threshold")))
    t.add_row("Images / patients", f"{before['n']} / {before.get('n_patients', '–')}", "")
    settings = before.get("ci_settings")
    t.caption = (f"T fitted on {c['val_images']} validation images (val NLL {fmt(c['val_nll'][0])} -> "
                 f"{fmt(c['val_nll'][1])}). Temperature changes no decision at threshold 0.5, and no ranking (AUROC) "
                 f"except among probabilities that float32 rounded to one value."
                 + ("\n[yellow]T is at the end of the range searched: the validation probabilities are saturated "
                    "(0 or 1), and the fit is rough.[/]" if c.get("at_limit") else "")
                 + (f"\n95% intervals over patients ({settings['resamples']} resamples, seed {settings['seed']})."
                    if settings else ""))
    return t


def breakdown_table(by: dict, title: str) -> Table:
    """Per-group figures (magnification, subtype, patient)."""
    t = Table(title=title, title_style="bold")
    t.add_column("group")
    keys = ["n", "accuracy", "precision", "recall", "specificity", "f1", "auroc"]
    for k in keys:
        t.add_column(k, justify="right")
    for g, m in by.items():
        ci = m.get("ci") or {}
        t.add_row(str(g), *[fmt_ci(m.get(k), ci.get(k)) if k != "n" else fmt(m.get(k)) for k in keys])
    return t


def scores_table(out: dict) -> Table:
    """New images scored with a run (newimages.score_images): images and patients per predicted
    class, unreadable files. Counts only: the images carry no labels, so no figure of merit."""
    title = f"New images: {out['run']}" + (" (TTA)" if out.get("tta") else "")
    t = Table(title=title, title_style="bold", caption=f"threshold {fmt(out['threshold'])}", caption_justify="left")
    t.add_column("predicted class")
    t.add_column("images", justify="right")
    t.add_column("patients (vote)", justify="right")  # files with BreakHis names: mean probability per patient
    for name, n in out["counts"].items():
        t.add_row(name, str(n), str(out["patient_votes"].get(name, 0)))
    t.add_row("unreadable (skipped)", str(len(out["skipped"])), "", style="red" if out["skipped"] else None,
              end_section=True)
    t.add_row("files", str(out["images"]), "")
    return t


def fitted_table(columns: list[str], rows: list[list[str]], title: str, caption: str = "",
                 best: set[int] = frozenset(), sections: set[int] = frozenset(), drop_order: list[str] = (),
                 width: int | None = None, whole: tuple[str, ...] = (), left: tuple[str, ...] = (),
                 elsewhere: str = "--csv, --markdown or --json") -> Table:
    """A table fitted to the terminal by leaving out whole columns (the logbook's): rows of cells, a line
    before each index in `sections` (e.g. a new set of comparable runs); rows in `best` in bold.

    The first column (the run's name) never wraps, so a name can be copied, and nor do the columns
    named in `whole` (e.g. the settings a sweep varies). When the table is wider than `width`
    (default: the terminal), the columns in `drop_order` are left out, first ones first, until it
    fits; the caption names them and says where they are (`elsewhere`). Columns in `left` are
    left-aligned (text), the others right (figures)."""
    width = width or console.width
    keep = list(range(len(columns)))
    dropped: list[str] = []

    def build() -> Table:
        note = f"\nLeft out to fit {width} columns: {', '.join(dropped)} (see {elsewhere})." if dropped else ""
        t = Table(title=title, title_style="bold", caption=caption + note, caption_justify="left")
        for i in keep:
            fixed = i == 0 or columns[i] in whole
            t.add_column(columns[i], justify="left" if i == 0 or columns[i] in left else "right", no_wrap=fixed,
                         overflow="ignore" if fixed else "fold")
        for r, cells in enumerate(rows):
            t.add_row(*(cells[i] for i in keep), style="bold" if r in best else None, end_section=r + 1 in sections)
        return t

    table = build()
    for name in drop_order:
        if Console(width=10_000).measure(table).maximum <= width or name not in columns:
            continue
        keep.remove(columns.index(name))
        dropped.append(name)
        table = build()
    return table


def _pct_or_dash(v) -> str:
    return fmt(None if v is None else 100 * float(v), 1)


def protocol_table(out: dict):
    """The logbook rows of an eva protocol run (protocol.json, protocol.run_eva) as a Table, in percentage points."""
    t = Table(title=f"eva protocol: balanced accuracy (%), {out['task']} task, {out['magnification']}X, "
                    f"{len(out['seeds'])} seeds", title_style="bold", caption_justify="left",
              caption=("eva protocol: scored on eva's 14 validation patients, which also chose the checkpoint; std over "
                       "seeds, as eva reports. held-out patients: per seed an accession split; checkpoint chosen on its "
                       "val patients, scored on its test patients. Intervals: 95%, Nadeau-Bengio t over the seeds' "
                       "splits. selection bias: held-out validation figure - test figure. " + (out.get("note") or "")).strip())
    for c in ("row", "view", "mean", "std", "95% interval", "per seed"):
        t.add_column(c, justify="left" if c in ("row", "view", "per seed") else "right", no_wrap=c == "95% interval")
    for r in out["rows"]:
        ci = f"[{_pct_or_dash(r['ci'][0])}, {_pct_or_dash(r['ci'][1])}]" if r["ci"] else "–"
        t.add_row(r["row"], r["view"], _pct_or_dash(r["mean"]), _pct_or_dash(r["std"]), ci, " ".join(_pct_or_dash(v) for v in r["per_seed"]),
                  end_section=r is out["rows"][-1])
    for key, label in (("difference", "difference (eva - held-out)"), ("selection_bias", "selection bias")):
        d = out[key]
        t.add_row(label, d.get("view", "centre"), _pct_or_dash(d["mean"]), "", f"[{_pct_or_dash(d['ci'][0])}, {_pct_or_dash(d['ci'][1])}]", "")
    return t
