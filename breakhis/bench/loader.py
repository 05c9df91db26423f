"""Loader throughput: our device loader vs the loader one writes by hand, side by side.

    python -m breakhis.bench loader --data data/BreaKHis_v1            # our loader vs the hand-written one
    python -m breakhis.bench loader --data data/demo --json            # last line: one JSON object
    python -m breakhis.bench loader --data data/demo --no-baseline     # ours, with and without stain normalisation
    python -m breakhis.bench loader --he 256                           # on 256 real-H&E 700x460 PNGs (~500 KB each)

`loader` decodes every image under --data once into a fresh uint8 cache (timed: the cache
build), then, on the same images and the same augmentations (random resized crop to
--image-size, flips, colour jitter, normalise), times in one run:
(a) our loader from the warm cache, on the GPU when there is one, and
(b) the loader one writes by hand: a Dataset decoding each PNG with Pillow and applying
    torchvision transforms, through a DataLoader with one worker per core (--workers).
Both skip their first batch (start-up) and time --batches batches; ours also runs at least
two seconds. On a GPU it also trains ResNet-50 (channels-last, bf16 autocast) for one epoch
fed by our loader and for the same epoch fed from batches made beforehand on the device; both
run engine.train_step, the step training runs.

Stain normalisation (--stain-norm): our loader over the same cache with a Macenko and a Reinhard
normalisation fitted on a seeded sample of the images. Each field is normalised once when the
images are put on the device (timed: "normalise once"), then the loader runs as before; the
three loaders are timed in turn, twice, best of two each, and the ratio to the plain loader is
printed (goal: at least 0.85). A tree whose fields are too pale for a method (too few stained
pixels to fit on) gets a note instead of a figure.

--he N writes a temporary tree of N fields of real H&E texture at the archive's 700x460 (demo's
--content he, cut from ../shared/data/he-field.png) and measures on it instead of --data: the
synthetic demo's PNGs are 3-5x smaller than the archive's (about 500 KB), which flatters Pillow's
decode in the baseline and the cache build.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Iterable, Sequence

import torch
from PIL import Image
from rich.console import Console
from rich.table import Table
from torchvision import transforms as T
from torchvision.models import resnet50

from .. import stain
from ..augment import MEAN, STD, Augment
from ..data.cache import build_cache, default_cache_size
from ..data.dataset import index_tree
from ..data.demo import make_demo
from ..engine import train_step
from ..errors import UserError
from ..loader import DeviceImages, Loader


def main(argv: Sequence[str]) -> int:
    # long by design: a benchmark script read top to bottom (flags, setup, the timed sides, the printed table)
    ap = argparse.ArgumentParser(prog="python -m breakhis.bench loader", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", help="BreaKHis_v1 root (or its parent, or a demo tree)")
    ap.add_argument("--he", type=int, default=0, metavar="N",
                    help="instead of --data: a temporary tree of N real-H&E 700x460 fields (real PNG sizes)")
    ap.add_argument("--json", action="store_true", help="print one JSON object as the last line")
    ap.add_argument("--batch-size", type=int, default=64, help="images per batch (default: 64)")
    ap.add_argument("--image-size", type=int, default=224, help="model input side, pixels (default: 224)")
    ap.add_argument("--batches", type=int, default=10, help="timed batches of each loader (default: 10)")
    ap.add_argument("--workers", type=int, default=0, help="DataLoader workers and cache decoders (0: one per core)")
    ap.add_argument("--cache-dir", default="", help="reuse this cache folder (default: a fresh temporary one, "
                                                     "so the build time is a cold build)")
    ap.add_argument("--no-baseline", action="store_true", help="skip the Pillow + DataLoader baseline (slow on a CPU)")
    args = ap.parse_args(argv)
    for name in ("batch_size", "image_size", "batches"):
        if getattr(args, name) < 1:
            raise UserError(f"--{name.replace('_', '-')} {getattr(args, name)}: must be at least 1")
    if args.workers < 0:
        raise UserError(f"--workers {args.workers}: must be 0 (one per core) or more")
    workers = args.workers or os.cpu_count() or 1
    console = Console(stderr=args.json)
    if bool(args.data) == bool(args.he):
        raise UserError("give the tree to measure: --data ROOT, or --he N for N fields of real H&E texture")
    made = tempfile.mkdtemp(prefix="breakhis-bench-he-") if args.he else None
    try:
        return _measure(args, workers, console, made)
    finally:
        if made:
            shutil.rmtree(made, ignore_errors=True)


def _measure(args, workers: int, console: Console, made: str | None) -> int:
    if made:
        patients = max(4, -(-args.he // 24))
        root = make_demo(made, patients, -(-args.he // patients), (700, 460), content="he")
    index = index_tree(root if made else args.data)  # UserError for a missing root or one without BreakHis images
    paths = [r.path for r in index.records]
    labels = [r.label for r in index.records]
    if len(paths) < 2 * args.batch_size:  # a first (untimed) batch and at least one timed one per epoch
        raise UserError(f"--batch-size {args.batch_size}: {index.root} has only {len(paths)} images; "
                        f"give a batch size of at most {len(paths) // 2}")
    size = default_cache_size(args.image_size)
    tmp = None if args.cache_dir else tempfile.mkdtemp(prefix="breakhis-bench-")
    try:
        t0 = time.perf_counter()
        cache = build_cache(index.root, paths, size, cache_dir=args.cache_dir or tmp, workers=workers,
                                      progress=not args.json)
        build_s = time.perf_counter() - t0
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        ours, stained = time_stain(cache.images, labels, device, args.batch_size, args.image_size, args.batches)
        baseline = None if args.no_baseline else time_baseline([str(index.root / p) for p in paths], device,
                                                               args.batch_size, args.image_size, args.batches, workers)
        gpu = train_epochs(cache.images, labels, device, args.batch_size, args.image_size) \
            if device.type == "cuda" else None
    finally:
        if tmp:
            shutil.rmtree(tmp, ignore_errors=True)

    table = Table(title=f"Loader throughput: {len(paths)} images -> {args.image_size}px, batch {args.batch_size}, "
                        f"{device_name(device)}, {os.cpu_count()} cores")
    table.add_column("what")
    table.add_column("images/s", justify="right")
    table.add_column("note")
    png_kb = sum(os.path.getsize(index.root / p) for p in paths) / len(paths) / 1024
    table.add_row("cache build", "", f"{build_s:.1f} s for {len(paths)} images at {size[0]}x{size[1]}, {workers} workers"
                  + ("" if cache.build_s is not None else " (already built)") + f"; files {png_kb:,.0f} KB on average"
                  + (" (real H&E texture)" if made else ""))
    table.add_row("ours (warm cache)", f"{ours:,.0f}", f"uint8 cache on {device.type}, per-sample crop, dihedral, colour")
    for method, s in stained.items():
        if "error" in s:
            table.add_row(f"ours + {method}", "", f"not fitted: {s['error']}")
            continue
        table.add_row(f"ours + {method}", f"{s['img_s']:,.0f}",
                      f"{s['ratio']:.2f} of ours (goal >= 0.85); normalise once: {s['normalise_s']:.2f} s "
                      f"for {len(paths)} fields ({len(paths) / s['normalise_s']:,.0f} fields/s)")
    if baseline is not None:
        table.add_row("baseline", f"{baseline:,.0f}", f"Pillow + torchvision transforms, DataLoader, {workers} workers")
        table.add_row("ratio", f"{ours / baseline:.1f}x", "ours / baseline")
    if gpu is None:
        table.caption = "ResNet-50 epoch comparison skipped: it needs a GPU"
    else:
        fed, premade = gpu
        n = len(paths) // args.batch_size * args.batch_size
        table.add_row("ResNet-50 epoch, fed by ours", f"{n / fed:,.0f}", f"{fed:.2f} s, bf16, channels-last")
        table.add_row("ResNet-50 epoch, pre-made tensors", f"{n / premade:,.0f}",
                      f"{premade:.2f} s; loader overhead {100 * (fed / premade - 1):+.1f}%")
    console.print(table)
    if args.json:
        print(json.dumps({"ours_img_s": round(ours, 1),
                          "baseline_img_s": round(baseline, 1) if baseline is not None else None,
                          "ratio": round(ours / baseline, 2) if baseline is not None else None,
                          "cache_build_s": round(build_s, 2), "file_kb": round(png_kb, 1), "he": bool(made),
                          "stain": {m: {k: round(v, 3) if isinstance(v, float) else v for k, v in s.items()}
                                    for m, s in stained.items()}}))
    return 0


def device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(batches: Iterable, count: int, device: torch.device, min_s: float = 0.0) -> float:
    """Images/s over `count` batches after the first (start-up), running at least min_s seconds.

    `batches` must not run out (see epochs)."""
    it = iter(batches)
    next(it)
    _sync(device)
    t0, n, k = time.perf_counter(), 0, 0
    for x in it:
        n, k = n + len(x[0]), k + 1
        if k >= count and time.perf_counter() - t0 >= min_s:
            break
    _sync(device)
    return n / (time.perf_counter() - t0)


def bench_augment():
    """The augmentation both loaders apply: RandomResizedCrop's defaults, flips, ColorJitter(0.2, 0.2, 0.2, 0.05)."""
    return Augment(crop_scale=(0.08, 1.0), crop_ratio=(3 / 4, 4 / 3), dihedral=True, color_jitter=0.2, stain_jitter=0.0)


