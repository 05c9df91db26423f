"""Training throughput of a backbone: channels-last, AMP and torch.compile side by side.

    python -m breakhis.bench train --backbone resnet50                 # on a GPU: 8 rows, with MFU
    python -m breakhis.bench train --backbone resnet18 --image-size 64 --batch-size 32 --steps 10   # CPU
    python -m breakhis.bench train --backbone resnet50 --json          # last line: one JSON object

Each row trains the same model (random init, our head) on synthetic device tensors: forward,
cross-entropy, backward and an AdamW step, exactly as many images per step as --batch-size.
Warmup steps (compilation, cudnn autotuning) are not timed; the GPU is synchronised before the
clock stops. The ratio is to the plain fp32, NCHW, eager row. FLOPs are counted by
torch.utils.flop_counter on one training step of the actual model at the actual size (convs
and matmuls, 2 FLOPs per multiply-add); MFU = achieved FLOP/s over the GPU's dense peak for
the row's precision (fp32 rows run as TF32).
"""
from __future__ import annotations

import argparse
import copy
import gc
import json
import time
from collections.abc import Sequence

import torch
from rich.console import Console
from rich.table import Table
from torch.utils.flop_counter import FlopCounterMode

from ..device import amp_dtype, needs_grad_scaler, prepare_model, resolve_device
from ..engine import train_step
from ..errors import UserError
from ..models import build_model
from ..optim import build_optimizer
from ..registry import BACKBONES, unknown

# Dense tensor-core peaks in TFLOP/s (no sparsity), by a substring of the device name; the
# first match wins, so the PCIe H100 comes before the SXM one.
PEAK_TFLOPS: list[tuple[str, dict[str, float]]] = [
    ("H100 PCIe", {"bf16": 756.0, "fp16": 756.0, "tf32": 378.0}),
    ("H100", {"bf16": 989.0, "fp16": 989.0, "tf32": 494.5}),  # SXM
    ("H200", {"bf16": 989.0, "fp16": 989.0, "tf32": 494.5}),
    ("A100", {"bf16": 312.0, "fp16": 312.0, "tf32": 156.0}),
]


