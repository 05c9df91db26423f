"""The names a setting may take: backbones, optimizers, schedulers, and the per-epoch metrics.

Plain dicts of plain data (a scheduler's factory is a torch class name and a function giving its
keyword arguments), with no torch import, so that `TrainConfig.validate()` can refuse an
unknown name in a fraction of a second, before torch (about 3 s to import) or any data is touched.
models.py and optim.py build from these tables; nothing else lists the names.
"""
from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

# backbone name -> dotted path of the final classifier layer that our head replaces. The layers
# before it stay in the backbone: VGG and AlexNet keep their two 4096-wide fully connected layers
# (features are 4096), ConvNeXt keeps its LayerNorm + Flatten. EfficientNet's classifier is
# Dropout + Linear: both go, so our head's dropout is the only one.
BACKBONES: dict[str, str] = {
    **{f"resnet{n}": "fc" for n in (18, 34, 50, 101, 152)},
    **{f"efficientnet_b{i}": "classifier" for i in range(8)},
    **{f"densenet{n}": "classifier" for n in (121, 169, 201)},
    **{f"vgg{n}{bn}": "classifier.6" for n in (11, 13, 16, 19) for bn in ("", "_bn")},
    "alexnet": "classifier.6",
    "convnext_tiny": "classifier.2",
}

# `--backbone timm:NAME`: any timm model as the feature extractor (timm.create_model(NAME,
# num_classes=0)). NAME is a timm registry name (checked against timm's list after the imports, in
# fit.preflight) or a Hugging Face hub name `hf-hub:ORG/REPO`. Here only the syntax is checked.
TIMM = "timm:"

# timm names the tests build (random init, CPU): known to train, evaluate, export. Name -> note.
TIMM_TESTED: dict[str, str] = {
    "vit_tiny_patch16_224": "ViT-Ti/16, 5.5 M parameters; any --image-size divisible by 16 (no Grad-CAM: tokens)",
    "convnext_atto": "ConvNeXt-Atto, 3.4 M parameters; Grad-CAM at its last stage",
    "resnet18": "timm's ResNet-18 (its own weights: resnet18.a1_in1k)",
    "efficientnet_b0": "timm's EfficientNet-B0",
    "vit_small_patch16_224": "ViT-S/16, 22 M parameters",
    "convnext_tiny": "ConvNeXt-T, 28 M parameters",
}

# Pathology foundation models published for timm on the Hugging Face hub. Most are gated (accept the
# licence on the model page, then download with a token), so a machine without access passes the
# downloaded file with --weights; "arch"/"kwargs" rebuild the architecture offline for that, and
# "mean"/"std"/"size" are the inputs the model card asks for. kwargs values naming timm layers are
# strings, resolved in models.py (this module stays torch-free). "features": width of the pooled
# output timm gives with num_classes=0 (the class token; Virchow2's card concatenates the mean
# patch token as well, which this toolkit does not).
IMAGENET = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
PATHOLOGY: dict[str, dict] = {
    "hf-hub:MahmoodLab/UNI": {
        "arch": "vit_large_patch16_224", "kwargs": {"init_values": 1e-5, "dynamic_img_size": True},
        "mean": IMAGENET[0], "std": IMAGENET[1], "size": 224, "features": 1024,
        "licence": "CC-BY-NC-ND-4.0, gated: accept the terms on huggingface.co/MahmoodLab/UNI"},
    "hf-hub:paige-ai/Virchow2": {
        "arch": "vit_huge_patch14_224",
        "kwargs": {"img_size": 224, "init_values": 1e-5, "mlp_ratio": 5.3375, "reg_tokens": 4,
                   "mlp_layer": "SwiGLUPacked", "act_layer": "SiLU"},
        "mean": IMAGENET[0], "std": IMAGENET[1], "size": 224, "features": 1280,
        "licence": "CC-BY-NC-ND-4.0, gated: accept the terms on huggingface.co/paige-ai/Virchow2"},
    "hf-hub:bioptimus/H-optimus-0": {
        "arch": "vit_giant_patch14_reg4_dinov2", "kwargs": {"img_size": 224, "init_values": 1e-5,
                                                            "dynamic_img_size": False},
        "mean": (0.707223, 0.578729, 0.703617), "std": (0.211883, 0.230117, 0.177517), "size": 224,
        "features": 1536, "licence": "Apache-2.0 (huggingface.co/bioptimus/H-optimus-0)"},
    "hf-hub:prov-gigapath/prov-gigapath": {
        "arch": "vit_giant_patch14_dinov2", "kwargs": {"img_size": 224, "patch_size": 16, "init_values": 1e-5,
                                                       "mlp_ratio": 5.33334},
        "mean": IMAGENET[0], "std": IMAGENET[1], "size": 224, "features": 1536,
        "licence": "Apache-2.0, gated: accept the terms on huggingface.co/prov-gigapath/prov-gigapath"},
}
# Named in the literature but not timm models: listed by --list-backbones with the reason.
NOT_TIMM: dict[str, str] = {
    "owkin/phikon": "Phikon (ViT-B/16, iBOT): a Hugging Face transformers model, not a timm one; not supported",
    "owkin/phikon-v2": "Phikon-v2 (ViT-L/16, DINOv2): a transformers model; not supported",
}

