"""The training config: one typed dataclass; the command-line flags are generated from it.

Precedence, everywhere: dataclass defaults < preset / config file / tune BASE < flags
(< a tune SPACE sample). `config.json` in every run is this dataclass, resolved.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import re
import sys
import typing
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from . import registry
from .errors import UserError

# old config keys -> new ones: old config.json files, presets and space files still load
RENAMED = {"split": "split_ratio"}
MAX_IMAGE_SIZE = 1024  # model input side, pixels
_DEVICE = re.compile(r"auto|cpu|cuda(:\d+)?|mps")


def _f(default, help: str, **kw):
    """A config field with its help text (unit or meaning)."""
    if isinstance(default, (list, tuple)):
        return field(default_factory=lambda d=tuple(default): d, metadata={"help": help, **kw})
    return field(default=default, metadata={"help": help, **kw})


@dataclass(frozen=True)
class TrainConfig:
    # --- data ---
    data: str = _f("data/BreaKHis_v1", "root of the BreaKHis tree (BreaKHis_v1, its parent, or the Kaggle mirror)")
    task: str = _f("binary", "binary (benign/malignant) or subtype (8 classes)", choices=("binary", "subtype"))
    magnification: str = _f("all", "40, 100, 200, 400 or all; applied after the patient split", choices=("all", "40", "100", "200", "400"))
    split_ratio: str = _f("60:10:30", "train:val:test percentages of images, split by patient", aliases=("--split",))
    split_seed: int = _f(0, "seed of the patient split (kept across --seeds unless --resplit)")
    group: str = _f("patient", "split unit: patient folder, or accession (slide ids that differ only in letter suffix)", choices=("patient", "accession"))
    fold: int = _f(0, "official fold 1..5 from Folds.csv / mkfold (0: use --split-ratio)")
    folds: str = _f("", "train one run per official fold, each as --fold N: 1-5, 1,2,3,4,5, 2-4 or 3 (the logbook shows them as one row)")
    val_fraction: float = _f(0.1, "--fold: fraction of the fold's training units moved to validation")
    split_file: str = _f("", "reuse a split manifest (split.json) instead of drawing one")
    skip_bad: bool = _f(False, "skip unreadable images (recorded in the manifest) instead of failing")
    near_duplicates: str = _f("link", "near-duplicate fields across patients (verified copies, docs/data.md): link their patients "
                              "on one side of the split, report them only, or off (not searched)", choices=("link", "report", "off"))
    # --- fast data path ---
    image_size: int = _f(224, "model input side, pixels")
    cache_size: str = _f("", "cached field size HxW in pixels (empty: chosen from --image-size, aspect kept)")
    cache_dir: str = _f("", "decode cache folder (empty: ~/.cache/breakhis)")
    device_cache_gb: float = _f(8.0, "keep the uint8 cache on the GPU when it fits in this many GiB, else stream from pinned memory")
    batch_size: int = _f(32, "images per training batch")
    drop_last: bool = _f(True, "drop the last partial training batch (fixed shapes for compile)")
    balanced_sampling: bool = _f(False, "draw training classes equally")
    augment: bool = _f(True, "training augmentation on the device (off: centre view, as in evaluation)")
    crop_scale: tuple[float, ...] = _f((0.35, 1.0), "random resized crop: area fraction range of the field")
    crop_ratio: tuple[float, ...] = _f((0.75, 1.3333), "random resized crop: aspect ratio range")
    dihedral: bool = _f(True, "random flips and 90-degree rotations (8 dihedral views)")
    color_jitter: float = _f(0.2, "brightness/contrast/saturation jitter strength (hue: a quarter of it); 0 off")
    stain_jitter: float = _f(0.05, "H&E stain jitter strength in HED space; 0 off")
    stain_norm: str = _f("none", "stain normalisation of every decoded field, before augmentation, training and evaluation: "
                         "none, macenko or reinhard (fitted on --stain-ref, else on a seeded sample of training images; "
                         "saved as stain.json in the run)", choices=("none", "macenko", "reinhard"))
    stain_ref: str = _f("", "reference field (PNG, JPEG, TIFF) --stain-norm is fitted on (empty: a sample of the training images)")
    # --- model ---
    backbone: str = _f("resnet152", "torchvision name (registry.BACKBONES) or timm:NAME (a timm model, or timm:hf-hub:ORG/REPO); see --list-backbones")
    pretrained: bool = _f(True, "start from the backbone's pretrained weights (torchvision: TORCH_HOME; timm: the Hugging Face cache)")
    weights: str = _f("", "backbone weights from a local .safetensors, .bin or .pth state dict")
    mean: tuple[float, ...] = _f((), "input normalisation mean per RGB channel (empty: the backbone's own; recorded in config.json)")
    std: tuple[float, ...] = _f((), "input normalisation std per RGB channel (empty: the backbone's own)")
    head: tuple[int, ...] = _f((1000,), "hidden sizes of the head, e.g. 1000,512,128; 'none' for one linear layer")
    dropout: tuple[float, ...] = _f((0.5, 0.5), "dropout rates, one before each linear layer of the head from the first on")
    freeze: bool = _f(False, "freeze the backbone (weights and BatchNorm statistics): only the head trains")
    unfreeze_at: int = _f(0, "epoch at which a frozen backbone starts training (0: never)")
    feature_cache: bool = _f(True, "with --freeze (no --unfreeze-at): compute the backbone's features once and train the head on them")
    feature_views: int = _f(0, "with --freeze: augmented views per training image kept in the feature cache (0: 4 with augmentation, 1 without)")
    # --- optimisation ---
    epochs: int = _f(60, "training epochs")
    optimizer: str = _f("adamw", "adam, adamw or sgd", choices=tuple(registry.OPTIMIZERS))
    lr: float = _f(1e-4, "learning rate (peak for onecycle)")
    weight_decay: float = _f(0.01, "weight decay")
    momentum: float = _f(0.9, "SGD momentum")
    nesterov: bool = _f(False, "SGD with Nesterov momentum")
    scheduler: str = _f("multistep", "none, step, multistep, exponential, cosine, onecycle or plateau", choices=tuple(registry.SCHEDULERS))
    step_size: int = _f(10, "step: epochs between decays")
    milestones: tuple[int, ...] = _f((10, 30, 50), "multistep: epochs at which lr is multiplied by gamma")
    gamma: float = _f(0.1, "decay factor of step, multistep and exponential")
    pct_start: float = _f(0.3, "onecycle: fraction of steps spent rising")
    plateau_patience: int = _f(5, "plateau: epochs without val-loss improvement before decaying")
    plateau_factor: float = _f(0.1, "plateau: decay factor")
    min_lr: float = _f(0.0, "cosine and plateau: lower bound of lr")
    warmup_epochs: int = _f(0, "linear warmup epochs before the scheduler takes over")
    class_weights: tuple[float, ...] = _f((0.5, 0.8), "cross-entropy class weights, one per class ('none' for equal)")
    label_smoothing: float = _f(0.0, "cross-entropy label smoothing")
    # --- loop ---
    select: str = _f("val_acc", "checkpoint selection metric", choices=registry.SELECT_METRICS)
    patience: int = _f(0, "stop after this many epochs without improvement of --select (0: off)")
    seed: int = _f(0, "seed of initialisation, sampling and augmentation")
    tensorboard: bool = _f(True, "write TensorBoard event files beside history.csv (tensorboard --logdir results/)")
    # --- benchmark protocol (docs/eva.md) ---
    protocol: str = _f("none", "eva: kaiko-ai eva's BreakHis linear probe (4 subtypes, its 14 validation patients), reproduced "
                       "and beside it the same probe on held-out patients; brings experiments/eva.py's preset protocol (docs/eva.md)", choices=("none", "eva"))
    probe_steps: int = _f(12500, "--protocol: linear-probe optimizer steps at most (eva: 12,500)")
    probe_lrs: tuple[float, ...] = _f((), "--protocol: learning rates the probe sweeps, each chosen on validation patients (empty: --lr)")
    probe_weight_decays: tuple[float, ...] = _f((), "--protocol: weight decays the probe sweeps with --probe-lrs (empty: --weight-decay)")
    probe_view: str = _f("both", "--protocol: the held-out rows' view of a field: centre (eva's centre crop), whole "
                         "(features of the left, centre and right squares averaged) or both", choices=("centre", "whole", "both"))
    # --- speed ---
    device: str = _f("auto", "auto, cpu, cuda or cuda:N")
    amp: str = _f("auto", "mixed precision: auto (bf16 if supported, else fp16; off on CPU), bf16, fp16 or off", choices=("auto", "bf16", "fp16", "off"))
    channels_last: bool = _f(True, "channels-last memory format")
    compile: bool = _f(False, "torch.compile the model")
    compile_mode: str = _f("default", "torch.compile mode", choices=("default", "reduce-overhead", "max-autotune"))
    workers: int = _f(0, "processes decoding the cache (0: one per core)")

    # ------------------------------------------------------------------
    @property
    def cached_features(self) -> bool:
        """Whether the head trains on backbone features computed once (a backbone that never trains)."""
        return self.freeze and not self.unfreeze_at and self.feature_cache

    @property
    def views(self) -> int:
        """Training views per image in the feature cache: one without augmentation (they would be equal)."""
        return (self.feature_views or 4) if self.augment else 1

    @property
    def num_classes(self) -> int:
        return 8 if self.task == "subtype" else 2

    def split_percentages(self) -> tuple[int, int, int]:
        """--split-ratio as three whole percentages (train, val, test) summing to 100."""
        return parse_split_ratio(self.split_ratio)

    def fold_list(self) -> tuple[int, ...]:
        """--folds as the official fold numbers, ascending; () without --folds."""
        return parse_folds(self.folds) if self.folds else ()

    def per_fold(self) -> list[TrainConfig]:
        """One config per fold of --folds, each exactly what --fold N makes (folds cleared); [self] without --folds."""
        if not self.folds:
            return [self]
        return [dataclasses.replace(self, fold=k, folds="") for k in self.fold_list()]

    def cache_hw(self) -> tuple[int, int] | None:
        """--cache-size as (H, W) pixels; None: chosen from --image-size."""
        return parse_hw(self.cache_size, "--cache-size") if self.cache_size else None

    def validate(self) -> TrainConfig:
        """Check every setting, registry names included, before any work; raise UserError in the user's words.
        (Long by design: one rule per setting, in field order; splitting it would scatter the one place.)

        This is the one place these rules live: the data pipeline, the model and optimizer
        builders and tune.py rely on a validated config and do not check again.
        """
        for key in CHOICE_FIELDS:  # registry names (backbone, optimizer, scheduler, select) included
            check_choice(key, getattr(self, key))
        problem = registry.backbone_problem(self.backbone)
        if problem:
            raise UserError(problem)
        self.split_percentages()
        self.cache_hw()
        _positive_finite("--lr", self.lr)
        _at_least("--epochs", self.epochs, 1)
        _at_least("--batch-size", self.batch_size, 1)
        _at_least("--image-size", self.image_size, 16)
        if self.image_size > MAX_IMAGE_SIZE:
            raise UserError(f"--image-size {self.image_size}: must be at most {MAX_IMAGE_SIZE} pixels (the fields are "
                            f"700x460; the whole archive's cache at {MAX_IMAGE_SIZE} already takes about 50 GB)")
        _at_least("--workers", self.workers, 0)
        _at_least("--patience", self.patience, 0)
        _at_least("--unfreeze-at", self.unfreeze_at, 0)
        _at_least("--feature-views", self.feature_views, 0)
        if self.feature_views and not self.cached_features:
            raise UserError(f"--feature-views {self.feature_views}: cached features need a backbone that never trains; "
                            f"add --freeze (without --unfreeze-at or --no-feature-cache), or drop --feature-views")
        for flag, values in (("--mean", self.mean), ("--std", self.std)):
            if values and (len(values) != 3 or not all(math.isfinite(v) for v in values)):
                raise UserError(f"{flag} {values}: give three numbers, one per RGB channel, e.g. 0.485,0.456,0.406")
        if self.std and min(self.std) <= 0:
            raise UserError(f"--std {self.std}: must be positive")
        _at_least("--plateau-patience", self.plateau_patience, 0)
        for flag, value in (("--weight-decay", self.weight_decay), ("--momentum", self.momentum),
                            ("--min-lr", self.min_lr), ("--device-cache-gb", self.device_cache_gb)):
            if not (math.isfinite(value) and value >= 0):
                raise UserError(f"{flag} {value}: must be zero or positive")
        if self.class_weights:
            if len(self.class_weights) != self.num_classes:
                raise UserError(f"--class-weights has {len(self.class_weights)} values; the {self.task} task has "
                                f"{self.num_classes} classes: give one positive weight per class, e.g. 0.5,0.8")
            if not all(math.isfinite(w) and w > 0 for w in self.class_weights):
                raise UserError(f"--class-weights {self.class_weights}: weights must be positive")
        if not 0 <= self.label_smoothing < 1:
            raise UserError(f"--label-smoothing {self.label_smoothing}: must lie in [0, 1)")
        # the head: [Dropout(d0)] Linear(F, h1) ReLU [Dropout(d1)] ... Linear(., classes)
        if len(self.dropout) > len(self.head) + 1:
            raise UserError(f"--dropout has {len(self.dropout)} rates but the head has only {len(self.head) + 1} linear "
                            f"layer(s) (--head {','.join(map(str, self.head)) or 'none'}): give at most one rate per linear layer")
        if any(not 0 <= d < 1 for d in self.dropout):
            raise UserError(f"--dropout {self.dropout}: rates must lie in [0, 1)")
        if any(h < 1 for h in self.head):
            raise UserError(f"--head {self.head}: hidden sizes must be positive")
        # augmentation
        if len(self.crop_scale) != 2 or not 0 < self.crop_scale[0] <= self.crop_scale[1] <= 1:
            raise UserError(f"--crop-scale {self.crop_scale}: give two area fractions lo,hi with 0 < lo <= hi <= 1")
        if len(self.crop_ratio) != 2 or not 0 < self.crop_ratio[0] <= self.crop_ratio[1]:
            raise UserError(f"--crop-ratio {self.crop_ratio}: give two aspect ratios lo,hi with 0 < lo <= hi")
        if not 0 <= self.color_jitter < 1:
            raise UserError(f"--color-jitter {self.color_jitter}: must lie in [0, 1) (0: off)")
        if not 0 <= self.stain_jitter < 1:
            raise UserError(f"--stain-jitter {self.stain_jitter}: must lie in [0, 1) (0: off)")
        if self.stain_ref and self.stain_norm == "none":
            raise UserError(f"--stain-ref {self.stain_ref}: a reference is for stain normalisation; add --stain-norm "
                            f"macenko or reinhard, or drop --stain-ref")
        # split
        if not 0 <= self.fold <= 5:
            raise UserError(f"--fold {self.fold}: official folds are 1..5 (0: use --split-ratio)")
        if not 0 <= self.val_fraction < 1:
            raise UserError(f"--val-fraction {self.val_fraction}: must lie in [0, 1)")
        if self.folds:
            parse_folds(self.folds)
            if self.fold:
                raise UserError(f"--folds {self.folds} with --fold {self.fold}: --folds already trains each fold it lists "
                                f"(as --fold N); give one of them")
            if self.split_file:
                raise UserError(f"--folds {self.folds} with --split-file: a split file fixes one split; drop one of them")
        # optimizer and schedule
        if self.nesterov and (self.optimizer != "sgd" or self.momentum <= 0):
            raise UserError(f"--nesterov needs --optimizer sgd with a positive --momentum "
                            f"(got {self.optimizer}, momentum {self.momentum})")
        if self.warmup_epochs < 0 or self.warmup_epochs >= self.epochs:
            raise UserError(f"--warmup-epochs {self.warmup_epochs}: must be at least 0 and less than --epochs {self.epochs}")
        if self.warmup_epochs and self.scheduler == "onecycle":
            raise UserError("--warmup-epochs with --scheduler onecycle: onecycle has its own warmup (--pct-start); "
                            "set --warmup-epochs 0")
        if self.scheduler in ("step", "multistep", "exponential") and not 0 < self.gamma <= 1:
            raise UserError(f"--gamma {self.gamma}: must lie in (0, 1]")
        if self.scheduler == "step" and self.step_size < 1:
            raise UserError(f"--step-size {self.step_size}: must be at least 1 epoch")
        if self.scheduler == "multistep" and (not self.milestones or any(m < 1 for m in self.milestones)):
            raise UserError(f"--milestones {tuple(self.milestones)}: give epochs >= 1, e.g. 10,30,50")
        if self.scheduler == "onecycle" and not 0 < self.pct_start < 1:
            raise UserError(f"--pct-start {self.pct_start}: must lie strictly between 0 and 1")
        if self.scheduler == "plateau" and not 0 < self.plateau_factor < 1:
            raise UserError(f"--plateau-factor {self.plateau_factor}: must lie strictly between 0 and 1")
        if self.protocol != "none":
            self._check_protocol()
        if not _DEVICE.fullmatch(self.device):
            raise UserError(f"--device {self.device!r}: use auto, cpu, cuda or cuda:N")
        return self

    def _check_protocol(self) -> None:
        """The settings a benchmark protocol runs with: a frozen backbone on cached features, a linear head,
        the protocol's own splits."""
        need = "--protocol eva trains a linear probe on cached features of a frozen backbone"
        if not self.cached_features:
            raise UserError(f"{need}: add --freeze (without --unfreeze-at or --no-feature-cache), or start from "
                            f"--preset eva:protocol")
        if self.head or self.dropout:
            raise UserError(f"{need}: give --head none --dropout none (the probe is one linear layer)")
        if self.augment:
            raise UserError(f"{need} on one fixed view per field: add --no-augment")
        if self.task not in ("binary", "subtype"):
            raise UserError(f"--task {self.task}: the protocol has subtype (eva's 4 classes) and binary")
        if self.fold or self.folds or self.split_file:
            raise UserError("--protocol eva makes its own splits (eva's patients; seeded accession splits): "
                            "drop --fold, --folds and --split-file")
        if self.group != "accession":
            raise UserError("--protocol eva: the held-out variant splits by accession; give --group accession")
        if self.stain_norm != "none":
            raise UserError("--protocol eva scores the fields as eva reads them: drop --stain-norm")
        _at_least("--probe-steps", self.probe_steps, 1)
        for lr in self.probe_lrs:
            _positive_finite("--probe-lrs", lr)
        if any(not (math.isfinite(w) and w >= 0) for w in self.probe_weight_decays):
            raise UserError(f"--probe-weight-decays {self.probe_weight_decays}: each must be zero or positive")

    def to_dict(self) -> dict[str, Any]:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items()}


