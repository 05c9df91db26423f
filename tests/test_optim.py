"""Optimizers and schedules: lr sequences against values computed by hand, trained through engine.train_one_epoch."""
import dataclasses
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from breakhis.config import make_config
from breakhis.engine import train_one_epoch
from breakhis.errors import UserError
from breakhis.models import Classifier, build_model, set_frozen
from breakhis.optim import build_optimizer, build_schedule, current_lr
from breakhis.registry import OPTIMIZERS, SCHEDULERS

E, S, LR = 8, 3, 1.0  # epochs, optimizer steps per epoch, base lr
# S batches of two images: x (2, 2) zeros, y (2,) one of each class, idx (2,); the loss stays finite at lr 1
BATCHES = [(torch.zeros(2, 2), torch.tensor([0, 1]), torch.arange(2))] * S


def _setup(name, lr=LR, **kw):
    """A tiny Classifier (train_one_epoch's train_mode looks at its backbone), SGD over it, and the schedule."""
    torch.manual_seed(0)
    model = Classifier(nn.Linear(2, 2), nn.Sequential(nn.Linear(2, 2)))
    opt = build_optimizer(model.parameters(), "sgd", lr=lr, weight_decay=0.0)
    return model, opt, build_schedule(opt, make_config({"scheduler": name, "epochs": E, **kw}), steps_per_epoch=S)


def _run(model, opt, sched, epochs, losses=None, start=0, batches=BATCHES):
    """The lr of every optimizer step: engine.train_one_epoch per epoch (it steps the batch rule), then the
    epoch's step_epoch with its validation loss, as fit.py calls it."""
    lrs = []

    def loss_fn(logits, y):
        lrs.append(current_lr(opt))  # train_step takes the loss just before optimizer.step(): the lr that step uses
        return F.cross_entropy(logits, y)

    for e in range(start, start + epochs):
        train_one_epoch(model, batches, opt, sched, loss_fn)
        sched.step_epoch(None if losses is None else losses[e])
    return lrs


def lr_sequence(name, losses=None, **kw):
    model, opt, sched = _setup(name, **kw)
    return _run(model, opt, sched, E, losses)


def per_epoch(lrs):
    # every batch of an epoch-stepped schedule uses the same lr
    epochs = [lrs[i:i + S] for i in range(0, len(lrs), S)]
    assert all(len(set(e)) == 1 for e in epochs)
    return [e[0] for e in epochs]


def test_registries():
    assert set(OPTIMIZERS) == {"adam", "adamw", "sgd"}
    assert {k: v.when for k, v in SCHEDULERS.items()} == {
        "none": "never", "step": "epoch", "multistep": "epoch", "exponential": "epoch", "cosine": "epoch",
        "onecycle": "batch", "plateau": "metric"}


def _onecycle_by_hand(pct_start, total=E * S, top=LR):
    """OneCycleLR's lr at every step (two cosine phases, torch's defaults), written out."""
    start, final = top / 25, top / 25 / 1e4
    peak = pct_start * total - 1  # the step at which the rise ends
    return [top + (start - top) / 2 * (1 + math.cos(math.pi * t / peak)) if t <= peak else
            final + (top - final) / 2 * (1 + math.cos(math.pi * (t - peak) / (total - 1 - peak))) for t in range(total)]


# name -> (settings, validation losses, the lr of every epoch by hand; per batch for a batch-stepped one).
# A scheduler added to the registry without a case here fails test_lr_of_every_scheduler (KeyError).
HAND = {
    "none": ({}, None, [LR] * E),
    "step": ({"step_size": 3, "gamma": 0.5}, None, [1, 1, 1, 0.5, 0.5, 0.5, 0.25, 0.25]),
    "multistep": ({"milestones": (5, 2), "gamma": 0.1}, None, [1, 1, 0.1, 0.1, 0.1, 0.01, 0.01, 0.01]),
    "exponential": ({"gamma": 0.5}, None, [0.5 ** e for e in range(E)]),
    "cosine": ({"min_lr": 0.1}, None, [0.1 + 0.9 * (1 + math.cos(math.pi * e / E)) / 2 for e in range(E)]),
    "onecycle": ({"pct_start": 0.25}, None, _onecycle_by_hand(0.25)),
    # patience 1: the lr drops after two epochs in a row without improvement
    "plateau": ({"plateau_patience": 1, "plateau_factor": 0.1}, [5, 4, 4, 4, 3, 3, 3, 3],
                [1, 1, 1, 1, 0.1, 0.1, 0.1, 0.01]),
}


