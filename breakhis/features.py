"""Frozen backbone features computed once; the head trains on them.

    head, train = part_batches(model, prep, "train", cfg, device, images)   # the head, a FeatureLoader
    for epoch in ...: train.set_epoch(epoch); train_one_epoch(head, train, ...)
    feats = run_features(model.backbone, prep, cfg, device, amp, images)   # {"train": (K, n, F), "val": (n, F)}

With --freeze (and no --unfreeze-at), the backbone is a fixed function of the image (eval mode,
no gradients), so its pooled features (B, F) are computed once and a training epoch becomes a few
small matrix products through the head. What users see (where the files live, what makes a new
one, the views and the approximation with augmentation): docs/training.md.

Stored as `<cache dir>/features/<decode cache folder>-<part>-<key>.npy`, float16 (half the bytes;
the relative rounding, 2^-11, is far below what separates the classes), read memory-mapped.
feature_key hashes everything the features depend on. Training view v of K is the per-sample
augmentation the run's loader draws at epoch v + 1 (epoch e reads view (e - 1) mod K); the order
of the images in an epoch is the loader's own (same seed, same permutation) and the head's
dropout draws from the same global generator, so without augmentation a cached run equals a run
through the frozen backbone up to float16 rounding (tests/test_features.py).
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import torch

from .augment import Augment, tta_views
from .config import TrainConfig
from .data.prepare import Prepared
from .device import amp_dtype, autocast
from .io import atomic_path, no_space, sha256_of
from .loader import DeviceImages, Loader, epoch_generator, epoch_order
from .models import Classifier
from .stain import StainParams

FORMAT_VERSION = 1
PASS_BATCH = 64  # images per forward pass of the one-time feature computation


def feature_key(prep: Prepared, cfg: TrainConfig, part: str, amp: torch.dtype | None, tta: bool = False,
                stain: StainParams | None = None, position: float = 0.5) -> str:
    """sha256 of everything the features of one partition and view depend on (see the module docstring);
    tta: the 8 dihedral evaluation views; stain: the fitted stain normalisation of the images (it
    changes the backbone's input); position: the evaluation square's place across the field (augment.draw)."""
    train = part == "train" and cfg.augment
    weights = sha256_of(Path(cfg.weights).expanduser()) if cfg.weights else None
    blob = {
        "version": FORMAT_VERSION, "cache": prep.cache.key, "backbone": cfg.backbone, "weights": weights,
        "pretrained": cfg.pretrained and not weights,
        "init_seed": cfg.seed if not (cfg.pretrained or weights) else None,  # a random init depends on it
        "image_size": cfg.image_size, "mean": list(cfg.mean), "std": list(cfg.std), "amp": str(amp),
        "channels_last": cfg.channels_last, "stain": stain.key() if stain is not None else None,
        "positions": hashlib.sha256(np.ascontiguousarray(prep.positions[part], dtype=np.int64).tobytes()).hexdigest(),
        "view": {"augment": Augment.from_config(cfg).__dict__, "seed": cfg.seed, "views": cfg.views} if train
        else "evaluation-tta8" if tta and part != "train" else "evaluation",
    }
    if position != 0.5 and not train:
        blob["position"] = position  # absent at the centre: the keys of existing caches stay valid
    return hashlib.sha256(json.dumps(blob, sort_keys=True, default=list).encode()).hexdigest()


def features_usable(cfg: TrainConfig) -> bool:
    """Whether a run of cfg is scored on cached features: it trained on them, and the weights file
    its features are keyed by is still there (a run whose --weights file moved runs whole)."""
    return cfg.cached_features and (not cfg.weights or Path(cfg.weights).expanduser().is_file())


def part_batches(model: torch.nn.Module, prep: Prepared, part: str, cfg: TrainConfig, device: torch.device,
                 images: DeviceImages, *, tta: bool = False, net: torch.nn.Module | None = None):
    """(network, batches) that train on or score one partition: the one choice between cached features
    and images, for training (fit) and scoring (predict) alike.

    A Classifier of a run that trains on cached features (features_usable) runs its head over them
    (FeatureLoader; the feature pass happens here once per partition and view); anything else (a
    backbone that trains, an exported program) runs whole over the images (Loader.for_run). "train"
    gives the training loader, other partitions the evaluation one; tta: the 8 dihedral views.
    net: the module that runs on images in model's place (fit's channels-last or compiled copy)."""
    amp = amp_dtype(cfg.amp, device)
    if features_usable(cfg) and isinstance(model, Classifier):
        feats = run_features(model.backbone, prep, cfg, device, amp, images, parts=(part,), tta=tta)[part]
        return Classifier(torch.nn.Identity(), model.head), FeatureLoader.for_run(feats, prep, part, cfg, tta=tta)
    loader = Loader.for_run(images, prep.positions[part], prep.labels(part), cfg, train=part == "train",
                            dtype=amp or torch.float32)
    return net or model, loader


@torch.no_grad()  # not inference_mode: the loader's scratch buffers outlive this call
def compute(backbone: torch.nn.Module, loader: Loader, rows: np.ndarray, n: int, amp: torch.dtype | None,
            tta: bool = False) -> np.ndarray:
    """(V, n, F) float16 features of the n images the loader yields, row rows[idx] for cache position
    idx; V = 1, or the 8 dihedral views of augment.tta_views (identity first) with tta."""
    backbone.eval()
    out = None
    for x, _, idx in loader:
        views = tta_views(x) if tta else [x]
        with autocast(x.device, amp):
            f = torch.stack([backbone(v).float() for v in views])  # (V, B, F)
        if out is None:
            out = np.zeros((len(views), n, f.shape[-1]), dtype=np.float16)
        out[:, rows[idx.cpu().numpy()]] = f.cpu().numpy().astype(np.float16)
    return out


def _usable(path: Path, lead: tuple[int, int]) -> np.ndarray | None:
    """The stored features at path, memory-mapped, when they are what compute() writes: float16 (V, n, F)
    with (V, n) = lead, finite and not all one value; None for a file that is not (truncated, another
    dtype or shape, zeroed, edited), which is then rebuilt as a damaged decode cache is."""
    try:
        arr = np.load(path, mmap_mode="r")  # never unpickles: an object array is refused here
    except (OSError, ValueError, EOFError):
        return None
    if arr.dtype != np.float16 or arr.ndim != 3 or arr.shape[:2] != tuple(lead) or not arr.shape[2]:
        return None
    if not np.isfinite(arr).all() or arr.min() == arr.max():
        return None
    return arr


_LOADED: dict[tuple, torch.Tensor] = {}  # per process: features read back, by (file, its mtime and size, device)


def _loaded_key(path: Path, device: torch.device) -> tuple | None:
    try:
        st = path.stat()
    except OSError:
        return None
    return str(path), st.st_mtime_ns, st.st_size, str(device)


def _on_device(path: Path, make, lead: tuple[int, int], device: torch.device) -> torch.Tensor:
    """The stored features (_stored) as a tensor on device, read and checked once per process while the
    file is unchanged: a tune worker runs many trials on the same features one after another
    (reuse_actors). Callers only read the tensor."""
    key = _loaded_key(path, device)
    if key is None or key not in _LOADED:
        arr = _stored(path, make, lead)
        key = _loaded_key(path, device)
        if len(_LOADED) >= 8:  # train, val, test (and tta views) of one or two settings at a time
            _LOADED.clear()
        _LOADED[key] = torch.from_numpy(np.ascontiguousarray(arr)).to(device)
    return _LOADED[key]


def _stored(path: Path, make, lead: tuple[int, int]) -> np.ndarray:
    """The array at path, memory-mapped; made (make() -> (V, n, F) array with (V, n) = lead) and written
    atomically when missing or not usable (_usable)."""
    arr = _usable(path, lead) if path.is_file() else None
    if arr is not None:
        return arr
    arr = make()
    try:
        with atomic_path(path) as tmp:
            with open(tmp, "wb") as f:
                np.save(f, arr)
    except OSError as e:  # a full disk: one line, not a traceback
        full = no_space(e, "feature cache", path, arr.nbytes)
        if full is None:
            raise
        raise full from None
    return np.load(path, mmap_mode="r")


def feature_path(prep: Prepared, cfg: TrainConfig, part: str, amp: torch.dtype | None, tta: bool = False,
                 stain: StainParams | None = None, position: float = 0.5) -> Path:
    """Where the features of one partition (and view) of a run are kept."""
    key = feature_key(prep, cfg, part, amp, tta, stain, position)
    return prep.cache.folder.parent / "features" / f"{prep.cache.folder.name}-{part}-{key[:20]}.npy"


def run_features(backbone: torch.nn.Module, prep: Prepared, cfg: TrainConfig, device: torch.device,
                 amp: torch.dtype | None, images: DeviceImages,
                 parts: tuple[str, ...] = ("train", "val", "test"), tta: bool = False,
                 position: float = 0.5) -> dict[str, torch.Tensor]:
    """The cached features of a run's partitions, computed once: "train" (K, n, F), others (n, F),
    or with tta (8, n, F): the 8 dihedral views of the evaluation view. float16 tensors on the
    device, rows in partition order (prep.positions[part]). position: where the evaluation square sits
    across the field (augment.draw; 0.5 the centre), for partitions other than an augmented "train".
    images: prep's fields as the run sees them (DeviceImages.for_run, with its stain normalisation)."""
    stain = images.stain.params if images.stain is not None else None
    fmt = torch.channels_last if cfg.channels_last else torch.contiguous_format
    backbone.to(device, memory_format=fmt)
    out = {}
    for part in parts:
        pos, labels = prep.positions[part], prep.labels(part)
        if not len(pos):
            continue
        rows = np.zeros(len(prep.cache.images), dtype=np.int64)
        rows[pos] = np.arange(len(pos))
        views = cfg.views if part == "train" else 1
        train_view = part == "train" and cfg.augment
        dihedral = tta and part != "train"

        def make(part=part, pos=pos, labels=labels, rows=rows, views=views, train_view=train_view, dihedral=dihedral):
            loader = Loader(images, pos, labels, batch_size=PASS_BATCH, image_size=cfg.image_size, train=train_view,
                            augment=Augment.from_config(cfg) if train_view else None, drop_last=False, seed=cfg.seed,
                            dtype=amp or torch.float32, channels_last=cfg.channels_last, mean=cfg.mean, std=cfg.std,
                            position=position)
            arrays = []
            for v in range(views):
                loader.set_epoch(v + 1)  # view v: the draws of the loader's epoch v + 1
                arrays.append(compute(backbone, loader, rows, len(pos), amp, tta=dihedral))
            return np.concatenate(arrays)  # (K, n, F), or (8, n, F) with tta

        t = _on_device(feature_path(prep, cfg, part, amp, dihedral, stain, position), make, (8 if dihedral else views, len(pos)),
                       device)
        out[part] = t if part == "train" or dihedral else t[0]
    return out