def _positive_finite(flag: str, value: float) -> None:
    if not (math.isfinite(value) and value > 0):
        raise UserError(f"{flag} {value}: the learning rate must be positive and finite")



def _at_least(flag: str, value: int, least: int) -> None:
    if value < least:
        raise UserError(f"{flag} {value}: must be at least {least}" + (" pixels" if flag == "--image-size" else ""))


FIELDS = {f.name: f for f in fields(TrainConfig)}
CHOICE_FIELDS = tuple(k for k, f in FIELDS.items() if f.metadata.get("choices"))
_HINTS = typing.get_type_hints(TrainConfig)


def parse_split_ratio(text) -> tuple[int, int, int]:
    """'70:10:20' (or '70/10/20', or (70, 10, 20)) -> three whole percentages summing to 100."""
    text = text if isinstance(text, str) else ":".join(str(v) for v in text)
    try:
        r = tuple(int(p) for p in text.replace("/", ":").split(":"))
    except ValueError:
        r = ()
    if len(r) != 3 or sum(r) != 100 or min(r) < 0 or r[0] == 0 or r[2] == 0:
        raise UserError(f"--split-ratio {text!r}: give three whole percentages train:val:test summing to 100, "
                        f"e.g. 70:10:20 or 60:10:30")
    return r  # type: ignore[return-value]


