"""The whole pipeline on one tree, stage by stage: seconds and peak memory of each.

    python -m breakhis.data.demo /tmp/full --full                      # 7,909 synthetic 700x460 PNGs (minutes)
    python -m breakhis.data.demo /tmp/half --full --fraction 0.5       # every patient, half the images
    python -m breakhis.bench pipeline --data /tmp/full --json          # last line: one JSON object
    python -m breakhis.bench pipeline --data /tmp/half --stages cache_cold,decode_limit

Each stage runs in a fresh Python process (`--stage NAME`, started by this command), so that its
memory figures are its own: "peak RSS" is the stage process's own peak resident set
(getrusage ru_maxrss, exact); "peak PSS" is the largest sum, over the stage process and all its
descendants (decode workers, Ray's processes and trial workers), of their proportional set size
(/proc/<pid>/smaps_rollup, sampled every 0.2 s; PSS shares each shared page among the processes
mapping it, so the memory-mapped cache is not counted once per process). "seconds" is the
stage's work, timed inside its process after the imports; "process s" adds the interpreter start
and imports.

Stages, in order (a later one uses what an earlier one left in --work):
  cache_cold    index the tree and decode every file into a fresh uint8 cache (--workers processes)
  decode_limit  Pillow alone on the same files: open, convert to RGB, resize to the cache size, in
                the same number of processes, nothing kept: the most a cache build could reach
  cache_warm    the same build_cache call again: it finds the cache and memory-maps it
  index_report  index + integrity report (counts, duplicates, unreadable files) on the warm cache,
                what `python -m breakhis.data ROOT` does
  split         prepare(): index, warm cache, duplicates dropped, patient-level split
  train         one epoch of --backbone at --image-size (fit(): train pass + validation pass; the
                seconds are the epoch's own, from history.csv). fit() then scores the run
  finalize      predict.finalize on that run again: val and test predictions, bootstrap intervals, plots
  logbook       evaluate.py's logbook over --runs copies of the run folder
  tune          tune.py: --trials one-epoch trials (one seed each) on a local Ray, one CPU per trial

Goals (for the issue; printed, never asserted): cache build >= 0.8 of the decode limit; peak
PSS of any stage <= cache size + 2 GiB; every stage after training < 15 s.
"""
from __future__ import annotations

import argparse
import concurrent.futures as cf
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from io import StringIO
from pathlib import Path

from PIL import Image
from rich.console import Console
from rich.table import Table

from .. import compare, logbook_table
from ..config import make_config
from ..data.cache import CHUNK_MAX, RESAMPLE, build_cache, default_cache_size, default_workers
from ..data.dataset import index_tree
from ..data.integrity import integrity_report
from ..data.prepare import prepare
from ..errors import UserError
from ..fit import fit
from ..io import read_csv
from ..predict import finalize
from ..tuning import experiment as tuning
from ..tuning.results import collect, write_results
from ..tuning.space import load_space

STAGES = ("cache_cold", "decode_limit", "cache_warm", "index_report", "split", "train", "finalize", "logbook", "tune")
AFTER_TRAINING = ("finalize", "logbook")  # the stages the 15 s goal is about (tune trains)
GiB = 1024 ** 3


# --- the parent: one process per stage, memory sampled from /proc --------------------------------

def _children() -> dict[int, list[int]]:
    """ppid -> [pid] of every process on the machine (Linux /proc)."""
    out: dict[int, list[int]] = {}
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                with open(f"/proc/{d}/stat") as f:
                    ppid = int(f.read().rsplit(")", 1)[1].split()[1])  # the name may hold spaces
            except (OSError, IndexError, ValueError):
                continue
            out.setdefault(ppid, []).append(int(d))
    return out


def tree_pss(pid: int) -> int | None:
    """Bytes: the PSS of pid and all its descendants; None where /proc has no smaps_rollup."""
    kids, todo, total, seen = _children(), [pid], 0, False
    while todo:
        p = todo.pop()
        todo += kids.get(p, [])
        try:
            with open(f"/proc/{p}/smaps_rollup") as f:
                for line in f:
                    if line.startswith("Pss:"):
                        total += int(line.split()[1]) * 1024
                        seen = True
                        break
        except OSError:
            continue  # gone, or not ours to read
    return total if seen else None


