"""engine.train_step's GradScaler branch (fp16 on the CPU) and evaluate's TTA loss, against torch computed here."""
import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from breakhis.engine import evaluate, make_loss, train_step

LR = 0.1
INIT_SCALE = 2.0 ** 10  # GradScaler's starting loss scale; its backoff factor halves it after an overflow


def _fp16_on_cpu() -> bool:
    try:
        with torch.autocast("cpu", dtype=torch.float16):
            out = nn.Linear(2, 2)(torch.ones(1, 2))
        return out.dtype == torch.float16 and torch.amp.GradScaler("cpu").is_enabled()
    except (RuntimeError, TypeError, AssertionError):
        return False


fp16 = pytest.mark.skipif(not _fp16_on_cpu(), reason="this torch build cannot autocast fp16 (or GradScale) on the CPU")


def _setup():
    """A linear model (4 -> 2), plain SGD (no momentum: one step is lr * grad), a batch, an enabled scaler."""
    torch.manual_seed(0)
    model = nn.Linear(4, 2)
    opt = torch.optim.SGD(model.parameters(), lr=LR)
    x, y = torch.randn(3, 4), torch.tensor([0, 1, 1])  # (B, 4), (B,)
    return model, opt, x, y, torch.amp.GradScaler("cpu", init_scale=INIT_SCALE)


@fp16
def test_scaled_step_equals_an_sgd_step_with_the_unscaled_gradient():
    model, opt, x, y, scaler = _setup()
    ref = copy.deepcopy(model)
    # the reference: the same fp16 forward and fp32 loss, the gradient without any scaling, w - lr * g
    with torch.autocast("cpu", dtype=torch.float16):
        logits = ref(x)
    grads = torch.autograd.grad(F.cross_entropy(logits.float(), y), list(ref.parameters()))
    want = [p.detach() - LR * g for p, g in zip(ref.parameters(), grads)]
    loss, out = train_step(model, x, y, opt, F.cross_entropy, amp=torch.float16, scaler=scaler)
    assert out.dtype == torch.float16 and loss.dtype == torch.float32  # autocast forward, fp32 loss
    assert all(g.abs().sum() > 0 for g in grads)
    for p, r, w in zip(model.parameters(), ref.parameters(), want):
        assert not torch.equal(p.detach(), r.detach())  # the step was taken
        # the scale is a power of two, so scaling and unscaling the fp16 gradient is exact
        torch.testing.assert_close(p.detach(), w, rtol=1e-6, atol=1e-7)
    assert scaler.get_scale() == INIT_SCALE  # no overflow: the scale stays (it grows only after 2000 good steps)


@fp16
def test_step_with_inf_gradients_is_skipped_and_the_scale_halved():
    model, opt, x, y, scaler = _setup()
    before = [p.detach().clone() for p in model.parameters()]

    def huge(logits, y):
        # a finite loss whose scaled gradient (1e6 * 2**10 * ~0.5) overflows fp16 on its way back to the weights
        return F.cross_entropy(logits, y) * 1e6

    loss, _ = train_step(model, x, y, opt, huge, amp=torch.float16, scaler=scaler)
    assert torch.isfinite(loss)
    assert any(not torch.isfinite(p.grad).all() for p in model.parameters())  # the gradients did overflow
    assert all(torch.equal(p.detach(), b) for p, b in zip(model.parameters(), before))  # step skipped
    assert scaler.get_scale() == INIT_SCALE * 0.5
    # the next, finite step goes through at the reduced scale
    train_step(model, x, y, opt, F.cross_entropy, amp=torch.float16, scaler=scaler)
    assert all(not torch.equal(p.detach(), b) for p, b in zip(model.parameters(), before))
    assert scaler.get_scale() == INIT_SCALE * 0.5


# ---------------------------------------------------------------------- evaluate with TTA
def _conv_model():
    """A small model that is not dihedrally invariant: (B, 3, 6, 6) -> (B, 3) logits."""
    torch.manual_seed(1)
    return nn.Sequential(nn.Conv2d(3, 2, 3), nn.Flatten(), nn.Linear(2 * 4 * 4, 3)).eval()


def _views_by_hand(x):
    """The 8 dihedral views of a square batch (B, 3, S, S): the 4 rotations, each also mirrored left-right."""
    rotations = [torch.rot90(x, k, dims=(2, 3)) for k in range(4)]
    return rotations + [torch.flip(r, dims=(3,)) for r in rotations]


def _batches():
    torch.manual_seed(2)
    x = torch.randn(5, 3, 6, 6)
    y = torch.tensor([0, 2, 1, 2, 0])
    # two batches of unequal size, as a loader's last batch: (x, y, idx)
    return [(x[:3], y[:3], torch.arange(3)), (x[3:], y[3:], torch.arange(3, 5))]


def test_tta_loss_is_that_of_the_mean_of_the_eight_views_softmax():
    model, batches = _conv_model(), _batches()
    ev = evaluate(model, batches, nn.CrossEntropyLoss(), tta=True)
    with torch.no_grad():
        means = [torch.stack([F.softmax(model(v), dim=1) for v in _views_by_hand(x)]).mean(0) for x, _, _ in batches]
    y = torch.cat([b[1] for b in batches])
    p = torch.cat(means)  # (N, 3) the mean probability of each class over the 8 views
    want = F.nll_loss(torch.log(p), y)  # the mean over all images; evaluate weighs each batch by its size
    assert ev["loss"] == pytest.approx(float(want), rel=1e-5)
    torch.testing.assert_close(torch.from_numpy(ev["probs"]), p.double(), rtol=1e-5, atol=1e-7)
    assert ev["labels"].tolist() == y.tolist() and ev["idx"].tolist() == list(range(5))
    # not the plain loss of the identity view, nor the mean of the views' losses
    with torch.no_grad():
        plain = F.cross_entropy(torch.cat([model(x) for x, _, _ in batches]), y)
        per_view = torch.stack([F.cross_entropy(torch.cat([model(_views_by_hand(x)[k]) for x, _, _ in batches]), y)
                                for k in range(8)]).mean()
    assert evaluate(model, batches, nn.CrossEntropyLoss())["loss"] == pytest.approx(float(plain), rel=1e-5)
    assert abs(ev["loss"] - float(plain)) > 1e-3 and abs(ev["loss"] - float(per_view)) > 1e-3


def test_tta_loss_with_class_weights():
    # make_loss's weighted cross-entropy on the log of the mean probability: sum w_y * -log p_y / sum w_y
    model, (batch, _) = _conv_model(), _batches()
    x, y, _ = batch
    w = torch.tensor([0.5, 0.8, 2.0])
    ev = evaluate(model, [batch], make_loss(tuple(w.tolist()), 0.0, torch.device("cpu")), tta=True)
    with torch.no_grad():
        p = torch.stack([F.softmax(model(v), dim=1) for v in _views_by_hand(x)]).mean(0)
    want = (w[y] * -torch.log(p[torch.arange(len(y)), y])).sum() / w[y].sum()
    assert ev["loss"] == pytest.approx(float(want), rel=1e-5)