# optimizer name -> torch.optim class. Adam's weight decay is the classic L2 term added to the
# gradient; AdamW's is decoupled (applied to the weights). Momentum and Nesterov apply to SGD.
OPTIMIZERS: dict[str, str] = {"adam": "Adam", "adamw": "AdamW", "sgd": "SGD"}


class Scheduler(NamedTuple):
    """A SCHEDULERS entry: when the scheduler steps, and how optim.build_schedule builds it.

    The factory is data, not a torch call: `cls` names a torch.optim.lr_scheduler class (as
    OPTIMIZERS names torch.optim classes) and `kwargs(cfg, total_steps, lrs)` gives its keyword
    arguments from a validated TrainConfig, the run's optimizer steps (epochs x batches per epoch)
    and the optimizer's lr per param group. So one entry holds everything about a name (its
    stepping rule, its class, its settings) with no second table to keep in step, and importing
    this module, or validating a config, still imports no torch.
    """

    when: str  # "batch" (after each optimizer step), "epoch", "metric" (on the validation loss) or "never"
    cls: str = ""  # torch.optim.lr_scheduler class name; "" for none (constant lr)
    kwargs: Callable[[Any, int, list[float]], dict[str, Any]] = lambda cfg, total_steps, lrs: {}
    min_steps: int = 0  # fewest optimizer steps the class accepts (OneCycleLR divides by total_steps - 1)


# scheduler name -> Scheduler. optim.Schedule applies the stepping rule; nothing else steps a scheduler.
# onecycle: max_lr is the optimizer's lr (torch defaults: start at max_lr/25, end at max_lr/25/1e4,
# cosine, momentum cycled); cosine runs from lr to min_lr over the epochs after warmup.
SCHEDULERS: dict[str, Scheduler] = {
    "none": Scheduler("never"),
    "step": Scheduler("epoch", "StepLR", lambda cfg, total_steps, lrs: {"step_size": cfg.step_size, "gamma": cfg.gamma}),
    "multistep": Scheduler("epoch", "MultiStepLR",
                           lambda cfg, total_steps, lrs: {"milestones": sorted(cfg.milestones), "gamma": cfg.gamma}),
    "exponential": Scheduler("epoch", "ExponentialLR", lambda cfg, total_steps, lrs: {"gamma": cfg.gamma}),
    "cosine": Scheduler("epoch", "CosineAnnealingLR",
                        lambda cfg, total_steps, lrs: {"T_max": cfg.epochs - cfg.warmup_epochs, "eta_min": cfg.min_lr}),
    "onecycle": Scheduler("batch", "OneCycleLR",
                          lambda cfg, total_steps, lrs: {"max_lr": lrs, "total_steps": total_steps, "pct_start": cfg.pct_start},
                          min_steps=2),
    "plateau": Scheduler("metric", "ReduceLROnPlateau",
                         lambda cfg, total_steps, lrs: {"mode": "min", "factor": cfg.plateau_factor,
                                                        "patience": cfg.plateau_patience, "min_lr": cfg.min_lr}),
}

# per-epoch figure (a history.csv column) -> the better direction. The val_* ones can select the
# checkpoint (--select); all of them can drive a search (tune.py --metric).
EPOCH_METRICS: dict[str, str] = {
    "val_acc": "max",
    "val_loss": "min",
    "val_recall": "max",
    "val_auroc": "max",
    "val_f1": "max",
    "train_acc": "max",
    "train_loss": "min",
}
SELECT_METRICS: tuple[str, ...] = tuple(k for k in EPOCH_METRICS if k.startswith("val_"))


def backbone_problem(name: str) -> str:
    """'' when `name` is a torchvision registry name or a well-formed timm:NAME; else the message."""
    if name in BACKBONES:
        return ""
    if name.startswith(TIMM):
        rest = name[len(TIMM):]
        if not rest or rest != rest.strip() or (rest.startswith("hf-hub:") and "/" not in rest):
            return (f"--backbone {name!r}: give timm:NAME with a timm model name (timm:vit_small_patch16_224) "
                    f"or a hub name (timm:hf-hub:MahmoodLab/UNI)")
        return ""
    return (f"--backbone {name!r}: choose one of {', '.join(BACKBONES)}, or timm:NAME for a timm model "
            f"(python train.py --list-backbones)")


def unknown(kind: str, name: str, valid) -> str:
    """The one-line message for a name that is not in a registry."""
    return f"unknown {kind} {name!r}; choose one of {', '.join(valid)}"
