"""Train one CNN on BreakHis and record it as a run folder under results/.

    python train.py --demo                                   # synthetic tree, small model, ~1 min on a CPU
    python train.py --data data/BreaKHis_v1                  # the logbook's best entry (resnet152, see README)
    python train.py --backbone resnet152 --freeze            # only the head trains
    python train.py --preset logbook:resnet50_frozen         # one named entry of experiments/logbook.py
    python train.py --config results/tune/<name>/best.json   # retrain a tune result
    python train.py --seeds 0,1,2 --backbone resnet50        # repeats on the same patient split
    python train.py --folds 1-5                              # one run per official fold (Folds.csv / mkfold)
    python train.py --resume results/<run>                   # continue an interrupted run
    python train.py --backbone timm:convnext_tiny --freeze   # any timm model; --list-backbones shows names
    python train.py --backbone timm:hf-hub:MahmoodLab/UNI --weights uni.bin --freeze   # a pathology model
    python train.py --protocol eva --backbone timm:hf-hub:MahmoodLab/UNI --weights uni.bin   # eva's benchmark, and held out

Precedence: defaults < --demo / --preset / --config < flags. Every setting is a flag
(see --help); config.json in the run folder holds the resolved settings. Every setting is
checked (TrainConfig.validate) before torch is imported, the tree read or a folder made.
"""
from __future__ import annotations

import argparse
import dataclasses
import shlex
import sys
import time
from pathlib import Path

from breakhis.config import add_flags, flag_name, load_config_file, make_config, overrides_from_args
from breakhis.errors import UserError, guard
from breakhis.tuning.space import load_preset

DEMO_DIR = Path("data/demo")
# a small, fast model for the synthetic demo tree (CPU, about a minute)
DEMO = {"data": str(DEMO_DIR / "BreaKHis_v1"), "backbone": "resnet18", "pretrained": False, "image_size": 64,
        "batch_size": 32, "epochs": 6, "lr": 1e-3, "scheduler": "multistep", "milestones": (4,),
        "head": (128,), "dropout": (0.2, 0.2), "class_weights": (0.5, 0.5)}
EVA_DEMO_DIR = Path("data/demo-eva")  # --demo --protocol eva: a tree with eva's validation patients (data/eva.py)
EVA_DEMO = {"data": str(EVA_DEMO_DIR / "BreaKHis_v1"), "image_size": 64}


def parse(argv):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--demo", action="store_true", help="make the synthetic demo tree if missing and train on it")
    ap.add_argument("--preset", help="named settings, e.g. logbook:resnet50_frozen (experiments/logbook.py)")
    ap.add_argument("--config", help="settings from a JSON file (a run's config.json or tune's best.json)")
    ap.add_argument("--name", help="run folder name under --results (default: time and backbone)")
    ap.add_argument("--results", default="results", help="folder that holds run folders")
    ap.add_argument("--resume", metavar="RUN_DIR", help="continue an interrupted run from its last.pt")
    ap.add_argument("--seeds", help="train once per seed, e.g. 0,1,2, on the same patient split")
    ap.add_argument("--resplit", action="store_true", help="with --seeds: also redraw the patient split per seed")
    ap.add_argument("--quiet", action="store_true", help="no progress bars or per-epoch lines")
    ap.add_argument("--list-backbones", action="store_true", help="print the backbones: torchvision, tested timm "
                    "names, pathology foundation models (hub names, licences, input sizes), and exit")
    add_flags(ap)
    return ap.parse_args(argv)


def list_backbones() -> str:
    """The --list-backbones text, from breakhis.registry (no torch import)."""
    from breakhis.registry import BACKBONES, NOT_TIMM, PATHOLOGY, TIMM_TESTED
    lines = ["torchvision (ImageNet weights, 224 px, ImageNet normalisation):", "  " + ", ".join(BACKBONES), "",
             "timm, any model as --backbone timm:NAME; tested here (normalisation and size from its pretrained_cfg):"]
    lines += [f"  timm:{k:28s} {v}" for k, v in TIMM_TESTED.items()]
    lines += ["", "pathology foundation models (gated hubs: download, then --weights FILE):"]
    lines += [f"  timm:{k:40s} {v['size']} px, {v['features']} features, {v['arch']}; {v['licence']}"
              for k, v in PATHOLOGY.items()]
    lines += [f"  {k:45s} {v}" for k, v in NOT_TIMM.items()]
    return "\n".join(lines)