def parse_folds(text: str) -> tuple[int, ...]:
    """'1-5', '1,2,3,4,5', '2-4', '1-2,5' or '3' -> the official fold numbers (1..5), ascending, each once."""
    out: list[int] = []
    try:
        for part in str(text).split(","):
            ends = [int(v) for v in part.split("-")]  # int() refuses '' ('1-', '-3') and words
            if len(ends) > 2:
                raise ValueError
            a, b = ends[0], ends[-1]
            if not 1 <= a <= b <= 5:
                raise ValueError
            out += range(a, b + 1)
    except ValueError:
        out = []
    if not out or len(set(out)) != len(out):
        raise UserError(f"--folds {text!r}: give official folds 1..5, each once, as a list or ascending ranges, "
                        f"e.g. 1-5, 1,2,3,4,5, 2-4 or 3")
    return tuple(sorted(out))


def parse_hw(text: str, flag: str) -> tuple[int, int]:
    """'256x389' -> (256, 389)."""
    try:
        h, w = (int(v) for v in text.lower().split("x"))
        if h > 0 and w > 0:
            return h, w
    except ValueError:
        pass
    raise UserError(f"{flag} {text!r}: give the size as HxW in pixels, e.g. 256x389")


def flag_name(key: str) -> str:
    return "--" + key.replace("_", "-")