@pytest.mark.parametrize("name", sorted(SCHEDULERS))
def test_lr_of_every_scheduler(name):
    kw, losses, want = HAND[name]
    model, opt, sched = _setup(name, **kw)
    got = _run(model, opt, sched, E, losses)
    assert type(sched.scheduler).__name__ == (SCHEDULERS[name].cls or "NoneType")  # the class its entry names
    if SCHEDULERS[name].when == "batch":
        assert len(set(got[:S])) == S  # it moves within an epoch
        assert got == pytest.approx(want, abs=1e-12)
    else:
        assert per_epoch(got) == pytest.approx(want, abs=1e-9)


def test_onecycle():
    # 24 steps, rising over the first 25%: phase one ends at step 0.25*24 - 1 = 5
    got = lr_sequence("onecycle", pct_start=0.25)
    start, final = LR / 25, LR / 25 / 1e4
    assert got[0] == pytest.approx(start)
    assert max(got) == pytest.approx(LR) and got.index(max(got)) == 5
    assert got[-1] == pytest.approx(final)
    # cosine annealing within each phase, e.g. step 2 of the rise and step 14 of the fall
    assert got[2] == pytest.approx(LR + (start - LR) / 2 * (1 + math.cos(math.pi * 2 / 5)))
    assert got[14] == pytest.approx(final + (LR - final) / 2 * (1 + math.cos(math.pi * 9 / 18)))
    assert all(a < b for a, b in zip(got[:5], got[1:6])) and all(a > b for a, b in zip(got[5:], got[6:]))


def test_onecycle_keeps_final_lr_past_its_end():
    model, opt, sched = _setup("onecycle", pct_start=0.25)
    _run(model, opt, sched, E)
    # five more optimizer steps than the schedule was built for (an epoch with more batches)
    past = _run(model, opt, sched, 1, batches=BATCHES[:1] * 5)
    assert past == pytest.approx([LR / 25 / 1e4] * 5)
    assert current_lr(opt) == pytest.approx(LR / 25 / 1e4)


def test_plateau_min_lr_and_needs_loss():
    # the first loss sets the best; with patience 0 every later flat epoch halves the lr, down to min_lr
    got = per_epoch(lr_sequence("plateau", losses=[1] * E, plateau_patience=0, plateau_factor=0.5, min_lr=0.2))
    assert got == pytest.approx([1, 1, 0.5, 0.25, 0.2, 0.2, 0.2, 0.2])
    _, _, sched = _setup("plateau")
    with pytest.raises(ValueError, match="val_loss"):
        sched.step_epoch()


def test_warmup_then_step():
    # linear from lr/10 over 3 epochs, then StepLR counting from epoch 3
    got = per_epoch(lr_sequence("step", step_size=2, gamma=0.5, warmup_epochs=3))
    assert got == pytest.approx([0.1, 0.4, 0.7, 1, 1, 0.5, 0.5, 0.25])


def test_warmup_then_constant():
    got = per_epoch(lr_sequence("none", warmup_epochs=2))
    assert got == pytest.approx([0.1, 0.55] + [1] * 6)


def test_warmup_then_cosine():
    got = per_epoch(lr_sequence("cosine", warmup_epochs=2))
    want = [0.1, 0.55] + [(1 + math.cos(math.pi * e / 6)) / 2 for e in range(6)]
    assert got == pytest.approx(want, abs=1e-9)


def test_warmup_plateau_ignores_warmup_losses():
    # the losses of the two warmup epochs (huge, then tiny) must not count
    losses = [9, 0.1, 5, 5, 3, 3, 3, 3]
    got = per_epoch(lr_sequence("plateau", losses=losses, plateau_patience=1, warmup_epochs=2))
    assert got == pytest.approx([0.1, 0.55, 1, 1, 1, 1, 1, 0.1])


def test_state_dict_resume_continues_sequence():
    for name, kw in [("onecycle", {"pct_start": 0.25}), ("multistep", {"milestones": (2, 5), "warmup_epochs": 1}),
                     ("plateau", {"plateau_patience": 1}), ("cosine", {})]:
        losses = [5, 4, 4, 4, 3, 3, 3, 3]
        full = lr_sequence(name, losses=losses, **kw)
        model, opt, sched = _setup(name, **kw)
        first = _run(model, opt, sched, 3, losses)
        saved_opt, saved_sched = opt.state_dict(), sched.state_dict()
        # resume: fresh objects, states loaded in either order
        model2, opt2, sched2 = _setup(name, **kw)
        sched2.load_state_dict(saved_sched)
        opt2.load_state_dict(saved_opt)
        rest = _run(model2, opt2, sched2, E - 3, losses, start=3)
        assert first + rest == pytest.approx(full, rel=1e-12), name
        assert len(set(full)) > 1


