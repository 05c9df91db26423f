"""Evaluate a run from its folder alone, or compare many runs side by side.

    python evaluate.py results/<run>                        # "Model Evaluation" table of the test partition
    python evaluate.py results/<run> --tta --threshold youden   # 8 dihedral views; threshold chosen on val
    python evaluate.py results/<run> --by magnification     # per magnification / subtype / patient
    python evaluate.py results/<run> --data other/BreaKHis_v1   # score every image of another tree
    python evaluate.py results/<run> --export model.pt2     # torch.export program for deployment
    python evaluate.py results/<run> --model model.pt2      # evaluate with that exported program
    python evaluate.py results/<run> --cam 8                # Grad-CAM overlays of 8 test images
    python evaluate.py results/<run> --images new/ 'more/*.tif' --cam 4   # score new images: a CSV, no metrics
    python evaluate.py results/<run> --calibrate --save-temperature   # temperature scaling fitted on val
    python evaluate.py results/ --sort auroc --markdown logbook.md   # the logbook: all runs compared

The model is rebuilt from model.safetensors and config.json; the split from split.json.

What is safe to load: run folders are read as JSON, CSV and safetensors, which hold no code.
An exported program (--model FILE.pt2) is different: torch.export.load unpickles it, and a
crafted file can run code. It is loaded only when the run recorded the file's SHA-256 when it
exported it (RUN/exports.json), or with --trust-model for a file you made or trust.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from rich.markup import escape

from breakhis.calibration import check_options
from breakhis.data.images import find_images
from breakhis.errors import UserError, guard
from breakhis.metrics import check_threshold_rule

BY = ("magnification", "subtype", "patient")
MODEL_FLAGS = ("tta", "data", "by", "export", "model", "cam", "images", "calibrate")  # options that need one run's model
# options of a partition's evaluation or of the logbook, meaningless for unlabelled new images
NOT_WITH_IMAGES = ("part", "data", "include_seen", "by", "export", "model", "trust_model", "csv", "markdown", "calibrate",
                   "save_temperature")


def parse(argv):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("runs", nargs="+", help="run folder(s), or a folder holding runs (e.g. results/)")
    ap.add_argument("--part", "--split", dest="part", default=None, choices=("val", "test"),
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
    ap.add_argument("--cam", type=int, default=0, metavar="N", help="write Grad-CAM overlays of N test images (with --images: of N new images)")
    ap.add_argument("--images", nargs="+", metavar="PATH",
                    help="score new images (files, folders searched recursively, or glob patterns; PNG, JPEG, TIFF) "
                         "and write a CSV of probabilities and predictions; no metrics (they carry no labels)")
    ap.add_argument("--out", metavar="FILE.csv", help="with --images: the CSV to write (default RUN/scores/<time>.csv; "
                                                      "an existing file is never overwritten)")
    ap.add_argument("--calibrate", action="store_true",
                    help="fit temperature scaling on the run's validation predictions; show the test figures before and after")
    ap.add_argument("--save-temperature", action="store_true",
                    help="with --calibrate: save the temperature in RUN/calibration.json; later evaluations and --export use it")
    ap.add_argument("--sort", default="accuracy", help="compare: metric that ranks the runs")
    ap.add_argument("--csv", metavar="FILE", help="compare: write the table as CSV")
    ap.add_argument("--markdown", metavar="FILE", help="compare: write the table as Markdown")
    ap.add_argument("--n-boot", "--boot", dest="boot", type=int, default=1000,
                    help="bootstrap resamples for the intervals (default 1000)")
    ap.add_argument("--boot-seed", type=int, default=0, help="seed of the bootstrap draws (default 0)")
    a = ap.parse_args(argv)
    # every option checked before a model is loaded or an image read
    if a.boot < 1:
        raise UserError(f"--n-boot {a.boot}: give at least 1 resample (1000 or more for a paper)")
    check_threshold_rule(a.threshold)
    check_options(a.calibrate, a.save_temperature, a.data, a.part or "test")
    if a.cam < 0:
        raise UserError(f"--cam {a.cam}: give the number of images to explain, e.g. --cam 8")
    if a.out and not a.images:
        raise UserError(f"--out {a.out} names the CSV of --images: add --images PATH...")
    if a.images:
        used = [f"--{k.replace('_', '-')}" for k in NOT_WITH_IMAGES if getattr(a, k)]
        if used:
            raise UserError(f"{', '.join(used)} cannot go with --images (new images are scored with the run's model, "
                            f"without labels, into a CSV: --out FILE.csv names it); leave {'it' if len(used) == 1 else 'them'} out")
        a.images = find_images(a.images)  # a missing file, an empty folder or a pattern matching nothing: one line
    a.part = a.part or "test"
    return a


def compare(a, paths: list[Path]) -> int:
    """The logbook: many runs from their predictions.csv, side by side."""
    from breakhis import compare, io, logbook_table, report

    used = [f"--{k}" for k in MODEL_FLAGS if getattr(a, k, None)]
    if used:
        raise UserError(f"{', '.join(used)} apply to one run (they need its model); the comparison of "
                        f"{len(paths)} runs reads their predictions.csv: give a single run folder")
    book = compare.logbook(paths, part=a.part, threshold=a.threshold, sort=a.sort, n_boot=a.boot, seed=a.boot_seed)
    if a.csv:
        io.write_csv(a.csv, logbook_table.records(book))
    if a.markdown:
        io.write_text(a.markdown, logbook_table.markdown(book))
    if a.json:
        print(json.dumps({"sort": a.sort, "split": a.part, "threshold": a.threshold, "boot": a.boot,
                          "ci_settings": book.ci_settings,
                          "rows": logbook_table.records(book)}))
        return 0
    report.console.print(logbook_table.render(book))
    for f in (a.csv, a.markdown):
        if f:
            report.console.print(f"wrote {f}")
    return 0


def score_new(a, run: Path) -> int:
    """--images: the run's probabilities and predictions for new image files, a CSV and a short table."""
    from breakhis import report
    from breakhis.newimages import score_images

    out = score_images(run, a.images, threshold=a.threshold, tta=a.tta, device=a.device, out=a.out, cam=a.cam,
                       progress=not a.json)
    if a.json:
        print(json.dumps(out))
        return 0
    report.console.print(report.scores_table(out))
    for s in out["skipped"]:
        report.console.print(f"[red]unreadable, skipped:[/] {escape(s['path'])} ({escape(s['error'])})", soft_wrap=True)
    r = out["resized"]
    if r["other_aspect"] or r["smaller_than_field"]:
        report.console.print(f"note: {r['other_aspect']} image(s) of another aspect than 700:460 were stretched to the "
                             f"run's {r['field']} (HxW) field, {r['smaller_than_field']} smaller than it were upsampled",
                             soft_wrap=True)
    report.console.print("no metrics: new images carry no labels")
    for p in [out["csv"], *out["cam"]]:
        report.console.print(f"wrote {escape(p)}", soft_wrap=True)
    return 0


