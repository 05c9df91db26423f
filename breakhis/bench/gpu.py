"""Every check only a GPU can show, in one command (about 8 minutes on one H100/H200).

    python -m breakhis.bench gpu --json gpu.json           # the figures, also written to gpu.json
    python -m breakhis.bench gpu --json gpu.json --quick   # fewer steps, no compiled ResNet-152 row

Without CUDA it exits with code 2 and says so. Checks, each with its figures:
  loader     one epoch of ResNet-50 (bf16 autocast, channels-last) fed by our loader from a
             device-resident uint8 cache, against the same steps on batches made beforehand on
             the device (goal: within 5%); and our loader's img/s resident vs streamed (budget 0:
             pinned host memory, copied one batch ahead on a side stream)
  train      ResNet-50 and ResNet-152 training img/s at 224 px: fp32 (TF32), bf16, bf16 +
             channels-last, bf16 + channels-last + torch.compile; MFU against the card's dense peak
  share      four one-epoch Ray Tune trials at 0.25 GPU each, against the same four one after
             another (goal: at least 2.5x)
  end_to_end a 2-epoch train.py-equivalent run (fit) on a generated 700x460 tree, then evaluate_run,
             checking the run folder's files, its history and its scores

Every check is a function of the device, so the tests run each one on the CPU at tiny sizes.
"""
from __future__ import annotations

import argparse
import gc
import shutil
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import ray
import torch
from rich.console import Console
from torchvision.models import resnet50

from .. import runs
from ..config import make_config
from ..data.demo import make_demo
from ..data.prepare import prepare
from ..device import needs_grad_scaler
from ..errors import UserError
from ..evaluation import evaluate_run
from ..fit import fit
from ..io import read_csv, read_json, write_json
from ..loader import DeviceImages, Loader
from ..models import build_model
from ..options import EvalOptions
from ..predict import open_run
from ..tuning import experiment as tuning
from ..tuning.results import collect, write_results
from ..tuning.space import load_space
from .loader import bench_augment, epochs, time_ours, timed, train_epochs
from .train import peak_tflops, time_training, train_flops

RUN_FILES = ("config.json", "split.json", "status.json", "history.csv", "metrics.json", "predictions.csv",
             "model.safetensors")
# (name, amp, channels_last, compile) of the training rows
TRAIN_ROWS = (("fp32", None, False, False), ("bf16", torch.bfloat16, False, False),
              ("bf16+channels-last", torch.bfloat16, True, False), ("bf16+channels-last+compile", torch.bfloat16, True, True))


