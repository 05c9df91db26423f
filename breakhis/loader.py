"""The fast data path: uint8 images kept on the device, batches assembled and augmented there.

How a cached field (H x W uint8, e.g. 256 x 390 for the 700 x 460 originals) becomes the
model input (image_size x image_size, normalised with the ImageNet MEAN and STD):

* evaluation (train=False), and training with augmentation off: the central square of full
  field height (H x H) resized (bilinear) to image_size x image_size; in order, no randomness.
* training: per sample, independently of the others in the batch:
  1. random resized crop: a box of area fraction U(crop_scale) of the whole field and aspect
     ratio (width/height) log-uniform in crop_ratio, clamped inside the field, at a uniform
     position; resized (bilinear) to image_size x image_size;
  2. one of the 8 dihedral transforms (flips and 90-degree rotations), uniformly;
  3. H&E stain jitter in HED space (Ruifrok-Johnston matrix, as skimage.color.rgb2hed):
     each stain channel scaled by U(1-s, 1+s) and shifted by U(-s, s), back to RGB (as
     skimage.color.hed2rgb; negative stain amounts are kept, not clipped, so that a zero
     jitter is exactly the identity);
  4. colour jitter: brightness, contrast, saturation factors U(1-s, 1+s) (as torchvision's
     adjust_brightness / adjust_contrast / adjust_saturation, in that fixed order), then a hue
     rotation by U(-s/4, s/4) of a turn about the grey axis of RGB space (torchvision instead
     shifts the HSV hue, which walks the colour hexagon rather than a circle), clipped to [0, 1];
  5. normalise.
  Stain jitter comes before colour jitter: staining happens on the slide, colour shifts in
  the camera. All random values of an epoch are drawn at once on the CPU from (seed, epoch),
  always all of them, so switching one augmentation off leaves the others' draws unchanged.

The geometric step takes one of two equivalent routes: on the CPU a per-sample loop of
uint8 slicing + F.interpolate (7x faster there than grid_sample), elsewhere one
F.affine_grid + F.grid_sample per batch whose per-sample theta composes crop and dihedral.
"""
from __future__ import annotations

import math
import sys
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from .errors import UserError

MEAN = (0.485, 0.456, 0.406)  # ImageNet statistics, as torchvision's weights expect
STD = (0.229, 0.224, 0.225)
GREY = (0.2989, 0.587, 0.114)  # luma weights, as torchvision's rgb_to_grayscale
# Ruifrok-Johnston stain vectors (rows: haematoxylin, eosin, DAB), as skimage.color
RGB_FROM_HED = np.array([[0.65, 0.70, 0.29], [0.07, 0.99, 0.11], [0.27, 0.57, 0.78]])
HED_FROM_RGB = np.linalg.inv(RGB_FROM_HED)
LOG_ADJUST = math.log(1e-6)  # skimage's optical-density scale
_NRAND = 15  # random numbers drawn per sample, see _draw


@dataclass(frozen=True)
class Augment:
    """Training augmentation settings; strengths of 0 switch a part off."""
    crop_scale: tuple[float, float] = (0.35, 1.0)  # area fraction of the whole cached field
    crop_ratio: tuple[float, float] = (0.75, 1.3333)  # width / height
    dihedral: bool = True  # the 8 flips / 90-degree rotations, drawn per sample
    color_jitter: float = 0.2  # brightness/contrast/saturation in [1-s, 1+s]; hue in [-s/4, s/4] turn
    stain_jitter: float = 0.05  # HED scale ~ U(1-s, 1+s) and shift ~ U(-s, s) per stain

    def __post_init__(self):
        lo, hi = self.crop_scale
        if not 0 < lo <= hi <= 1:
            raise UserError(f"--crop-scale {lo},{hi}: give two area fractions lo,hi with 0 < lo <= hi <= 1")
        if not 0 < self.crop_ratio[0] <= self.crop_ratio[1]:
            raise UserError(f"--crop-ratio {self.crop_ratio[0]},{self.crop_ratio[1]}: give two aspect ratios lo,hi with 0 < lo <= hi")
        if not 0 <= self.color_jitter < 1:
            raise UserError(f"--color-jitter {self.color_jitter}: must lie in [0, 1) (0: off)")
        if not 0 <= self.stain_jitter < 1:
            raise UserError(f"--stain-jitter {self.stain_jitter}: must lie in [0, 1) (0: off)")

    @classmethod
    def from_config(cls, cfg) -> "Augment | None":
        """The augmentation a TrainConfig asks for; None when cfg.augment is False."""
        if not cfg.augment:
            return None
        return cls(crop_scale=tuple(cfg.crop_scale), crop_ratio=tuple(cfg.crop_ratio), dihedral=cfg.dihedral,
                   color_jitter=cfg.color_jitter, stain_jitter=cfg.stain_jitter)