def layers_of(a) -> list[dict]:
    layers = []
    if a.demo:
        layers.append(DEMO)
    if getattr(a, "protocol", None) == "eva":  # the flag brings eva's settings (experiments/eva.py), flags still win
        layers += [load_preset("eva:protocol")] + ([EVA_DEMO] if a.demo else [])
    if a.preset:
        layers.append(load_preset(a.preset))
    if a.config:
        layers.append(load_config_file(a.config))
    layers.append(overrides_from_args(a))
    return layers


def resolve(a):
    return make_config(*layers_of(a))


def seed_list(text: str | None, default: int) -> list[int]:
    """--seeds '0,1,2' -> [0, 1, 2]; without the flag, the config's one seed."""
    if text is None:
        return [default]
    try:
        seeds = [int(s) for s in text.split(",") if s.strip()]
    except ValueError:
        raise UserError(f"--seeds {text!r}: give whole numbers separated by commas, e.g. 0,1,2") from None
    if not seeds:
        raise UserError("--seeds: give at least one seed")
    return seeds


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    a = parse(argv)
    if a.list_backbones:
        print(list_backbones())
        return 0
    # --- config: every setting checked before the heavy imports (torch: ~3 s) and any work ---
    if a.resume:
        given = [flag_name(k) for k in overrides_from_args(a)] + \
            [f"--{k}" for k in ("demo", "preset", "config", "seeds", "name") if getattr(a, k)]
        if given:
            raise UserError(f"--resume continues {a.resume} with its own settings (config.json); drop {' '.join(given)} "
                            f"(to train longer or differently, start a new run, e.g. --config {a.resume}/config.json)")
    cfg = None if a.resume else resolve(a)
    seeds = seed_list(a.seeds, cfg.seed if cfg else 0)
    if cfg and cfg.protocol != "none":
        return run_protocol(cfg, a, argv)
    if cfg and cfg.folds and (a.seeds or a.resplit):
        raise UserError(f"--folds {cfg.folds} with --seeds/--resplit is not supported: the folds are the repeats "
                        f"(one run per fold); for seed repeats on one fold use --fold N --seeds {a.seeds or '0,1,2'}")

    from breakhis import report, runs
    from breakhis.data.demo import make_demo, write_folds
    from breakhis.fit import fit, preflight, with_inputs

    # --- resume: the run's own config, nothing else ---
    if a.resume:
        run_dir = Path(a.resume)
        if not runs.is_run(run_dir):
            raise UserError(f"--resume {run_dir}: not a run folder (no config.json and split.json)")
        if runs.status_of(run_dir) == runs.FINISHED:
            raise UserError(f"--resume {run_dir}: the run already finished; train a new one instead")
        if runs.owner_alive(run_dir) and runs.status_of(run_dir) == runs.RUNNING:
            raise UserError(f"--resume {run_dir}: another process is training it right now ({run_dir / runs.OWNER})")
        if not (run_dir / "last.pt").is_file():
            cv = (runs.read_json(run_dir / runs.RUN_MARKER) or {}).get("_cv")
            again = (f"it is a fold of the --folds call {cv['name']}: run that call again, with its flags and "
                     f"--name {cv['name']}, to train this fold from the start and continue the others"
                     if isinstance(cv, dict) and cv.get("name") else
                     f"train it again: python train.py --config {run_dir}/config.json --name NEW_NAME")
            raise UserError(f"--resume {run_dir}: nothing to resume, the run stopped before its first epoch was "
                            f"saved (no last.pt); {again}")
        runs.claim(run_dir)
        cfg = runs.load_config(run_dir)
        metrics = fit(cfg, run_dir, resume=True, progress=not a.quiet)
        report.console.print(report.evaluation_table(metrics))
        report.console.print(f"run folder: {run_dir}")
        return 0

    # --- where the runs go, and what they need of this machine: refused before any work ---
    runs.check_name(a.name)
    runs.check_results(a.results)
    preflight(cfg)
    # the backbone's own normalisation, and its input size unless --image-size (or a preset) set one
    cfg = with_inputs(cfg, keep_size=any("image_size" in layer for layer in layers_of(a)))

    # --- data ---
    if a.demo and not Path(cfg.data).exists():
        make_demo(DEMO_DIR, patients=16, images_per_patient=16, size=(350, 230))
        report.console.print(f"made the SYNTHETIC demo tree {DEMO_DIR / 'BreaKHis_v1'}")
    if a.demo and Path(cfg.data) == Path(DEMO["data"]) and not (DEMO_DIR / "Folds.csv").exists():
        write_folds(DEMO_DIR / "BreaKHis_v1")  # synthetic official-style folds, so that --fold and --folds can be tried

    if cfg.folds:
        return train_folds(cfg, a.name, a.results, a.quiet, argv)
    return train_seeds(cfg, seeds, a.name, a.results, a.resplit, a.quiet)