def epochs(loader) -> Iterable:
    """Endless batches of a Loader, one epoch after another."""
    e = 0
    while True:
        loader.set_epoch(e)
        yield from loader
        e += 1


def time_ours(images, labels, device, batch_size: int, image_size: int, batches: int) -> float:
    data = DeviceImages(images, device)
    ld = Loader(data, range(len(labels)), labels, batch_size=batch_size, image_size=image_size, train=True,
                augment=bench_augment(), drop_last=True)
    return timed(epochs(ld), batches, device, min_s=2.0)


def time_stain(images, labels, device, batch_size: int, image_size: int, batches: int) -> tuple[float, dict]:
    """Our loader's img/s without stain normalisation, and per method {"img_s", "ratio" (to the plain
    loader), "normalise_s" (normalising every field once, on the device)} or {"error"}: the three
    loaders timed in turn, twice, best of two (a busy machine slows one round, not one loader)."""
    sample = images[stain.train_sample(len(images), 0)]
    loaders, stained = {"none": DeviceImages(images, device)}, {}
    for method in ("macenko", "reinhard"):
        try:
            params = stain.fit(method, sample, {}, "the sample of the benchmark's fields")
        except UserError as e:
            stained[method] = {"error": str(e).split(":")[0] + ": too pale for this method"}
            continue
        _sync(device)
        t0 = time.perf_counter()
        loaders[method] = DeviceImages(images, device, stain=params)
        _sync(device)
        stained[method] = {"normalise_s": time.perf_counter() - t0}
    best = dict.fromkeys(loaders, 0.0)
    for _ in range(2):
        for name, data in loaders.items():
            ld = Loader(data, range(len(labels)), labels, batch_size=batch_size, image_size=image_size, train=True,
                        augment=bench_augment(), drop_last=True)
            best[name] = max(best[name], timed(epochs(ld), batches, device, min_s=2.0))
    for method in loaders.keys() - {"none"}:
        stained[method].update(img_s=best[method], ratio=best[method] / best["none"])
    return best["none"], stained


