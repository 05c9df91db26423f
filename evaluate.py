"""Evaluate a run from its folder alone, or compare many runs side by side (the logbook).

    python evaluate.py results/<run>                        # "Model Evaluation" table of the test partition
    python evaluate.py results/<run> --tta --threshold youden   # 8 dihedral views; threshold chosen on val
    python evaluate.py results/<run> --by magnification     # per magnification / subtype / patient
    python evaluate.py results/<run> --data other/BreaKHis_v1   # score every image of another tree
    python evaluate.py results/<run> --export model.pt2     # torch.export program for deployment
    python evaluate.py results/<run> --model model.pt2      # evaluate with that exported program
    python evaluate.py results/<run> --cam 8                # Grad-CAM overlays of 8 test images
    python evaluate.py results/tune/<name>/runs/<trial> --plots   # a tune trial's plots, drawn on demand
    python evaluate.py results/<run> --calibrate --save-temperature   # temperature scaling fitted on val
    python evaluate.py results/ --sort auroc --markdown logbook.md   # the logbook: all runs compared
    python evaluate.py results/<protocol run>               # a train.py --protocol eva run: its rows again

The model is rebuilt from model.safetensors and config.json; the split from split.json. New
image files are scored by score.py (python score.py RUN PATH...). What is safe to load:
docs/safety.md (an exported .pt2 runs code when loaded: --model loads only files the run
exported itself, unless --trust-model).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from breakhis.errors import UserError, guard
from breakhis.options import BY, EvalOptions


def parse(argv) -> EvalOptions:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("runs", nargs="+", help="run folder(s), or a folder holding runs (e.g. results/)")
    ap.add_argument("--part", "--split", dest="part", default="test", choices=("val", "test"),
                    help="partition to score (default test)")
    ap.add_argument("--tta", action="store_true", help="average the 8 dihedral views of each image")
    ap.add_argument("--threshold", default="0.5",
                    help="decision threshold: a number, youden or recall=0.95 (chosen on val, applied to test)")
    ap.add_argument("--data", help="score the images of another tree with the same naming; images of the run's "
                                   "train/val patients (or pixel copies of theirs) are left out and counted")
    ap.add_argument("--include-seen", action="store_true",
                    help="with --data: keep the run's train/val patients too (the figure is then not a test figure)")
    ap.add_argument("--device", default=None, help="auto, cpu, cuda (default: the run's)")
    ap.add_argument("--by", choices=BY, help="break the metrics down by group")
    ap.add_argument("--json", action="store_true", help="print the metrics as one JSON object on the last line")
    ap.add_argument("--export", metavar="FILE.pt2", help="write a torch.export program of the model")
    ap.add_argument("--model", metavar="FILE.pt2",
                    help="evaluate with an exported program of this run instead of the checkpoint (only files the run "
                         "exported itself, by SHA-256, unless --trust-model)")
    ap.add_argument("--trust-model", action="store_true",
                    help="load --model even if this run did not export it: loading a .pt2 file can run code stored in it")
    ap.add_argument("--plots", action="store_true",
                    help="draw RUN/plots/: learning curves, ROC, PR, confusion matrix and reliability diagram of --part "
                         "(at --threshold and the run's temperature); tune trials are trained without plots")
    ap.add_argument("--cam", type=int, default=0, metavar="N", help="write Grad-CAM overlays of N test images")
    ap.add_argument("--calibrate", action="store_true",
                    help="fit temperature scaling on the run's validation predictions; show the test figures before and after")
    ap.add_argument("--save-temperature", action="store_true",
                    help="with --calibrate: save the temperature in RUN/calibration.json; later evaluations and --export use it")
    ap.add_argument("--sort", default="accuracy", help="logbook: the metric that ranks the runs")
    ap.add_argument("--csv", metavar="FILE", help="logbook: write the table as CSV")
    ap.add_argument("--markdown", metavar="FILE", help="logbook: write the table as Markdown")
    ap.add_argument("--n-boot", "--boot", dest="n_boot", type=int, default=1000,
                    help="bootstrap resamples for the intervals (default 1000)")
    ap.add_argument("--boot-seed", type=int, default=0, help="seed of the bootstrap draws (default 0)")
    if "--images" in (argv if argv is not None else sys.argv[1:]):
        raise UserError("new images are scored by score.py now: python score.py RUN PATH... [--threshold T --tta "
                        "--cam N --out FILE.csv]")
    return EvalOptions(**vars(ap.parse_args(argv)))


def logbook(opts: EvalOptions, paths: list[Path]) -> int:
    """Many runs from their predictions.csv, side by side."""
    from breakhis import compare, io, logbook_table, report

    book = compare.logbook(paths, part=opts.part, threshold=opts.threshold, sort=opts.sort, n_boot=opts.n_boot,
                           seed=opts.boot_seed)
    if opts.csv:
        io.write_csv(opts.csv, logbook_table.records(book))
    if opts.markdown:
        io.write_text(opts.markdown, logbook_table.markdown(book))
    if opts.json:
        print(json.dumps({"sort": opts.sort, "split": opts.part, "threshold": opts.threshold, "boot": opts.n_boot,
                          "ci_settings": book.ci_settings, "rows": logbook_table.records(book)}))
        return 0
    report.console.print(logbook_table.render(book))
    for f in (opts.csv, opts.markdown):
        if f:
            report.console.print(f"wrote {f}")
    return 0


def show(out: dict, by: str | None) -> None:
    """The tables and lines of one run's evaluation."""
    from breakhis import report

    if out.get("export"):
        report.console.print(f"wrote {out['export']} (torch.export program; load with torch.export.load(path).module())")
    title = f"Model Evaluation: {Path(out['run']).name} ({out['split']}" + (", TTA" if out["tta"] else "") + ")"
    if out.get("calibration"):
        report.console.print(report.calibration_table(out, title=title.replace("Model Evaluation", "Calibration")))
        c = out["calibration"]
        report.console.print(f"wrote {Path(out['run']) / 'calibration.json'} (T = {c['temperature']:.4g}); later evaluations "
                             f"and --export use it" if c["saved"] else
                             f"not saved: add --save-temperature to use T = {c['temperature']:.4g} from now on")
    else:
        report.console.print(report.evaluation_table(out, split=out["split"], title=title))
    if out.get("left_out"):
        lo = out["left_out"]
        report.console.print(f"left out: {lo['images']} images of {lo['patients']} patients ({lo['why']})")
    if out.get("not_a_test_figure"):
        report.console.print(f"[bold red]NOT A TEST FIGURE:[/] {out['not_a_test_figure']} (--include-seen)")
    if out.get("by"):
        report.console.print(report.breakdown_table(out["by"], f"By {by}"))
    for p in out.get("plots", []) + out.get("cam", []):
        report.console.print(f"wrote {p}")