def run_protocol(cfg, a, argv: list[str]) -> int:
    """--protocol eva: the data and splits checked, then one feature pass and the probes (breakhis/protocol.py)."""
    if a.resplit:
        raise UserError("--protocol eva already draws one held-out split per seed; drop --resplit")
    seeds = seed_list(a.seeds, cfg.seed) if a.seeds else [cfg.seed + i for i in range(5)]
    if len(seeds) < 2:
        raise UserError(f"--seeds {a.seeds}: the protocol reports a spread over seeds; give at least two (eva: 5)")
    from breakhis import protocol, report, runs
    from breakhis.data.demo import make_demo
    from breakhis.data.eva import DEMO_SLIDES
    from breakhis.fit import preflight, with_inputs

    runs.check_name(a.name)
    runs.check_results(a.results)
    if a.name:
        runs.check_new(a.results, a.name)
    device = preflight(cfg)
    cfg = protocol.eva_inputs(with_inputs(cfg, keep_size=True))
    if a.demo and Path(cfg.data) == Path(EVA_DEMO["data"]) and not Path(cfg.data).exists():
        make_demo(EVA_DEMO_DIR, images_per_patient=16, size=(350, 230), slides=DEMO_SLIDES)
        report.console.print(f"made the SYNTHETIC demo tree {EVA_DEMO_DIR / 'BreaKHis_v1'} (eva's patient ids)")
    data = protocol.plan(cfg, seeds, progress=not a.quiet)
    run_dir = runs.new_run_dir(a.results, a.name, f"eva-{cfg.backbone}")
    report.console.print(f"run folder: {run_dir}")
    out = protocol.run_eva(cfg, run_dir, seeds, data, device, progress=not a.quiet)
    report.console.print(report.protocol_table(out))
    return 0


