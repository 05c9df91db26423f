"""Score new image files with a trained run: probabilities and predictions in a CSV, no metrics.

    python score.py results/<run> new/ 'more/*.tif'                 # folders (recursive), files, globs
    python score.py results/<run> new/ --threshold youden --tta     # threshold chosen on the run's val images
    python score.py results/<run> new/ --cam 4 --out scores.csv     # and Grad-CAM of the 4 most confident

Each file (PNG, JPEG, TIFF, any size) is decoded as the run's cache decodes its tree and shown to
the run's model through its own evaluation view, normalisation, stain normalisation and saved
temperature. The CSV (RUN/scores/<time>.csv, or --out; never overwritten) holds one row per file,
unreadable ones included with their error, and for BreakHis file names the patient's vote. The
images carry no labels, so no metric is computed (evaluate.py RUN --data TREE scores a labelled tree).
"""
from __future__ import annotations

import argparse
import json

from rich.markup import escape

from breakhis.errors import guard
from breakhis.options import ScoreOptions


def parse(argv) -> ScoreOptions:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("run", help="the run folder (results/<run>)")
    ap.add_argument("paths", nargs="+", metavar="PATH",
                    help="image files, folders searched recursively, or glob patterns (quote them); PNG, JPEG, TIFF")
    ap.add_argument("--threshold", default="0.5",
                    help="decision threshold: a number, youden or recall=0.95 (chosen on the run's validation images)")
    ap.add_argument("--tta", action="store_true", help="average the 8 dihedral views of each image")
    ap.add_argument("--device", default=None, help="auto, cpu, cuda (default: the run's)")
    ap.add_argument("--out", metavar="FILE.csv", help="the CSV to write (default RUN/scores/<time>.csv; an existing "
                                                      "file is never overwritten)")
    ap.add_argument("--cam", type=int, default=0, metavar="N", help="Grad-CAM overlays of the N most confident images")
    ap.add_argument("--json", action="store_true", help="print the summary as one JSON object")
    return ScoreOptions(**vars(ap.parse_args(argv))).validate()


def show(out: dict) -> None:
    from breakhis import report

    report.console.print(report.scores_table(out))
    for s in out["skipped"]:
        report.console.print(f"[red]unreadable, skipped:[/] {escape(s['path'])} ({escape(s['error'])})", soft_wrap=True)
    r = out["resized"]
    if r["other_aspect"] or r["smaller_than_field"]:
        report.console.print(f"note: {r['other_aspect']} image(s) of another aspect than 700:460 were stretched to the "
                             f"run's {r['field']} (HxW) field, {r['smaller_than_field']} smaller than it were upsampled",
                             soft_wrap=True)
    report.console.print("no metrics: new images carry no labels")
    if out.get("note"):
        report.console.print(f"note: {escape(out['note'])}", soft_wrap=True)
    for p in [out["csv"], *out["cam"]]:
        report.console.print(f"wrote {escape(p)}", soft_wrap=True)


def main(argv=None) -> int:
    # --- options, the files named, the run: all checked before a model is loaded or an image decoded ---
    opts = parse(argv)
    from breakhis.data.images import find_images

    paths = find_images(opts.paths)  # a missing file, an empty folder or a pattern matching nothing: one line
    from breakhis.newimages import score_images
    from breakhis.predict import open_run

    run = open_run(opts.run, device=opts.device, progress=not opts.json)
    opts.check_run(run.cfg)

    # --- score, then show ---
    out = score_images(run, paths, threshold=opts.threshold, tta=opts.tta, out=opts.out, cam=opts.cam,
                       progress=not opts.json)
    if opts.json:
        print(json.dumps(out))
    else:
        show(out)
    return 0


if __name__ == "__main__":
    raise SystemExit(guard(main))