def main(argv=None) -> int:
    # --- options: every setting checked before torch is imported or a file read ---
    opts = parse(argv)
    from breakhis import runs

    if len(opts.runs) == 1 and (Path(opts.runs[0]) / "protocol.json").is_file():
        return show_protocol(Path(opts.runs[0]), opts.json)
    paths = runs.find_runs(opts.runs)
    opts.validate(n_runs=len(paths))
    if len(paths) > 1:
        return logbook(opts, paths)

    # --- the run: opened once, checked against the options before any model or image is loaded ---
    from breakhis.evaluation import evaluate_run
    from breakhis.predict import open_run

    run = open_run(paths[0], device=opts.device, model_file=opts.model, trust=opts.trust_model)
    opts.check_run(run.cfg)

    # --- evaluate, then show ---
    out = evaluate_run(run, opts)
    if opts.json:
        print(json.dumps(out))
    else:
        show(out, opts.by)
    return 0


def show_protocol(run_dir: Path, as_json: bool) -> int:
    """A --protocol run: the rows it recorded (protocol.json), side by side with their difference."""
    from breakhis import protocol, report
    from breakhis.io import read_json

    out = read_json(run_dir / protocol.FILE)
    if not isinstance(out, dict) or "rows" not in out:
        raise UserError(f"{run_dir / protocol.FILE}: not a protocol record (no rows); the run did not finish")
    if as_json:
        print(json.dumps(out))
    else:
        report.console.print(report.protocol_table(out))
    return 0


if __name__ == "__main__":
    raise SystemExit(guard(main))
