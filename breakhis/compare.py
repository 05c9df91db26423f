"""The logbook: many runs side by side, with 95% intervals and a paired test against the best.

    python evaluate.py results/ --sort auroc --markdown logbook.md
    python evaluate.py results/a results/b results/c --csv logbook.csv --boot 2000

    book = logbook(paths, part="test", threshold="0.5", sort="accuracy", n_boot=1000)
    logbook_table.render(book); logbook_table.records(book); logbook_table.markdown(book)

Works from each run folder's files alone (config.json, metrics.json, predictions.csv): no
model is loaded. The rules (columns, comparable image sets, repeats and cross-validation rows,
the test against the pick, Holm) are the user's reference: docs/statistics.md, "The logbook".
Here: load_run reads one folder, group_repeats and _row_name make the rows, score_row scores
them (intervals.bootstrap_ci over the pooled rows' patients), rank orders each image set by the
validation figure and tests every other row against the pick (intervals.recipe_test, fold_test,
paired_bootstrap, holm).
"""
from __future__ import annotations

import hashlib
import math
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from . import counts, intervals
from . import metrics as M
from .config import TrainConfig, renamed
from .errors import UserError
from .io import number, read_csv, read_json

# (key, column title) of the figures shown for every binary run: counts.TITLES without balanced accuracy, the
# mean of recall and specificity, which are shown (the table is wide already); it can still be sorted by
METRICS = tuple((k, counts.TITLES[k]) for k in counts.CI_KEYS if k != "balanced_accuracy")
IGNORED = ("device", "workers", "cache_dir", "device_cache_gb", "split_file")
REPEAT_KEYS = ("seed", "split_seed")
DEFAULTS = TrainConfig().to_dict()
SORT_KEYS = tuple(k for k, _ in METRICS) + tuple(k for k in counts.CI_KEYS if k not in dict(METRICS))


@dataclass
class Run:
    """One run folder, read back: settings and its predictions on the compared partition."""
    path: Path
    name: str
    config: dict            # config.json without "_env"
    saved: dict             # metrics.json ({} when absent)
    paths: list[str] = field(default_factory=list)  # image paths, sorted
    y: np.ndarray | None = None         # (N,) labels, 1 = malignant
    p: np.ndarray | None = None         # (N,) malignant probability, as predicted
    patients: np.ndarray | None = None  # (N,) patient ids
    threshold: float = 0.5              # this run's decision threshold (--threshold, chosen on its own val rows)
    val: tuple | None = None            # (y, p, patients) of its validation rows: what the ranking reads
    repeats: dict = field(default_factory=dict)  # config.json "_repeats": the train.py --seeds call it came from
    cv: dict = field(default_factory=dict)       # config.json "_cv": the train.py --folds call it came from
    test_train: float = math.nan                 # test / train images of its split (the CV test's correction)
    fingerprint: str = ""   # sha1 of the scored images' paths and labels: equal means comparable
    note: str = ""

    @property
    def task(self) -> str:
        return self.config.get("task", "binary")

    @property
    def scored(self) -> bool:
        return self.task == "binary" and self.y is not None and self.y.size > 0


@dataclass
class Row:
    """One line of the logbook: a single run, or a group of repeats."""
    runs: list[Run]
    name: str
    value: dict = field(default_factory=dict)   # pooled point estimates (the compared partition)
    val: dict = field(default_factory=dict)     # pooled validation figures: rows are ranked and picked by these
    ci: dict = field(default_factory=dict)      # metric -> (lo, hi)
    spread: dict = field(default_factory=dict)  # metric -> {"mean", "std", "n"} across the runs
    per_run: list[dict] = field(default_factory=list)  # each run's own figures (what the recipe test compares)
    image_set: str = ""                         # letter of the set of comparable rows
    best: bool = False
    versus: dict | None = None                  # paired_bootstrap result against the best
    note: str = ""
    identical: list[str] = field(default_factory=list)  # runs left out: same seed, split and images as one kept
    shared_patients: int = 0                    # cross-validation: patients in the test side of more than one fold

    @property
    def folds(self) -> list[int]:
        """The folds of a cross-validation row (the runs of one --folds call), in order; [] for other rows."""
        return sorted(int(r.config.get("fold") or 0) for r in self.runs) if self.runs and self.runs[0].cv else []

    @property
    def signature(self) -> tuple[str, ...]:
        return tuple(sorted({r.fingerprint for r in self.runs}))


# --- reading runs ---------------------------------------------------------------------------

