"""Search the training config with Ray Tune; ASHA stops weak trials early.

    python tune.py --space experiments/weights.py --data data/BreaKHis_v1          # class weights (0.5, w)
    python tune.py --space experiments/lr.py --samples 16 --max-epochs 30          # 16 draws of lr and weight decay
    python tune.py --space experiments/logbook.py                                 # the whole logbook as one grid
    python tune.py --space experiments/backbones.py --gpus-per-trial 0.25         # four trials share one GPU
    python tune.py --space experiments/lr.py --backbone resnet18 --image-size 64   # any train.py flag is a base setting
    python tune.py --name lr-20260101-120000 --resume                             # continue after Ctrl-C
    python tune.py --space experiments/lr.py --address HEAD_IP:6379               # an existing Ray cluster
    python tune.py --space experiments/weights.py --folds 1-5                     # each trial scored over 5 folds (slow)
    python train.py --config results/tune/<name>/best.json                        # retrain the best trial
    python tune.py --space experiments/weights.py --verbose                       # Ray's own log lines here too

Precedence: train defaults < the space file's BASE < flags < each trial's SPACE sample.
Each trial runs train.py's fit() into results/tune/<name>/runs/<trial_id>/, a normal run folder
(`python evaluate.py` accepts it). Epochs are ASHA's time unit: every trial runs --grace-period
epochs; at each rung (grace, grace*factor, grace*factor^2, ... epochs) only the best
1/--reduction-factor of the trials that reached it go on. results/tune/<name>/ holds Ray's
experiment folder, tune.json, trials.csv and best.json. The decode cache is built once, before
any trial starts; trials memory-map it. With --address the data root, the cache folder and
--results must be on a filesystem that every node sees at the same path.

--folds 1-5 (slow): every trial trains each listed official fold in turn, as train.py --folds, into
runs/<trial_id>/fold<N>/, and is scored by the mean over folds of each fold's best validation value
of --metric. It reports once, after its last fold, so ASHA cannot stop it early: a search costs
samples x folds full runs. Every fold's data is checked in the driver before Ray starts.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from breakhis.config import add_flags, make_config, overrides_from_args
from breakhis.errors import UserError, guard

REDUCTION_FACTOR = 3
# settings fixed when an experiment starts; --resume continues with the stored ones
FIXED = ("space", "samples", "max_epochs", "grace_period", "reduction_factor", "metric", "mode", "concurrent")


def parse(argv):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                 allow_abbrev=False)
    ap.add_argument("--space", help="search space file, e.g. experiments/lr.py (required unless --resume)")
    ap.add_argument("--samples", type=int, help="draws from the space's domains (Ray's num_samples; grids multiply); default 1")
    ap.add_argument("--max-epochs", type=int, help="epochs of a trial that is never stopped (ASHA's max_t); default --epochs")
    ap.add_argument("--grace-period", type=int, help="epochs before ASHA may stop a trial (default 5, at most --max-epochs)")
    ap.add_argument("--reduction-factor", type=int, help=f"ASHA keeps 1/factor of the trials per rung (default {REDUCTION_FACTOR})")
    ap.add_argument("--metric", help="what ASHA and the ranking optimise (default: the space's METRIC, else val_acc)")
    ap.add_argument("--mode", choices=("min", "max"), help="default: the space's MODE, else min for losses, max otherwise")
    ap.add_argument("--concurrent", type=int, help="at most this many trials at once (default: as resources allow)")
    ap.add_argument("--gpus-per-trial", type=float, help="GPU share of a trial, e.g. 0.25 (default 1; 0 without a GPU)")
    ap.add_argument("--cpus-per-trial", type=float,
                    help="CPU cores of a trial (default 1; 0.5 for a frozen backbone on cached features, whose "
                         "trials are small enough to share a core)")
    ap.add_argument("--name", help="experiment name under RESULTS/tune (default: space name and time)")
    ap.add_argument("--resume", action="store_true", help="continue the interrupted experiment --name")
    ap.add_argument("--trust-state", action="store_true",
                    help="with --resume: restore Ray's experiment state even if it changed since tune.py last stopped "
                         "(restoring unpickles it, which can run code)")
    ap.add_argument("--address", help="join this Ray cluster (e.g. HEAD_IP:6379 or auto) instead of starting one")
    ap.add_argument("--results", default="results", help="results folder; experiments go to RESULTS/tune/<name>")
    ap.add_argument("--verbose", action="store_true",
                    help="show Ray's own log lines and the trials' output here (default: RESULTS/tune/<name>/ray.log)")
    add_flags(ap)
    return ap.parse_args(argv)


def shown(path: Path) -> str:
    """A path as the user can copy it: relative to where they stand when it is below it, else absolute."""
    try:
        return str(Path(path).resolve().relative_to(Path.cwd().resolve()))
    except ValueError:
        return str(path)


def main(argv=None) -> int:
    t0 = time.perf_counter()
    a = parse(argv)
    from breakhis.data.prepare import prepare
    from breakhis.fit import build_features, preflight
    from breakhis.io import write_json
    from breakhis.report import console
    from breakhis.tuning import experiment as tuning
    from breakhis.tuning.output import ray_log, timeline, timeline_line

    results = Path(a.results).resolve() / "tune"

    # --- config: a new experiment's settings, or the stored ones of the experiment --resume continues ---
    setup, exp_dir, name = settings(a, results)
    if a.address:  # nothing listening: said now, in seconds, before any data work or folder
        tuning.probe_address(a.address)

    # --- data: index, split and decode once, before any trial starts; trials memory-map the cache ---
    base_cfg = tuning.absolute_paths(make_config(setup.base), setup.cwd)
    device = preflight(base_cfg)  # the device, AMP, --weights and a timm backbone every trial needs
    if a.resume:
        tuning.check_state(exp_dir, trust=a.trust_state)
    for fold_cfg in base_cfg.per_fold():  # with --folds, every fold's split is checked before Ray starts
        prep = prepare(fold_cfg, progress=True)
        if fold_cfg.cached_features:  # a frozen backbone: its features once, here; every trial reads them
            with console.status("computing the frozen backbone's features once for all trials"):
                build_features(fold_cfg, prep, device)
    if not a.resume:
        exp_dir = tuning.new_experiment(results, name)
        setup.save(exp_dir)

    # --- Ray: start or join, resources per trial, run (Ray's own log lines into the experiment's ray.log) ---
    phases = {"driver_setup": time.perf_counter() - t0}
    cpus = a.cpus_per_trial or (0.5 if base_cfg.cached_features else 1.0)
    with ray_log(exp_dir, a.verbose):
        t1 = time.perf_counter()
        tuning.start_ray(a.address, verbose=a.verbose)
        resources, note = tuning.trial_resources(a.gpus_per_trial, cpus)
        phases["ray_start"] = time.perf_counter() - t1
        console.print(f"experiment {shown(exp_dir)}: {setup.metric} ({setup.mode}), up to {setup.max_epochs} epochs "
                      f"per trial, ASHA grace {setup.grace_period} factor {setup.reduction_factor}; {note}",
                      highlight=False, soft_wrap=True)
        t1 = time.perf_counter()
        try:
            pairs = tuning.run_experiment(setup, exp_dir, resources, resume=a.resume)
        finally:
            tuning.seal_state(exp_dir)  # what --resume will check before Ray unpickles it
        phases["trials"] = time.perf_counter() - t1
    t1 = time.perf_counter()
    code = report(pairs, setup, exp_dir, a.results)
    phases["results"] = time.perf_counter() - t1
    where = timeline(exp_dir, phases)
    write_json(exp_dir / "timing.json", where)
    console.print(timeline_line(where), highlight=False, soft_wrap=True)
    return code


def settings(a, results: Path):
    """(Setup, experiment folder or None, name): a new experiment's, checked before any work, or the
    stored ones (tune.json) of the experiment --resume continues, which takes no setting flags."""
    from breakhis.report import console
    from breakhis.tuning import experiment as tuning
    from breakhis.tuning.space import load_space, shipped

    if a.resume:
        exp_dir = tuning.find_experiment(results, a.name)
        given = [f"--{k.replace('_', '-')}" for k in FIXED if getattr(a, k) is not None] + \
                [f"--{k.replace('_', '-')}" for k in overrides_from_args(a)]
        if given:
            raise UserError(f"--resume continues {exp_dir} with its stored settings (tune.json); drop {' '.join(given)}")
        return tuning.Setup.load(exp_dir), exp_dir, exp_dir.name
    if not a.space:
        raise UserError(f"--space FILE is required, e.g. --space experiments/lr.py; shipped: {', '.join(shipped())}")
    space = load_space(a.space)
    setup = tuning.make_setup(space, overrides_from_args(a), metric=a.metric, mode=a.mode, max_epochs=a.max_epochs,
                              grace_period=a.grace_period,
                              reduction_factor=REDUCTION_FACTOR if a.reduction_factor is None else a.reduction_factor,
                              samples=1 if a.samples is None else a.samples, concurrent=a.concurrent)
    name = a.name or f"{space.path.stem}-{time.strftime('%Y%m%d-%H%M%S')}"
    if (results / name).exists():
        tuning.new_experiment(results, name)  # raises: never overwrite
    if space.doc:
        console.print(f"[bold]{space.path.name}[/]: {space.doc.splitlines()[0]}")
    return setup, None, name


def complete_winner(run: Path) -> None:
    """The best trial's run folder(s) finalized again with what trials skip: the intervals in metrics.json
    and the plots (the same checkpoint and data, so the same point figures as in trials.csv)."""
    from breakhis import runs
    from breakhis.predict import finalize
    from breakhis.report import console
    from breakhis.tuning.experiment import fold_runs

    with console.status("the winner's intervals and plots"):
        for run_dir in [run] if runs.is_run(run) else fold_runs(run):
            finalize(run_dir, progress=False)


def report(pairs, setup, exp_dir: Path, results_flag: str) -> int:
    """trials.csv, best.json and the table; the lines that say what next, each one copyable line."""
    from breakhis import runs
    from breakhis.report import console
    from breakhis.tuning.results import collect, held_out, pick_best, results_table, write_results
    from breakhis.tuning.space import load_space

    rows = collect(pairs, setup, exp_dir)
    best = pick_best(rows, setup)
    if best:
        complete_winner(Path(best["run"]))  # first: best.json carries the intervals it writes
    best = write_results(exp_dir, rows, setup)
    keys = list(load_space(setup.space).space)
    console.print(results_table(rows, setup, keys, title=f"{exp_dir.name}: {setup.metric} ({setup.mode})"))
    console.print(f"trials.csv: {shown(exp_dir / 'trials.csv')}", highlight=False, soft_wrap=True)
    if any(r["status"] == runs.INTERRUPTED for r in rows):
        print(f"interrupted; continue with: python tune.py --name {exp_dir.name} --resume"
              + (f" --results {results_flag}" if results_flag != "results" else ""), file=sys.stderr)
        return 130
    if best is None:
        print(f"no trial finished; see the errors above and {shown(exp_dir / 'trials.csv')}", file=sys.stderr)
        return 1
    h = held_out(best, rows, setup)
    test = f"{h['test']:.4f}" if isinstance(h["test"], float) else "–"
    if h["test_ci"]:
        test += f" [{h['test_ci'][0]:.3f}, {h['test_ci'][1]:.3f}]"
    console.print(f"best: {best['trial']} {setup.metric} {h['validation']:.4f} (best of {h['trials']} trials: "
                  f"optimistic by selection), test {h['test_figure']} {test}, run {shown(best['run'])}",
                  highlight=False, soft_wrap=True)
    console.print("the test figure chose nothing; for an unbiased estimate of the recipe retrain it on a new split "
                  "(--split-seed) or with --folds", highlight=False, soft_wrap=True)
    console.print(f"retrain it: python train.py --config {shown(exp_dir / 'best.json')}", highlight=False, soft_wrap=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(guard(main))
