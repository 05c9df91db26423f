"""Stain normalisation (Macenko, Reinhard): fitted once per run, applied to every decoded field.

    params = fit_run(cfg, prep)          # on --stain-ref, else on a seeded sample of TRAINING images
    save(params, run_dir)                # stain.json in the run folder (atomic)
    params = load(run_dir, cfg)          # evaluation applies the same transform
    norm = Normaliser(params, device)
    out = norm(fields)                   # (B, H, W, 3) uint8 -> (B, H, W, 3) uint8, each image to the reference

What is fitted (`fit`), on the reference image or on the training sample pooled as one image:
* macenko (Macenko et al., ISBI 2009, as torchstain's numpy normalizer): optical density
  OD = -log((I + 1) / IO) per RGB channel; pixels with OD < BETA in any channel are transparent
  and left out; the plane of the two largest eigenvectors of the OD covariance; the angles of the
  pixels in that plane, their ALPHA and 100 - ALPHA percentiles give the two stain vectors, the
  one with the larger red OD first (haematoxylin, then eosin): `he` (3, 2). The stain amounts
  C = pinv(he) OD of every pixel give `max_c` (2,), their 99th percentiles.
* reinhard (Reinhard et al. 2001, as torchstain's numpy normalizer): the mean and standard
  deviation of each CIELAB channel (D65) over all pixels: `mean` (3,), `std` (3,).

How a field is normalised: the same statistics of the field itself, then
* macenko: C = pinv(he_i) OD, scaled by max_c_ref / max_c_i, re-stained with he_ref:
  I' = min(IO exp(-he_ref C'), 255). This is one 3x3 map in OD space per image.
* reinhard: each LAB channel standardised and given the reference's mean and std, back to RGB,
  clipped to [0, 1].
Output is rounded to uint8 (torchstain truncates). A field with too little tissue, or whose two
stain vectors cannot be told apart, or whose statistics are not finite, is LEFT UNCHANGED:
stretching a blank field to tissue statistics would only amplify its noise. Too little tissue:
fewer than MIN_TISSUE of the pixels are those the statistics rest on (macenko: OD >= BETA in
every channel, the pixels its stain vectors come from; reinhard: OD >= BETA in some channel, i.e.
not near-white background). A reference (or training sample) like that is refused (UserError).
Pale fields (light eosin: red OD below BETA) leave Macenko few pixels: on the synthetic demo
tree, whose stroma is that pale, it rests on the nuclei and leaves about 5% of the fields unchanged.

Where: breakhis/loader.py (DeviceImages) normalises every cached field once per process, on the
device, in batches of fields (per-image stain vectors from torch.linalg.eigh on (B, 3, 3)
covariances), before any crop or augmentation; a cache streamed from the host is normalised per
batch as it arrives.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from .config import TrainConfig
from .data.cache import decode_resize, default_cache_size
from .data.prepare import Prepared
from .errors import UserError
from .io import read_json, write_json

FILE = "stain.json"  # in a run folder
IO = 240.0  # transmitted light intensity (torchstain's default)
ALPHA = 1.0  # robust extremes of the stain angles: the ALPHA and 100 - ALPHA percentiles
BETA = 0.15  # OD below this in any channel: a transparent (background) pixel
MAX_C_PERCENTILE = 99.0  # percentile of the stain amounts taken as each stain's maximum
MIN_TISSUE = 0.01  # fraction of a field's pixels that must be tissue for it to be normalised
MIN_ANGLE = 1e-3  # radians between the two stain vectors below which they cannot be told apart
SAMPLE = 32  # training images the default fit pools
FIT_PIXELS = 2**22  # pixels pooled at most by a fit (the sample is strided above this)
CHUNK_PIXELS = 2**22  # pixels per normalisation call on an accelerator: (B, P, 3) float32 temporaries of 50 MB
# RGB -> XYZ (sRGB, D65) and the white point, as torchstain (and skimage) use them
RGB2XYZ = ((0.412453, 0.357580, 0.180423), (0.212671, 0.715160, 0.072169), (0.019334, 0.119193, 0.950227))
WHITE = (0.95047, 1.0, 1.08883)


@dataclass(frozen=True)
class StainParams:
    """What a fit produced: plain numbers, saved as stain.json.

    method: "macenko" or "reinhard"; values: macenko {"he": 3x2 lists (columns H, E: OD per RGB
    channel), "max_c": [H, E]}; reinhard {"mean": [L, a, b], "std": [L, a, b]}. source: where it
    was fitted ({"reference": path} or {"train_sample": [paths], "seed": s, "train_images": n}).
    """
    method: str
    values: dict
    source: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return {"method": self.method, **self.values, "source": self.source,
                "constants": {"io": IO, "alpha": ALPHA, "beta": BETA, "max_c_percentile": MAX_C_PERCENTILE,
                              "min_tissue": MIN_TISSUE}}

    def key(self) -> dict:
        """What the transform depends on (the feature cache key hashes it)."""
        return {"method": self.method, **self.values}

    @classmethod
    def from_dict(cls, d: dict, where: str) -> StainParams:
        shapes = {"macenko": {"he": (3, 2), "max_c": (2,)}, "reinhard": {"mean": (3,), "std": (3,)}}
        method = d.get("method") if isinstance(d, dict) else None
        try:
            values = {k: np.asarray(d[k], dtype=np.float64) for k in shapes[method]}
            good = all(v.shape == shapes[method][k] and np.isfinite(v).all() for k, v in values.items())
        except (KeyError, TypeError, ValueError):
            good = False
        why = out_of_range(method, values) if good else ""
        if not good or why:
            raise UserError(f"{where} is not a stain normalisation this toolkit wrote, or it is damaged"
                            f"{' (' + why + ')' if why else ''}; train the run again")
        return cls(method, {k: v.tolist() for k, v in values.items()}, d.get("source") or {})


UNIT_TOL = 1e-3  # |norm - 1| allowed of a saved stain vector (a fit's are unit length to float rounding)
OD_TOL = 1e-3  # how far below 0 a saved stain vector's OD may read (rounding of a component at 0)
# the largest stain amount a fit can give: |OD| <= log(IO) in each of 3 channels, through pinv of two
# unit vectors at least MIN_ANGLE apart (its norm is at most 1 / sin(MIN_ANGLE / 2))
MAX_C_LIMIT = math.log(IO) * math.sqrt(3) / math.sin(MIN_ANGLE / 2)
LAB_RANGE = ((0.0, 100.0), (-128.0, 128.0), (-128.0, 128.0))  # CIELAB channels of RGB in [0, 1]


def out_of_range(method: str, values: dict[str, np.ndarray]) -> str:
    """Why finite fitted values cannot come from a fit (fit, macenko_stats, reinhard_stats); "" when they can."""
    if method == "macenko":
        he, max_c = values["he"], values["max_c"]
        norms = np.linalg.norm(he, axis=0)
        if np.abs(norms - 1).max() > UNIT_TOL:
            return f"stain vectors of length {', '.join(f'{n:.4g}' for n in norms)}, need 1"
        if he.min() < -OD_TOL:
            return f"a stain vector with negative optical density {he.min():.4g}"
        if not ((max_c > 0) & (max_c <= MAX_C_LIMIT)).all():
            return f"max_c {', '.join(f'{c:.4g}' for c in max_c)}, need > 0 and <= {MAX_C_LIMIT:.4g}"
    else:
        mean, std = values["mean"], values["std"]
        for c, (lo, hi) in enumerate(LAB_RANGE):
            if not lo <= mean[c] <= hi:
                return f"LAB mean {mean[c]:.4g} of channel {'Lab'[c]} outside [{lo:g}, {hi:g}]"
            if not 0 < std[c] <= (hi - lo) / 2:
                return f"LAB std {std[c]:.4g} of channel {'Lab'[c]}, need > 0 and <= {(hi - lo) / 2:g}"
    return ""


# ---------------------------------------------------------------------------- batched maths (torch)

def optical_density(x: torch.Tensor) -> torch.Tensor:
    """OD = -log((I + 1) / IO) of x (..., 3) float RGB in [0, 255]."""
    return torch.log(IO / (x + 1))


def percentile(v: torch.Tensor, q: float, valid: torch.Tensor | None = None) -> torch.Tensor:
    """The q-th percentile (numpy's 'linear' method) of each row of v (B, P) over its valid
    entries (B, P) bool (all when None) -> (B,). Rows without valid entries give +-inf.

    A partial sort (topk) of the tail that holds the percentile, not a full sort: for q = 1 or 99
    that is about 1% of each row."""
    B, P = v.shape
    n = torch.full((B,), P, device=v.device) if valid is None else valid.sum(1)
    pos = (n - 1).clamp(min=0).double() * (q / 100)
    lo, hi = pos.floor().long(), pos.ceil().long()
    frac = (pos - lo).to(v.dtype)
    top = q > 50  # rank from the top: fewer values to sort
    if top:
        lo, hi = n - 1 - lo, n - 1 - hi
    w = v if valid is None else v.masked_fill(~valid, -math.inf if top else math.inf)
    k = int(min(P, max(1, int(torch.maximum(lo, hi).max()) + 1)))
    s = torch.topk(w, k, dim=1, largest=top, sorted=True).values
    a, b = (s.gather(1, i.clamp(0, k - 1)[:, None])[:, 0] for i in (lo, hi))
    return a + frac * (b - a)


def macenko_stats(od: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Stain vectors of each image of od (B, P, 3), the optical density of its pixels.

    Returns he (B, 3, 2) (columns H, E), max_c (B, 2), the tissue fraction (B,) and ok (B,) bool
    (enough tissue, separable stains, finite). See the module docstring."""
    B, P, _ = od.shape
    tissue = (od[..., 0] >= BETA) & (od[..., 1] >= BETA) & (od[..., 2] >= BETA)  # (B, P)
    n = tissue.sum(1)
    w = tissue.to(od.dtype)[..., None]
    mu = (od * w).sum(1) / n.clamp(min=1)[:, None]  # (B, 3)
    d = (od - mu[:, None]) * w
    cov = d.transpose(1, 2) @ d / (n - 1).clamp(min=1)[:, None, None]  # (B, 3, 3), as np.cov
    _, vecs = torch.linalg.eigh(cov)  # eigenvalues ascending
    plane = vecs[:, :, 1:3]  # (B, 3, 2): the second and the largest eigenvector
    proj = od @ plane  # (B, P, 2)
    # atan2(largest, second): the OD of tissue is positive, so its projection on the largest
    # eigenvector has one sign and the angles never wrap around +-pi, whatever eigh's signs
    phi = torch.atan2(proj[..., 1], proj[..., 0])
    lo, hi = percentile(phi, ALPHA, tissue), percentile(phi, 100 - ALPHA, tissue)
    v_lo = (plane @ torch.stack([lo.cos(), lo.sin()], -1)[..., None])[..., 0]  # (B, 3)
    v_hi = (plane @ torch.stack([hi.cos(), hi.sin()], -1)[..., None])[..., 0]
    h_first = (v_lo[:, 0] > v_hi[:, 0])[:, None]  # haematoxylin: the larger red OD
    he = torch.stack([torch.where(h_first, v_lo, v_hi), torch.where(h_first, v_hi, v_lo)], -1)  # (B, 3, 2)
    finite = torch.isfinite(he).flatten(1).all(-1)  # not so without tissue (percentiles of nothing)
    he = torch.where(finite[:, None, None], he, torch.eye(3, 2, dtype=he.dtype, device=he.device))  # placeholder
    c = od @ torch.linalg.pinv(he).transpose(1, 2)  # (B, P, 2) stain amounts of every pixel
    max_c = torch.stack([percentile(c[..., 0], MAX_C_PERCENTILE), percentile(c[..., 1], MAX_C_PERCENTILE)], -1)
    frac = n.to(od.dtype) / P
    ok = finite & (frac >= MIN_TISSUE) & (hi - lo > MIN_ANGLE) & (max_c > 0).all(-1) & torch.isfinite(max_c).all(-1)
    return he, max_c, frac, ok


def rgb_to_lab(rgb: torch.Tensor) -> torch.Tensor:
    """CIELAB (D65; L in [0, 100]) of rgb (..., 3) sRGB in [0, 1], as torchstain's rgb2lab."""
    lin = torch.where(rgb > 0.04045, ((rgb.clamp(min=0) + 0.055) / 1.055) ** 2.4, rgb / 12.92)
    m = torch.tensor(RGB2XYZ, dtype=rgb.dtype, device=rgb.device) / torch.tensor(WHITE, dtype=rgb.dtype,
                                                                                 device=rgb.device)[:, None]
    xyz = lin @ m.T  # XYZ over the white point
    f = torch.where(xyz > 0.008856, xyz.clamp(min=0) ** (1 / 3), 7.787 * xyz + 16 / 116)
    fx, fy, fz = f.unbind(-1)
    return torch.stack([116 * fy - 16, 500 * (fx - fy), 200 * (fy - fz)], -1)


def lab_to_rgb(lab: torch.Tensor) -> torch.Tensor:
    """sRGB (..., 3) in [0, 1] (clipped) of CIELAB lab (..., 3), as torchstain's lab2rgb."""
    L, a, b = lab.unbind(-1)
    fy = (L + 16) / 116
    f = torch.stack([a / 500 + fy, fy, fy - b / 200], -1)
    xyz = torch.where(f > 0.2068966, f ** 3, (f - 16 / 116) / 7.787)
    m = torch.linalg.inv(torch.tensor(RGB2XYZ, dtype=torch.float64)).to(lab.dtype).to(lab.device)
    xyz = xyz * torch.tensor(WHITE, dtype=lab.dtype, device=lab.device)
    rgb = xyz @ m.T
    rgb = torch.where(rgb > 0.0031308, 1.055 * rgb.clamp(min=0) ** (1 / 2.4) - 0.055, rgb * 12.92)
    return rgb.clamp(0, 1)


def reinhard_stats(lab: torch.Tensor, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """LAB mean (B, 3), std (B, 3) (population), tissue fraction (B,) and ok (B,) of the images whose
    pixels are x (B, P, 3) RGB in [0, 255] and lab (B, P, 3) their CIELAB. Tissue here: any pixel
    that is not near-white background (OD >= BETA in some channel, i.e. I + 1 <= IO exp(-BETA))."""
    mean, std = lab.mean(1), lab.std(1, correction=0)
    dark = IO * math.exp(-BETA) - 1
    frac = ((x[..., 0] <= dark) | (x[..., 1] <= dark) | (x[..., 2] <= dark)).to(lab.dtype).mean(1)
    ok = (frac >= MIN_TISSUE) & (std > 1e-6).all(-1) & torch.isfinite(mean).all(-1) & torch.isfinite(std).all(-1)
    return mean, std, frac, ok


# ---------------------------------------------------------------------------- applying

class Normaliser:
    """Normalises fields to one fitted reference, on `device`.

    stats(fields) -> per-image maps (a dict of (B, ...) tensors); apply(fields, maps) -> the
    normalised fields; calling it does both. fields: (B, H, W, 3) uint8 on the device.
    Rows whose maps say ok=False come back unchanged (see the module docstring).
    """

    def __init__(self, params: StainParams, device):
        self.params, self.method, self.device = params, params.method, torch.device(device)
        t = {k: torch.tensor(v, dtype=torch.float32, device=self.device) for k, v in params.values.items()}
        self.ref = t  # macenko: he (3, 2), max_c (2,); reinhard: mean (3,), std (3,)

    def _space(self, fields: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(x, s): the pixels x (B, P, 3) float in [0, 255] and the space the method works in:
        macenko the optical density, reinhard CIELAB, (B, P, 3) float32."""
        x = fields.reshape(fields.shape[0], -1, 3).float()
        return x, optical_density(x) if self.method == "macenko" else rgb_to_lab(x / 255)

    def stats(self, fields: torch.Tensor, space: tuple[torch.Tensor, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
        """Per-image maps of fields (B, H, W, 3) uint8: macenko "m" (B, 3, 3) in OD space; reinhard
        "scale", "shift" (B, 3) in LAB; and "ok" (B,) bool. space: _space(fields), if at hand."""
        x, s = space or self._space(fields)
        if self.method == "macenko":
            he, max_c, _, ok = macenko_stats(s)
            # OD' = he_ref diag(max_c_ref / max_c) pinv(he) OD
            m = self.ref["he"] @ torch.diag_embed(self.ref["max_c"] / max_c.clamp(min=1e-6)) @ torch.linalg.pinv(he)
            ok = ok & torch.isfinite(m).flatten(1).all(-1)
            return {"m": torch.where(ok[:, None, None], m, torch.eye(3, device=m.device)), "ok": ok}
        mean, std, _, ok = reinhard_stats(s, x)
        scale = self.ref["std"] / std.clamp(min=1e-6)
        return {"scale": torch.where(ok[:, None], scale, 1.0), "shift": torch.where(ok[:, None], self.ref["mean"] - mean * scale, 0.0),
                "ok": ok}

    def apply(self, fields: torch.Tensor, maps: dict[str, torch.Tensor],
              space: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        """fields (B, H, W, 3) uint8 normalised with maps (from stats) -> a new (B, H, W, 3) uint8 tensor."""
        _, s = space or self._space(fields)
        if self.method == "macenko":
            y = torch.baddbmm(torch.full((1, 1, 3), math.log(IO), device=s.device), s,
                              maps["m"].transpose(1, 2), alpha=-1).exp_().clamp_(max=255)
        else:
            y = lab_to_rgb(s.mul_(maps["scale"][:, None]).add_(maps["shift"][:, None])).mul_(255)
        out = y.round_().to(torch.uint8).view(fields.shape)
        keep = ~maps["ok"]
        if keep.any():  # too little tissue: the field as it was
            out[keep] = fields[keep]
        return out

    def __call__(self, fields: torch.Tensor) -> torch.Tensor:
        out = torch.empty_like(fields)
        for i, j in chunks(fields.shape[0], fields.shape[1] * fields.shape[2], fields.device):
            space = self._space(fields[i:j])  # shared by stats and apply (apply overwrites it)
            out[i:j] = self.apply(fields[i:j], self.stats(fields[i:j], space), space)
        return out


def chunks(n: int, pixels: int, device) -> list[tuple[int, int]]:
    """(start, stop) of consecutive runs of n images of `pixels` pixels, CHUNK_PIXELS at a time (on
    the CPU an eighth of that: five 256 x 390 fields; their float temporaries, about 5 MB each, are
    reused from the allocator's pool instead of costing fresh pages; one field at a time is 4x slower)."""
    step = max(1, (CHUNK_PIXELS // (8 if torch.device(device).type == "cpu" else 1)) // max(1, pixels))
    return [(i, min(n, i + step)) for i in range(0, n, step)]


# ---------------------------------------------------------------------------- fitting

def fit(method: str, fields: np.ndarray | torch.Tensor, source: dict, what: str,
        hint: str = "give a field with tissue") -> StainParams:
    """The reference of `method` from fields (N, H, W, 3) uint8, pooled as one image (strided to at
    most FIT_PIXELS pixels). `what` names them, and `hint` says what to do, in the UserError raised
    when they show no tissue."""
    x = torch.as_tensor(np.asarray(fields)).reshape(-1, 3)
    x = x[::max(1, -(-len(x) // FIT_PIXELS))].float()[None]  # (1, P, 3)
    if method == "macenko":
        he, max_c, frac, ok = macenko_stats(optical_density(x))
        values = {"he": he[0].double().tolist(), "max_c": max_c[0].double().tolist()}
    elif method == "reinhard":
        mean, std, frac, ok = reinhard_stats(rgb_to_lab(x / 255), x)
        values = {"mean": mean[0].double().tolist(), "std": std[0].double().tolist()}
    else:
        raise ValueError(f"unknown stain normalisation {method!r}")
    if not bool(ok[0]):
        where = "in every channel" if method == "macenko" else "in some channel"
        raise UserError(f"{what} shows no H&E tissue to fit --stain-norm {method} on: {float(frac[0]):.1%} of its "
                        f"pixels are stained (optical density >= {BETA} {where}; at least {MIN_TISSUE:.0%} "
                        f"needed{', in two separable stain colours' if method == 'macenko' else ''}); {hint}")
    why = out_of_range(method, {k: np.asarray(v) for k, v in values.items()})
    if why:  # what a fit writes is what a run folder is checked against when read back (from_dict)
        raise UserError(f"{what} gives a --stain-norm {method} fit that cannot be used ({why}); {hint}")
    return StainParams(method, values, source)


def read_reference(path: str | Path, size: tuple[int, int]) -> np.ndarray:
    """The --stain-ref image decoded as the cache decodes fields (RGB, resized to size=(H, W)): (H, W, 3) uint8."""
    p = Path(path).expanduser()
    if not p.is_file():
        raise UserError(f"--stain-ref {path}: file not found; give a reference field (PNG, JPEG or TIFF), or leave "
                        f"--stain-ref out to fit on a sample of the training images")
    pixels, info = decode_resize(p, size)
    if not info["ok"]:
        raise UserError(f"--stain-ref {path}: not a readable image ({info['error']}); give a PNG, JPEG or TIFF field")
    return pixels


def fit_reference(cfg: TrainConfig) -> StainParams:
    """cfg.stain_norm fitted on cfg.stain_ref, decoded at the run's cache size; UserError for a
    missing or unreadable file, or an image without tissue (fit.preflight calls it before any work)."""
    size = cfg.cache_hw() or default_cache_size(cfg.image_size)
    pixels = read_reference(cfg.stain_ref, size)
    return fit(cfg.stain_norm, pixels[None], {"reference": str(cfg.stain_ref)}, f"--stain-ref {cfg.stain_ref}")


def train_sample(n: int, seed: int) -> np.ndarray:
    """Sorted rows (at most SAMPLE) of a training partition of n images, drawn with seed."""
    return np.sort(np.random.default_rng(seed).choice(n, size=min(SAMPLE, n), replace=False))


def fit_run(cfg: TrainConfig, prep: Prepared) -> StainParams | None:
    """The stain reference of a run: None for --stain-norm none; cfg.stain_ref when given; else a
    sample of SAMPLE training images drawn with --split-seed (so --seeds repeats share it), from
    the decode cache. Validation and test images are never looked at."""
    if cfg.stain_norm == "none":
        return None
    if cfg.stain_ref:
        return fit_reference(cfg)
    rows = train_sample(len(prep.positions["train"]), cfg.split_seed)
    fields = prep.cache.images[prep.positions["train"][rows]]  # (n, H, W, 3) uint8
    source = {"train_sample": [prep.parts["train"][i].path for i in rows], "seed": cfg.split_seed,
              "train_images": len(prep.positions["train"])}
    return fit(cfg.stain_norm, fields, source, f"the sample of {len(rows)} training images",
               "give a reference field with tissue (--stain-ref PNG)"
               + (", or use --stain-norm reinhard" if cfg.stain_norm == "macenko" else ""))


def save(params: StainParams | None, run_dir: Path) -> None:
    """stain.json in the run folder (atomic); nothing for None."""
    if params is not None:
        write_json(Path(run_dir) / FILE, params.to_dict())


def load(run_dir: Path, cfg: TrainConfig) -> StainParams | None:
    """The run's fitted stain normalisation (None when cfg.stain_norm is none); a missing or
    damaged stain.json is a UserError."""
    if cfg.stain_norm == "none":
        return None
    path = Path(run_dir) / FILE
    d = read_json(path)
    if d is None:
        raise UserError(f"run {run_dir} was trained with --stain-norm {cfg.stain_norm} but has no {FILE}; "
                        f"its images cannot be normalised as in training: train the run again")
    params = StainParams.from_dict(d, str(path))
    if params.method != cfg.stain_norm:
        raise UserError(f"{path} holds a {params.method} normalisation but the run's config says "
                        f"--stain-norm {cfg.stain_norm}; the run folder is damaged")
    return params