def load_run(path: Path, name: str, part: str, rule: str) -> Run:
    """A run folder's settings and its predictions on `part`, thresholded by `rule`."""
    raw = read_json(path / "config.json") or {}
    if not isinstance(raw, dict):
        raise UserError(f"{path / 'config.json'} is not a JSON object of settings; the run folder is damaged")
    metrics = read_json(path / "metrics.json") or {}
    if not isinstance(metrics, dict):
        raise UserError(f"{path / 'metrics.json'} is not a JSON object of figures; the run folder is damaged "
                        f"(finish or rescore it with train.py --resume {path})")
    config = renamed({k: v for k, v in raw.items() if not k.startswith("_")}, str(path / "config.json"))
    # a setting added after the run was made reads as its default, as runs.load_config reads it (e.g. folds):
    # it neither splits the run from its repeats nor shows as a differing column
    config = {**{k: v for k, v in DEFAULTS.items() if k not in config}, **config}
    run = Run(path, name, config, metrics, repeats=raw.get("_repeats") or {},
              cv=raw.get("_cv") or {})
    if run.task != "binary":
        run.note = "subtype task: not ranked"
        return run
    table = read_csv(path / "predictions.csv")
    if not table:
        run.note = "no predictions.csv (unfinished run: resume it with train.py --resume)"
        return run
    need = {"path", "patient", "label", "p_malignant", "split"}
    missing = need - set(table[0])
    if missing:
        raise UserError(f"{path / 'predictions.csv'} lacks the column(s) {', '.join(sorted(missing))}; "
                        f"the run folder is damaged (rewrite it with `python -c \"from breakhis.predict import finalize; "
                        f"finalize('{path}')\"`)")
    if number(rule) is not None:
        threshold = M.choose_threshold([], [], rule)
    else:
        val = [r for r in table if r["split"] == "val"]
        if not val:
            raise UserError(f"--threshold {rule}: run {path} has no validation predictions to choose it on; "
                            f"give a number such as 0.5")
        threshold = M.choose_threshold(*_arrays(val)[:2], rule)
    rows = sorted((r for r in table if r["split"] == part), key=lambda r: r["path"])
    if not rows:
        run.note = f"no {part} predictions in predictions.csv"
        return run
    y, p, patients = _arrays(rows)
    run.paths, run.y, run.p, run.patients, run.threshold = [r["path"] for r in rows], y, p, patients, threshold
    val_rows = [r for r in table if r["split"] == "val"]
    run.val = _arrays(val_rows) if val_rows else None
    text = "\n".join(f"{q}\t{label}" for q, label in zip(run.paths, y))
    run.fingerprint = hashlib.sha1(text.encode()).hexdigest()
    if run.cv:
        split = read_json(path / "split.json") or {}
        if split.get("train") and split.get("test"):
            run.test_train = len(split["test"]) / len(split["train"])
    return run


