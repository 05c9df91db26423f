"""The linear probe of a benchmark protocol: one linear layer trained on cached features, as eva trains it.

    probe = fit_probe(train_f, train_y, val_f, val_y, ProbeSettings(), num_classes=4, seed=0)
    probe.val_score                             # balanced accuracy of the kept checkpoint on the validation rows
    balanced_accuracy(probe.predict(test_f), test_y)

eva's recipe, read from its source (github.com/kaiko-ai/eva: configs/vision/pathology/offline/classification/
breakhis.yaml, src/eva/core/models/modules/head.py) and the libraries' defaults it relies on:
- head torch.nn.Linear(F, C) (torch's default initialisation), unweighted cross-entropy;
- AdamW lr 3e-4; the config sets no weight decay, so it is torch's default, 0.01;
- HeadModule's default scheduler, torch.optim.lr_scheduler.ConstantLR (factor 1/3, total_iters 5), stepped
  once per epoch by Lightning: the first 5 epochs run at lr / 3;
- batches of 256, reshuffled every epoch, the last partial batch kept (Lightning's defaults);
- at most 12,500 optimizer steps; a validation pass after every epoch (Lightning's default), monitoring
  val/MulticlassAccuracy, which is torchmetrics' macro average: the balanced accuracy;
- ModelCheckpoint keeps the checkpoint whenever the monitored value is strictly higher; EarlyStopping
  stops after 500 validation checks (epochs) without a strictly higher value (min_delta 0);
- the reported figure is the validation balanced accuracy of the kept checkpoint.
The test side of a split never reaches fit_probe: nothing here can choose on it.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

WARMUP_EPOCHS, WARMUP_FACTOR = 5, 1 / 3  # torch ConstantLR's defaults (eva.HeadModule's scheduler)


@dataclass(frozen=True)
class ProbeSettings:
    steps: int = 12_500  # optimizer steps at most
    batch_size: int = 256  # images per step
    lr: float = 3e-4
    weight_decay: float = 0.01
    patience: int = 500  # epochs (validation checks) without a strictly better score before stopping; 0 off


@dataclass
class Probe:
    weight: torch.Tensor  # (C, F) float32 of the kept checkpoint
    bias: torch.Tensor  # (C,)
    val_score: float  # balanced accuracy of the kept checkpoint on the validation rows
    best_epoch: int  # epoch (1-based) of the kept checkpoint
    best_step: int  # optimizer steps taken when it was kept
    steps: int  # optimizer steps taken in all

    def predict(self, f: torch.Tensor) -> torch.Tensor:
        """(n,) int64 predicted classes of features f (n, F)."""
        return (f.float() @ self.weight.T + self.bias).argmax(1)


def balanced_accuracy(pred: torch.Tensor, y: torch.Tensor) -> float:
    """Mean over the classes present in y of the share of their images predicted right (sklearn's
    balanced_accuracy_score; torchmetrics' macro MulticlassAccuracy when every class is present)."""
    k = int(max(pred.max(), y.max())) + 1
    support = torch.bincount(y, minlength=k)
    hits = torch.bincount(y[pred == y], minlength=k)
    present = support > 0
    return float((hits[present] / support[present]).mean())


def _adamw(p: torch.Tensor, g: torch.Tensor, m: torch.Tensor, v: torch.Tensor, step: int, lr: torch.Tensor,
           wd: torch.Tensor, betas=(0.9, 0.999), eps: float = 1e-8) -> None:
    """One torch.optim.AdamW step of parameters p (G, ...) with gradients g, in place: torch's single-tensor
    update written out, with a learning rate and weight decay per leading index, lr and wd (G, 1, ...)
    (G probes at once; the optimizer's own bookkeeping would cost more than the probe's arithmetic)."""
    p.mul_(1 - lr * wd)
    m.lerp_(g, 1 - betas[0])
    v.mul_(betas[1]).addcmul_(g, g, value=1 - betas[1])
    denom = (v.sqrt() / math.sqrt(1 - betas[1] ** step)).add_(eps)
    p.sub_(m / denom * (lr / (1 - betas[0] ** step)))


def fit_probe(train_f: torch.Tensor, train_y: torch.Tensor, val_f: torch.Tensor, val_y: torch.Tensor,
              settings: ProbeSettings, num_classes: int, seed: int) -> Probe:
    """Train Linear(F, num_classes) on (train_f (n, F), train_y (n,)), validating on (val_f, val_y) after every
    epoch, and return the checkpoint with the best validation balanced accuracy (the module docstring's recipe).
    seed: the head's initialisation (torch's nn.Linear default) and the batch order."""
    return fit_probes(train_f, train_y, val_f, val_y, [settings], num_classes, seed)[0]


@torch.no_grad()
def fit_probes(train_f: torch.Tensor, train_y: torch.Tensor, val_f: torch.Tensor, val_y: torch.Tensor,
               grid: list[ProbeSettings], num_classes: int, seed: int) -> list[Probe]:
    """fit_probe for each of the settings in grid (which may differ in lr and weight_decay only), trained side
    by side: same initialisation and batch order (same seed), each stopped and selected on its own, so each
    result is what a run of that setting alone gives.
    The gradient of the mean cross-entropy is written out, (softmax - one-hot) / B: the same numbers as
    autograd through nn.functional.cross_entropy and torch.optim.AdamW (tests/test_eva.py)."""
    first = grid[0]
    if any((s.steps, s.batch_size, s.patience) != (first.steps, first.batch_size, first.patience) for s in grid):
        raise ValueError("the settings of one grid may differ in lr and weight_decay only")
    device, G = train_f.device, len(grid)
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    init = nn.Linear(train_f.shape[1], num_classes)
    w = init.weight.detach().to(device).repeat(G, 1, 1)  # (G, C, F)
    b = init.bias.detach().to(device).repeat(G, 1, 1)  # (G, 1, C)
    lr0 = torch.tensor([s.lr for s in grid], device=device).view(G, 1, 1)
    wd = torch.tensor([s.weight_decay for s in grid], device=device).view(G, 1, 1)
    state = [(torch.zeros_like(t), torch.zeros_like(t)) for t in (w, b)]
    x, xv = train_f.float(), val_f.float()
    n, step, epoch = len(x), 0, 0
    best = [Probe(w[i].clone(), b[i, 0].clone(), -1.0, 0, 0, 0) for i in range(G)]
    stale, running = [0] * G, [True] * G
    while step < first.steps and any(running):
        epoch += 1
        lr = lr0 * (WARMUP_FACTOR if epoch <= WARMUP_EPOCHS else 1.0)
        order = torch.randperm(n, generator=g).to(device)
        for s in range(0, n, first.batch_size):
            c = order[s:s + first.batch_size]
            xb = x[c]  # (B, F)
            p = torch.baddbmm(b, xb.expand(G, -1, -1), w.transpose(1, 2)).softmax(2)  # (G, B, C)
            p[:, torch.arange(len(c), device=device), train_y[c]] -= 1
            p /= len(c)  # d(mean cross-entropy)/d(logits)
            step += 1
            for t, grad, (m, v) in ((w, p.transpose(1, 2) @ xb, state[0]), (b, p.sum(1, keepdim=True), state[1])):
                _adamw(t, grad, m, v, step, lr, wd)
            if step >= first.steps:  # Lightning stops mid-epoch at max_steps, then validates once more
                break
        pred = torch.baddbmm(b, xv.expand(G, -1, -1), w.transpose(1, 2)).argmax(2)  # (G, n_val)
        for i in range(G):
            if not running[i]:
                continue
            score = balanced_accuracy(pred[i], val_y)
            best[i].steps = step
            if score > best[i].val_score:
                best[i] = Probe(w[i].clone(), b[i, 0].clone(), score, epoch, step, step)
                stale[i] = 0
            else:
                stale[i] += 1
                running[i] = not (first.patience and stale[i] >= first.patience)
    return best
