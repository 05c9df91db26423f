"""The fast data path: uint8 images kept on the device, batches assembled and augmented there.

    data = DeviceImages(cache.images, "cuda", budget_gb=8)      # (N, H, W, 3) uint8, shared
    train = Loader(data, idx, labels, batch_size=32, image_size=224, train=True,
                   augment=Augment.from_config(cfg), drop_last=True, seed=cfg.seed, dtype=torch.bfloat16)
    train = Loader.for_run(data, idx, labels, cfg, train=True, dtype=torch.bfloat16)   # the same, from a config
    for epoch in range(cfg.epochs):
        train.set_epoch(epoch)
        for x, y, idx in train: ...                             # x (B, 3, 224, 224) on the device

What each batch shows (the evaluation view, the training augmentation) is documented in
breakhis/augment.py. Geometry takes one of two routes that sample the same pixels: on the
CPU a per-sample loop of uint8 slicing + F.interpolate (7x faster there than grid_sample),
spread over threads; elsewhere one F.affine_grid + F.grid_sample per batch whose per-sample
theta composes crop and dihedral. Colour and stain jitter are per-sample 3x3 maps applied
with one bmm per batch. Random draws come from a CPU generator seeded by (seed, epoch), so
CPU and GPU runs draw the same crops and factors.

Stain normalisation (--stain-norm, breakhis/stain.py) belongs to DeviceImages: each decoded
field is normalised to the run's reference before the loader crops or augments it, the same
for training and evaluation views (`DeviceImages.for_run(cache.images, cfg, device, stain)`).
"""
from __future__ import annotations

import sys
import warnings
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch
import torch.nn.functional as F

from .augment import GREY, MEAN, NRAND, STD, Augment, crop_thetas, dihedral, draw
from .config import TrainConfig
from .stain import Normaliser, StainParams, chunks

CHUNK = 8  # samples rendered together on the CPU: their float planes (5 MB) stay in the cache


class _Pool:
    """Reuses CPU output buffers once nothing outside holds them.

    A fresh 38 MB batch costs more in page faults than the whole augmentation; on CUDA the
    caching allocator already recycles memory, so the pool is used on the CPU only. A buffer
    is free when no Python name or autograd graph holds it and no other tensor (a view,
    .numpy()) shares its storage.
    """

    def __init__(self, size: int = 4):
        self.size, self.items, self.idle = size, [], []

    @staticmethod
    def _refs(t: torch.Tensor) -> tuple[int, int, int]:
        # Python names, C++ holders of the tensor (an autograd graph), other tensors on its storage
        return sys.getrefcount(t), t._use_count(), torch._C._storage_Use_Count(t.untyped_storage()._cdata)

    def get(self, shape, dtype, memory_format) -> torch.Tensor:
        for i in range(len(self.items)):
            if self._refs(self.items[i]) == self.idle[i] and self.items[i].shape == shape \
                    and self.items[i].dtype == dtype and self.items[i].is_contiguous(memory_format=memory_format):
                return self.items[i]
        if len(self.items) == self.size:  # all held by the caller: forget the oldest, it keeps its tensor
            del self.items[0], self.idle[0]
        self.items.append(torch.empty(shape, dtype=dtype, memory_format=memory_format))
        self.idle.append(self._refs(self.items[-1]))
        return self.items[-1]


