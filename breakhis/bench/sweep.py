"""A frozen-backbone sweep against its own epochs: what a trial costs beyond the training it does.

    python -m breakhis.bench sweep                                 # the demo tree (made if missing), 64 trials
    python -m breakhis.bench sweep --data data/BreaKHis_v1 --trials 128 --max-epochs 30 --json

Side by side in one run, on the same cached features of a frozen backbone (resnet18 at 224 by
default, random init so nothing is downloaded, no augmentation so one feature view):

  feature pass   the one-time pass of every image through the backbone (cold: the files deleted first)
  sweep          `tune.py` in its own process, as a user runs it: a grid of --trials learning rates
                 (geometric, 1e-4 to 1e-2) under ASHA (grace 5, factor 3), the features warm
  limit          the same trials' epochs alone: each trial's head trained for the epochs that trial
                 ran in the sweep (history.csv), in a plain loop in this process, one thread as in a
                 trial's worker (train_one_epoch, evaluate and the epoch's validation figures on
                 FeatureLoaders; heads built before the clock starts; no run folder, no Ray)

Per trial, the overhead is its time in its worker (trial.json: from the trial function's start to its
return, the scoring of its best checkpoint included) minus its epochs (history.csv's seconds);
without trial.json (older trials) Ray's time_total_s, which leaves out a stopped trial's scoring.
The ratio is (sweep - its driver setup) / limit. Goals (issue 21, 2-core CPU): the sweep within the
feature pass + 60 s, and a median per-trial overhead of at most 0.3 s.
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from rich.console import Console
from rich.table import Table

from ..config import make_config
from ..data.demo import make_demo
from ..data.prepare import prepare
from ..device import amp_dtype
from ..engine import evaluate, make_loss, train_one_epoch
from ..errors import UserError
from ..features import FeatureLoader, feature_path, run_features
from ..fit import build_features, preflight, val_metrics, with_inputs
from ..io import read_csv, read_json
from ..loader import DeviceImages
from ..models import Classifier, model_for
from ..optim import build_optimizer, build_schedule

DEMO = Path("data/demo")  # train.py --demo's tree: made here when --data is not given and it is missing
TUNE = Path(__file__).resolve().parents[2] / "tune.py"
GOAL_SLACK_S = 60.0   # the sweep within the feature pass + this
GOAL_OVERHEAD_S = 0.3  # median per-trial overhead beyond its epochs


def grid(trials: int) -> list[float]:
    """The swept learning rates: `trials` values, geometric from 1e-4 to 1e-2 (rounded to 4 digits)."""
    return [float(f"{v:.4g}") for v in np.geomspace(1e-4, 1e-2, trials)]


def base_settings(a) -> dict:
    """The train.py settings of every trial (and of the limit): frozen backbone on cached features."""
    return {"data": a.data, "backbone": a.backbone, "pretrained": False, "image_size": a.image_size, "freeze": True,
            "augment": False, "batch_size": a.batch_size, "epochs": a.max_epochs, "scheduler": "cosine",
            "head": (256,), "dropout": (0.2,), "cache_dir": a.cache_dir, "device": "cpu", "lr": 1e-3}


def flags(settings: dict) -> list[str]:
    out = []
    for k, v in settings.items():
        name = "--" + k.replace("_", "-")
        if isinstance(v, bool):
            out.append(name if v else "--no-" + name[2:])
        else:
            out += [name, ",".join(map(str, v)) if isinstance(v, tuple) else str(v)]
    return out


def trial_times(exp: Path) -> list[dict]:
    """Per trial of a finished sweep: epochs run, their seconds, its seconds in its worker, the overhead."""
    out = []
    for run in sorted((exp / "runs").iterdir()):
        history = read_csv(run / "history.csv")
        epochs = sum(float(h["seconds"]) for h in history)
        own = read_json(run / "trial.json") or {}
        seconds = own.get("seconds")
        source = "trial.json"
        if seconds is None:  # older trials: Ray's own clock, which ends at the trial's last report
            lines = (exp / run.name / "result.json").read_text().splitlines() if (exp / run.name / "result.json").is_file() else []
            seconds = json.loads(lines[-1])["time_total_s"] if lines else float("nan")
            source = "ray"
        out.append({"trial": run.name, "epochs": len(history), "epoch_seconds": epochs, "seconds": seconds,
                    "report_seconds": own.get("report_seconds"),
                    "overhead": seconds - epochs, "source": source, "lr": float(read_json(run / "config.json")["lr"])})
    return out


def limit(settings: dict, lrs_epochs: list[tuple[float, int]]) -> float:
    """Seconds to train every trial's head for its epochs in one plain loop: the floor of any sweep."""
    cfg0 = with_inputs(make_config(settings))
    device = torch.device("cpu")
    prep = prepare(cfg0, progress=False)
    amp = amp_dtype(cfg0.amp, device)
    model = model_for(cfg0)
    images = DeviceImages.for_run(prep.cache.images, cfg0, device, None)
    feats = {p: run_features(model.backbone, prep, cfg0, device, amp, images, parts=(p,))[p]  # warm: read back
             for p in ("train", "val")}
    heads = []  # built before the clock starts: the limit is the epochs alone
    for lr, epochs in lrs_epochs:
        cfg = with_inputs(make_config({**settings, "lr": lr}))
        head = Classifier(torch.nn.Identity(), model_for(cfg).head)  # the trial's own initial head (same seed)
        heads.append((cfg, head, epochs))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as in a trial's worker (Ray: one thread for a trial of at most one CPU)
    t0 = time.perf_counter()
    for cfg, head, epochs in heads:
        train = FeatureLoader.for_run(feats["train"], prep, "train", cfg)
        val = FeatureLoader.for_run(feats["val"], prep, "val", cfg)
        opt = build_optimizer(head.parameters(), cfg.optimizer, cfg.lr, cfg.weight_decay, cfg.momentum, cfg.nesterov)
        sched = build_schedule(opt, cfg, steps_per_epoch=len(train))
        loss = make_loss(cfg.class_weights, cfg.label_smoothing, device)
        for epoch in range(1, epochs + 1):
            train.set_epoch(epoch)
            train_one_epoch(head, train, opt, sched, loss)
            ev = evaluate(head, val, loss)
            val_metrics(ev, cfg.task)  # the figures an epoch reports (ASHA reads them)
            sched.step_epoch(ev["loss"])
    seconds = time.perf_counter() - t0
    torch.set_num_threads(threads)
    return seconds


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m breakhis.bench sweep", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default="", help="BreakHis root (default: the demo tree data/demo, made if missing)")
    ap.add_argument("--trials", type=int, default=64, help="trials of the grid (default 64)")
    ap.add_argument("--max-epochs", type=int, default=20, help="epochs of a trial ASHA never stops (default 20)")
    ap.add_argument("--backbone", default="resnet18", help="frozen backbone (default resnet18, random init)")
    ap.add_argument("--image-size", type=int, default=224, help="model input side, pixels (default 224)")
    ap.add_argument("--batch-size", type=int, default=32, help="images per training batch (default 32)")
    ap.add_argument("--cpus-per-trial", default="", help="passed to tune.py (default: tune.py's own)")
    ap.add_argument("--cache-dir", default="", help="decode and feature cache folder (default: a temporary one)")
    ap.add_argument("--json", action="store_true", help="print the figures as one JSON object on the last line")
    a = ap.parse_args(argv)
    if a.trials < 1 or a.max_epochs < 1:
        raise UserError(f"--trials {a.trials} / --max-epochs {a.max_epochs}: both must be at least 1")
    if not TUNE.is_file():
        raise UserError(f"{TUNE} not found: run the sweep benchmark from a checkout of the repository")
    console = Console()
    with tempfile.TemporaryDirectory(prefix="bench-sweep-") as tmp:
        tmp = Path(tmp)
        if not a.data:
            a.data = str(DEMO / "BreaKHis_v1")
            if not Path(a.data).exists():
                make_demo(DEMO, patients=16, images_per_patient=16, size=(350, 230))  # what train.py --demo makes
        a.data = str(Path(a.data).resolve())
        a.cache_dir = str(Path(a.cache_dir).resolve()) if a.cache_dir else str(tmp / "cache")
        settings = base_settings(a)
        cfg = with_inputs(make_config(settings))
        device = preflight(cfg)
        prep = prepare(cfg, progress=False)  # the decode cache, before any timing

        # --- the one-time feature pass, cold ---
        amp = amp_dtype(cfg.amp, device)
        for part in ("train", "val", "test"):
            feature_path(prep, cfg, part, amp).unlink(missing_ok=True)
        t0 = time.perf_counter()
        build_features(cfg, prep, device)
        feature_s = time.perf_counter() - t0

        # --- the sweep: tune.py in its own process, features warm ---
        (tmp / "space.py").write_text(f'"""Learning rates of a frozen head."""\nSPACE = {{"lr": {grid(a.trials)}}}\n')
        argv_tune = [sys.executable, str(TUNE), "--space", str(tmp / "space.py"), "--results", str(tmp / "results"),
                     "--name", "sweep", "--max-epochs", str(a.max_epochs), "--grace-period", str(min(5, a.max_epochs)),
                     "--reduction-factor", "3", *flags(settings),
                     *(["--cpus-per-trial", a.cpus_per_trial] if a.cpus_per_trial else [])]
        env = {**os.environ, "PYTHONPATH": str(TUNE.parent) + os.pathsep + os.environ.get("PYTHONPATH", "")}
        with console.status(f"sweep: {a.trials} trials of up to {a.max_epochs} epochs (tune.py)"):
            t0 = time.perf_counter()
            done = subprocess.run(argv_tune, cwd=tmp, env=env, capture_output=True, text=True)
            sweep_s = time.perf_counter() - t0
        if done.returncode != 0:
            raise RuntimeError(f"tune.py exited {done.returncode}:\n{done.stdout[-2000:]}\n{done.stderr[-3000:]}")
        exp = tmp / "results" / "tune" / "sweep"
        trials = trial_times(exp)
        phases = read_json(exp / "timing.json") or {}
        with open(exp / "trials.csv") as f:
            statuses = [r["status"] for r in csv.DictReader(f)]
        over = [t["overhead"] for t in trials]
        console.print(f"sweep {sweep_s:.1f} s; per-trial overhead median {statistics.median(over):.2f} s, "
                      f"max {max(over):.2f} s", highlight=False)

        # --- the limit: the same epochs, one plain loop ---
        with console.status("limit: the same epochs in one loop"):
            limit_s = limit(settings, [(t["lr"], t["epochs"]) for t in trials])
        shutil.rmtree(exp, ignore_errors=True)

    epochs_total = sum(t["epochs"] for t in trials)
    setup_s = phases.get("driver_setup")
    ratio = (sweep_s - (setup_s or 0)) / limit_s
    table = Table(title=f"{a.trials}-trial sweep, frozen {a.backbone} at {cfg.image_size} px, {epochs_total} epochs in all, "
                        f"{len(prep.positions['train'])} train / {len(prep.positions['val'])} val images, "
                        f"CPU {os.cpu_count()} cores")
    table.add_column("")
    table.add_column("seconds", justify="right")
    table.add_row("feature pass (once, cold)", f"{feature_s:.1f}")
    table.add_row("sweep: tune.py end to end", f"{sweep_s:.1f}")
    for key in ("driver_setup", "ray_start", "trials", "results"):
        if key in phases:
            table.add_row(f"  {key.replace('_', ' ')}", f"{phases[key]:.1f}")
    table.add_row("limit: the same epochs in one loop", f"{limit_s:.1f}")
    table.add_row("ratio (sweep - driver setup) / limit", f"{ratio:.1f}x")
    table.add_row("per-trial overhead, median / max", f"{statistics.median(over):.2f} / {max(over):.2f}")
    waits = [t["report_seconds"] for t in trials if t["report_seconds"] is not None]
    if waits:
        table.add_row("  of which waiting in tune.report, median", f"{statistics.median(waits):.2f}")
    console.print(table)
    goals = {f"sweep within feature pass + {GOAL_SLACK_S:.0f} s": sweep_s <= feature_s + GOAL_SLACK_S,
             f"median per-trial overhead <= {GOAL_OVERHEAD_S} s": statistics.median(over) <= GOAL_OVERHEAD_S}
    for goal, met in goals.items():
        console.print(f"{'met' if met else 'NOT met'}: {goal}", highlight=False)
    console.print(f"trials: {', '.join(f'{statuses.count(s)} {s}' for s in sorted(set(statuses)))}; "
                  f"overhead measured by {trials[0]['source'] if trials else '-'}", highlight=False)
    if a.json:
        print(json.dumps({"trials": a.trials, "epochs": epochs_total, "feature_s": feature_s, "sweep_s": sweep_s,
                          "phases": phases, "limit_s": limit_s, "ratio": ratio,
                          "overhead_median_s": statistics.median(over), "overhead_max_s": max(over),
                          "statuses": statuses, "goals": goals, "per_trial": trials}))
    return 0