_told: set[str] = set()


def renamed(settings: dict[str, Any], where: str = "") -> dict[str, Any]:
    """settings with old keys (RENAMED) under their new names; says so once per old key."""
    out = {}
    for k, v in settings.items():
        if k in RENAMED:
            if k not in _told:
                _told.add(k)
                print(f"note: setting {k!r} is now {RENAMED[k]!r}{f' ({where})' if where else ''}; "
                      f"the old name still works", file=sys.stderr)
            k = RENAMED[k]
        out[k] = v
    return out


def coerce(key: str, value: Any) -> Any:
    """Convert a value from a flag, a JSON file or a search space to the field's type."""
    key = RENAMED.get(key, key)
    if key not in FIELDS:
        raise UserError(f"unknown setting {key!r}; valid settings: {', '.join(FIELDS)}")
    hint = _HINTS[key]
    name = flag_name(key)
    try:
        if typing.get_origin(hint) is tuple:
            item = typing.get_args(hint)[0]
            if isinstance(value, str):
                value = [] if value.strip().lower() in ("none", "") else [v for v in value.split(",") if v.strip()]
            elif isinstance(value, (int, float)):
                value = [value]
            out = tuple(item(v) for v in value)
            if item is int and any(float(v) != int(float(v)) for v in value):
                raise ValueError
            return out
        if hint is bool:
            if isinstance(value, str):
                if value.lower() in ("1", "true", "yes", "on"):
                    return True
                if value.lower() in ("0", "false", "no", "off"):
                    return False
                raise ValueError
            return bool(value)
        if hint is int and isinstance(value, float) and value != int(value):
            raise ValueError
        value = hint(value)
    except (TypeError, ValueError):
        raise UserError(f"{name} {value!r}: expected {getattr(hint, '__name__', hint)}") from None
    return check_choice(key, value)