def run_stage(name: str, argv: list[str]) -> dict:
    """Run one stage in a fresh process; its JSON figures plus the peak PSS of its process tree."""
    cmd = [sys.executable, "-m", "breakhis.bench", "pipeline", *argv, "--stage", name]
    t0 = time.perf_counter()
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        proc = subprocess.Popen(cmd, stdout=out, stderr=err, env={**os.environ, "RAY_AIR_NEW_OUTPUT": "0"})
        peak = None
        while proc.poll() is None:
            pss = tree_pss(proc.pid)
            if pss is not None:
                peak = max(peak or 0, pss)
            time.sleep(0.2)
        out.seek(0)
        err.seek(0)
        text, errors = out.read(), err.read()
    if proc.returncode != 0:
        raise RuntimeError(f"stage {name} failed (exit {proc.returncode}):\n{(text + errors)[-4000:]}")
    row = json.loads(text.strip().splitlines()[-1])
    row.update(stage=name, process_s=time.perf_counter() - t0, peak_pss=peak)
    return row


# --- the stages (each in its own process) --------------------------------------------------------

def _limit_decode(items: list[str], size: tuple[int, int]) -> int:
    h, w = size
    for p in items:
        with Image.open(p) as im:
            im.convert("RGB").resize((w, h), RESAMPLE)
    return len(items)