def _arrays(rows: list[dict]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Labels (N,), malignant probabilities (N,) and patients (N,) of predictions.csv rows."""
    return (np.array([int(r["label"]) for r in rows]), np.array([float(r["p_malignant"]) for r in rows]),
            np.array([r["patient"] for r in rows]))


def run_names(paths: list[Path]) -> list[str]:
    """Each run's path relative to the folder that holds them all."""
    resolved = [p.resolve() for p in paths]
    base = Path(os.path.commonpath(resolved))
    if base in resolved:
        base = base.parent
    return [str(p.relative_to(base)) for p in resolved]


# --- settings and repeats -------------------------------------------------------------------

def _setting(config: dict, key: str):
    v = config.get(key)
    if key == "data" and isinstance(v, str):
        return os.path.normpath(v)
    return tuple(v) if isinstance(v, list) else v


def differing_settings(configs: list[dict]) -> list[str]:
    """The settings whose values differ between configs, in config order (IGNORED left out)."""
    keys = list(dict.fromkeys(k for c in configs for k in c if k not in IGNORED))
    return [k for k in keys if len({repr(_setting(c, k)) for c in configs}) > 1]


def group_repeats(items: list[Run]) -> list[tuple[list[Run], list[Run]]]:
    """Repeats of one recipe, in first-seen order: (runs, identical runs left out).

    Runs are repeats when their settings are equal except the seed: they share the patient split.
    Runs on other splits (split_seed) are pooled only when they came from one `train.py --seeds
    --resplit` call (its "_repeats" record), runs of other folds only when they came from one
    `train.py --folds` call (its "_cv" record). Runs with the same seed, split and test images are
    the same run trained twice: one is kept, the others are listed as left out."""
    groups: dict[str, list[Run]] = {}
    for r in items:
        resplit = bool(r.repeats.get("resplit"))
        ignored = ("fold",) if r.cv else REPEAT_KEYS if resplit else ("seed",)
        call = ("cv", r.cv.get("id"), r.cv.get("name")) if r.cv else r.repeats.get("id") if resplit else None
        key = repr((sorted((k, repr(_setting(r.config, k))) for k in r.config if k not in IGNORED and k not in ignored),
                    call))
        groups.setdefault(key, []).append(r)
    out = []
    for runs_ in groups.values():
        kept, same, seen = [], [], set()
        for r in runs_:
            ident = (repr(r.config.get("seed")), repr(r.config.get("split_seed")), r.fingerprint)
            (same if ident in seen else kept).append(r)
            seen.add(ident)
        out.append((kept, same))
    return out


def _prefix(names: list[str]) -> str:
    """The names' common prefix without a trailing -seed / -fold."""
    prefix = os.path.commonprefix(names).rstrip("-_./ ")
    for suffix in ("seed", "fold"):
        if prefix.endswith(suffix):
            prefix = prefix[:-len(suffix)].rstrip("-_./ ")
    return prefix


def _group_name(names: list[str]) -> str:
    if len(names) == 1:
        return names[0]
    prefix = _prefix(names)
    return prefix if len(prefix) >= 3 else " + ".join(names)


def _row_name(items: list[Run]) -> str:
    """A cross-validation: its runs' common prefix (or the --folds call's name) and "(k folds)"; other rows: _group_name."""
    names = [r.name for r in items]
    if not (items[0].cv and len(items) > 1):
        return _group_name(names)
    return f"{_prefix(names) or items[0].cv.get('name') or ' + '.join(names)} ({len(items)} folds)"


# --- figures and the paired test ------------------------------------------------------------

def _pooled(items: list[Run]) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Labels, raw probabilities, patients and each image's threshold (its run's) of runs taken together."""
    return (np.concatenate([r.y for r in items]), np.concatenate([r.p for r in items]),
            np.concatenate([r.patients for r in items]), np.concatenate([np.full(r.y.size, r.threshold) for r in items]))


def _figures(y, p, patients, t) -> dict:
    return {**M.binary_metrics(y, p, t), **M.patient_metrics(y, p, patients, t)}


def score_row(row: Row, n_boot: int, seed: int = 0) -> None:
    """Pooled figures with intervals over patients, mean ± std across the row's runs, and the validation
    figures the ranking uses. Every figure uses each run's raw probabilities at its own threshold."""
    y, p, patients, t = _pooled(row.runs)
    row.value = _figures(y, p, patients, t)
    row.ci = intervals.bootstrap_ci(y, p, patients, n_boot=n_boot, seed=seed, threshold=t)
    keys = [k for k, _ in METRICS] + ["best_val_acc"]
    per_run = [{**_figures(r.y, r.p, r.patients, r.threshold), "best_val_acc": r.saved.get("best_val_acc")}
               for r in row.runs]
    row.spread = M.mean_std(per_run, keys)  # sample std (ddof 1)
    row.per_run = per_run
    if row.folds:
        seen = [set(r.patients.tolist()) for r in row.runs]
        row.shared_patients = sum(sum(p in s for s in seen) > 1 for p in set().union(*seen))
    row.value["best_val_acc"] = row.spread["best_val_acc"]["mean"]
    if all(r.val is not None for r in row.runs):
        vy, vp, vpat = (np.concatenate([r.val[i] for r in row.runs]) for i in range(3))
        vt = np.concatenate([np.full(r.val[0].size, r.threshold) for r in row.runs])
        row.val = _figures(vy, vp, vpat, vt)


def paired(a: Row, b: Row, metric: str, n_boot: int, seed: int = 0) -> dict:
    """paired_bootstrap of row a against row b on their shared test images (same signature)."""
    ys, pas, pbs, pats, tas, tbs = [], [], [], [], [], []
    for f in a.signature:
        ra = [r for r in a.runs if r.fingerprint == f]
        rb = [r for r in b.runs if r.fingerprint == f]
        for x in ra:
            for z in rb:  # both runs list the same images in the same (sorted) order
                ys.append(x.y), pas.append(x.p), pbs.append(z.p), pats.append(x.patients)
                tas.append(np.full(x.y.size, x.threshold)), tbs.append(np.full(z.y.size, z.threshold))
    cat = np.concatenate
    return intervals.paired_bootstrap(cat(ys), cat(pas), cat(pbs), cat(pats), metric=metric, n_boot=n_boot, seed=seed,
                                      threshold=cat(tas), threshold_b=cat(tbs))


def recipes(a: Row, b: Row, metric: str, n_boot: int, seed: int = 0) -> dict:
    """Is recipe a better than recipe b? intervals.recipe_test over the rows' runs (repeats over seeds, or
    splits with --resplit): the seed-to-seed variance and the sampling of the test patients are both part
    of the verdict (Welch over the runs alone was fooled when recipes differ in which patients they get
    wrong). The paired bootstrap over patients only asks whether these particular checkpoints differ."""
    def runs(row: Row) -> list[tuple]:
        return [(r.y, r.p, r.patients, r.threshold) for r, f in zip(row.runs, row.per_run)
                if f.get(metric) is not None and math.isfinite(f[metric])]
    ra, rb = runs(a), runs(b)
    return intervals.recipe_test(metric, ra, rb, n_boot, seed,
                                 f"recipes: runs ({len(ra)} vs {len(rb)}) and test patients")


