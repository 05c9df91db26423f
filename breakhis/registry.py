"""The names a setting may take: backbones, optimizers, schedulers, and the per-epoch metrics.

Plain dicts of plain data, with no torch import, so that `TrainConfig.validate()` can refuse an
unknown name in a fraction of a second, before torch (about 3 s to import) or any data is touched.
models.py and optim.py build from these tables; nothing else lists the names.
"""
from __future__ import annotations

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

# optimizer name -> torch.optim class. Adam's weight decay is the classic L2 term added to the
# gradient; AdamW's is decoupled (applied to the weights). Momentum and Nesterov apply to SGD.
OPTIMIZERS: dict[str, str] = {"adam": "Adam", "adamw": "AdamW", "sgd": "SGD"}

# scheduler name -> when it steps: per optimizer step ("batch"), per epoch, on the validation
# loss ("metric"), or never. optim.Schedule applies the rule; nothing else steps a scheduler.
SCHEDULERS: dict[str, str] = {
    "none": "never",
    "step": "epoch",
    "multistep": "epoch",
    "exponential": "epoch",
    "cosine": "epoch",
    "onecycle": "batch",
    "plateau": "metric",
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


def unknown(kind: str, name: str, valid) -> str:
    """The one-line message for a name that is not in a registry."""
    return f"unknown {kind} {name!r}; choose one of {', '.join(valid)}"