def decode_limit(paths: list[str], size: tuple[int, int], workers: int) -> None:
    """Pillow decode + resize of every path in `workers` processes, chunked as build_cache chunks them."""
    chunk = max(1, min(CHUNK_MAX, len(paths) // (workers * 4)))
    tasks = [paths[s:s + chunk] for s in range(0, len(paths), chunk)]
    with cf.ProcessPoolExecutor(min(workers, len(tasks))) as ex:
        for fut in cf.as_completed([ex.submit(_limit_decode, t, size) for t in tasks]):
            fut.result()


def stage(name: str, a: argparse.Namespace) -> dict:
    """Do one stage's work; returns its figures (seconds of work, and what it produced)."""
    # long by design: one branch per stage, each a few lines, in the order the pipeline runs them
    work = Path(a.work)
    size = default_cache_size(a.image_size)
    cfg = make_config({"data": a.data, "cache_dir": str(work / "cache"), "image_size": a.image_size,
                       "backbone": a.backbone, "pretrained": False, "batch_size": a.batch_size, "epochs": 1,
                       "workers": a.workers, "device": "cpu", "class_weights": "none", "head": (64,), "dropout": (0.2,)})
    run0 = work / "results" / "run0"
    figures: dict = {}
    t0 = time.perf_counter()
    if name in ("cache_cold", "cache_warm"):
        index = index_tree(a.data)
        cache = build_cache(index.root, [r.path for r in index.records], size, cache_dir=work / "cache",
                            workers=a.workers, progress=False)
        figures.update(images=len(index.records), cache_bytes=int(cache.images.nbytes), built=cache.build_s is not None)
    elif name == "decode_limit":
        index = index_tree(a.data)
        decode_limit([str(index.root / r.path) for r in index.records], size, a.workers)
        figures.update(images=len(index.records))
    elif name == "index_report":
        index = index_tree(a.data)
        cache = build_cache(index.root, [r.path for r in index.records], size, cache_dir=work / "cache",
                            workers=a.workers, progress=False)
        rep = integrity_report(index, cache.info, cache.paths)
        figures.update(images=len(index.records), duplicate_groups=len(rep.get("duplicates") or []))
    elif name == "split":
        prep = prepare(cfg, progress=False)
        figures.update({k: len(v) for k, v in prep.parts.items()})
    elif name == "train":
        shutil.rmtree(run0, ignore_errors=True)
        run0.mkdir(parents=True)
        fit(cfg, run0, progress=False)
        row = read_csv(run0 / "history.csv")[-1]
        figures.update(epoch_s=float(row["seconds"]), img_s=float(row["img_s"]), fit_s=time.perf_counter() - t0)
        return {"seconds": float(row["seconds"]), **figures, **_rusage()}
    elif name == "finalize":
        for f in ("metrics.json", "predictions.csv"):
            (run0 / f).unlink(missing_ok=True)
        shutil.rmtree(run0 / "plots", ignore_errors=True)
        out = finalize(run0, progress=False)
        figures.update(test_accuracy=out["test"]["accuracy"])
    elif name == "logbook":
        paths = [run0]
        for i in range(1, a.runs):  # copies of one run, untimed
            dst = run0.parent / f"run{i}"
            if not dst.exists():
                shutil.copytree(run0, dst)
            paths.append(dst)
        t0 = time.perf_counter()
        book = compare.logbook(paths)
        Console(file=StringIO(), width=200).print(logbook_table.render(book))
        figures.update(runs=book.runs)
    elif name == "tune":
        # what tune.py does, without its printing: setup, cache (warm), Ray, trials, trials.csv
        space_file = work / "seeds.py"
        space_file.write_text(f'"""Seeds."""\nSPACE = {{"seed": {list(range(a.trials))}}}\n')
        shutil.rmtree(work / "tune", ignore_errors=True)
        setup = tuning.make_setup(load_space(space_file), {**cfg.to_dict(), "epochs": 1}, metric=None, mode=None,
                                  max_epochs=1, grace_period=1, reduction_factor=2, samples=1, concurrent=None)
        prepare(cfg, progress=False)
        exp_dir = tuning.new_experiment(work / "tune", "bench")
        setup.save(exp_dir)
        tuning.start_ray(None)
        resources, _ = tuning.trial_resources(None, 1.0)
        rows = collect(tuning.run_experiment(setup, exp_dir, resources), setup, exp_dir)
        write_results(exp_dir, rows, setup)
        if bad := [r for r in rows if r["status"] != "finished"]:
            raise RuntimeError(f"tune stage: trials not finished: {bad}")
        figures.update(trials=a.trials)
    return {"seconds": time.perf_counter() - t0, **figures, **_rusage()}


def _rusage() -> dict:
    """Peak RSS in bytes of this process and of its largest waited-for child (Linux reports KiB)."""
    unit = 1 if sys.platform == "darwin" else 1024
    return {"peak_rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * unit,
            "peak_rss_child": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * unit}


# --- the command ----------------------------------------------------------------------------------

def _gib(b) -> str:
    return "-" if b is None else f"{b / GiB:.2f} GiB"


def goals(rows: dict[str, dict]) -> list[tuple[str, bool, str]]:
    """(goal, met, figures) for the goals that the stages run can show."""
    out = []
    if "cache_cold" in rows and "decode_limit" in rows:
        ratio = rows["decode_limit"]["seconds"] / rows["cache_cold"]["seconds"]
        out.append(("cache build >= 0.8 of the decode limit", ratio >= 0.8, f"{ratio:.2f}"))
    cache = next((r["cache_bytes"] for r in rows.values() if "cache_bytes" in r), None)
    if cache is not None:
        worst = max(rows.values(), key=lambda r: r.get("peak_pss") or r["peak_rss"])
        peak = worst.get("peak_pss") or worst["peak_rss"]
        out.append(("peak memory <= cache + 2 GiB", peak <= cache + 2 * GiB,
                    f"{_gib(peak)} ({worst['stage']}) vs {_gib(cache + 2 * GiB)}"))
    after = {k: rows[k]["seconds"] for k in AFTER_TRAINING if k in rows}
    if after:
        slow = max(after, key=after.get)
        out.append(("every stage after training < 15 s", after[slow] < 15, f"slowest: {slow} {after[slow]:.1f} s"))
    return out


def main(argv: Sequence[str]) -> int:
    # long by design: a benchmark script read top to bottom (flags, setup, the timed sides, the printed table)
    ap = argparse.ArgumentParser(prog="python -m breakhis.bench pipeline", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", required=True, help="BreaKHis_v1 root (or its parent), e.g. a --full demo tree")
    ap.add_argument("--json", action="store_true", help="print one JSON object as the last line")
    ap.add_argument("--stages", default=",".join(STAGES), help=f"comma-separated subset of {','.join(STAGES)}")
    ap.add_argument("--image-size", type=int, default=64, help="model input side, px; the cache is sized for it (default 64)")
    ap.add_argument("--backbone", default="resnet18", help="the small backbone trained (default resnet18)")
    ap.add_argument("--batch-size", type=int, default=64, help="training batch (default 64)")
    ap.add_argument("--workers", type=int, default=0, help="decode processes, cache and limit alike (0: one per core)")
    ap.add_argument("--runs", type=int, default=20, help="run folders in the logbook (default 20)")
    ap.add_argument("--trials", type=int, default=4, help="one-epoch trials of the tune stage (default 4)")
    ap.add_argument("--work", default="", help="keep the cache, runs and experiment here (default: a temporary folder)")
    ap.add_argument("--stage", help=argparse.SUPPRESS)  # internal: run one stage in this process
    a = ap.parse_args(argv)
    a.workers = a.workers or default_workers()
    chosen = [s.strip() for s in a.stages.split(",") if s.strip()]
    if bad := [s for s in chosen if s not in STAGES]:
        raise UserError(f"--stages: unknown stage(s) {', '.join(bad)}; choose from {', '.join(STAGES)}")
    for flag, v, least in (("--image-size", a.image_size, 32), ("--batch-size", a.batch_size, 1),
                           ("--runs", a.runs, 1), ("--trials", a.trials, 1)):
        if v < least:
            raise UserError(f"{flag} {v}: must be at least {least}")
    if a.stage:
        print(json.dumps(stage(a.stage, a)))
        return 0

    index = index_tree(a.data)  # a missing or empty tree fails here, in one line
    need = {"finalize": "train", "logbook": "train"}
    for s in chosen:
        if s in need and need[s] not in chosen and not (a.work and (Path(a.work) / "results" / "run0").is_dir()):
            raise UserError(f"--stages {s} needs the train stage (or a --work folder holding its run)")
    work = Path(a.work) if a.work else Path(tempfile.mkdtemp(prefix="breakhis-pipeline-"))
    try:
        work.mkdir(parents=True, exist_ok=True)  # a --work folder that does not exist yet
    except OSError as e:
        raise UserError(f"--work {work}: cannot create it ({e.strerror or e})") from None
    console = Console(stderr=a.json)
    child = ["--data", str(index.root), "--work", str(work), "--image-size", str(a.image_size), "--backbone", a.backbone,
             "--batch-size", str(a.batch_size), "--workers", str(a.workers), "--runs", str(a.runs),
             "--trials", str(a.trials)]
    rows: dict[str, dict] = {}
    try:
        if "cache_cold" in chosen:
            shutil.rmtree(work / "cache", ignore_errors=True)  # cold: nothing to find
        for s in (s for s in STAGES if s in chosen):
            with console.status(f"stage {s}"):
                rows[s] = run_stage(s, child)
            r = rows[s]  # a line per stage as it ends: a long run shows its figures as it goes
            console.print(f"{s}: {r['seconds']:.2f} s, peak RSS {_gib(r['peak_rss'])}, peak PSS {_gib(r['peak_pss'])}",
                          highlight=False)
    finally:
        if not a.work:
            shutil.rmtree(work, ignore_errors=True)

    n = len(index.records)
    h, w = default_cache_size(a.image_size)
    table = Table(title=f"pipeline: {n} images ({index.root}), cache {h}x{w}, {a.backbone} at {a.image_size} px, "
                        f"{a.workers} workers, {os.cpu_count()} cores")
    for col in ("stage", "seconds", "process s", "peak RSS", "peak PSS (tree)", "note"):
        table.add_column(col, justify="left" if col in ("stage", "note") else "right")
    for s, r in rows.items():
        note = ""
        if s in ("cache_cold", "cache_warm"):
            note = f"{n / r['seconds']:,.0f} img/s, cache {_gib(r['cache_bytes'])}" + ("" if r["built"] else " (found)")
        elif s == "decode_limit":
            note = f"{n / r['seconds']:,.0f} img/s"
            if "cache_cold" in rows:
                note += f"; cache build / limit = {r['seconds'] / rows['cache_cold']['seconds']:.2f}"
        elif s == "train":
            note = f"{r['img_s']:,.0f} train img/s; fit() with scoring {r['fit_s']:.1f} s"
        elif s == "split":
            note = " / ".join(f"{k} {r[k]}" for k in ("train", "val", "test"))
        elif s == "logbook":
            note = f"{r['runs']} runs"
        elif s == "tune":
            note = f"{r['trials']} one-epoch trials"
        elif s == "index_report":
            note = f"{r['duplicate_groups']} duplicate group(s)"
        table.add_row(s, f"{r['seconds']:.2f}", f"{r['process_s']:.1f}", _gib(r["peak_rss"]), _gib(r["peak_pss"]), note)
    console.print(table)
    met = goals(rows)
    for goal, ok, fig in met:
        console.print(f"{'[green]met[/]' if ok else '[red]missed[/]'}  {goal}: {fig}", highlight=False)
    if a.json:
        print(json.dumps({"images": n, "cache_hw": [h, w], "workers": a.workers, "cores": os.cpu_count(),
                          "stages": rows, "goals": [{"goal": g, "met": ok, "figures": f} for g, ok, f in met]}))
    return 0