def peak_tflops(device: torch.device, precision: str) -> float | None:
    """The dense peak of this GPU for 'bf16', 'fp16' or 'tf32'; None when unknown or on the CPU."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((peaks[precision] for key, peaks in PEAK_TFLOPS if key in name), None)


def train_flops(model: torch.nn.Module, image_size: int, device: torch.device) -> tuple[float, float]:
    """(forward, forward + backward) FLOPs per image, counted on one fp32 step of batch 1."""
    x = torch.randn(1, 3, image_size, image_size, device=device)
    counter = FlopCounterMode(display=False)
    with counter:
        logits = model(x)
    forward = counter.get_total_flops()
    with counter:
        model(x).sum().backward()
    model.zero_grad(set_to_none=True)
    del logits
    return float(forward), float(counter.get_total_flops())


def time_training(model: torch.nn.Module, device: torch.device, *, batch_size: int, image_size: int,
                  channels_last: bool, amp: torch.dtype | None, compile: bool, compile_mode: str,
                  steps: int, warmup: int) -> float:
    """Images per second over `steps` timed training steps after `warmup` untimed ones."""
    model = prepare_model(model, device, channels_last, compile, compile_mode)
    model.train()
    opt = build_optimizer(model.parameters(), "adamw", lr=1e-4, weight_decay=0.01)
    scaler = torch.amp.GradScaler(device.type, enabled=needs_grad_scaler(amp))
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    x = torch.randn(batch_size, 3, image_size, image_size, device=device).contiguous(memory_format=fmt)
    y = torch.randint(0, 2, (batch_size,), device=device)

    loss_fn = torch.nn.CrossEntropyLoss()

    def step() -> None:
        train_step(model, x, y, opt, loss_fn, amp=amp, scaler=scaler)

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    for _ in range(warmup):
        step()
    sync()
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    sync()
    return batch_size * steps / (time.perf_counter() - t0)


def plan(device: torch.device, amp: torch.dtype | None, compile_cpu: bool) -> list[dict]:
    """Every combination of layout, precision and compile, with the reason where one is skipped."""
    rows = []
    for compiled in (False, True):
        for use_amp in (False, True):
            for cl in (False, True):
                skip = ""
                if use_amp and amp is None:
                    skip = "AMP is off on the CPU (autocast is rarely faster there)" if device.type == "cpu" \
                        else "this device supports no AMP dtype"
                elif compiled and device.type == "cpu" and not compile_cpu:
                    skip = "compile skipped on the CPU (--compile-cpu to run it)"
                rows.append({"channels_last": cl, "amp": (str(amp).removeprefix("torch.") if amp else "on") if use_amp else "off",
                             "compile": compiled, "skipped": skip, "_dtype": amp if use_amp else None})
    return rows


def main(argv: Sequence[str] | None = None) -> int:
    # long by design: a benchmark script read top to bottom (flags, setup, the timed sides, the printed table)
    parser = argparse.ArgumentParser(prog="python -m breakhis.bench train", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backbone", default="resnet50", help="a name of breakhis.registry.BACKBONES")
    parser.add_argument("--image-size", type=int, default=224, help="input side, pixels")
    parser.add_argument("--batch-size", type=int, default=64, help="images per training step")
    parser.add_argument("--steps", type=int, default=20, help="timed training steps per row")
    parser.add_argument("--warmup", type=int, default=5, help="untimed steps per row before timing")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    parser.add_argument("--amp", default="auto", choices=("auto", "bf16", "fp16"), help="precision of the AMP rows")
    parser.add_argument("--compile-mode", default="default", choices=("default", "reduce-overhead", "max-autotune"))
    parser.add_argument("--compile-cpu", action="store_true", help="also time compiled rows on the CPU")
    parser.add_argument("--json", action="store_true", help="print the rows as one JSON object on the last line")
    args = parser.parse_args(argv)
    if args.backbone not in BACKBONES:
        raise UserError(unknown("backbone", args.backbone, BACKBONES))
    for flag, value, least in (("--image-size", args.image_size, 64), ("--batch-size", args.batch_size, 1),
                               ("--steps", args.steps, 1), ("--warmup", args.warmup, 0)):
        if value < least:
            raise UserError(f"{flag} {value}: must be at least {least}")
    device = resolve_device(args.device)
    amp = amp_dtype(args.amp, device)
    console = Console()

    torch.manual_seed(0)
    base = build_model(args.backbone, pretrained=False)
    fwd_flops, step_flops = train_flops(copy.deepcopy(base).to(device), args.image_size, device)
    rows = plan(device, amp, args.compile_cpu)
    with console.status("timing") as status:
        for row in rows:
            if row["skipped"]:
                continue
            status.update(f"timing channels_last={row['channels_last']} amp={row['amp']} compile={row['compile']}")
            if row["compile"]:
                torch._dynamo.reset()  # each compiled row compiles its own model from scratch
            row["img_s"] = time_training(copy.deepcopy(base), device, batch_size=args.batch_size,
                                         image_size=args.image_size, channels_last=row["channels_last"],
                                         amp=row["_dtype"], compile=row["compile"], compile_mode=args.compile_mode,
                                         steps=args.steps, warmup=args.warmup)
            gc.collect()
            if device.type == "cuda":
                torch.cuda.empty_cache()

    baseline = rows[0].get("img_s")
    for row in rows:
        dtype = row.pop("_dtype")
        if "img_s" not in row:
            continue
        row["ratio"] = row["img_s"] / baseline
        peak = peak_tflops(device, {torch.bfloat16: "bf16", torch.float16: "fp16"}.get(dtype, "tf32"))
        if peak:
            row["mfu"] = row["img_s"] * step_flops / (peak * 1e12)

    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    table = Table(title=f"training img/s: {args.backbone}, {args.image_size} px, batch {args.batch_size}, {gpu}",
                  caption=f"{fwd_flops / 1e9:.2f} GFLOP forward, {step_flops / 1e9:.2f} GFLOP per trained image")
    for col in ("layout", "precision", "compile", "img/s", "vs fp32 NCHW eager", "MFU"):
        table.add_column(col, justify="left" if col in ("layout", "precision", "compile") else "right")
    skipped: dict[str, int] = {}
    for row in rows:
        if row["skipped"]:
            skipped[row["skipped"]] = skipped.get(row["skipped"], 0) + 1
            continue
        table.add_row("channels-last" if row["channels_last"] else "NCHW", row["amp"] if row["amp"] != "off" else "fp32",
                      args.compile_mode if row["compile"] else "eager", f"{row['img_s']:,.1f}", f"{row['ratio']:.2f}x",
                      f"{row['mfu']:.1%}" if "mfu" in row else "-")
    console.print(table)
    for reason, n in skipped.items():
        console.print(f"{n} row(s) skipped: {reason}")
    if device.type == "cuda" and peak_tflops(device, "bf16") is None:
        console.print(f"MFU omitted: no peak FLOP/s known for {gpu}")
    if args.json:
        print(json.dumps({"backbone": args.backbone, "image_size": args.image_size, "batch_size": args.batch_size,
                          "steps": args.steps, "device": gpu, "torch": torch.__version__,
                          "gflop_forward_per_image": fwd_flops / 1e9, "gflop_train_per_image": step_flops / 1e9,
                          "rows": rows}))
    return 0
