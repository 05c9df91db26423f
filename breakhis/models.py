"""Backbones, the classification head, freezing, and weight files.

The model is a torchvision backbone whose final classifier layer is replaced by nn.Identity, or a
timm model built with num_classes=0 (`--backbone timm:NAME`: its pooled features), followed by
our head. It outputs logits: two for the binary task, trained with cross-entropy.
The logbook's "2 -> sigmoid" output is the softmax of these two logits:
the probability of malignant is `logits.softmax(1)[:, 1]`.

    model = build_model("resnet152", num_classes=2, head=(1000,), dropout=(0.5, 0.5))
    # backbone (B, 2048) -> Dropout(0.5) Linear(2048, 1000) ReLU Dropout(0.5) Linear(1000, 2)
    build_model("timm:vit_tiny_patch16_224", image_size=64, pretrained=False)   # (B, 192) features

Each backbone expects its own input normalisation and size: `input_spec` gives them (ImageNet and
224 for torchvision; timm's pretrained_cfg, or registry.PATHOLOGY for hub models).
"""
from __future__ import annotations

import difflib
import re
import sys
import warnings
from pathlib import Path
from urllib.error import URLError

import timm
import torch
from safetensors.torch import load_file
from torch import nn
from torchvision.models import get_model, get_model_weights

from .config import TrainConfig
from .device import seed_everything
from .errors import UserError
from .registry import BACKBONES, IMAGENET, PATHOLOGY, TIMM

# Old DenseNet checkpoints (the files torchvision downloads) name layers 'norm.1' for 'norm1'.
_DENSENET_KEY = re.compile(r"^(.*denselayer\d+\.(?:norm|relu|conv))\.([12]\.(?:weight|bias|running_mean|running_var|num_batches_tracked))$")


class Classifier(nn.Module):
    """A backbone giving (B, F) features and a head giving (B, num_classes) logits."""

    def __init__(self, backbone: nn.Module, head: nn.Sequential):
        super().__init__()
        self.backbone = backbone
        self.head = head

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone(x))  # (B, 3, H, W) float -> (B, num_classes) logits


def _final_linear(backbone: nn.Module, path: str) -> nn.Linear:
    layer = backbone.get_submodule(path)
    linears = [m for m in layer.modules() if isinstance(m, nn.Linear)]
    return linears[-1]


def make_head(in_features: int, num_classes: int, head: tuple[int, ...], dropout: tuple[float, ...]) -> nn.Sequential:
    """[Dropout(d0)] Linear(F, h1) ReLU [Dropout(d1)] Linear(h1, h2) ReLU ... Linear(., num_classes).

    Dropout rate i sits before linear layer i; fewer rates than linear layers leave the last
    layers without dropout. The sizes and rates are those of a validated TrainConfig.
    """
    sizes = [in_features, *head, num_classes]
    if len(dropout) > len(sizes) - 1:
        raise ValueError(f"{len(dropout)} dropout rates for {len(sizes) - 1} linear layer(s)")
    layers: list[nn.Module] = []
    for i, (fan_in, fan_out) in enumerate(zip(sizes[:-1], sizes[1:])):
        if i < len(dropout):
            layers.append(nn.Dropout(dropout[i]))
        layers.append(nn.Linear(fan_in, fan_out))
        if i < len(sizes) - 2:
            layers.append(nn.ReLU(inplace=True))
    return nn.Sequential(*layers)