def train_folds(cfg, name: str | None, results: str, quiet: bool, argv: list[str]) -> int:
    """One run per official fold: every fold's data and folder checked before the first one trains.

    Run again after an interruption or a kill, the same command with the same --name continues it (the
    one command to give; printed on Ctrl-C): finished folds are kept, a fold with a last.pt resumes, a
    fold killed before its first epoch was saved trains from the start, missing ones are trained; a fold
    folder of other settings is refused. The runs keep the first call's cross-validation record (_cv)."""
    from breakhis import report, runs
    from breakhis.data.prepare import prepare
    from breakhis.fit import check_data

    stamp = time.strftime("%Y%m%d-%H%M%S")
    base = name or f"{stamp}-{runs.label_of(cfg.backbone)}"
    again = shlex.join(["python", "train.py", *argv, *([] if name else ["--name", base])])
    folds = [(fold_cfg, Path(results) / f"{base}-fold{fold_cfg.fold}") for fold_cfg in cfg.per_fold()]
    for _, path in folds:
        runs.check_name(str(path.relative_to(results)))
    plans = [runs.fold_plan(path) for _, path in folds]
    cv = {"id": stamp, "folds": list(cfg.fold_list()), "name": base}
    for (fold_cfg, path), plan in zip(folds, plans):
        if plan != "new":
            differ = runs.settings_differ(path, fold_cfg)
            if differ:
                raise UserError(f"{path} exists with other settings ({differ}): continue it with the settings it "
                                f"was started with, or choose another --name")
            cv = (runs.read_json(path / runs.RUN_MARKER) or {}).get("_cv") or cv
    if any(p != "new" for p in plans):
        words = {"new": "trained", "finished": "finished, kept", "resume": "resumed from its last.pt",
                 "restart": "killed before its first epoch was saved: trained from the start"}
        report.console.print("continuing the --folds call " + base + ": " + "; ".join(
            f"fold {c.fold} {words[p]}" for (c, _), p in zip(folds, plans)), soft_wrap=True)
    preps = {}
    for (fold_cfg, _), plan in zip(folds, plans):  # the fold file lists the fold, no patient on both sides, a batch fits
        if plan in ("new", "restart"):
            preps[fold_cfg.fold] = prepare(fold_cfg, progress=not quiet)
            check_data(preps[fold_cfg.fold], fold_cfg)
    for i, ((fold_cfg, path), plan) in enumerate(zip(folds, plans)):
        if plan == "finished":
            continue
        if plan == "resume":
            runs.claim(path)
            code = train_one(fold_cfg, path, None, quiet, again=again)
        else:
            path = runs.restart(path) if plan == "restart" else runs.new_run_dir(results, str(path.relative_to(results)),
                                                                                  fold_cfg.backbone)
            code = train_one(fold_cfg, path, preps[fold_cfg.fold], quiet, again=again, cv=cv)
        if code:
            rest = [c.fold for c, _ in folds[i + 1:]]
            if rest:
                print(f"folds {','.join(map(str, rest))} were not started", file=sys.stderr)
            return code
    return 0


def train_seeds(cfg, seeds: list[int], name: str | None, results: str, resplit: bool, quiet: bool) -> int:
    """One run per seed, on one patient split (or one per seed with resplit)."""
    from breakhis import runs
    from breakhis.data.prepare import prepare
    from breakhis.fit import check_data

    prep = None
    repeats = {"id": time.strftime("%Y%m%d-%H%M%S"), "seeds": seeds, "resplit": resplit} if len(seeds) > 1 else None
    for seed in seeds:
        run_cfg = dataclasses.replace(cfg, seed=seed, split_seed=seed if resplit else cfg.split_seed)
        if prep is None or resplit:
            prep = prepare(run_cfg, progress=not quiet)
            check_data(prep, run_cfg)
        run_name = name and (f"{name}-seed{seed}" if len(seeds) > 1 else name)
        run_dir = runs.new_run_dir(results, run_name, run_cfg.backbone + (f"-seed{seed}" if len(seeds) > 1 else ""))
        code = train_one(run_cfg, run_dir, prep, quiet, repeats=repeats)
        if code:
            return code
    return 0


def train_one(cfg, run_dir: Path, prep, quiet: bool, again: str = "", **record) -> int:
    """fit() one run into run_dir (prep None: resume it) and print its table; 130 after Ctrl-C (saying
    truthfully how to continue: again, the command that continues a --folds call), else 0.
    record: repeats= or cv=, what the run records of the call it is one of (runs.start_run)."""
    from breakhis import report
    from breakhis.fit import fit

    report.console.print(f"run folder: {run_dir}")
    try:
        metrics = fit(cfg, run_dir, data=prep, progress=not quiet, resume=prep is None, **record)
    except KeyboardInterrupt:
        if (run_dir / "last.pt").is_file():
            print(f"interrupted; the last finished epoch is saved. Continue with: "
                  f"{again or f'python train.py --resume {run_dir}'}", file=sys.stderr)
        else:
            print(f"interrupted before the first epoch was saved (in the data, feature or first-epoch pass): "
                  f"nothing was saved (the folder {run_dir} was removed); start again"
                  + (f" with: {again}" if again else " with the same command"), file=sys.stderr)
        return 130
    report.console.print(report.evaluation_table(metrics, title=f"Model Evaluation: {run_dir.name}"))
    return 0


if __name__ == "__main__":
    raise SystemExit(guard(main))