class DeviceImages:
    """The uint8 images of one process, shared by all its loaders.

    images: (N, H, W, 3) uint8 numpy array (a memmap is fine) or tensor. When it fits in
    budget_gb GiB it is kept whole on the device (`resident`); on the CPU a zero-copy view
    counts as resident. Otherwise batches are gathered on the host, into pinned memory when
    `pin` (default: on CUDA), and copied to the device one batch ahead on a side stream.

    stain: a fitted stain normalisation (breakhis/stain.py). Every field is normalised on the
    device before any crop or augmentation: a resident array once, here, in batches of fields (on
    the CPU into a copy, the memmap being read-only); a streamed one per batch as it arrives
    (`fetched`), with each image's maps computed here in one pass. That per-batch pass over whole
    fields is cheap on a GPU but costs a CPU about 10x the loader's own work: there, keep the cache
    resident (--device-cache-gb).
    """

    def __init__(self, images, device, budget_gb: float = 8.0, pin: bool | None = None,
                 stain: StainParams | None = None):
        if tuple(images.shape[1:]) != tuple(images.shape[1:3]) + (3,) or len(images.shape) != 4 \
                or str(images.dtype).split(".")[-1] != "uint8":
            raise ValueError(f"images must be (N, H, W, 3) uint8, got {tuple(images.shape)} {images.dtype}")
        self.device = torch.device(device)
        if self.device.type == "cuda" and self.device.index is None:
            self.device = torch.device("cuda", torch.cuda.current_device())
        self.shape = tuple(int(s) for s in images.shape)
        self.pin = self.device.type == "cuda" and (pin is None or bool(pin))  # pinning serves CUDA copies only
        self.resident = int(np.prod(self.shape)) <= budget_gb * 2**30
        self.stain = Normaliser(stain, self.device) if stain is not None else None
        self._maps: dict[str, torch.Tensor] | None = None  # per-image stain maps of a streamed array
        if isinstance(images, torch.Tensor):
            self.host = images.cpu().numpy() if not self.resident else None
            self.images = images.to(self.device) if self.resident else None
            if self.images is not None and self.stain is not None:
                self.images = self.stain(self.images)
        else:
            self.host, self.images = images, None
            if self.resident:
                with warnings.catch_warnings():  # a read-only memmap: we never write to it
                    warnings.simplefilter("ignore", UserWarning)
                    view = torch.from_numpy(images)
                if self.device.type == "cpu" and self.stain is None:
                    self.images = view
                else:  # upload (or normalise) in chunks so the host never holds a second full copy
                    self.images = torch.empty(self.shape, dtype=torch.uint8, device=self.device)
                    parts = chunks(self.shape[0], self.shape[1] * self.shape[2], self.device) if self.stain else \
                        [(i, min(i + 256, self.shape[0])) for i in range(0, self.shape[0], 256)]
                    for i, j in parts:
                        part = view[i:j].to(self.device)
                        self.images[i:j].copy_(self.stain(part) if self.stain else part)
                self.host = None
        if self.host is not None and self.stain is not None:  # streamed: each image's maps, once
            maps = [self.stain.stats(torch.from_numpy(np.array(self.host[i:j])).to(self.device))
                    for i, j in chunks(self.shape[0], self.shape[1] * self.shape[2], self.device)]
            self._maps = {k: torch.cat([m[k] for m in maps]) for k in maps[0]}

    @classmethod
    def for_run(cls, images, cfg: TrainConfig, device, stain: StainParams | None = None) -> DeviceImages:
        """The images of a run: its device budget and its fitted stain normalisation (stain.fit_run
        when training, stain.load(run_dir) after), the one place runs build them."""
        return cls(images, device, budget_gb=cfg.device_cache_gb, stain=stain)

    def fetched(self, fields: torch.Tensor, ids) -> torch.Tensor:
        """A streamed batch of fields (B, H, W, 3) uint8 on the device, rows `ids` of the array:
        stain-normalised with their maps when the array has a stain normalisation."""
        if self.stain is None:
            return fields
        ids = torch.as_tensor(ids, device=self.device)
        return self.stain.apply(fields, {k: v[ids] for k, v in self._maps.items()})

    def __len__(self) -> int:
        return self.shape[0]


_POOLS: dict[int, ThreadPoolExecutor] = {}


def _threads(n: int) -> ThreadPoolExecutor:
    """A process-wide pool of n threads, each running torch ops on one intra-op thread."""
    if n not in _POOLS:
        _POOLS[n] = ThreadPoolExecutor(n, thread_name_prefix="breakhis-loader", initializer=torch.set_num_threads,
                                       initargs=(1,))
    return _POOLS[n]


def epoch_generator(seed: int, epoch: int) -> torch.Generator:
    """The CPU generator of one epoch's order and augmentation draws."""
    state = np.random.SeedSequence([seed % 2**63, epoch % 2**63]).generate_state(1, np.uint64)[0]
    return torch.Generator().manual_seed(int(state))


def epoch_order(labels: np.ndarray, train: bool, balanced: bool, g: torch.Generator) -> torch.Tensor:
    """(n,) positions in the order an epoch visits them: in order for evaluation, a permutation for
    training, or n class-balanced draws with replacement. The first draws of g (see Loader)."""
    n = len(labels)
    if not train:
        return torch.arange(n)
    if balanced:  # each class drawn with equal probability, n draws with replacement
        _, inv, counts = np.unique(labels, return_inverse=True, return_counts=True)
        return torch.multinomial(torch.from_numpy(1.0 / counts[inv]), n, replacement=True, generator=g)
    return torch.randperm(n, generator=g)


