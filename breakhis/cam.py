"""Grad-CAM: where the model looks when it decides (Selvaraju et al., 2017).

    python evaluate.py results/<run> --cam 8     # 8 test images, the most confident errors first

The heat map is taken at the backbone's last convolutional feature map, found generically:
the last module, in the order modules finish their forward pass, that holds an nn.Conv2d
and returns a 4-D tensor. That is `layer4` of a ResNet and `features` of a DenseNet,
EfficientNet, VGG, AlexNet or ConvNeXt; pooling and LayerNorm modules after it hold no
convolution, so they are passed over.

timm backbones: Grad-CAM is offered where forward_features gives a spatial (B, C, h, w) map
(ResNets, ConvNeXts, EfficientNets...). Vision transformers (ViT, DeiT, and the pathology
foundation models UNI, Virchow2, H-optimus-0, Prov-GigaPath) give (B, tokens, D) and Swin gives
channels-last maps: their only convolution is the patch embedding, before any attention, so a
map there would explain nothing; they are refused with a message.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .augment import MEAN, STD
from .data.dataset import class_names
from .errors import UserError
from .io import atomic_path
from .loader import DeviceImages, Loader


def target_layer(model: nn.Module, x: torch.Tensor) -> nn.Module:
    """The last convolution-bearing module with a 4-D output during model(x)."""
    candidates = [m for m in model.modules() if any(isinstance(c, nn.Conv2d) for c in m.modules())]
    finished: list[nn.Module] = []

    def hook(module, inputs, output):
        if isinstance(output, torch.Tensor) and output.dim() == 4:
            finished.append(module)

    handles = [m.register_forward_hook(hook) for m in candidates]
    try:
        with torch.no_grad():
            model(x[:1])
    finally:
        for h in handles:
            h.remove()
    if not finished:
        raise ValueError(f"{type(model).__name__} has no convolutional layer with a 4-D output for Grad-CAM")
    return finished[-1]


def grad_cam(model: nn.Module, x: torch.Tensor, target_class, layer: nn.Module | None = None) -> torch.Tensor:
    """Grad-CAM heat maps (B, h, w) in [0, 1] at the feature map of `layer` (default: target_layer).

    x: (B, 3, H, W) float input as the model takes it; target_class: an int or (B,) class indices.
    Map = ReLU(sum over channels of (mean gradient of the class logit) * activation), divided by
    its maximum per image (an all-zero map stays zero).
    """
    was_training = model.training
    model.eval()
    layer = layer or target_layer(model, x)
    saved: dict[str, torch.Tensor] = {}

    def hook(module, inputs, output):
        # clone: a later in-place op (DenseNet's F.relu(features, inplace=True)) must not alter it
        saved["act"] = output.detach().clone()
        output.register_hook(lambda g: saved.__setitem__("grad", g.detach()))

    handle = layer.register_forward_hook(hook)
    try:
        with torch.enable_grad():
            # requires_grad on the input: activations of a frozen backbone still get gradients
            logits = model(x.detach().clone().requires_grad_(True)).float()  # (B, C)
            target = torch.as_tensor(target_class, device=logits.device).long().expand(logits.shape[0])
            logits.gather(1, target[:, None]).sum().backward()
    finally:
        handle.remove()
        model.train(was_training)
    act, grad = saved["act"].float(), saved["grad"].float()  # (B, K, h, w)
    weights = grad.mean(dim=(2, 3), keepdim=True)  # (B, K, 1, 1)
    cam = F.relu((weights * act).sum(1))  # (B, h, w)
    peak = cam.amax(dim=(1, 2), keepdim=True)
    return torch.where(peak > 0, cam / peak.clamp_min(1e-12), torch.zeros_like(cam))


def choose(probs: np.ndarray, labels: np.ndarray, n: int) -> np.ndarray:
    """Positions of n images: the most confident errors first, then the most confident correct ones."""
    pred, conf = probs.argmax(1), probs.max(1)
    wrong = pred != labels
    # sort keys: errors before correct, then confidence descending; stable, so ties keep input order
    order = np.lexsort((-conf, ~wrong))
    return order[:n]


def spatial(model: nn.Module, x: torch.Tensor) -> bool:
    """Whether the backbone has a spatial feature map for Grad-CAM: always for torchvision's; for a
    timm model, whether forward_features(x) is (B, C, h, w) with C its feature width."""
    backbone = getattr(model, "backbone", model)
    if not hasattr(backbone, "forward_features") or not hasattr(backbone, "num_features"):
        return True
    with torch.no_grad():
        f = backbone.forward_features(x[:1])
    return f.dim() == 4 and f.shape[1] == backbone.num_features


def check_spatial(model: nn.Module, x: torch.Tensor, backbone: str) -> None:
    """A UserError unless the model has a spatial feature map for Grad-CAM (see spatial); x (B, 3, S, S)."""
    if not spatial(model, x):
        raise UserError(f"--cam: {backbone} has no spatial feature map (a transformer: its features are tokens), "
                        f"so Grad-CAM is not offered for it; it is for convolutional backbones")


def _view(x: torch.Tensor, mean_rgb=MEAN, std_rgb=STD) -> np.ndarray:
    """(3, S, S) normalised input -> (S, S, 3) RGB in [0, 1]."""
    mean = torch.tensor(mean_rgb, device=x.device).view(3, 1, 1)
    std = torch.tensor(std_rgb, device=x.device).view(3, 1, 1)
    return (x.float() * std + mean).clamp(0, 1).permute(1, 2, 0).cpu().numpy()


def save_cams(run, ev: dict, part: str, out_folder: str | Path, n: int) -> list[Path]:
    """Grad-CAM overlays of n images of one evaluated partition of a run (predict.TrainedRun), as PNG
    files in out_folder, drawn with a fresh copy of its checkpoint (an exported program has no gradients).

    ev: run.predict(part) ("probs" (N, C), "labels" (N,), "idx" (N,) cache positions), in the order
    of run.data.parts[part]. The class explained is the predicted one.
    Files: cam-01-error-<image name>.png, ... in the order chosen (errors first).
    """
    probs, labels, idx = np.asarray(ev["probs"]), np.asarray(ev["labels"]), np.asarray(ev["idx"])
    if len(idx) == 0:
        raise UserError("--cam: the evaluated partition has no images")
    picked = choose(probs, labels, n)
    if not len(picked):  # --cam 0: nothing asked for
        return []
    names = [run.data.parts[part][int(i)].path for i in picked]
    return draw_cams(run.checkpoint(), run.images, idx[picked], probs[picked], labels[picked], names, run.cfg,
                     out_folder)


def draw_cams(model: nn.Module, images: DeviceImages, rows, probs: np.ndarray, labels: np.ndarray | None,
              names: list[str], cfg, out_folder: str | Path) -> list[Path]:
    """One Grad-CAM overlay PNG per image, in the order given, into out_folder.

    rows (K,): positions in `images`, shown through the run's evaluation loader (Loader.for_run);
    probs (K, C): the predictions to explain (the predicted class is explained); labels (K,) the
    true classes, or None for unlabelled images (then the title gives the prediction only and the
    files are cam-01-<predicted class>-<stem>.png instead of cam-01-<error|correct>-<stem>.png);
    names (K,): the image paths shown in the titles, their stems in the file names.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    class_of = class_names(cfg.task)
    rows, probs = np.asarray(rows), np.asarray(probs)
    y = np.zeros(len(rows), np.int64) if labels is None else np.asarray(labels)
    mean, std = cfg.mean or MEAN, cfg.std or STD
    # the run's own evaluation view, in float32 and channels-first for the overlays
    loader = Loader.for_run(images, rows, y, dataclasses.replace(cfg, batch_size=16, channels_last=False),
                            train=False, dtype=torch.float32)
    model = model.float()
    check_spatial(model, next(iter(loader))[0], cfg.backbone)
    out_folder, written = Path(out_folder), []
    for x, _, _ in loader:  # in order: batch rows follow `rows`
        ks = range(len(written), len(written) + len(x))
        pred = torch.as_tensor(probs[list(ks)].argmax(1), device=x.device)
        heat = grad_cam(model, x, pred)[:, None]  # (B, 1, h, w)
        heat = F.interpolate(heat, size=x.shape[-2:], mode="bilinear", align_corners=False)[:, 0].cpu().numpy()
        for b, j in enumerate(ks):
            p, c = probs[j], int(probs[j].argmax())
            view = _view(x[b], mean, std)
            fig = Figure(figsize=(7.5, 4.2), dpi=110, layout="constrained")
            FigureCanvasAgg(fig)
            left, right = fig.subplots(1, 2)
            left.imshow(view)
            right.imshow(view)
            right.imshow(heat[b], cmap="jet", alpha=0.45, vmin=0, vmax=1)
            for ax in (left, right):
                ax.set_axis_off()
            left.set_title("evaluation view", fontsize=9)
            right.set_title(f"Grad-CAM of '{class_of[c]}'", fontsize=9)
            if labels is None:
                kind, what = class_of[c], f"predicted {class_of[c]} (p={p[c]:.3f}), no label"
            else:
                t = int(y[j])
                kind = "error" if c != t else "correct"
                what = (f"label {class_of[t]}, predicted {class_of[c]} (p={p[c]:.3f}"
                        + (f", p_{class_of[t]}={p[t]:.3f}" if c != t else "") + f"): {kind}")
            fig.suptitle(f"{names[j]}\n{what}", fontsize=8)
            path = out_folder / f"cam-{j + 1:02d}-{kind}-{Path(names[j]).stem}.png"
            with atomic_path(path) as tmp:
                fig.savefig(tmp, format="png")
            written.append(path)
    return written
