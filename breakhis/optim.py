"""Optimizers, learning-rate schedules, and the one rule for when a schedule steps.

    opt = build_optimizer(model.parameters(), "adamw", lr=1e-4, weight_decay=0.01)
    sched = build_scheduler(opt, "multistep", epochs=60, steps_per_epoch=len(batches), milestones=(10, 30, 50))
    ... after each optimizer step:         step_schedule(sched, "batch")
    ... after each epoch's validation:     step_schedule(sched, "epoch", val_loss=val_loss)

`step_schedule` is the only caller of a torch scheduler's .step(). The lr in use during epoch e
(or batch t for onecycle) is the schedule's value at e (or t), counted from 0.
"""
from __future__ import annotations

from typing import Any, Callable, Iterable

import torch
from torch.optim import lr_scheduler

from .errors import UserError


def _fused(params: list) -> dict[str, bool]:
    # The fused CUDA kernels update every parameter in one launch; only when all live on a GPU.
    return {"fused": True} if params and all(p.is_cuda for p in params) else {}


# name -> (params, lr, weight_decay, momentum, nesterov) -> optimizer. Adam's weight decay is
# the classic L2 term added to the gradient; AdamW's is decoupled (applied to the weights).
OPTIMIZERS: dict[str, Callable[..., torch.optim.Optimizer]] = {
    "adam": lambda p, lr, wd, momentum, nesterov: torch.optim.Adam(p, lr=lr, weight_decay=wd, **_fused(p)),
    "adamw": lambda p, lr, wd, momentum, nesterov: torch.optim.AdamW(p, lr=lr, weight_decay=wd, **_fused(p)),
    "sgd": lambda p, lr, wd, momentum, nesterov: torch.optim.SGD(p, lr=lr, weight_decay=wd, momentum=momentum,
                                                                 nesterov=nesterov),
}

# name -> when it steps: per optimizer step ('batch'), per epoch, on the validation loss, or never.
SCHEDULERS: dict[str, str] = {
    "none": "never",
    "step": "epoch",
    "multistep": "epoch",
    "exponential": "epoch",
    "cosine": "epoch",
    "onecycle": "batch",
    "plateau": "metric",
}

WARMUP_START = 0.1  # linear warmup starts at lr * WARMUP_START


def build_optimizer(params: Iterable, name: str, lr: float, weight_decay: float, momentum: float = 0.9,
                    nesterov: bool = False) -> torch.optim.Optimizer:
    """An optimizer over `params` (parameters or param groups).

    Build it over all parameters, frozen ones included: a parameter without .grad is skipped
    entirely (no update, no weight decay) until it is unfrozen.
    """
    if name not in OPTIMIZERS:
        raise UserError(f"unknown optimizer {name!r}; choose one of {', '.join(OPTIMIZERS)}")
    if not lr > 0:
        raise UserError(f"--lr {lr}: the learning rate must be positive")
    if weight_decay < 0:
        raise UserError(f"--weight-decay {weight_decay}: must be zero or positive")
    if nesterov and (name != "sgd" or momentum <= 0):
        raise UserError(f"--nesterov needs --optimizer sgd with a positive --momentum (got {name}, momentum {momentum})")
    params = list(params)
    return OPTIMIZERS[name](params, lr, weight_decay, momentum, nesterov)


class Schedule:
    """A torch scheduler (or none) with its stepping rule `when` and an optional linear warmup.

    Warmup (per epoch): during epoch e < warmup_epochs the lr is
    lr * (WARMUP_START + (1 - WARMUP_START) * e / warmup_epochs); from epoch warmup_epochs on,
    the wrapped scheduler runs as if training had started there.
    """

    def __init__(self, optimizer: torch.optim.Optimizer, name: str, scheduler: Any, warmup_epochs: int = 0,
                 total_steps: int = 0):
        self.optimizer = optimizer
        self.name = name
        self.when = SCHEDULERS[name]
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