class FeatureLoader:
    """Batches (f, y, idx) of cached features, in the order Loader would visit the same images:
    f (B, F) float32 on the features' device, y (B,) labels, idx (B,) cache positions.

    feats: (K, n, F) training views (epoch e reads view (e - 1) mod K) or (n, F); with tta (an
    evaluation loader over the (8, n, F) dihedral views) f is (8, B, F) and tta_views splits it,
    so engine.evaluate averages the views as it does for images. Rows in the order of
    `positions`. Order, balanced sampling and drop_last follow Loader (same seed, same
    generator), so the head sees the batches of a run through the backbone.
    """

    def __init__(self, feats: torch.Tensor, positions, labels, *, batch_size: int, train: bool,
                 balanced: bool = False, drop_last: bool = False, seed: int = 0, tta: bool = False):
        if tta and (train or feats.dim() != 3 or len(feats) != 8):
            raise ValueError("tta features are the 8 (8, n, F) dihedral views of an evaluation partition")
        self.feats = feats if feats.dim() == 3 else feats[None]
        self.tta = tta
        self.labels = np.asarray(labels, dtype=np.int64)
        dev = self.feats.device
        self._y = torch.from_numpy(self.labels).to(dev)
        self._idx = torch.as_tensor(np.asarray(positions, dtype=np.int64)).to(dev)
        self.batch_size, self.train, self.balanced = batch_size, train, balanced and train
        self.drop_last, self.seed, self.epoch = drop_last and train, seed, 0

    @classmethod
    def for_run(cls, feats: torch.Tensor, prep: Prepared, part: str, cfg: TrainConfig, tta: bool = False) -> FeatureLoader:
        train = part == "train"
        return cls(feats, prep.positions[part], prep.labels(part), batch_size=cfg.batch_size, train=train,
                   balanced=cfg.balanced_sampling, drop_last=cfg.drop_last, seed=cfg.seed, tta=tta)

    def __len__(self) -> int:
        n = len(self.labels)
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    @staticmethod
    def tta_views(f: torch.Tensor) -> list[torch.Tensor]:
        """The 8 views of a tta batch (8, B, F): features of augment.tta_views' images, identity first."""
        return list(f.unbind(0))

    def __iter__(self):
        order = epoch_order(self.labels, self.train, self.balanced, epoch_generator(self.seed, self.epoch))
        order = order.to(self.feats.device)
        view = self.feats[(self.epoch - 1) % len(self.feats)] if self.train else self.feats[0]  # (n, F)
        for s in range(0, len(self) * self.batch_size, self.batch_size):
            c = order[s:s + self.batch_size]
            yield (self.feats[:, c] if self.tta else view[c]).float(), self._y[c], self._idx[c]
