"""The logbook's table: what compare.logbook() found, shown in the terminal (rich), as Markdown, and as
flat records for --csv and --json.

    book = compare.logbook(paths)
    console.print(render(book)); write_text("logbook.md", markdown(book)); write_csv("logbook.csv", records(book))

Cells read "0.912 [0.871, 0.944]" (figure and 95% interval over patients), rows of repeats and of
folds "0.905 ± 0.012 [...]" (mean ± sample std across runs, interval of the pooled predictions);
the last column is the comparison with the row picked on validation (compare.rank).
"""
from __future__ import annotations

import math

from . import report
from .compare import METRICS, Logbook, Row
from .io import jsonable

# columns left out first when the logbook is wider than the terminal (the run name, the ranking and the
# comparison with the best stay; the settings that differ go last): figures by key, other columns by title
DROP_ORDER = ("aucpr", "specificity", "patient_recognition_rate", "precision", "patient_accuracy", "f1", "recall",
              "val acc (selected epoch)", "runs", "image set", "auroc")


def _signed(v: float) -> str:
    return f"{v:+.3f}".replace("-", "−")


def versus_text(row: Row, many_sets: bool) -> str:
    if row.best:
        return "best" + (f" on image set {row.image_set}" if many_sets else "")
    if row.versus is None:
        return row.note
    v = row.versus
    text = f"{_signed(v['diff'])} [{_signed(v['ci'][0])}, {_signed(v['ci'][1])}]"
    shown = f"p={v['p_value']:.3f}, Holm {v['p_holm']:.3f}"
    what = "recipes" if v.get("test", "").startswith("recipes") else "these checkpoints only"
    return text + (f" {shown} *" if v["significant"] else f" n.s. ({shown})") + f" ({what})"


def _cell(row: Row, key: str) -> str:
    s = row.spread.get(key) or {}
    if len(row.runs) > 1 and s.get("n", 0) > 1:
        text = f"{report.fmt(s['mean'])} ± {report.fmt(s['std'])}"
    else:
        text = report.fmt(row.value.get(key))
    lo, hi = row.ci.get(key, (None, None))
    if lo is not None and math.isfinite(lo):
        text += f" [{report.fmt(lo)}, {report.fmt(hi)}]"
    return text


def settings_of(row: Row, keys: list[str]) -> dict[str, str]:
    """Each differing setting of the row; repeats list their distinct seeds."""
    out = {}
    for k in keys:
        values = list(dict.fromkeys(report.show(r.config.get(k)) for r in row.runs))
        out[k] = ",".join(values)
    return out


def table(book: Logbook) -> tuple[list[str], list[list[str]]]:
    """Column titles and display cells (the same for the terminal and Markdown)."""
    rows, keys, sort = book.rows, book.keys, book.sort
    many_sets = len({r.image_set for r in rows if r.image_set}) > 1
    repeats = any(len(r.runs) > 1 for r in rows)
    cols = ["run", *keys, *(["runs"] if repeats else []), *(["image set"] if many_sets else []),
            f"val {sort} (ranks)", "val acc (selected epoch)", *(t for _, t in METRICS), f"vs best ({sort})"]
    cells = []
    for r in rows:
        settings = settings_of(r, keys)
        same = f" (+{len(r.identical)} identical, counted once)" if r.identical else ""
        line = [r.name + (" ★" if r.best else "") + same, *(settings[k] for k in keys)]
        line += [str(len(r.runs))] if repeats else []
        line += [r.image_set or "–"] if many_sets else []
        if r.value:
            line += [report.fmt(r.val.get(sort)), _cell(r, "best_val_acc"), *(_cell(r, k) for k, _ in METRICS),
                     versus_text(r, many_sets)]
        else:
            subtype = (r.runs[0].saved.get("test") or {}) if r.runs[0].task != "binary" else {}
            acc = report.fmt(subtype.get("accuracy"))
            line += ["–", report.fmt(r.runs[0].saved.get("best_val_acc")), acc, *["–"] * (len(METRICS) - 1),
                     r.note + (f" (macro F1 {report.fmt(subtype.get('macro_f1'))})" if subtype else "")]
        cells.append(line)
    return cols, cells