class PillowDataset(torch.utils.data.Dataset):
    """The hand-written loader: decode a PNG with Pillow, torchvision transforms."""

    def __init__(self, paths: list[str], image_size: int):
        self.paths = paths
        self.tf = T.Compose([T.RandomResizedCrop(image_size), T.RandomHorizontalFlip(), T.RandomVerticalFlip(),
                             T.ColorJitter(0.2, 0.2, 0.2, 0.05), T.ToTensor(), T.Normalize(MEAN, STD)])

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i):
        with Image.open(self.paths[i]) as im:
            return self.tf(im.convert("RGB")), 0


def time_baseline(paths, device, batch_size: int, image_size: int, batches: int, workers: int) -> float:
    dl = torch.utils.data.DataLoader(PillowDataset(paths, image_size), batch_size=batch_size, shuffle=True,
                                     num_workers=workers, drop_last=True, pin_memory=device.type == "cuda")

    def to_device():
        while True:
            for x, y in dl:
                yield x.to(device, non_blocking=True), y.to(device, non_blocking=True)

    return timed(to_device(), batches, device)


def train_epochs(images, labels, device, batch_size: int, image_size: int,
                 model_fn: Callable[[], torch.nn.Module] | None = None) -> tuple[float, float]:
    """Seconds of one training epoch fed by our loader, and of the same epoch from pre-made device batches.

    ResNet-50 (random init), channels-last, bf16 autocast, AdamW; one untimed warm-up epoch
    of each kind first (cudnn autotuning, allocator growth).
    """
    model = (model_fn or (lambda: resnet50(weights=None, num_classes=2)))().to(device, memory_format=torch.channels_last)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    ld = Loader(DeviceImages(images, device), range(len(labels)), labels, batch_size=batch_size,
                image_size=image_size, train=True, augment=bench_augment(), drop_last=True, dtype=torch.bfloat16)
    premade = [(x.clone(), y.clone()) for x, y, _ in ld]

    loss_fn = torch.nn.CrossEntropyLoss()

    def epoch(batches) -> float:
        _sync(device)
        t0 = time.perf_counter()
        for x, y, *_ in batches:
            train_step(model, x, y, opt, loss_fn, amp=torch.bfloat16)
        _sync(device)
        return time.perf_counter() - t0

    epoch(premade), epoch(ld)  # warm-up
    fed, made = zip(*[(epoch(ld), epoch(premade)) for _ in range(2)])  # alternated, best of two
    return min(fed), min(made)