class Loader:
    """Batches (x, y, idx) on data.device: x (B, 3, S, S) normalised in `dtype`, y (B,)
    int64 labels, idx (B,) int64 positions into data's array. See the module docstring
    for the views. The order and augmentation of an epoch depend only on (seed, epoch):
    call set_epoch(e) before each epoch; iterating twice without it repeats the epoch.
    """

    def __init__(self, data: DeviceImages, indices, labels, *, batch_size: int, image_size: int, train: bool,
                 augment: Augment | None = None, balanced: bool = False, drop_last: bool = False, seed: int = 0,
                 dtype=torch.float32, channels_last: bool = True, mean=MEAN, std=STD, position: float = 0.5):
        self.position = float(position)  # evaluation view: where the square of full height sits (augment.draw)
        self.indices = np.asarray(indices, dtype=np.int64).reshape(-1)
        self.labels = np.asarray(labels, dtype=np.int64).reshape(-1)
        if len(self.indices) != len(self.labels):
            raise ValueError(f"{len(self.indices)} indices but {len(self.labels)} labels")
        if len(self.indices) == 0:
            raise ValueError("no images to load")
        if self.indices.min() < 0 or self.indices.max() >= len(data):
            raise ValueError(f"indices must lie in [0, {len(data)})")
        if batch_size < 1 or image_size < 1:
            raise ValueError(f"batch_size and image_size must be positive, got {batch_size}, {image_size}")
        self.data, self.batch_size, self.size, self.train = data, batch_size, image_size, train
        self.augment = augment if train else None
        self.balanced, self.drop_last, self.seed, self.dtype = balanced and train, drop_last and train, seed, dtype
        self.memory_format = torch.channels_last if channels_last else torch.contiguous_format
        self.epoch = 0
        # the CPU slices each crop (much faster there); accelerators take one grid_sample
        self._geometry = "slice" if data.device.type == "cpu" else "grid"
        self._pool = _Pool() if data.device.type == "cpu" else None
        self._scratch: dict[str, torch.Tensor] = {}
        self._y = torch.from_numpy(self.labels).to(data.device)
        self._idx = torch.from_numpy(self.indices).to(data.device)
        dev = data.device
        # the backbone's input normalisation (ImageNet for torchvision; timm's pretrained_cfg)
        self.mean, self.std = tuple(float(v) for v in mean), tuple(float(v) for v in std)
        self._mean = torch.tensor(self.mean, device=dev).view(1, 3, 1)
        self._std = torch.tensor(self.std, device=dev).view(1, 3, 1)
        self._grey = torch.tensor(GREY, device=dev)
        self._slots: list[torch.Tensor] | None = None  # pinned host batches of the streamed CUDA path

    @classmethod
    def for_run(cls, data: DeviceImages, indices, labels, cfg: TrainConfig, *, train: bool, dtype) -> Loader:
        """The training (train=True) or evaluation loader of a run's config; data: DeviceImages.for_run
        (which holds the run's stain normalisation)."""
        return cls(data, indices, labels, batch_size=cfg.batch_size, image_size=cfg.image_size, train=train,
                   augment=Augment.from_config(cfg) if train else None, balanced=cfg.balanced_sampling and train,
                   drop_last=cfg.drop_last and train, seed=cfg.seed, dtype=dtype, channels_last=cfg.channels_last,
                   mean=cfg.mean or MEAN, std=cfg.std or STD)

    def __len__(self) -> int:
        n = len(self.indices)
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch whose order and augmentation the next iteration draws."""
        self.epoch = int(epoch)

    # ------------------------------------------------------------------ drawing
    def _order(self, g: torch.Generator) -> torch.Tensor:
        return epoch_order(self.labels, self.train, self.balanced, g)

    def _draw(self, u: torch.Tensor) -> dict:
        """The epoch's per-sample parameters (augment.draw); box and k stay on the CPU, the
        float32 maps go to the device once per epoch, so batches never wait on a copy."""
        H, W = self.data.shape[1:3]
        p = draw(u, self.augment, H, W, self.position)
        p["theta"] = crop_thetas(p["box"], p["k"], H, W) if self._geometry == "grid" else None
        dev = self.data.device
        return {key: v if v is None or key in ("box", "k") else v.to(dev, torch.float32) for key, v in p.items()}

    # ------------------------------------------------------------------ iteration
    def __iter__(self):
        g = epoch_generator(self.seed, self.epoch)
        order = self._order(g)
        p = self._draw(torch.rand(len(order), NRAND, generator=g, dtype=torch.float64))
        order_d = order.to(self.data.device)
        parts = [slice(s, s + self.batch_size) for s in range(0, len(self) * self.batch_size, self.batch_size)]
        streamed = self._streamed(order, order_d, parts)
        for c in parts:
            src, rows = next(streamed)
            x = self._render(src, rows, {key: None if v is None else v[c] for key, v in p.items()})
            yield x, self._y[order_d[c]], self._idx[order_d[c]]

    def _streamed(self, order: torch.Tensor, order_d: torch.Tensor, parts: list[slice]):
        """(source array, rows in it) per batch: the resident array and the batch's positions
        in it (a list on the CPU, a device tensor elsewhere), or a prefetched copy of the
        batch's images and None."""
        d = self.data
        if d.resident:
            for c in parts:
                yield d.images, self.indices[order[c].numpy()].tolist() if self._geometry == "slice" \
                    else self._idx[order_d[c]]
            return
        if not d.pin:  # synchronous host gather (CPU, or pinning switched off)
            for c in parts:
                ids = self.indices[order[c].numpy()]
                yield d.fetched(torch.from_numpy(np.take(d.host, ids, axis=0)).to(d.device), ids), None
            return
        # pinned host buffers, two in turn, copied on a side stream one batch ahead
        stream = torch.cuda.Stream(d.device)
        if self._slots is None:
            self._slots = [torch.empty((self.batch_size,) + d.shape[1:], dtype=torch.uint8).pin_memory()
                           for _ in range(2)]
        done = [None, None]  # copy events per slot: a slot is rewritten only after its copy ended

        def stage(j: int):
            ids, s = self.indices[order[parts[j]].numpy()], j % 2
            if done[s] is not None:
                done[s].synchronize()
            host = self._slots[s][:len(ids)]
            np.take(d.host, ids, axis=0, out=host.numpy(), mode="clip")  # ids are checked; clip skips a buffer
            with torch.cuda.stream(stream):
                dev = host.to(d.device, non_blocking=True)
                done[s] = torch.cuda.Event()
                done[s].record(stream)
            return dev, done[s]

        nxt = stage(0)
        for j in range(len(parts)):
            dev, ev = nxt
            if j + 1 < len(parts):
                nxt = stage(j + 1)
            main = torch.cuda.current_stream(d.device)
            main.wait_event(ev)
            dev.record_stream(main)  # allocated on the side stream, used on the main one
            yield d.fetched(dev, self.indices[order[parts[j]].numpy()]), None

    def _buf(self, name: str, shape) -> torch.Tensor:
        """A float32 scratch tensor kept between batches (CPU: fresh pages cost more than the work)."""
        t = self._scratch.get(name)
        if t is None or t.shape != torch.Size(shape):
            t = self._scratch[name] = torch.empty(shape, device=self.data.device)
        return t

    def _render(self, src: torch.Tensor, rows, p: dict) -> torch.Tensor:
        """Geometry, jitter and normalisation of one batch -> (B, 3, S, S) in self.dtype."""
        B, S, dev = len(p["k"]), self.size, self.data.device
        shape = (B, 3, S, S)
        out = self._pool.get(shape, self.dtype, self.memory_format) if self._pool else \
            torch.empty(shape, dtype=self.dtype, device=dev, memory_format=self.memory_format)
        if self._geometry == "grid":
            fields = src if rows is None else src[rows]  # (B, H, W, 3) uint8
            grid = F.affine_grid(p["theta"], [B, 3, S, S], align_corners=False)
            x = F.grid_sample(fields.permute(0, 3, 1, 2).float(), grid, mode="bilinear", padding_mode="border",
                              align_corners=False)
            self._photometric(x.reshape(B, 3, S * S), p, out)
            return out
        # On the CPU the batch is cut into one part per intra-op thread, each rendered by a
        # worker that runs torch on one thread: the per-sample ops are small, and on a busy
        # machine they lose more waiting at intra-op barriers than they gain.
        rows = list(range(B)) if rows is None else rows
        x, y = self._buf("x", (B, 3, S * S)), self._buf("y", (B, 3, S * S))
        n = min(torch.get_num_threads(), B)

        def work(part: slice):
            for i in range(part.start, part.stop, CHUNK):  # a few samples at a time stay in cache
                c = slice(i, min(i + CHUNK, part.stop))
                q = {key: None if v is None else v[c] for key, v in p.items()}
                self._slice(src, rows[c], q, x[c])
                self._photometric(x[c], q, out[c], y[c])

        parts = [slice(j * B // n, (j + 1) * B // n) for j in range(n)]
        if n == 1:
            work(parts[0])
        else:
            list(_threads(n).map(work, parts))
        return out

    def _slice(self, src: torch.Tensor, rows: list, p: dict, x: torch.Tensor) -> None:
        """Per-sample crop, resize and dihedral on the CPU into x (B, 3, S*S) float32, [0, 255]."""
        B, S = len(rows), self.size
        box, k = p["box"].tolist(), p["k"].tolist()
        if all(b == box[0] for b in box) and not any(k):  # one view for all: a single interpolate
            y0, x0, h, w = box[0]
            crop = src[:, y0:y0 + h, x0:x0 + w][torch.as_tensor(rows)].permute(0, 3, 1, 2)
            x.view(B, 3, S, S).copy_(F.interpolate(crop.contiguous(memory_format=torch.channels_last), size=(S, S),
                                                   mode="bilinear", align_corners=False))
            return
        for i in range(B):
            y0, x0, h, w = box[i]
            crop = src[rows[i], y0:y0 + h, x0:x0 + w].permute(2, 0, 1)[None]  # (1, 3, h, w) uint8
            # channels-last contiguous uint8 takes interpolate's vectorised path (7x grid_sample)
            o = F.interpolate(crop.contiguous(memory_format=torch.channels_last), size=(S, S),
                              mode="bilinear", align_corners=False)
            x[i].view(3, S, S).copy_(dihedral(o[0], k[i]))

    def _photometric(self, x: torch.Tensor, p: dict, out: torch.Tensor, y: torch.Tensor | None = None) -> None:
        """Stain and colour jitter and normalisation of x (B, 3, P) float32 in [0, 255] (overwritten),
        written into out (B, 3, S, S) in its dtype and memory format; y: scratch like x."""
        B, unit = x.shape[0], 255.0
        y = torch.empty_like(x) if y is None else y
        if p["stain_m"] is not None:
            x, y, unit = self._stain(x, p["stain_m"], p["stain_t"], y), x, 1.0
        # (B, 3, P) view of the output whatever its memory format; computed in float32, cast on store
        outv = out.view(B, 3, -1) if out.is_contiguous() else out.permute(0, 2, 3, 1).reshape(B, -1, 3).transpose(1, 2)
        if p["rs"] is None:  # normalise only: one per-channel scale and shift into the output
            torch.addcmul(-self._mean / self._std, x, 1 / (unit * self._std), out=outv)
            return
        m, t = self._colour(x, p["rs"], p["coef"], unit)
        y = torch.bmm(m, x, out=y)  # jittered and normalised, less the offset
        for ch in range(3):  # add the offset, clip to [0, 1] RGB: per plane, scalar bounds are fastest
            y[:, ch].add_(t[:, ch]).clamp_(-self.mean[ch] / self.std[ch], (1 - self.mean[ch]) / self.std[ch])
        outv.copy_(y)

    @staticmethod
    def _stain(x: torch.Tensor, m: torch.Tensor, shift: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        """HED jitter (maps from augment.stain_maps) of x (B, 3, P) in [0, 255] (overwritten) -> out, in [0, 1]."""
        od = x.div_(255).clamp_(min=1e-6).log_()
        return torch.baddbmm(shift, m, od, out=out).exp_().clamp_(0, 1)

    def _colour(self, x: torch.Tensor, rs: torch.Tensor, coef: torch.Tensor, unit: float):
        """Per-sample (B, 3, 3) matrix and (B, 3, 1) offset of colour jitter then normalisation,
        for x (B, 3, P) in [0, unit]; rs, coef from augment.colour_maps."""
        m = rs * (coef[:, 0] / unit)[:, None, None]
        # contrast blends towards the mean grey of the brightened image: an offset along the grey axis
        t = rs.sum(2, keepdim=True) * (coef[:, 1] * (x.mean(2) @ self._grey) / unit)[:, None, None]
        return m / self._std, (t - self._mean) / self._std