def records(book: Logbook) -> list[dict]:
    """One flat dict per row with numbers (CSV columns; the --json payload)."""
    rows, keys = book.rows, book.keys
    out = []
    for r in rows:
        rec = {"run": r.name, **settings_of(r, keys), "runs": len(r.runs), "image_set": r.image_set,
               "cv_folds": ",".join(map(str, r.folds)), "shared_test_patients": r.shared_patients if r.folds else None,
               "best": r.best, "folders": ";".join(str(x.path) for x in r.runs), "identical": ";".join(r.identical),
               "thresholds": ";".join(f"{x.threshold:.6g}" for x in r.runs),
               **{f"val_{k}": r.val.get(k) for k, _ in METRICS}}
        for k in ("best_val_acc", *(k for k, _ in METRICS)):
            s = r.spread.get(k) or {}
            lo, hi = r.ci.get(k, (None, None))
            rec.update({k: r.value.get(k), f"{k}_lo": lo, f"{k}_hi": hi,
                        f"{k}_mean": s.get("mean"), f"{k}_std": s.get("std")})
        if not r.value and r.runs[0].task != "binary":
            test = r.runs[0].saved.get("test") or {}
            rec.update(accuracy=test.get("accuracy"), macro_f1=test.get("macro_f1"),
                       best_val_acc=r.runs[0].saved.get("best_val_acc"))
        v = r.versus or {}
        rec.update(vs_best_diff=v.get("diff"), vs_best_lo=(v.get("ci") or (None, None))[0],
                   vs_best_hi=(v.get("ci") or (None, None))[1], vs_best_p=v.get("p_value"), vs_best_p_holm=v.get("p_holm"), vs_best_test=v.get("test"),
                   significant=v.get("significant"), note=r.note)
        out.append(jsonable(rec))
    return out


def markdown(book: Logbook) -> str:
    """The logbook as a Markdown table with its caption."""
    def line(items):
        return "| " + " | ".join(str(c).replace("|", "\\|") for c in items) + " |"
    columns, cells = table(book)
    right = ["---"] + ["---:" if c != "image set" else ":---:" for c in columns[1:]]
    return "\n".join([line(columns), "| " + " | ".join(right) + " |", *map(line, cells), "", caption(book), ""])


def caption(book: Logbook) -> str:
    """What the figures are and how rows are compared (under the table and the Markdown)."""
    sort, part, n_boot, threshold, seed = book.sort, book.part, book.n_boot, book.threshold, book.seed
    return (f"{part} figures at threshold {threshold} (each run's own), [95% interval over "
            f"patients, {n_boot} resamples, seed {seed}]. Rows are ranked and ★ picked by their validation {sort}, "
            f"never by {part}; other rows: {part} difference to the pick [95% interval]: between rows of repeats the "
            f"recipe test (their runs and the test patients), otherwise a paired bootstrap over the patients of the shared "
            f"{part} images (these checkpoints only); p-values Holm-corrected for the rows compared, * where the "
            f"corrected p <= 0.05. Rows of repeats and of folds (one --folds call; between two of them the fold test: "
            f"test patients resampled over the folds, and the folds' model noise): mean ± sample std (ddof 1) across runs, interval of the pooled "
            f"predictions, patients resampled with their rows of every run. Rows are ranked only "
            f"against rows on the same {part} images (the same letter under 'image set').")


def render(book: Logbook, width: int | None = None):
    """The rich table of the logbook: a line between image sets, the best rows in bold, run names never
    wrapped; columns least needed to read the ranking go first when the terminal is too narrow."""
    rows = book.rows
    columns, cells = table(book)
    starts = {i for i in range(1, len(rows)) if rows[i].image_set != rows[i - 1].image_set}
    stacked = [[c.replace(" [", "\n[").replace("] ", "]\n") for c in line] for line in cells]  # narrower
    drop = [c for c in (dict(METRICS).get(d, d) for d in DROP_ORDER) if c in columns] + [k for k in book.keys if k in columns]
    return report.fitted_table(columns, stacked, title=f"Logbook: {book.runs} runs, {book.part} split",
                               caption=caption(book), best={i for i, r in enumerate(rows) if r.best},
                               sections=starts, width=width, drop_order=drop)