class _Pool:
    """Reuses CPU output buffers once nothing outside holds them.

    A fresh 38 MB batch costs more in page faults than the whole augmentation; on CUDA the
    caching allocator already recycles memory, so the pool is used on the CPU only. A buffer
    is free when no Python name holds it and no other tensor (a view, .numpy()) shares its
    storage.
    """

    def __init__(self, size: int = 4):
        self.size, self.items, self.idle = size, [], []

    @staticmethod
    def _refs(t: torch.Tensor) -> tuple[int, int]:
        return sys.getrefcount(t), torch._C._storage_Use_Count(t.untyped_storage()._cdata)

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
    """

    def __init__(self, images, device, budget_gb: float = 8.0, pin: bool | None = None):
        if tuple(images.shape[1:]) != tuple(images.shape[1:3]) + (3,) or len(images.shape) != 4 \
                or str(images.dtype).split(".")[-1] != "uint8":
            raise ValueError(f"images must be (N, H, W, 3) uint8, got {tuple(images.shape)} {images.dtype}")
        self.device = torch.device(device)
        if self.device.type == "cuda" and self.device.index is None:
            self.device = torch.device("cuda", torch.cuda.current_device())
        self.shape = tuple(int(s) for s in images.shape)
        self.pin = self.device.type == "cuda" if pin is None else bool(pin and torch.cuda.is_available())
        self.resident = int(np.prod(self.shape)) <= budget_gb * 2**30
        if isinstance(images, torch.Tensor):
            self.host = images.cpu().numpy() if not self.resident else None
            self.images = images.to(self.device) if self.resident else None
            return
        self.host, self.images = images, None
        if self.resident:
            with warnings.catch_warnings():  # a read-only memmap: we never write to it
                warnings.simplefilter("ignore", UserWarning)
                view = torch.from_numpy(images)
            if self.device.type == "cpu":
                self.images = view
            else:  # upload in chunks so the host never holds a second full copy
                self.images = torch.empty(self.shape, dtype=torch.uint8, device=self.device)
                for i in range(0, self.shape[0], 256):
                    self.images[i:i + 256].copy_(view[i:i + 256])
            self.host = None

    def __len__(self) -> int:
        return self.shape[0]


def dihedral(x: torch.Tensor, k: int) -> torch.Tensor:
    """Dihedral transform k in 0..7 of (..., S, S): bit 0 transpose, bit 1 flip W, bit 2 flip H."""
    if k & 1:
        x = x.transpose(-1, -2)
    if k & 2:
        x = x.flip(-1)
    if k & 4:
        x = x.flip(-2)
    return x


def tta_views(x: torch.Tensor) -> list[torch.Tensor]:
    """The 8 dihedral views of a batch (B, 3, S, S), identity first, in x's memory format."""
    fmt = torch.channels_last if x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous() \
        else torch.contiguous_format
    return [x] + [dihedral(x, k).contiguous(memory_format=fmt) for k in range(1, 8)]


_POOLS: dict[int, ThreadPoolExecutor] = {}


def _threads(n: int) -> ThreadPoolExecutor:
    """A process-wide pool of n threads, each running torch ops on one intra-op thread."""
    if n not in _POOLS:
        _POOLS[n] = ThreadPoolExecutor(n, thread_name_prefix="breakhis-loader", initializer=torch.set_num_threads,
                                       initargs=(1,))
    return _POOLS[n]


def _generator(seed: int, epoch: int) -> torch.Generator:
    state = np.random.SeedSequence([seed % 2**63, epoch % 2**63]).generate_state(1, np.uint64)[0]
    return torch.Generator().manual_seed(int(state))


