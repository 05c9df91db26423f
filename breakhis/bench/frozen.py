"""A frozen-backbone run with and without the feature cache, side by side.

    python -m breakhis.bench frozen --data data/BreaKHis_v1 --backbone resnet18 --epochs 20
    python -m breakhis.bench frozen --data data/demo/BreaKHis_v1 --backbone timm:convnext_atto --image-size 128

Three runs of the same config (--freeze, same seed, same split), each a whole fit() into a
temporary folder, timed end to end: through the frozen backbone every epoch; on the feature cache
starting cold (the one-time feature pass included: this run's feature files are deleted first);
and on the warm cache (what every later run and every tune trial pays). The decode cache is built
before timing. Each run ends with the scoring of the best checkpoint on val and test (finalize):
through the backbone for the first run, on the cached evaluation views for the others (the
feature pass covers train, val and test once). The table also gives the epochs alone (sum of
history.csv's seconds).

The ratio has a ceiling: the uncached run passes train + val through the backbone every epoch and
val + test once more when scoring, E (t + v) + v + s image passes for partitions of t, v and s
images; the cold cached run passes every image once, t + v + s. For 20 epochs of the default
60:10:30 split that is (20 x 0.7 + 0.4) / 1.0 = 14.4 (70:10:20: 16.3), however fast the head
trains: the cold ratio cannot reach 50x. The warm ratio (every later run, every tune trial) has no
such ceiling. Without augmentation (the default here) the test metrics agree up
to float16 rounding of the features; with --augment the cached run trains on --feature-views views.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

from ..config import make_config
from ..data.prepare import prepare
from ..device import amp_dtype
from ..features import feature_path
from ..fit import check_data, fit, preflight, with_inputs
from ..io import read_csv


def main(argv: Sequence[str] | None = None) -> int:
    # long by design: a benchmark script read top to bottom (flags, setup, the timed sides, the printed table)
    parser = argparse.ArgumentParser(prog="python -m breakhis.bench frozen", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", required=True, help="BreakHis root (or the demo tree: python -m breakhis.data.demo)")
    parser.add_argument("--backbone", default="resnet18", help="torchvision name or timm:NAME")
    parser.add_argument("--epochs", type=int, default=20, help="training epochs of each run")
    parser.add_argument("--image-size", type=int, default=224, help="model input side, pixels")
    parser.add_argument("--batch-size", type=int, default=32, help="images per training batch")
    parser.add_argument("--augment", action="store_true", help="training augmentation (cached: --feature-views views)")
    parser.add_argument("--feature-views", type=int, default=0, help="with --augment: views per image (0: 4)")
    parser.add_argument("--pretrained", action="store_true", help="pretrained weights (default: random init, no download)")
    parser.add_argument("--cache-dir", default="", help="decode and feature cache folder (default: ~/.cache/breakhis)")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    parser.add_argument("--json", action="store_true", help="print the figures as one JSON object on the last line")
    args = parser.parse_args(argv)
    cfg = make_config({"data": args.data, "backbone": args.backbone, "epochs": args.epochs, "image_size": args.image_size,
                       "batch_size": args.batch_size, "augment": args.augment, "feature_views": args.feature_views,
                       "pretrained": args.pretrained, "cache_dir": args.cache_dir, "device": args.device, "freeze": True,
                       "lr": 1e-3, "scheduler": "cosine", "head": (256,), "dropout": (0.2,)})
    device = preflight(cfg)
    cfg = with_inputs(cfg)
    amp = amp_dtype(cfg.amp, device)
    console = Console()
    prep = prepare(cfg, progress=True)  # decoded once, before any timing
    check_data(prep, cfg)

    runs = {}
    with tempfile.TemporaryDirectory(prefix="bench-frozen-") as tmp:
        for label, cached in (("through the backbone", False), ("feature cache, cold", True),
                              ("feature cache, warm", True)):
            if label.endswith("cold"):
                for part in ("train", "val", "test"):
                    feature_path(prep, cfg, part, amp).unlink(missing_ok=True)
            run_dir = Path(tmp) / label.replace(" ", "-").replace(",", "")
            run_dir.mkdir()
            with console.status(f"{label}: {args.epochs} epochs"):
                t0 = time.perf_counter()
                metrics = fit(dataclasses.replace(cfg, feature_cache=cached), run_dir, data=prep, progress=False)
                seconds = time.perf_counter() - t0
            epochs = sum(float(h["seconds"]) for h in read_csv(run_dir / "history.csv"))
            runs[label] = {"seconds": seconds, "epoch_seconds": epochs, "accuracy": metrics["test"]["accuracy"],
                           "auroc": metrics["test"].get("auroc")}
    base = runs["through the backbone"]
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    table = Table(title=f"frozen {args.backbone}, {args.epochs} epochs, {cfg.image_size} px, "
                        f"{len(prep.positions['train'])} train / {len(prep.positions['val'])} val / "
                        f"{len(prep.positions['test'])} test images, {where}",
                  caption="run: fit() end to end, scoring included; epochs: the training epochs alone")
    for col in ("", "run s", "speed-up", "epochs s", "speed-up ", "test acc", "test AUROC"):
        table.add_column(col, justify="left" if not col else "right")
    for label, r in runs.items():
        table.add_row(label, f"{r['seconds']:.1f}", f"{base['seconds'] / r['seconds']:.1f}x", f"{r['epoch_seconds']:.2f}",
                      f"{base['epoch_seconds'] / r['epoch_seconds']:.0f}x", f"{r['accuracy']:.4f}",
                      "-" if r["auroc"] is None else f"{r['auroc']:.4f}")
    console.print(table)
    cold, warm = runs["feature cache, cold"], runs["feature cache, warm"]
    console.print(f"one-time feature pass: about {cold['seconds'] - warm['seconds']:.1f} s "
                  f"(cold run minus warm run)", highlight=False)
    if args.json:
        print(json.dumps({"backbone": args.backbone, "epochs": args.epochs, "image_size": cfg.image_size,
                          "device": where, "runs": runs}))
    return 0