def _read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    if not path.is_file():
        raise UserError(f"--weights {path}: file not found; give a .safetensors, .bin or .pth state dict, or use --no-pretrained")
    try:
        if path.suffix == ".safetensors":
            state = load_file(str(path))
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # a corrupt or foreign file: the library's message says which
        raise UserError(f"--weights {path}: cannot read it as a state dict ({type(e).__name__}: {e})") from None
    # The torchvision reference scripts save {"model": state_dict, "optimizer": ...}.
    for key in ("model", "state_dict"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise UserError(f"--weights {path}: expected a state dict (names -> tensors)")
    return {_DENSENET_KEY.sub(r"\1\2", k): v for k, v in state.items()}


def mismatch(where: str, model: nn.Module, state: dict[str, torch.Tensor], skip: str = "") -> str:
    """A description of the first differences between a model's state dict and `state`, or ''."""
    own = {k: v for k, v in model.state_dict().items() if not (skip and k.startswith(skip))}
    given = {k: v for k, v in state.items() if not (skip and k.startswith(skip))}
    # Files saved before PyTorch 0.4.1 (many of torchvision's) lack BatchNorm's step counter;
    # load_state_dict fills it in.
    missing = [k for k in own if k not in given and not k.endswith(".num_batches_tracked")]
    extra = [k for k in given if k not in own]
    shapes = [f"{k} {tuple(given[k].shape)} vs {tuple(own[k].shape)}" for k in own
              if k in given and given[k].shape != own[k].shape]
    parts = [f"{label}: {', '.join(keys[:3])}{' ...' if len(keys) > 3 else ''}"
             for label, keys in (("missing", missing), ("unexpected", extra), ("shape (file vs model)", shapes)) if keys]
    return f"{where} do not fit ({'; '.join(parts)})" if parts else ""


def backbone_of(state: dict[str, torch.Tensor]) -> str | None:
    """The registry backbone whose tensors (names and shapes) a saved Classifier's state matches, if any.

    Builds each candidate on the meta device (no memory, no weights), so this costs a few seconds
    and is only asked after a mismatch."""
    given = {k.removeprefix("backbone."): tuple(v.shape) for k, v in state.items() if k.startswith("backbone.")}
    for name, classifier in BACKBONES.items():
        with torch.device("meta"):
            own = get_model(name, weights=None)
        keys = {k: tuple(v.shape) for k, v in own.state_dict().items() if not k.startswith(classifier + ".")}
        if {k: v for k, v in keys.items() if not k.endswith("num_batches_tracked")} == \
                {k: v for k, v in given.items() if not k.endswith("num_batches_tracked")}:
            return name
    return None


def _load_backbone(model: nn.Module, state: dict[str, torch.Tensor], classifier: str, where: str) -> None:
    """Load a torchvision state dict into the backbone; the original classifier's keys are ignored."""
    problem = mismatch(where, model, state, skip=classifier + ".")
    if problem:
        raise UserError(problem)
    model.load_state_dict({k: v for k, v in state.items() if not k.startswith(classifier + ".")}, strict=False)


def _download(name: str) -> dict[str, torch.Tensor]:
    """torchvision's DEFAULT ImageNet weights of `name`, from TORCH_HOME or the network."""
    weights = get_model_weights(name).DEFAULT
    try:
        return weights.get_state_dict(progress=True, check_hash=True)
    except (URLError, OSError, RuntimeError) as e:
        raise UserError(f"cannot fetch the pretrained {name} weights ({type(e).__name__}: {e}); give a local file with "
                        f"--weights PATH (.safetensors or .pth state dict of torchvision's {name}) or train from "
                        f"scratch with --no-pretrained") from None


# ---------------------------------------------------------------------- timm
def is_timm(backbone: str) -> bool:
    return backbone.startswith(TIMM)


def check_timm(backbone: str, pretrained: bool, weights: str) -> None:
    """What a timm backbone needs, checked before any data work (fit.preflight): a name timm knows
    (close matches listed otherwise), an architecture for hub names served by --weights, and, for
    pretrained weights without --weights, the weights themselves (fetched now into the Hugging Face
    cache, which the run then reads)."""
    name = backbone[len(TIMM):]
    hub = name.startswith("hf-hub:")
    if hub and (weights or not pretrained) and name not in PATHOLOGY:
        raise UserError(f"--backbone {backbone}{' with --weights' if weights else ' --no-pretrained'}: the "
                        f"architecture of {name} is not known offline; use --backbone timm:ARCH (the timm "
                        f"architecture its model card names, e.g. timm:vit_large_patch16_224), or one of "
                        f"{', '.join(PATHOLOGY)}")
    if not hub and not timm.is_model(name):
        close = difflib.get_close_matches(name, timm.list_models(), n=5, cutoff=0.6)
        raise UserError(f"--backbone {backbone}: timm has no model {name!r}"
                        + (f"; close matches: {', '.join('timm:' + c for c in close)}" if close else
                           "; see timm.list_models() or python train.py --list-backbones"))
    if pretrained and not weights:
        _create_timm(backbone, True)


def check_weights(backbone: str, weights: str, num_classes: int, head: tuple[int, ...], dropout: tuple[float, ...],
                  image_size: int = 0) -> None:
    """Whether a --weights file fits the model (UserError naming missing and unexpected keys), checked
    on the meta device: the file is read, the model takes no memory, nothing is copied."""
    with warnings.catch_warnings(), torch.device("meta"):
        warnings.simplefilter("ignore", UserWarning)  # "copying ... to a meta parameter is a no-op": the point
        build_model(backbone, num_classes, head, dropout, pretrained=False, weights=weights, image_size=image_size)


def _timm_layers(kwargs: dict) -> dict:
    """registry.PATHOLOGY kwargs with layer names ('SwiGLUPacked', 'SiLU') resolved to classes."""
    named = {"SwiGLUPacked": timm.layers.SwiGLUPacked, "SiLU": torch.nn.SiLU, "GELU": torch.nn.GELU}
    return {k: named.get(v, v) if isinstance(v, str) else v for k, v in kwargs.items()}


def _create_timm(backbone: str, pretrained: bool, image_size: int = 0) -> nn.Module:
    """timm.create_model(NAME, num_classes=0); image_size (0: the model's own) goes to models that
    take an input size (ViTs: their position embedding has one entry per patch)."""
    name = backbone[len(TIMM):]
    known = PATHOLOGY.get(name)
    if known and not pretrained:  # a hub model whose weights come from a file: its architecture, offline
        name, kwargs = known["arch"], _timm_layers(known["kwargs"])
    else:
        kwargs = {}
    try:
        if image_size:
            try:
                return timm.create_model(name, pretrained=pretrained, num_classes=0, **{**kwargs, "img_size": image_size})
            except TypeError:  # a convnet: any input size works, it takes none
                pass
        return timm.create_model(name, pretrained=pretrained, num_classes=0, **kwargs)
    except Exception as e:  # offline, gated, no such repository: the hub's message says which
        if not pretrained:
            raise
        first = str(e).splitlines()[0][:160] if str(e) else ""
        if name.startswith("hf-hub:"):
            repo = name.removeprefix("hf-hub:")
            raise UserError(f"--backbone {backbone}: cannot fetch its weights from the Hugging Face hub "
                            f"({type(e).__name__}: {first}); on a machine with access, accept the licence at "
                            f"https://huggingface.co/{repo}, run `huggingface-cli download {repo}` and pass the weights "
                            f"file with --weights FILE (pytorch_model.bin or model.safetensors)") from None
        raise UserError(f"--backbone {backbone}: cannot fetch its pretrained weights ({type(e).__name__}: {first}); "
                        f"give a local file with --weights FILE or train from scratch with --no-pretrained") from None


def input_spec(backbone: str, pretrained: bool = True) -> dict:
    """The input a backbone expects: {"size": pixels, "mean": (3,), "std": (3,)}.

    torchvision: ImageNet statistics at 224. timm: the model's pretrained_cfg (input_size, mean,
    std); hub models from registry.PATHOLOGY (no network needed). Built on the meta device."""
    if not is_timm(backbone):
        return {"size": 224, "mean": IMAGENET[0], "std": IMAGENET[1]}
    known = PATHOLOGY.get(backbone[len(TIMM):])
    if known:
        return {"size": known["size"], "mean": tuple(known["mean"]), "std": tuple(known["std"])}
    with torch.device("meta"):
        cfg = timm.create_model(backbone[len(TIMM):], pretrained=False, num_classes=0).pretrained_cfg
    return {"size": int(cfg.get("input_size", (3, 224, 224))[-1]), "mean": tuple(cfg.get("mean", IMAGENET[0])),
            "std": tuple(cfg.get("std", IMAGENET[1]))}


def _load_timm(model: nn.Module, state: dict[str, torch.Tensor], where: str) -> None:
    """Load a state dict of the timm model (its own key names; its classifier's keys ignored).

    The model's module's checkpoint_filter_fn, where timm has one, converts the file as timm's own
    loader would (e.g. a ViT's position embedding resampled to this --image-size)."""
    filt = getattr(sys.modules[type(model).__module__], "checkpoint_filter_fn", None)
    if filt is not None:
        try:
            state = filt(state, model)
        except Exception:  # a file the filter does not understand: the mismatch below names the keys
            pass
    classifier = model.pretrained_cfg.get("classifier") or "head"
    classifiers = (classifier,) if isinstance(classifier, str) else tuple(classifier)
    own = model.state_dict()
    state = {k: v for k, v in state.items() if not any(k == c or k.startswith(c + ".") for c in classifiers) or k in own}
    problem = mismatch(where, model, state)
    if problem:
        raise UserError(problem)
    model.load_state_dict(state, strict=False)


def build_model(backbone: str, num_classes: int = 2, head: tuple[int, ...] = (1000,),
                dropout: tuple[float, ...] = (0.5, 0.5), pretrained: bool = True, weights: str = "",
                image_size: int = 0) -> Classifier:
    """A torchvision or timm backbone with our head.

    image_size: the model input side in pixels, for timm models that are built for one (ViTs);
    0 or another backbone: ignored.

    `weights` (a local file) takes precedence over `pretrained` (torchvision's DEFAULT weights,
    cached in TORCH_HOME). The file holds either torchvision's state dict of the backbone
    (its own key names, the classifier may be present or not) or a whole Classifier's
    (keys 'backbone.*' and 'head.*', head included).
    """
    state = _read_state_dict(Path(weights)) if weights else None
    whole = state is not None and any(k.startswith("head.") for k in state) \
        and all(k.startswith(("backbone.", "head.")) for k in state)
    model, features = _backbone(backbone, pretrained, weights, None if whole else state, image_size)
    net = Classifier(model, make_head(features, num_classes, tuple(head), tuple(dropout)))
    return _load_whole(net, state, weights, backbone, head, num_classes) if whole else net


def _backbone(backbone: str, pretrained: bool, weights: str, state: dict | None, image_size: int) -> tuple[nn.Module, int]:
    """(the backbone giving (B, F) features, F): torchvision or timm, with state (a backbone's tensors from
    --weights), else pretrained weights, else its random initialisation."""
    if is_timm(backbone):
        model = _create_timm(backbone, pretrained and state is None and not weights, image_size)
        if state is not None:
            _load_timm(model, state, f"--weights {weights}: the tensors of this file and {backbone}")
        return model, model.num_features
    classifier = BACKBONES[backbone]  # a validated name (TrainConfig.validate); another is a bug: KeyError
    model = get_model(backbone, weights=None)
    if state is not None:
        _load_backbone(model, state, classifier, f"--weights {weights}: the tensors of this file and {backbone}")
    elif pretrained and not weights:
        _load_backbone(model, {_DENSENET_KEY.sub(r"\1\2", k): v for k, v in _download(backbone).items()},
                       classifier, f"torchvision's {backbone} weights")
    features = _final_linear(model, classifier).in_features
    model.set_submodule(classifier, nn.Identity())
    return model, features


_SHARED: dict[tuple, tuple[nn.Module, int, torch.Tensor]] = {}  # model_for(shared=True): per process


def model_for(cfg: TrainConfig, *, initial: bool = True, shared: bool = False) -> Classifier:
    """The model a run's config describes, the one place its settings become a model.

    initial: the model training starts from, seeded with cfg.seed (a random initialisation depends
    on it, and so does the feature cache's key), with cfg's pretrained weights or --weights file;
    otherwise the architecture alone (no download, no file read), for a run's checkpoint to be
    loaded into.
    shared (initial, for a backbone that never trains: cached features, no --weights file): the backbone
    is built once per process for each (backbone, pretrained, seed, image size) and the same module is
    given to every model asking for it (a tune worker runs many trials one after another); the head is
    built from the random state that backbone's build left, so its initial weights are those of an
    unshared model_for. Callers must not change the backbone (it is frozen)."""
    if initial and shared and not cfg.weights:
        key = (cfg.backbone, cfg.pretrained, cfg.seed, cfg.image_size)
        if key not in _SHARED:
            seed_everything(cfg.seed)
            if len(_SHARED) >= 2:  # a few backbones at a time: each can be hundreds of MB
                _SHARED.clear()
            _SHARED[key] = (*_backbone(cfg.backbone, cfg.pretrained, "", None, cfg.image_size), torch.get_rng_state())
        backbone, features, rng = _SHARED[key]
        seed_everything(cfg.seed)  # python and numpy as model_for leaves them; torch as the backbone's build left it
        torch.set_rng_state(rng)
        return Classifier(backbone, make_head(features, cfg.num_classes, tuple(cfg.head), tuple(cfg.dropout)))
    if initial:
        seed_everything(cfg.seed)
    return build_model(cfg.backbone, cfg.num_classes, cfg.head, cfg.dropout, pretrained=cfg.pretrained and initial,
                       weights=cfg.weights if initial else "", image_size=cfg.image_size)


def _load_whole(net: Classifier, state: dict, weights: str, backbone: str, head, num_classes: int) -> Classifier:
    """Load a whole saved Classifier (keys 'backbone.*' and 'head.*') into net."""
    problem = mismatch(f"--weights {weights}: the tensors of this saved model and a {backbone} with head "
                       f"{tuple(head)} and {num_classes} classes", net, state)
    if problem:
        raise UserError(problem)
    net.load_state_dict(state)
    return net


def set_frozen(model: Classifier, frozen: bool) -> None:
    """Freeze (no gradients) or unfreeze the backbone's parameters; the head always trains.

    The optimizer may be built over all parameters: frozen ones get no .grad and are skipped.
    """
    for p in model.backbone.parameters():
        p.requires_grad_(not frozen)


def is_frozen(model: Classifier) -> bool:
    return not any(p.requires_grad for p in model.backbone.parameters())


def train_mode(model: Classifier) -> None:
    """model.train(), except that a frozen backbone stays in eval mode as a whole.

    Its BatchNorm running statistics stay untouched, and its own dropout and stochastic depth
    are off, so a frozen backbone is a fixed function of the image.
    """
    model.train()
    if is_frozen(model):
        model.backbone.eval()


def portable_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """model.state_dict() as safetensors can store it: on the CPU, contiguous, no shared storage.

    Channels-last weights are not contiguous, and safetensors refuses them (and tensors sharing
    memory); this copies each tensor. Keys are those of the uncompiled model.
    """
    # A fresh contiguous CPU copy of every tensor: never a view of the live parameter.
    return {k.removeprefix("_orig_mod."): v.detach().to("cpu", memory_format=torch.contiguous_format, copy=True)
            for k, v in model.state_dict().items()}