class Loader:
    """Batches (x, y, idx) on data.device: x (B, 3, S, S) normalised in `dtype`, y (B,)
    int64 labels, idx (B,) int64 positions into data's array. See the module docstring
    for the views. The order and augmentation of an epoch depend only on (seed, epoch):
    call set_epoch(e) before each epoch; iterating twice without it repeats the epoch.
    """

    def __init__(self, data: DeviceImages, indices, labels, *, batch_size: int, image_size: int, train: bool,
                 augment: Augment | None = None, balanced: bool = False, drop_last: bool = False, seed: int = 0,
                 dtype=torch.float32, channels_last: bool = True):
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
        self._mean = torch.tensor(MEAN, device=dev).view(1, 3, 1)
        self._std = torch.tensor(STD, device=dev).view(1, 3, 1)

    def __len__(self) -> int:
        n = len(self.indices)
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch whose order and augmentation the next iteration draws."""
        self.epoch = int(epoch)

    # ------------------------------------------------------------------ drawing
    def _order(self, g: torch.Generator) -> torch.Tensor:
        n = len(self.indices)
        if not self.train:
            return torch.arange(n)
        if self.balanced:  # each class drawn with equal probability, n draws with replacement
            _, inv, counts = np.unique(self.labels, return_inverse=True, return_counts=True)
            return torch.multinomial(torch.from_numpy(1.0 / counts[inv]), n, replacement=True, generator=g)
        return torch.randperm(n, generator=g)

    def _draw(self, u: torch.Tensor) -> dict:
        """Per-sample parameters from uniforms u (B, _NRAND) float64, on the CPU."""
        H, W = self.data.shape[1:3]
        B, a = len(u), self.augment
        if a is None:  # the central square of full field height
            side = min(H, W)
            box = torch.tensor([(H - side) // 2, (W - side) // 2, side, side]).expand(B, 4)
            return {"box": box, "k": torch.zeros(B, dtype=torch.long), "colour": None, "stain": None}
        area = (a.crop_scale[0] + (a.crop_scale[1] - a.crop_scale[0]) * u[:, 0]) * H * W
        logr = math.log(a.crop_ratio[0]) + (math.log(a.crop_ratio[1]) - math.log(a.crop_ratio[0])) * u[:, 1]
        h = (area / logr.exp()).sqrt().round().clamp(1, H).long()
        w = (area * logr.exp()).sqrt().round().clamp(1, W).long()
        y0 = (u[:, 2] * (H - h + 1)).long().clamp(max=H - h)
        x0 = (u[:, 3] * (W - w + 1)).long().clamp(max=W - w)
        k = (u[:, 4] * 8).long().clamp(max=7) if a.dihedral else torch.zeros(B, dtype=torch.long)
        s, c = 2 * u[:, 5:9] - 1, a.color_jitter
        colour = torch.cat([1 + c * s[:, :3], c / 4 * s[:, 3:]], 1) if c > 0 else None  # b, c, s, hue
        st = a.stain_jitter
        stain = torch.cat([1 + st * (2 * u[:, 9:12] - 1), st * (2 * u[:, 12:15] - 1)], 1) if st > 0 else None
        return {"box": torch.stack([y0, x0, h, w], 1), "k": k, "colour": colour, "stain": stain}

    # ------------------------------------------------------------------ iteration
    def __iter__(self):
        g = _generator(self.seed, self.epoch)
        order = self._order(g)
        u = torch.rand(len(order), _NRAND, generator=g, dtype=torch.float64)
        starts = range(0, len(self) * self.batch_size, self.batch_size)
        batches = [order[s:s + self.batch_size] for s in starts]
        streamed = self._streamed(batches)
        for j, sel in enumerate(batches):
            src, rows = next(streamed)
            p = self._draw(u[starts[j]:starts[j] + len(sel)])
            x = self._render(src, rows, p)
            sel_d = sel.to(self.data.device)
            yield x, self._y[sel_d], self._idx[sel_d]

    def _streamed(self, batches):
        """(source array, rows in it) per batch: the resident tensor, or a prefetched copy."""
        d = self.data
        if d.resident:
            for sel in batches:
                yield d.images, self.indices[sel.numpy()].tolist()
            return
        if not d.pin:  # synchronous host gather (CPU, or pinning switched off)
            for sel in batches:
                yield torch.from_numpy(np.take(d.host, self.indices[sel.numpy()], axis=0)).to(d.device), range(len(sel))
            return
        # pinned host buffers, two in turn, copied on a side stream one batch ahead
        stream = torch.cuda.Stream(d.device)
        slots = [torch.empty((self.batch_size,) + d.shape[1:], dtype=torch.uint8).pin_memory() for _ in range(2)]
        done = [None, None]  # copy events per slot: a slot is rewritten only after its copy ended

        def stage(j):
            ids, s = self.indices[batches[j].numpy()], j % 2
            if done[s] is not None:
                done[s].synchronize()
            host = slots[s][:len(ids)]
            np.take(d.host, ids, axis=0, out=host.numpy())
            with torch.cuda.stream(stream):
                dev = host.to(d.device, non_blocking=True)
                done[s] = torch.cuda.Event()
                done[s].record(stream)
            return dev, done[s]

        nxt = stage(0)
        for j in range(len(batches)):
            dev, ev = nxt
            if j + 1 < len(batches):
                nxt = stage(j + 1)
            main = torch.cuda.current_stream(d.device)
            main.wait_event(ev)
            dev.record_stream(main)  # allocated on the side stream, used on the main one
            yield dev, range(dev.shape[0])

    def _buf(self, name: str, shape, dtype=torch.float32) -> torch.Tensor:
        """A scratch tensor kept between batches on the CPU (fresh pages cost more than the work)."""
        if self._pool is None:
            return torch.empty(shape, dtype=dtype, device=self.data.device)
        t = self._scratch.get(name)
        if t is None or t.shape != torch.Size(shape) or t.dtype != dtype:
            t = self._scratch[name] = torch.empty(shape, dtype=dtype)
        return t

    def _render(self, src: torch.Tensor, rows, p: dict) -> torch.Tensor:
        """Geometry, jitter and normalisation of one batch -> (B, 3, S, S) in self.dtype."""
        B, S, dev = len(p["k"]), self.size, self.data.device
        shape = (B, 3, S, S)
        out = self._pool.get(shape, self.dtype, self.memory_format) if self._pool else \
            torch.empty(shape, dtype=self.dtype, device=dev, memory_format=self.memory_format)
        if self._geometry == "grid":
            self._photometric(self._grid(src, rows, p).view(B, 3, S * S), p, out)
            return out
        # On the CPU the batch is cut into one part per intra-op thread, each rendered by a
        # worker that runs torch on one thread: the per-sample ops are small, and on a busy
        # machine they lose more waiting at intra-op barriers than they gain.
        rows, x, y = list(rows), self._buf("x", (B, 3, S * S)), self._buf("y", (B, 3, S * S))
        n = min(torch.get_num_threads(), B)

        def work(c: slice):
            q = {key: None if v is None else v[c] for key, v in p.items()}
            self._slice(src, rows[c], q, x[c])
            self._photometric(x[c], q, out[c], y[c])

        parts = [slice(j * B // n, (j + 1) * B // n) for j in range(n)]
        if n == 1:
            work(parts[0])
        else:
            list(_threads(n).map(work, parts))
        return out

    def _photometric(self, x: torch.Tensor, p: dict, out: torch.Tensor, y: torch.Tensor | None = None) -> None:
        """Stain and colour jitter and normalisation of x (B, 3, P) float32 in [0, 255] (overwritten),
        written into out (B, 3, S, S) in its dtype and memory format; y: scratch like x."""
        B, dev, unit = x.shape[0], x.device, 255.0
        y = torch.empty_like(x) if y is None else y
        if p["stain"] is not None:
            x, y, unit = self._stain(x, p["stain"].to(dev, torch.float32), y), x, 1.0
        # (B, 3, P) view of the output whatever its memory format; computed in float32, cast on store
        outv = out.view(B, 3, -1) if out.is_contiguous() else out.permute(0, 2, 3, 1).reshape(B, -1, 3).transpose(1, 2)
        if p["colour"] is None:  # normalise only: one per-channel scale and shift into the output
            torch.addcmul(-self._mean / self._std, x, 1 / (unit * self._std), out=outv)
            return
        m, t = self._colour(x, p["colour"].to(dev, torch.float32), unit)
        y = torch.bmm(m, x, out=y)  # jittered and normalised, less the offset
        for ch in range(3):  # add the offset, clip to [0, 1] RGB: per plane, scalar bounds are fastest
            y[:, ch].add_(t[:, ch]).clamp_(-MEAN[ch] / STD[ch], (1 - MEAN[ch]) / STD[ch])
        outv.copy_(y)

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

    def _grid(self, src, rows, p) -> torch.Tensor:
        H, W = self.data.shape[1:3]
        B, S, dev = len(p["k"]), self.size, src.device
        rows_t = torch.as_tensor(list(rows), device=dev) if not isinstance(rows, range) else None
        fields = (src[rows_t] if rows_t is not None else src).permute(0, 3, 1, 2).float()  # (B, 3, H, W)
        y0, x0, h, w = p["box"].double().unbind(1)
        k = p["k"]
        fx = torch.where(k & 2 > 0, -1.0, 1.0).double()  # flip of output x
        fy = torch.where(k & 4 > 0, -1.0, 1.0).double()
        swap = (k & 1) > 0  # transpose: output x reads the crop's y and vice versa
        theta = torch.zeros(B, 2, 3, dtype=torch.float64)
        sx, sy = w / W, h / H
        theta[:, 0, 0] = torch.where(swap, 0.0, sx * fx)
        theta[:, 0, 1] = torch.where(swap, sx * fy, 0.0)
        theta[:, 1, 0] = torch.where(swap, sy * fx, 0.0)
        theta[:, 1, 1] = torch.where(swap, 0.0, sy * fy)
        theta[:, 0, 2] = (2 * x0 + w) / W - 1
        theta[:, 1, 2] = (2 * y0 + h) / H - 1
        grid = F.affine_grid(theta.float().to(dev), [B, 3, S, S], align_corners=False)
        return F.grid_sample(fields, grid, mode="bilinear", padding_mode="border", align_corners=False).contiguous()

    def _stain(self, x: torch.Tensor, st: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        """HED jitter of x (B, 3, P) in [0, 255] (overwritten) -> out, in [0, 1].

        skimage's rgb2hed, scale and shift of each stain, hed2rgb, without skimage's clipping
        of negative stain amounts (so zero jitter is exactly the identity): in log RGB that is
        one per-sample affine map.  st (B, 6): three scales, then three shifts.
        """
        dev = x.device
        to_hed = torch.tensor(HED_FROM_RGB.T / LOG_ADJUST, dtype=torch.float32, device=dev)  # column form
        to_rgb = torch.tensor(RGB_FROM_HED.T * LOG_ADJUST, dtype=torch.float32, device=dev)
        m = (to_rgb * st[:, None, :3]) @ to_hed  # (B, 3, 3): to stains, scale each, back to log RGB
        shift = to_rgb @ st[:, 3:, None]  # (B, 3, 1)
        od = x.div_(255).clamp_(min=1e-6).log_()
        return torch.baddbmm(shift, m, od, out=out).exp_().clamp_(0, 1)

    def _colour(self, x: torch.Tensor, cj: torch.Tensor, unit: float):
        """Per-sample (B, 3, 3) matrix and (B, 3, 1) offset: colour jitter, then normalisation.

        x (B, 3, P) in [0, unit]; cj (B, 4) brightness, contrast, saturation factors, hue shift.
        """
        dev = x.device
        b, c, s, hue = cj.unbind(1)
        grey = torch.tensor(GREY, device=dev)
        eye = torch.eye(3, device=dev)
        sat = s[:, None, None] * eye + (1 - s)[:, None, None] * grey.expand(3, 3)
        # hue: rotation by 2 pi hue about the grey axis k = (1, 1, 1) / sqrt(3) (Rodrigues)
        ang = (2 * math.pi * hue)[:, None, None]
        k = torch.full((3,), 3 ** -0.5, device=dev)
        cross = torch.tensor([[0.0, -1, 1], [1, 0, -1], [-1, 1, 0]], device=dev) * 3 ** -0.5  # [k]x
        rot = torch.cos(ang) * eye + torch.sin(ang) * cross + (1 - torch.cos(ang)) * torch.outer(k, k)
        rs = rot @ sat
        m = rs * (b * c / unit)[:, None, None]
        # contrast blends towards the mean grey of the brightened image: an offset along the grey axis
        t = rs.sum(2, keepdim=True) * ((1 - c) * b * (x.mean(2) @ grey) / unit)[:, None, None]
        std = self._std.view(1, 3, 1)
        return m / std, (t - self._mean) / std
