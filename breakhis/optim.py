"""Optimizers, learning-rate schedules, and the one rule for when a schedule steps.

    opt = build_optimizer(model.parameters(), "adamw", lr=1e-4, weight_decay=0.01)
    schedule = build_schedule(opt, cfg, steps_per_epoch=len(batches))
    ... after each optimizer step:         schedule.step_batch()
    ... after each epoch's validation:     schedule.step_epoch(val_loss)

Schedule is the only caller of a torch scheduler's .step(); each scheduler's rule (per batch,
per epoch, on the validation loss, never) and its torch class and settings are its
registry.SCHEDULERS entry. The lr in use during epoch e (or batch t for onecycle) is the schedule's
value at e (or t), counted from 0. The names and settings come from a validated TrainConfig
(validate() refuses unknown names and holds the rules on lr, gamma, milestones, ...); a name outside
the registries here is a bug and raises KeyError.
"""
from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch.optim import lr_scheduler

from .config import TrainConfig
from .errors import UserError
from .registry import OPTIMIZERS, SCHEDULERS

WARMUP_START = 0.1  # linear warmup starts at lr * WARMUP_START


def build_optimizer(params: Iterable, name: str, lr: float, weight_decay: float, momentum: float = 0.9,
                    nesterov: bool = False) -> torch.optim.Optimizer:
    """An optimizer (registry.OPTIMIZERS) over `params` (parameters or param groups).

    Build it over all parameters, frozen ones included: a parameter without .grad is skipped
    entirely (no update, no weight decay) until it is unfrozen.
    """
    params = list(params)
    kw: dict[str, Any] = {"lr": lr, "weight_decay": weight_decay}
    if name == "sgd":
        kw.update(momentum=momentum, nesterov=nesterov)
    elif params and all(p.is_cuda for p in params):
        kw["fused"] = True  # the fused CUDA kernels update every parameter in one launch
    return getattr(torch.optim, OPTIMIZERS[name])(params, **kw)


class Schedule:
    """A torch scheduler (or none) with its stepping rule and an optional linear warmup.

    Warmup (per epoch): during epoch e < warmup_epochs the lr is
    lr * (WARMUP_START + (1 - WARMUP_START) * e / warmup_epochs); from epoch warmup_epochs on,
    the wrapped scheduler runs as if training had started there.
    """

    def __init__(self, optimizer: torch.optim.Optimizer, name: str, scheduler: Any, warmup_epochs: int = 0,
                 total_steps: int = 0):
        self.optimizer = optimizer
        self.name = name
        self.when = SCHEDULERS[name].when
        self.scheduler = scheduler
        self.warmup_epochs = warmup_epochs
        self.total_steps = total_steps  # onecycle: steps past the end keep the final lr
        self.epoch = 0  # epochs completed
        self.steps = 0  # optimizer steps completed
        self.base_lrs = [g["lr"] for g in optimizer.param_groups]
        if warmup_epochs:
            self._set_warmup_lr()

    def _set_warmup_lr(self) -> None:
        f = WARMUP_START + (1 - WARMUP_START) * min(self.epoch, self.warmup_epochs) / self.warmup_epochs
        for g, base in zip(self.optimizer.param_groups, self.base_lrs):
            g["lr"] = base * f

    def step_batch(self) -> None:
        """After each optimizer step: onecycle advances; the others only count."""
        self.steps += 1
        # OneCycleLR raises past its end; steps beyond epochs * steps_per_epoch keep the final lr.
        if self.when == "batch" and self.scheduler.last_epoch < self.total_steps - 1:
            self.scheduler.step()

    def step_epoch(self, val_loss: float | None = None) -> None:
        """After each epoch's validation: warmup, then the per-epoch schedulers, or plateau on val_loss."""
        self.epoch += 1
        if self.epoch <= self.warmup_epochs:
            # Still warming up (or just done: back to the base lr, the wrapped scheduler's epoch 0).
            self._set_warmup_lr()
            return
        if self.when == "epoch":
            self.scheduler.step()
        elif self.when == "metric":
            if val_loss is None:
                raise ValueError("the plateau schedule steps on the validation loss: pass val_loss")
            self.scheduler.step(val_loss)

    def state_dict(self) -> dict[str, Any]:
        return {"name": self.name, "epoch": self.epoch, "steps": self.steps, "base_lrs": self.base_lrs,
                "lrs": [g["lr"] for g in self.optimizer.param_groups],
                "scheduler": self.scheduler.state_dict() if self.scheduler is not None else None}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore the schedule and the optimizer's current lrs (whatever order things were loaded in)."""
        if state["name"] != self.name:
            raise UserError(f"the saved schedule is {state['name']!r} but this run uses {self.name!r}")
        self.epoch, self.steps, self.base_lrs = state["epoch"], state["steps"], list(state["base_lrs"])
        if self.scheduler is not None:
            self.scheduler.load_state_dict(state["scheduler"])
        for g, lr in zip(self.optimizer.param_groups, state["lrs"]):
            g["lr"] = lr


def build_schedule(optimizer: torch.optim.Optimizer, cfg: TrainConfig, steps_per_epoch: int) -> Schedule:
    """The schedule cfg.scheduler for cfg.epochs epochs of `steps_per_epoch` optimizer steps.

    Built from its registry.SCHEDULERS entry: the torch.optim.lr_scheduler class it names, with
    the keyword arguments it gives (e.g. onecycle's max_lr is the optimizer's lr, over
    epochs * steps_per_epoch steps; plateau is mode min on the validation loss).
    """
    name = cfg.scheduler
    entry = SCHEDULERS[name]
    total = cfg.epochs * steps_per_epoch
    if total < entry.min_steps:  # known only now: steps_per_epoch comes from the data
        raise UserError(f"{name} needs at least {entry.min_steps} optimizer steps (epochs {cfg.epochs} x "
                        f"{steps_per_epoch} batches)")
    lrs = [g["lr"] for g in optimizer.param_groups]
    sched = getattr(lr_scheduler, entry.cls)(optimizer, **entry.kwargs(cfg, total, lrs)) if entry.cls else None
    return Schedule(optimizer, name, sched, warmup_epochs=cfg.warmup_epochs, total_steps=total)


def current_lr(optimizer: torch.optim.Optimizer) -> float:
    """The lr of the first param group (the one the schedules are written for)."""
    return float(optimizer.param_groups[0]["lr"])