def _free(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def loader_check(device: torch.device, *, n: int, hw: tuple[int, int], batch_size: int, image_size: int,
                 model_fn=None) -> dict:
    """Loader overhead in a ResNet-50 bf16 channels-last epoch; resident vs streamed loader img/s."""
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (n, *hw, 3), dtype=np.uint8)  # (N, H, W, 3) uint8, like the cache
    labels = np.arange(n) % 2
    fed, premade = train_epochs(images, labels, device, batch_size, image_size, model_fn=model_fn)
    _free(device)
    batches = max(2, n // batch_size - 1)
    resident = time_ours(images, labels, device, batch_size, image_size, batches)
    streamed = time_streamed(images, labels, device, batch_size, image_size, batches)
    overhead = fed / premade - 1
    return {"images": n, "batch_size": batch_size, "image_size": image_size, "epoch_fed_s": fed,
            "epoch_premade_s": premade, "overhead": overhead, "goal": "within 5%", "met": overhead <= 0.05,
            "resident_img_s": resident, "streamed_img_s": streamed}


def time_streamed(images, labels, device, batch_size: int, image_size: int, batches: int) -> float:
    """Our loader's img/s with budget 0: gathered on the host, copied one batch ahead."""
    data = DeviceImages(images, device, budget_gb=0)
    if data.resident:
        raise RuntimeError("a zero budget left the images resident")
    ld = Loader(data, range(len(labels)), labels, batch_size=batch_size, image_size=image_size, train=True,
                augment=bench_augment(), drop_last=True)
    return timed(epochs(ld), batches, device, min_s=1.0)


def train_check(device: torch.device, backbone: str, *, batch_size: int, image_size: int, steps: int, warmup: int,
                rows=TRAIN_ROWS) -> dict:
    """Training img/s of a backbone for each row, with MFU where the card's peak is known."""
    torch.manual_seed(0)
    base = build_model(backbone, pretrained=False)
    _, step_flops = train_flops(build_model(backbone, pretrained=False).to(device), image_size, device)
    out = []
    for name, amp, cl, comp in rows:
        if comp:
            torch._dynamo.reset()
        model = build_model(backbone, pretrained=False)
        model.load_state_dict(base.state_dict())
        img_s = time_training(model, device, batch_size=batch_size, image_size=image_size, channels_last=cl, amp=amp,
                              compile=comp, compile_mode="default", steps=steps, warmup=warmup + (3 if comp else 0))
        peak = peak_tflops(device, "bf16" if amp is torch.bfloat16 else "tf32")
        out.append({"row": name, "img_s": img_s, "mfu": img_s * step_flops / (peak * 1e12) if peak else None,
                    "grad_scaler": needs_grad_scaler(amp)})
        del model
        _free(device)
    return {"backbone": backbone, "image_size": image_size, "batch_size": batch_size,
            "gflop_train_per_image": step_flops / 1e9, "rows": out}


def _tune(setup_base: dict, work: Path, name: str, trials: int, gpus: float, concurrent: int | None) -> float:
    """Seconds of a one-epoch, `trials`-seed experiment (run through the package's tune code)."""
    space_file = work / "seeds.py"
    space_file.write_text(f'"""Seeds."""\nSPACE = {{"seed": {list(range(trials))}}}\n')
    setup = tuning.make_setup(load_space(space_file), setup_base, metric=None, mode=None, max_epochs=1,
                              grace_period=1, reduction_factor=2, samples=1, concurrent=concurrent)
    exp_dir = tuning.new_experiment(work / "tune", name)
    setup.save(exp_dir)
    resources, _ = tuning.trial_resources(gpus if gpus else None, 1.0)
    t0 = time.perf_counter()
    rows = collect(tuning.run_experiment(setup, exp_dir, resources), setup, exp_dir)
    seconds = time.perf_counter() - t0
    write_results(exp_dir, rows, setup)
    if bad := [r for r in rows if r["status"] != runs.FINISHED]:
        raise RuntimeError(f"share check: trials did not finish: {bad}")
    return seconds


def share_check(device: torch.device, work: Path, *, trials: int = 4, share: float = 0.25, patients: int = 16,
                images_per_patient: int = 64, size: tuple[int, int] = (350, 230), image_size: int = 224,
                backbone: str = "resnet50", batch_size: int = 32) -> dict:
    """`trials` one-epoch trials at `share` GPU each, against the same trials one at a time.

    A trial of batch 32 leaves most of an H100 idle, which is what sharing is for; each trial
    also pays fixed costs (process, CUDA context, scoring), which sharing overlaps too."""
    root = make_demo(work / "tree", patients=patients, images_per_patient=images_per_patient, size=size)
    base = make_config({"data": str(root), "cache_dir": str(work / "cache"), "backbone": backbone, "pretrained": False,
                        "image_size": image_size, "batch_size": batch_size, "epochs": 1, "device": device.type,
                        "head": (64,), "dropout": (0.2,)}).to_dict()
    prepare(make_config(base), progress=False)  # the cache once, as tune.py does
    started = not ray.is_initialized()  # a Ray this check starts, it stops
    tuning.start_ray(None)
    gpus = share if device.type == "cuda" else 0
    try:
        together = _tune(base, work, "together", trials, gpus, None)
        alone = _tune(base, work, "alone", trials, gpus, 1)
    finally:
        if started:
            ray.shutdown()
    ratio = alone / together
    return {"trials": trials, "gpu_per_trial": gpus, "together_s": together, "one_after_another_s": alone,
            "speedup": ratio, "goal": "at least 2.5x", "met": ratio >= 2.5}


def end_to_end_check(device: torch.device, work: Path, *, patients: int = 12, images_per_patient: int = 8,
                     size: tuple[int, int] = (700, 460), backbone: str = "resnet50", image_size: int = 224,
                     batch_size: int = 16, amp: str = "auto") -> dict:
    """fit() for 2 epochs on a generated tree at the archive's field size, then evaluate_run; checks the folder."""
    root = make_demo(work / "e2e-tree", patients=patients, images_per_patient=images_per_patient, size=size)
    cfg = make_config({"data": str(root), "cache_dir": str(work / "cache"), "backbone": backbone, "pretrained": False,
                       "image_size": image_size, "batch_size": batch_size, "epochs": 2, "device": device.type,
                       "amp": amp})
    run_dir = work / "run"
    run_dir.mkdir(parents=True)
    t0 = time.perf_counter()
    metrics = fit(cfg, run_dir, progress=False)
    train_s = time.perf_counter() - t0
    ev = evaluate_run(open_run(run_dir), EvalOptions(runs=[str(run_dir)], n_boot=200).validate())
    history = read_csv(run_dir / "history.csv")
    problems = [f"missing {f}" for f in RUN_FILES if not (run_dir / f).is_file()]
    if [int(h["epoch"]) for h in history] != [1, 2]:
        problems.append(f"history epochs {[h['epoch'] for h in history]}")
    if runs.status_of(run_dir) != runs.FINISHED:
        problems.append(f"status {runs.status_of(run_dir)}")
    saved = (read_json(run_dir / "config.json") or {})
    if not isinstance(metrics.get("test"), dict) or not 0 <= metrics["test"].get("accuracy", -1) <= 1:
        problems.append("no test accuracy in metrics.json")
    if not list((run_dir / "plots").glob("*.png")):
        problems.append("no plots")
    return {"images": patients * images_per_patient, "field": f"{size[0]}x{size[1]}", "backbone": backbone,
            "amp": amp, "fit_s": train_s, "test_accuracy": metrics.get("test", {}).get("accuracy"),
            "evaluate_keys": sorted(ev)[:12], "config_device": saved.get("device"), "problems": problems,
            "met": not problems}


def main(argv: Sequence[str]) -> int:
    ap = argparse.ArgumentParser(prog="python -m breakhis.bench gpu", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--json", metavar="OUT.json", help="also write the figures to this file")
    ap.add_argument("--quick", action="store_true", help="fewer steps and images; no compiled ResNet-152 row")
    ap.add_argument("--checks", default="loader,train,share,end_to_end", help="comma-separated subset")
    ap.add_argument("--device", default="cuda", help="cuda or cuda:N")
    a = ap.parse_args(argv)
    chosen = [c.strip() for c in a.checks.split(",") if c.strip()]
    if bad := [c for c in chosen if c not in ("loader", "train", "share", "end_to_end")]:
        raise UserError(f"--checks: unknown check(s) {', '.join(bad)}; choose from loader, train, share, end_to_end")
    if not torch.cuda.is_available():
        raise UserError(f"bench gpu needs a CUDA device and torch {torch.__version__} sees none here; "
                        f"run it on a GPU machine (the CPU parts are covered by the tests)")
    device = torch.device(a.device)
    if not a.device.startswith("cuda"):
        raise UserError(f"--device {a.device}: bench gpu runs on cuda or cuda:N")
    console = Console()
    out: dict = {"device": torch.cuda.get_device_name(device), "torch": torch.__version__,
                 "cuda": torch.version.cuda, "checks": {}}
    steps, warmup = (10, 3) if a.quick else (30, 5)
    work = Path(tempfile.mkdtemp(prefix="breakhis-gpu-"))
    t_all = time.perf_counter()
    try:
        for check in chosen:
            t0 = time.perf_counter()
            console.print(f"[bold]{check}[/] ...")
            if check == "loader":
                res = loader_check(device, n=1024 if a.quick else 4096, hw=(256, 390), batch_size=128, image_size=224,
                                   model_fn=lambda: resnet50(weights=None, num_classes=2))
            elif check == "train":
                res = {b: train_check(device, b, batch_size=128 if b == "resnet50" else 64, image_size=224, steps=steps,
                                      warmup=warmup, rows=TRAIN_ROWS[:3] if a.quick and b == "resnet152" else TRAIN_ROWS)
                       for b in ("resnet50", "resnet152")}
            elif check == "share":
                res = share_check(device, work / "share")
            else:
                res = end_to_end_check(device, work / "e2e")
            res = {**res, "seconds": time.perf_counter() - t0} if isinstance(res, dict) else res
            out["checks"][check] = res
            console.print_json(data=res)
            _free(device)
            if a.json:  # after every check: a later failure keeps what was measured
                write_json(a.json, {**out, "seconds": time.perf_counter() - t_all})
    finally:
        shutil.rmtree(work, ignore_errors=True)
    out["seconds"] = time.perf_counter() - t_all
    if a.json:
        write_json(a.json, out)
        console.print(f"wrote {a.json}")
    return 0

