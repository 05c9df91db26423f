"""Evaluate a run from its folder alone, or compare many runs side by side.

    python evaluate.py results/<run>                        # "Model Evaluation" table of the test split
    python evaluate.py results/<run> --tta --threshold youden   # 8 dihedral views; threshold chosen on val
    python evaluate.py results/<run> --by magnification     # per magnification / subtype / patient
    python evaluate.py results/<run> --data other/BreaKHis_v1   # score every image of another tree
    python evaluate.py results/<run> --export model.pt2     # torch.export program for deployment
    python evaluate.py results/<run> --model model.pt2      # evaluate with that exported program
    python evaluate.py results/<run> --cam 8                # Grad-CAM overlays of 8 test images
    python evaluate.py results/ --sort auroc --markdown logbook.md   # the logbook: all runs compared

The model is rebuilt from model.safetensors and config.json; the split from split.json.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path

from breakhis.errors import UserError, guard
from breakhis.metrics import is_number

BY = ("magnification", "subtype", "patient")


def parse(argv):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("runs", nargs="+", help="run folder(s), or a folder holding runs (e.g. results/)")
    ap.add_argument("--split", default="test", choices=("val", "test"), help="partition to score")
    ap.add_argument("--tta", action="store_true", help="average the 8 dihedral views of each image")
    ap.add_argument("--threshold", default="0.5",
                    help="decision threshold: a number, youden or recall=0.95 (chosen on val, applied to test)")
    ap.add_argument("--data", help="score every image of another tree with the same naming")
    ap.add_argument("--device", default=None, help="auto, cpu, cuda (default: the run's)")
    ap.add_argument("--by", choices=BY, help="break the metrics down by group")
    ap.add_argument("--json", action="store_true", help="print the metrics as one JSON object on the last line")
    ap.add_argument("--export", metavar="FILE.pt2", help="write a torch.export program of the model")
    ap.add_argument("--model", metavar="FILE.pt2", help="evaluate with an exported program instead of the checkpoint")
    ap.add_argument("--cam", type=int, default=0, metavar="N", help="write Grad-CAM overlays of N test images")
    ap.add_argument("--sort", default="accuracy", help="compare: metric that ranks the runs")
    ap.add_argument("--csv", metavar="FILE", help="compare: write the table as CSV")
    ap.add_argument("--markdown", metavar="FILE", help="compare: write the table as Markdown")
    ap.add_argument("--boot", type=int, default=1000, help="bootstrap resamples for the intervals")
    return ap.parse_args(argv)


def threshold_for(rule: str, run_dir: Path, val_ev, task: str) -> float:
    """A number as given; youden / recall=R chosen on the validation predictions."""
    from breakhis import metrics as M

    try:
        return float(rule)
    except ValueError:
        pass
    if task != "binary":
        raise UserError(f"--threshold {rule}: thresholds apply to the binary task only")
    if val_ev is None:
        raise UserError(f"--threshold {rule}: needs the run's validation predictions ({run_dir}/predictions.csv)")
    return float(M.choose_threshold(val_ev["labels"], val_ev["probs"][:, 1], rule))


def export(model, cfg, device, path: str) -> None:
    """Save the model as a torch.export program taking (B, 3, S, S) float32 normalised images."""
    import torch

    from breakhis import atomic

    if not path.endswith(".pt2"):
        raise UserError(f"--export {path}: the file name must end in .pt2")
    model = model.float().eval()
    x = torch.randn(2, 3, cfg.image_size, cfg.image_size, device=device)
    batch = torch.export.Dim("batch", min=1, max=4096)
    prog = torch.export.export(model, (x,), dynamic_shapes=({0: batch},))
    with atomic.atomic_path(path) as tmp:
        torch.export.save(prog, str(tmp))


def evaluate_one(a, run_path: str) -> dict:
    from breakhis import fit as F
    from breakhis import metrics as M
    from breakhis import report, runs
    from breakhis.loader import DeviceImages

    run_dir = runs.check_run(run_path)
    cfg = runs.load_config(run_dir)
    device = F.resolve_device(a.device or cfg.device)
    cfg = dataclasses.replace(cfg, device=str(device))
    if a.data:
        prep = F.prepare_data(dataclasses.replace(cfg, data=a.data), whole=True)
    else:
        prep = F.prepare_data(dataclasses.replace(cfg, split_file=str(run_dir / "split.json")))
    model = F.load_exported(a.model) if a.model else F.load_run_model(run_dir, cfg, device)
    if a.export:
        export(model, cfg, device, a.export)
        report.console.print(f"wrote {a.export} (torch.export program; load with torch.export.load(path).module())")
    images = DeviceImages(prep.cache.images, device, budget_gb=cfg.device_cache_gb)
    split = "test" if a.data else a.split
    needs_val = not is_number(a.threshold) and not a.data
    val_ev = F.predict(model, prep, "val", cfg, device, tta=a.tta, images=images) if needs_val else None
    if a.data and not is_number(a.threshold):
        raise UserError(f"--threshold {a.threshold} with --data: give a number (the other tree has no validation split)")
    threshold = threshold_for(a.threshold, run_dir, val_ev, cfg.task)
    ev = val_ev if split == "val" and val_ev is not None else F.predict(model, prep, split, cfg, device, tta=a.tta,
                                                                        images=images)
    result = F.score(ev, prep.parts[split], cfg.task, threshold=threshold, n_boot=a.boot)
    saved = runs.read_json(run_dir / "metrics.json") or {}
    out = {"run": str(run_dir), "split": split, "tta": a.tta, "threshold": threshold,
           "best_val_acc": saved.get("best_val_acc"), "best_epoch": saved.get("best_epoch"), split: result}
    if a.by:
        keys = [_group_key(r, a.by) for r in prep.parts[split]]
        out["by"] = M.breakdown(ev["labels"], ev["probs"][:, 1], keys, threshold=threshold,
                                patients=[r.patient for r in prep.parts[split]]) if cfg.task == "binary" \
            else None
    if a.cam:
        from breakhis.cam import save_cams

        written = save_cams(F.load_run_model(run_dir, cfg, device), prep, ev, cfg, device, run_dir / "plots", a.cam)
        out["cam"] = [str(p) for p in written]
    return M.jsonable(out)


def _group_key(record, by: str):
    return {"magnification": lambda r: f"{r.magnification}X", "subtype": lambda r: r.subtype,
            "patient": lambda r: r.patient}[by](record)


def main(argv=None) -> int:
    a = parse(argv)
    from breakhis import report, runs

    paths = runs.find_runs(a.runs)
    if len(paths) > 1:
        from breakhis.compare import compare_main

        return compare_main(a, paths)
    out = evaluate_one(a, str(paths[0]))
    if not a.json:
        title = f"Model Evaluation: {Path(out['run']).name} ({out['split']}" + (", TTA" if out["tta"] else "") + ")"
        report.console.print(report.evaluation_table(out, split=out["split"], title=title))
        if out.get("by"):
            report.console.print(report.breakdown_table(out["by"], f"By {a.by}"))
        for p in out.get("cam", []):
            report.console.print(f"wrote {p}")
    else:
        print(json.dumps(out))
    return 0


if __name__ == "__main__":
    raise SystemExit(guard(main))
