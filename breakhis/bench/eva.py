"""The eva protocol's probes timed: ours against the same recipe through torch's optimizer and autograd.

    python -m breakhis.bench eva                                     # a generated tree of eva's size, frozen resnet18
    python -m breakhis.bench eva --data data/BreaKHis_v1 --backbone resnet50 --pretrained

Without --data it writes a synthetic tree with eva's patient ids (data/eva.py DEMO_SLIDES) into a temporary
folder, with as many images per patient as give eva's split its real sizes at 40X (1,132 train, 339 val). The feature pass (train.py --protocol eva's one
pass through the frozen backbone) is timed once; then, on those features, eva's 5 seeds:
- ours: probe.fit_probe (the cross-entropy gradient and AdamW written out);
- baseline: the same recipe with nn.Linear, nn.functional.cross_entropy, torch.optim.AdamW and scikit-learn's
  balanced accuracy after every epoch, as a user would write it;
and the 16-point sweep of --preset eva:sweep trained side by side (fit_probes) against 16 times one setting.
The selected epochs and validation figures of ours and the baseline are printed beside each other (they agree
to float rounding). The goal: the 5 seeds in under a minute on a CPU after the feature pass.
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
from sklearn.metrics import balanced_accuracy_score
from torch import nn

from ..config import make_config
from ..data import eva
from ..data.demo import make_demo
from ..errors import UserError
from ..fit import preflight, with_inputs
from ..probe import WARMUP_EPOCHS, WARMUP_FACTOR, ProbeSettings, fit_probe, fit_probes
from ..protocol import eva_inputs, features_of, grid_of, plan, rows_of
from ..tuning.space import load_preset


def eva_sized(slides=eva.DEMO_SLIDES) -> list[int]:
    """Images per patient of slides (make_demo's order: every 4th image is 40X) such that eva's split of the tree
    holds eva.COUNTS at 40X: each side's count shared out evenly over its patients."""
    per40 = {}
    for side, on_side in (("val", [s for _, s in slides if s in eva.VAL_SLIDES]),
                          ("train", [s for _, s in slides if s not in eva.VAL_SLIDES])):
        q, r = divmod(eva.COUNTS[side], len(on_side))
        per40.update({s: q + (i < r) for i, s in enumerate(on_side)})
    return [4 * per40[s] - 3 for _, s in slides]  # images 0, 4, ..., 4(n-1) are the n at 40X


def baseline_probe(x, y, xv, yv, s: ProbeSettings, k: int, seed: int) -> tuple[float, int]:
    """eva's recipe through the libraries: (best validation balanced accuracy, its epoch)."""
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    head = nn.Linear(x.shape[1], k).to(x.device)
    opt = torch.optim.AdamW(head.parameters(), lr=s.lr, weight_decay=s.weight_decay)
    best, best_epoch, stale, step, epoch = -1.0, 0, 0, 0, 0
    while step < s.steps:
        epoch += 1
        for group in opt.param_groups:
            group["lr"] = s.lr * (WARMUP_FACTOR if epoch <= WARMUP_EPOCHS else 1)
        order = torch.randperm(len(x), generator=g).to(x.device)
        for i in range(0, len(x), s.batch_size):
            c = order[i:i + s.batch_size]
            opt.zero_grad()
            nn.functional.cross_entropy(head(x[c]), y[c]).backward()
            opt.step()
            step += 1
            if step >= s.steps:
                break
        with torch.no_grad():
            score = balanced_accuracy_score(yv.cpu().numpy(), head(xv).argmax(1).cpu().numpy())
        if score > best:
            best, best_epoch, stale = score, epoch, 0
        else:
            stale += 1
            if s.patience and stale >= s.patience:
                break
    return best, best_epoch


def main(argv: Sequence[str] | None = None) -> int:
    # long by design: a benchmark script read top to bottom (flags, setup, the timed sides, the printed table)
    parser = argparse.ArgumentParser(prog="python -m breakhis.bench eva", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default="", help="BreakHis root (default: a generated tree of eva's size)")
    parser.add_argument("--backbone", default="resnet18", help="torchvision name or timm:NAME")
    parser.add_argument("--pretrained", action="store_true", help="pretrained weights (default: random init, no download)")
    parser.add_argument("--image-size", type=int, default=224, help="model input side, pixels")
    parser.add_argument("--seeds", type=int, default=5, help="probe seeds (eva: 5)")
    parser.add_argument("--probe-steps", type=int, default=12500, help="probe steps at most (eva: 12,500)")
    parser.add_argument("--cache-dir", default="", help="decode and feature cache folder (default: a temporary one)")
    parser.add_argument("--device", default="cpu", help="auto, cpu, cuda or cuda:N")
    parser.add_argument("--json", action="store_true", help="print the figures as one JSON object on the last line")
    args = parser.parse_args(argv)
    if args.seeds < 1 or args.probe_steps < 1:
        raise UserError(f"--seeds {args.seeds} / --probe-steps {args.probe_steps}: both must be at least 1")
    console = Console()
    with tempfile.TemporaryDirectory(prefix="breakhis-bench-eva-") as tmp:
        data = args.data
        if not data:
            with console.status("writing a synthetic tree with eva's patient ids and split sizes"):
                data = str(make_demo(Path(tmp) / "tree", images_per_patient=eva_sized(), size=(140, 92), slides=eva.DEMO_SLIDES))
        cfg = make_config(load_preset("eva:protocol"), {
            "data": data, "backbone": args.backbone, "pretrained": args.pretrained, "image_size": args.image_size,
            "probe_steps": args.probe_steps, "cache_dir": args.cache_dir or str(Path(tmp) / "cache"), "device": args.device})
        device = preflight(cfg)
        cfg = eva_inputs(with_inputs(cfg, keep_size=True))
        seeds = list(range(args.seeds))
        with console.status("decode cache and splits"):
            d = plan(cfg, seeds, progress=False)
        t0 = time.perf_counter()
        with console.status("the feature pass"):
            f = features_of(cfg, d, device, ("centre",))["centre"]
        t_feat = time.perf_counter() - t0
        y = torch.as_tensor(eva.labels(d["records"], cfg.task), device=device)
        tr, va = (torch.as_tensor(rows_of(d["records"], d["eva"], p), device=device) for p in ("train", "val"))
        (s,) = grid_of(cfg)
        k = len(eva.class_names(cfg.task))

        def ours(seed: int) -> tuple[float, int]:
            probe = fit_probe(f[tr], y[tr], f[va], y[va], s, k, seed)
            return probe.val_score, probe.best_epoch

        def baseline(seed: int) -> tuple[float, int]:
            return baseline_probe(f[tr], y[tr], f[va], y[va], s, k, seed)

        sides, picks = {}, {}
        for label, fn in (("ours", ours), ("baseline: torch.optim + autograd", baseline)):
            t0 = time.perf_counter()
            with console.status(f"{label}: {len(seeds)} seeds"):
                picks[label] = [fn(sd) for sd in seeds]
            sides[label] = time.perf_counter() - t0
        sweep = load_preset("eva:sweep")  # the grid of --preset eva:sweep
        grid = grid_of(dataclasses.replace(cfg, probe_lrs=sweep["probe_lrs"], probe_weight_decays=sweep["probe_weight_decays"]))
        t0 = time.perf_counter()
        with console.status(f"the {len(grid)}-point sweep, side by side"):
            fit_probes(f[tr], y[tr], f[va], y[va], grid, k, seeds[0])
        t_grid = time.perf_counter() - t0
    ours, base = sides["ours"], sides["baseline: torch.optim + autograd"]  # seconds of the 5 seeds
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    table = Table(title=f"eva protocol, frozen {args.backbone}, {len(tr)} train / {len(va)} val images at 40X, "
                        f"{len(seeds)} seeds, {where}", caption=f"feature pass: {t_feat:.1f} s (once per model)")
    for col in ("", "seconds", "ratio", "per seed: (val balanced acc, epoch kept)"):
        table.add_column(col, justify="left" if col in ("", "per seed: (val balanced acc, epoch kept)") else "right")
    for label, sec in sides.items():
        table.add_row(label, f"{sec:.1f}", f"{base / sec:.2f}x", " ".join(f"({v:.3f}, {e})" for v, e in picks[label]))
    n = len(grid)
    table.add_row(f"{n}-point sweep side by side (1 seed)", f"{t_grid:.1f}",
                  f"{n * ours / len(seeds) / t_grid:.2f}x vs {n} x one", "")
    console.print(table)
    console.print(f"goal: {len(seeds)} seeds in under 60 s after the feature pass: {ours:.1f} s "
                  f"({'met' if ours < 60 else 'missed'})", highlight=False)
    if args.json:
        print(json.dumps({"backbone": args.backbone, "device": where, "train": len(tr), "val": len(va),
                          "feature_seconds": t_feat, "seconds": sides, "grid_seconds": t_grid,
                          "picks": {k_: [list(p) for p in v] for k_, v in picks.items()}}))
    return 0