def main(argv=None) -> int:
    a = parse(argv)
    from breakhis import report, runs
    from breakhis.predict import evaluate_run

    paths = runs.find_runs(a.runs)
    if len(paths) > 1:
        return compare(a, paths)
    if a.images:
        return score_new(a, paths[0])
    if a.csv or a.markdown:
        raise UserError(f"{'--csv' if a.csv else '--markdown'} writes the logbook table of several runs; "
                        f"{paths[0]} is one run: give more runs (e.g. results/), or use --json for this one")
    out = evaluate_run(paths[0], part=a.part, tta=a.tta, threshold=a.threshold, data=a.data, device=a.device,
                       by=a.by, n_boot=a.boot, boot_seed=a.boot_seed, model_file=a.model, trust_model=a.trust_model, export=a.export,
                       cam=a.cam, include_seen=a.include_seen, calibrate=a.calibrate,
                       save_temperature=a.save_temperature)
    if a.json:
        print(json.dumps(out))
        return 0
    if out.get("export"):
        report.console.print(f"wrote {out['export']} (torch.export program; load with "
                             f"torch.export.load(path).module())")
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
        report.console.print(report.breakdown_table(out["by"], f"By {a.by}"))
    for p in out.get("cam", []):
        report.console.print(f"wrote {p}")
    return 0


if __name__ == "__main__":
    raise SystemExit(guard(main))
