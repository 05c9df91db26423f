"""The views: how a cached field becomes the model input, and the augmentation maths.

How a cached field (H x W uint8, e.g. 256 x 390 for the 700 x 460 originals) becomes the
model input (image_size x image_size, normalised with the backbone's mean and std: ImageNet's
MEAN and STD for torchvision, timm's pretrained_cfg for timm models; config.json records them):

* evaluation (train=False), and training with augmentation off: the central square of full
  field height (H x H) resized (bilinear) to image_size x image_size; in order, no randomness.
  (position 0 or 1 instead of 0.5 takes the left or right square of full height: the linear
  probe's whole-field view averages the three, breakhis/probe.py.)
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
     shifts the HSV hue, which walks the colour hexagon rather than a circle); clipped to
     [0, 1] once, at the end (torchvision clips after each step: the two differ only where an
     intermediate value leaves [0, 1]);
  5. normalise.
  Stain jitter comes before colour jitter: staining happens on the slide, colour shifts in
  the camera. All random values of an epoch are drawn at once on the CPU from (seed, epoch),
  always all of them, so switching one augmentation off leaves the others' draws unchanged.

Everything here runs on the CPU once per epoch (parameters, per-sample matrices) or is a
small tensor function; breakhis/loader.py applies them to batches on the device.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from .config import TrainConfig

MEAN = (0.485, 0.456, 0.406)  # ImageNet statistics, as torchvision's weights expect
STD = (0.229, 0.224, 0.225)
GREY = (0.2989, 0.587, 0.114)  # luma weights, as torchvision's rgb_to_grayscale
# Ruifrok-Johnston stain vectors (rows: haematoxylin, eosin, DAB), as skimage.color
RGB_FROM_HED = np.array([[0.65, 0.70, 0.29], [0.07, 0.99, 0.11], [0.27, 0.57, 0.78]])
HED_FROM_RGB = np.linalg.inv(RGB_FROM_HED)
LOG_ADJUST = math.log(1e-6)  # skimage's optical-density scale
NRAND = 15  # uniform random numbers drawn per sample, see draw


@dataclass(frozen=True)
class Augment:
    """Training augmentation settings; strengths of 0 switch a part off."""
    crop_scale: tuple[float, float] = (0.35, 1.0)  # area fraction of the whole cached field
    crop_ratio: tuple[float, float] = (0.75, 1.3333)  # width / height
    dihedral: bool = True  # the 8 flips / 90-degree rotations, drawn per sample
    color_jitter: float = 0.2  # brightness/contrast/saturation in [1-s, 1+s]; hue in [-s/4, s/4] turn
    stain_jitter: float = 0.05  # HED scale ~ U(1-s, 1+s) and shift ~ U(-s, s) per stain
    # the ranges (0 < crop lo <= hi <= 1, strengths in [0, 1)) are TrainConfig.validate()'s rules

    @classmethod
    def from_config(cls, cfg: TrainConfig) -> Augment | None:
        """The augmentation a TrainConfig asks for; None when cfg.augment is False."""
        if not cfg.augment:
            return None
        return cls(crop_scale=tuple(cfg.crop_scale), crop_ratio=tuple(cfg.crop_ratio), dihedral=cfg.dihedral,
                   color_jitter=cfg.color_jitter, stain_jitter=cfg.stain_jitter)


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



def draw(u: torch.Tensor, augment: Augment | None, H: int, W: int, position: float = 0.5) -> dict:
    """Per-sample parameters from uniforms u (n, NRAND) float64 for an H x W field, on the CPU.
    position: without augmentation, where the square of full height sits across the field (0 left,
    0.5 centre, 1 right).

    box (n, 4) long y0, x0, h, w; k (n,) dihedral index; rs, coef (colour_maps) and stain_m,
    stain_t (stain_maps), float64, None when that part is off. Every column of u is used
    whatever is switched off, so one switch leaves the other draws unchanged.
    """
    n, a = len(u), augment
    p = dict.fromkeys(["stain_m", "stain_t", "rs", "coef"])
    if a is None:  # the square of full field height, centred unless position says otherwise
        side = min(H, W)
        x0 = (W - side) // 2 if position == 0.5 else round((W - side) * position)
        p["box"] = torch.tensor([(H - side) // 2, x0, side, side]).repeat(n, 1)
        p["k"] = torch.zeros(n, dtype=torch.long)
        return p
    area = (a.crop_scale[0] + (a.crop_scale[1] - a.crop_scale[0]) * u[:, 0]) * H * W
    lo, hi = math.log(a.crop_ratio[0]), math.log(a.crop_ratio[1])
    ratio = (lo + (hi - lo) * u[:, 1]).exp()  # width / height, log-uniform
    h = (area / ratio).sqrt().round().clamp(1, H).long()
    w = (area * ratio).sqrt().round().clamp(1, W).long()
    y0 = (u[:, 2] * (H - h + 1)).long().clamp(max=H - h)
    x0 = (u[:, 3] * (W - w + 1)).long().clamp(max=W - w)
    p["box"] = torch.stack([y0, x0, h, w], 1)
    p["k"] = (u[:, 4] * 8).long().clamp(max=7) if a.dihedral else torch.zeros(n, dtype=torch.long)
    if a.color_jitter > 0:
        s = a.color_jitter * (2 * u[:, 5:9] - 1)
        p["rs"], p["coef"] = colour_maps(torch.cat([1 + s[:, :3], s[:, 3:] / 4], 1))
    if a.stain_jitter > 0:
        s = a.stain_jitter * (2 * u[:, 9:15] - 1)
        p["stain_m"], p["stain_t"] = stain_maps(torch.cat([1 + s[:, :3], s[:, 3:]], 1))
    return p


def colour_maps(cj: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """cj (n, 4) brightness, contrast, saturation factors and hue shift (turns), float64 ->
    rs (n, 3, 3) = hue rotation @ saturation, and coef (n, 2) = (b * c, (1 - c) * b)."""
    b, c, s, hue = cj.unbind(1)
    grey, eye = torch.tensor(GREY, dtype=torch.float64), torch.eye(3, dtype=torch.float64)
    sat = s[:, None, None] * eye + (1 - s)[:, None, None] * grey.expand(3, 3)
    # hue: rotation by 2 pi hue about the grey axis k = (1, 1, 1) / sqrt(3) (Rodrigues)
    ang = (2 * math.pi * hue)[:, None, None]
    k = torch.full((3,), 3 ** -0.5, dtype=torch.float64)
    cross = torch.tensor([[0.0, -1, 1], [1, 0, -1], [-1, 1, 0]], dtype=torch.float64) * 3 ** -0.5  # [k]x
    rot = torch.cos(ang) * eye + torch.sin(ang) * cross + (1 - torch.cos(ang)) * torch.outer(k, k)
    return rot @ sat, torch.stack([b * c, (1 - c) * b], 1)


def stain_maps(st: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """st (n, 6) stain scales then shifts, float64 -> the log-RGB affine map of the HED jitter,
    m (n, 3, 3) and shift (n, 3, 1), acting on (3, P) planes of log RGB.

    skimage's rgb2hed, scale and shift of each stain, hed2rgb, without skimage's clipping of
    negative stain amounts (so zero jitter is exactly the identity): one affine map in log RGB.
    """
    to_hed = torch.from_numpy(HED_FROM_RGB.T / LOG_ADJUST)  # column form of rgb2hed's matrix
    to_rgb = torch.from_numpy(RGB_FROM_HED.T * LOG_ADJUST)
    return (to_rgb * st[:, None, :3]) @ to_hed, to_rgb @ st[:, 3:, None]


def crop_thetas(box: torch.Tensor, k: torch.Tensor, H: int, W: int) -> torch.Tensor:
    """(n, 2, 3) affine_grid thetas (align_corners=False) that sample the boxes (y0, x0, h, w)
    of an H x W field, then apply dihedral k: the same pixels as slicing the box and resizing it."""
    y0, x0, h, w = box.double().unbind(1)
    fx = torch.where(k & 2 > 0, -1.0, 1.0).double()  # flip of output x
    fy = torch.where(k & 4 > 0, -1.0, 1.0).double()
    swap = (k & 1) > 0  # transpose: output x reads the crop's y and vice versa
    sx, sy = w / W, h / H
    theta = torch.zeros(len(k), 2, 3, dtype=torch.float64)
    theta[:, 0, 0] = torch.where(swap, 0.0, sx * fx)
    theta[:, 0, 1] = torch.where(swap, sx * fy, 0.0)
    theta[:, 1, 0] = torch.where(swap, sy * fx, 0.0)
    theta[:, 1, 1] = torch.where(swap, 0.0, sy * fy)
    theta[:, 0, 2] = (2 * x0 + w) / W - 1
    theta[:, 1, 2] = (2 * y0 + h) / H - 1
    return theta