def check_choice(key: str, value: Any) -> Any:
    """value, if the field has a list of choices and value is one of them (or has none); else a UserError."""
    choices = FIELDS[key].metadata.get("choices")
    if choices and value not in choices:
        raise UserError(f"{flag_name(key)} {value!r}: choose one of {', '.join(choices)}")
    return value


def add_flags(parser: argparse.ArgumentParser) -> None:
    """One flag per config field; unset flags stay absent, so precedence stays with the caller."""
    group = parser.add_argument_group("training config (defaults < preset/config file < these flags)")
    for f in fields(TrainConfig):
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
        shown = ",".join(map(str, default)) if isinstance(default, tuple) else default
        help_ = f"{f.metadata['help']} (default: {shown if shown != '' else 'none'})"
        names = (flag_name(f.name), *f.metadata.get("aliases", ()))
        if _HINTS[f.name] is bool:
            group.add_argument(*names, dest=f.name, action=argparse.BooleanOptionalAction,
                               default=argparse.SUPPRESS, help=help_)
        else:
            group.add_argument(*names, dest=f.name, default=argparse.SUPPRESS, metavar="V", help=help_)


def overrides_from_args(ns: argparse.Namespace) -> dict[str, Any]:
    """The config fields that were given on the command line, converted."""
    return {k: coerce(k, v) for k, v in vars(ns).items() if k in FIELDS}


def make_config(*layers: dict[str, Any], base: TrainConfig | None = None) -> TrainConfig:
    """Apply override layers in order (later wins) to the defaults and validate."""
    cfg = base or TrainConfig()
    for layer in layers:
        cfg = dataclasses.replace(cfg, **{k: coerce(k, v) for k, v in renamed(layer).items()})
    return cfg.validate()


def load_config_file(path: str | Path) -> dict[str, Any]:
    """Settings from a config.json (a run's, or tune's best.json: its "config" entry if present)."""
    p = Path(path)
    if not p.is_file():
        raise UserError(f"config file {p} not found")
    try:
        d = json.loads(p.read_text())
    except json.JSONDecodeError as e:
        raise UserError(f"config file {p} is not valid JSON: {e}") from None
    if isinstance(d, dict) and isinstance(d.get("config"), dict):
        d = d["config"]
    if not isinstance(d, dict):
        raise UserError(f"config file {p}: expected a JSON object of settings")
    d = renamed({k: v for k, v in d.items() if not k.startswith("_")}, str(p))  # "_env" is not a setting
    for k in d:
        if k not in FIELDS:
            raise UserError(f"config file {p}: unknown setting {k!r}; valid settings: {', '.join(FIELDS)}")
    return d