def build_scheduler(optimizer: torch.optim.Optimizer, name: str, *, epochs: int, steps_per_epoch: int,
                    step_size: int = 10, milestones: tuple[int, ...] = (10, 30, 50), gamma: float = 0.1,
                    pct_start: float = 0.3, plateau_patience: int = 5, plateau_factor: float = 0.1,
                    min_lr: float = 0.0, warmup_epochs: int = 0) -> Schedule:
    """The schedule `name` for `epochs` epochs of `steps_per_epoch` optimizer steps.

    onecycle: max_lr is the optimizer's lr, over epochs * steps_per_epoch steps (torch defaults:
    start at max_lr/25, end at max_lr/25/1e4, cosine, momentum cycled). cosine: from lr to
    min_lr over the epochs after warmup. plateau: mode min on the validation loss.
    """
    if name not in SCHEDULERS:
        raise UserError(f"unknown scheduler {name!r}; choose one of {', '.join(SCHEDULERS)}")
    if warmup_epochs < 0 or warmup_epochs >= epochs:
        raise UserError(f"--warmup-epochs {warmup_epochs}: must be at least 0 and less than --epochs {epochs}")
    if warmup_epochs and name == "onecycle":
        raise UserError("--warmup-epochs with --scheduler onecycle: onecycle has its own warmup (--pct-start); "
                        "set --warmup-epochs 0")
    if name in ("step", "multistep", "exponential") and not 0 < gamma <= 1:
        raise UserError(f"--gamma {gamma}: must lie in (0, 1]")
    main_epochs = epochs - warmup_epochs
    total = epochs * steps_per_epoch
    if name == "none":
        sched = None
    elif name == "step":
        if step_size < 1:
            raise UserError(f"--step-size {step_size}: must be at least 1 epoch")
        sched = lr_scheduler.StepLR(optimizer, step_size=step_size, gamma=gamma)
    elif name == "multistep":
        if not milestones or any(m < 1 for m in milestones):
            raise UserError(f"--milestones {tuple(milestones)}: give epochs >= 1, e.g. 10,30,50")
        sched = lr_scheduler.MultiStepLR(optimizer, milestones=sorted(milestones), gamma=gamma)
    elif name == "exponential":
        sched = lr_scheduler.ExponentialLR(optimizer, gamma=gamma)
    elif name == "cosine":
        sched = lr_scheduler.CosineAnnealingLR(optimizer, T_max=main_epochs, eta_min=min_lr)
    elif name == "onecycle":
        if not 0 < pct_start < 1:
            raise UserError(f"--pct-start {pct_start}: must lie strictly between 0 and 1")
        if total < 2:
            raise UserError(f"onecycle needs at least 2 optimizer steps (epochs {epochs} x {steps_per_epoch} batches)")
        sched = lr_scheduler.OneCycleLR(optimizer, max_lr=[g["lr"] for g in optimizer.param_groups],
                                        total_steps=total, pct_start=pct_start)
    else:  # plateau
        if not 0 < plateau_factor < 1:
            raise UserError(f"--plateau-factor {plateau_factor}: must lie strictly between 0 and 1")
        sched = lr_scheduler.ReduceLROnPlateau(optimizer, mode="min", factor=plateau_factor,
                                               patience=plateau_patience, min_lr=min_lr)
    return Schedule(optimizer, name, sched, warmup_epochs=warmup_epochs, total_steps=total)


def step_schedule(schedule: Schedule, event: str, val_loss: float | None = None) -> None:
    """Advance the schedule: event 'batch' after each optimizer step, 'epoch' after each epoch's
    validation (with val_loss; required by plateau). The only place any scheduler steps."""
    if event == "batch":
        schedule.steps += 1
        # OneCycleLR raises past its end; steps beyond epochs * steps_per_epoch keep the final lr.
        if schedule.when == "batch" and schedule.scheduler.last_epoch < schedule.total_steps - 1:
            schedule.scheduler.step()
        return
    if event != "epoch":
        raise ValueError(f"step_schedule event must be 'batch' or 'epoch', not {event!r}")
    schedule.epoch += 1
    if schedule.epoch <= schedule.warmup_epochs:
        # Still warming up (or just done: back to the base lr, the wrapped scheduler's epoch 0).
        schedule._set_warmup_lr()
        return
    if schedule.when == "epoch":
        schedule.scheduler.step()
    elif schedule.when == "metric":
        if val_loss is None:
            raise ValueError("the plateau schedule steps on the validation loss: pass val_loss")
        schedule.scheduler.step(val_loss)


def current_lr(optimizer: torch.optim.Optimizer) -> float:
    """The lr of the first param group (the one the schedules are written for)."""
    return float(optimizer.param_groups[0]["lr"])