def folds_test(a: Row, b: Row, metric: str, n_boot: int, seed: int = 0) -> dict:
    """Is cross-validation a better than b over the same folds? Fold j of a is paired with the run of b on
    the same test images; intervals.fold_test counts the joint sampling of the folds' test patients and the
    folds' model noise apart (the Nadeau-Bengio t over the folds had 3-10.5% power at +2 points, bench coverage),
    with the mean test/train ratio of the paired runs' splits."""
    runs_b = {r.fingerprint: r for r in b.runs}
    pairs, ratios = [], []
    for ra, fa in zip(a.runs, a.per_run):
        rb = runs_b.get(ra.fingerprint)
        fb = b.per_run[b.runs.index(rb)] if rb is not None else {}
        if all(f.get(metric) is not None and math.isfinite(f[metric]) for f in (fa, fb)):
            pairs.append(tuple((r.y, r.p, r.patients, r.threshold) for r in (ra, rb)))
            ratios += [ra.test_train, rb.test_train]
    ratio = float(np.nanmean(ratios)) if pairs else math.nan
    test = f"recipes: {len(pairs)} folds, test patients and models (test/train {ratio:.2f})"
    return intervals.fold_test(metric, pairs, ratio, n_boot, seed, test)


def _key(row: Row, metric: str) -> float:
    """The ranking value: the validation figure (never the test one); rows without one rank last."""
    v = row.val.get(metric)
    return -math.inf if v is None or not math.isfinite(v) else v


def rank(rows: list[Row], metric: str, n_boot: int, seed: int = 0) -> list[Row]:
    """Rows grouped by comparable test images (largest set first), ranked and picked by their validation
    figure within each. Every other row is tested against the pick on the test images; the p-values
    are Holm-corrected for the number of rows compared, and significance reads the corrected value."""
    sets: dict[tuple, list[Row]] = {}
    for row in rows:
        sets.setdefault(row.signature, []).append(row)
    out = []
    for i, members in enumerate(sorted(sets.values(), key=len, reverse=True)):
        members.sort(key=lambda r: _key(r, metric), reverse=True)
        letter = chr(ord("A") + i) if i < 26 else str(i + 1)
        for row in members:
            row.image_set = letter
        if len(members) == 1:
            members[0].note = "only row on these images: not ranked"
        else:
            members[0].best = True
            for row in members[1:]:
                if len(row.folds) > 1 and len(members[0].folds) > 1:
                    row.versus = folds_test(row, members[0], metric, n_boot, seed)
                elif len(row.per_run) > 1 and len(members[0].per_run) > 1:
                    row.versus = recipes(row, members[0], metric, n_boot, seed)
                else:
                    row.versus = {**paired(row, members[0], metric, n_boot, seed),
                                  "test": "checkpoints: paired bootstrap over patients"}
            adjusted = intervals.holm([r.versus["p_value"] for r in members[1:]])
            for row, q in zip(members[1:], adjusted):
                row.versus.update(p_holm=q, significant=bool(q <= 0.05))
        out += members
    return out


# --- output ---------------------------------------------------------------------------------

@dataclass
class Logbook:
    """Many runs compared: the rows (ranked) and what they were scored with (logbook_table shows them)."""
    rows: list[Row]
    keys: list[str]           # the settings that differ between the runs (columns)
    part: str
    runs: int                 # run folders read
    ci_settings: dict         # how every interval was made (intervals.interval_settings)
    sort: str                 # the metric the rows are ranked by (on validation)
    threshold: str            # --threshold: a number, youden or recall=R
    n_boot: int
    seed: int


def logbook(paths: list[Path], *, part: str = "test", threshold: str = "0.5", sort: str = "accuracy",
            n_boot: int = 1000, seed: int = 0) -> Logbook:
    """Read the run folders, group repeats, score with intervals, rank within comparable image sets."""
    loaded = [load_run(p, n, part, threshold) for p, n in zip(paths, run_names(paths))]
    keys = differing_settings([r.config for r in loaded])
    scored = [r for r in loaded if r.scored]
    rows = [Row(g, _row_name(g), identical=[r.name for r in same])
            for g, same in group_repeats(scored)]
    for row in rows:
        score_row(row, n_boot, seed)
    rows = rank(rows, sort, n_boot, seed)
    rows += [Row([r], r.name, note=r.note) for r in loaded if not r.scored]
    return Logbook(rows, keys, part, len(loaded), intervals.interval_settings(n_boot, seed), sort, threshold, n_boot, seed)


