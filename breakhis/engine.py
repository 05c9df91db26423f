"""The training step and loop as plain functions: train_step(), train_one_epoch(), evaluate(). No Trainer class.

train_step is the one step: training runs it, and both benchmarks (bench loader, bench train)
time it. Schedules step through optim.Schedule only: per batch here (onecycle), per epoch and
on the validation loss in the caller (fit.py).
"""
from __future__ import annotations

import time
from collections.abc import Callable, Iterable

import numpy as np
import torch
import torch.nn.functional as F

from .augment import tta_views
from .device import autocast
from .models import train_mode
from .optim import Schedule


class NonFiniteLoss(Exception):
    """The training loss became NaN or infinite."""


def make_loss(class_weights: tuple[float, ...], label_smoothing: float, device: torch.device) -> torch.nn.Module:
    """Cross-entropy over the logits, class-weighted when weights are given (e.g. (0.5, 0.8) to raise recall)."""
    weight = torch.tensor(class_weights, dtype=torch.float32, device=device) if class_weights else None
    return torch.nn.CrossEntropyLoss(weight=weight, label_smoothing=label_smoothing)


def train_step(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, optimizer: torch.optim.Optimizer,
               loss_fn: Callable, *, amp: torch.dtype | None = None,
               scaler: torch.amp.GradScaler | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """One optimizer step on a batch x (B, 3, S, S), y (B,); returns (loss, logits (B, C)), not synchronised.

    The forward pass runs under autocast (amp None: fp32); the loss is taken in fp32. With an
    enabled GradScaler (fp16) the loss is scaled and the step skipped on inf/nan gradients.
    """
    with autocast(x.device, amp):
        logits = model(x)  # (B, C)
    loss = loss_fn(logits.float(), y)
    optimizer.zero_grad(set_to_none=True)
    if scaler is not None and scaler.is_enabled():
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
    else:
        loss.backward()
        optimizer.step()
    return loss, logits


def train_one_epoch(model: torch.nn.Module, batches: Iterable, optimizer: torch.optim.Optimizer,
                    schedule: Schedule, loss_fn: Callable, *, amp: torch.dtype | None = None,
                    scaler: torch.amp.GradScaler | None = None, on_batch: Callable[[int], None] | None = None) -> dict:
    """One pass over the training batches; returns loss, acc, images, seconds, img_s.

    The loss is checked once per epoch (a per-batch check would synchronise the GPU every step);
    a NaN/inf raises NonFiniteLoss.
    """
    train_mode(model)
    device = next(model.parameters()).device
    loss_sum = torch.zeros((), device=device)  # summed per-image loss, kept on the device
    correct = torch.zeros((), device=device, dtype=torch.long)
    n = 0
    t0 = time.perf_counter()
    for i, (x, y, _) in enumerate(batches):
        loss, logits = train_step(model, x, y, optimizer, loss_fn, amp=amp, scaler=scaler)
        schedule.step_batch()
        loss_sum += loss.detach() * y.shape[0]
        correct += (logits.argmax(1) == y).sum()
        n += y.shape[0]
        if on_batch:
            on_batch(i + 1)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    seconds = time.perf_counter() - t0
    loss_mean = loss_sum.item() / max(n, 1)
    if not np.isfinite(loss_mean):
        raise NonFiniteLoss(f"the training loss is {loss_mean}")
    return {"loss": loss_mean, "acc": correct.item() / max(n, 1), "images": n, "seconds": seconds,
            "img_s": n / seconds if seconds > 0 else float("nan")}


@torch.no_grad()
def evaluate(model: torch.nn.Module, batches: Iterable, loss_fn: Callable | None = None, *,
             amp: torch.dtype | None = None, tta: bool = False) -> dict:
    """Class probabilities of every image, in loader order.

    Returns probs (N, C) float64 numpy, idx (N,) cache positions, labels (N,), loss (mean, or nan).
    With tta, the softmax of the 8 dihedral views is averaged: augment.tta_views of the images, or
    the batches' own tta_views where they already hold the views (features.FeatureLoader).
    """
    views_of = getattr(batches, "tta_views", tta_views)
    model.eval()
    probs, idxs, labels = [], [], []
    loss_sum, n = 0.0, 0
    for x, y, idx in batches:
        with autocast(x.device, amp):
            views = views_of(x) if tta else [x]
            logits = torch.stack([model(v).float() for v in views])  # (V, B, C)
        p = F.softmax(logits, dim=-1).mean(0)
        if loss_fn is not None:
            # loss of the averaged prediction: log of the mean probability
            loss_sum += float(loss_fn(torch.log(p.clamp_min(1e-12)), y)) * y.shape[0] if tta else \
                float(loss_fn(logits[0], y)) * y.shape[0]
        n += y.shape[0]
        probs.append(p.double().cpu())
        idxs.append(idx.cpu())
        labels.append(y.cpu())
    if not probs:
        return {"probs": np.zeros((0, 0)), "idx": np.zeros(0, int), "labels": np.zeros(0, int), "loss": float("nan")}
    return {"probs": torch.cat(probs).numpy(), "idx": torch.cat(idxs).numpy(), "labels": torch.cat(labels).numpy(),
            "loss": loss_sum / n if loss_fn is not None and n else float("nan")}