def test_state_dict_of_another_schedule():
    _, _, sched = _setup("step")
    _, _, other = _setup("cosine")
    with pytest.raises(UserError, match="step"):
        other.load_state_dict(sched.state_dict())


def test_errors():
    p = [nn.Parameter(torch.zeros(1))]
    # unknown names are TrainConfig.validate()'s to refuse, listing the valid ones; past it a name
    # outside the registries is a bug, and the builders raise KeyError
    with pytest.raises(UserError, match="adam, adamw, sgd"):
        make_config({"optimizer": "rmsprop"})
    with pytest.raises(KeyError, match="rmsprop"):
        build_optimizer(p, "rmsprop", 1e-3, 0.0)
    with pytest.raises(KeyError, match="linear"):
        build_schedule(build_optimizer(p, "sgd", 1e-3, 0.0), dataclasses.replace(make_config({}), scheduler="linear"), 1)
    # the rules on the settings are TrainConfig.validate()'s, checked before anything is built
    for lr in (0.0, -1e-3, float("nan"), float("inf")):
        with pytest.raises(UserError, match="--lr"):
            make_config({"optimizer": "adamw", "lr": lr})
    with pytest.raises(UserError, match="--nesterov"):
        make_config({"optimizer": "adamw", "nesterov": True})
    with pytest.raises(UserError, match="none, step, multistep, exponential, cosine, onecycle, plateau"):
        make_config({"scheduler": "linear", "epochs": 4})
    with pytest.raises(UserError, match="onecycle has its own warmup"):
        make_config({"scheduler": "onecycle", "epochs": 4, "warmup_epochs": 1})
    with pytest.raises(UserError, match="--warmup-epochs"):
        make_config({"scheduler": "step", "epochs": 4, "warmup_epochs": 4})
    with pytest.raises(UserError, match="--milestones"):
        make_config({"scheduler": "multistep", "epochs": 4, "milestones": (0, 2)})
    with pytest.raises(UserError, match="--gamma"):
        make_config({"scheduler": "exponential", "epochs": 4, "gamma": 1.5})
    opt = build_optimizer(p, "sgd", 1e-3, 0.0)
    with pytest.raises(UserError, match="onecycle needs at least 2 optimizer steps"):
        build_schedule(opt, make_config({"scheduler": "onecycle", "epochs": 1}), steps_per_epoch=1)


@pytest.mark.parametrize("nesterov", [False, True])
def test_sgd_settings_reach_the_optimizer(nesterov):
    opt = build_optimizer([nn.Parameter(torch.zeros(1))], "sgd", 0.01, 1e-4, momentum=0.8, nesterov=nesterov)
    g = opt.param_groups[0]
    assert isinstance(opt, torch.optim.SGD)
    assert (g["nesterov"], g["momentum"], g["weight_decay"], g["lr"]) == (nesterov, 0.8, 1e-4, 0.01)


def test_optimizer_kinds():
    p = [nn.Parameter(torch.zeros(1))]
    assert type(build_optimizer(p, "adam", 1e-3, 0.01)) is torch.optim.Adam
    assert type(build_optimizer(p, "adamw", 1e-3, 0.01)) is torch.optim.AdamW


@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
def test_frozen_backbone_untouched_then_trains_after_unfreezing(name):
    torch.manual_seed(0)
    model = build_model("resnet18", head=(8,), pretrained=False)
    # one optimizer over all parameters, with weight decay: frozen ones must not decay either
    opt = build_optimizer(model.parameters(), name, lr=1e-2, weight_decay=0.1)
    x, y = torch.randn(2, 3, 32, 32), torch.tensor([0, 1])

    def step():
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()

    set_frozen(model, True)
    backbone = {k: v.clone() for k, v in model.backbone.named_parameters()}
    head = {k: v.clone() for k, v in model.head.named_parameters()}
    step()
    step()
    assert all(torch.equal(v, backbone[k]) for k, v in model.backbone.named_parameters())
    assert all(p.grad is None for p in model.backbone.parameters())
    assert not any(torch.equal(v, head[k]) for k, v in model.head.named_parameters())
    set_frozen(model, False)
    step()
    changed = [not torch.equal(v, backbone[k]) for k, v in model.backbone.named_parameters()]
    assert all(changed)
