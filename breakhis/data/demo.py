"""Synthetic BreakHis-shaped tree, so every command can be tried without the 4 GB archive.

    python -m breakhis.data.demo data/demo --patients 16 --images-per-patient 12 --size 350x230

The pictures are SYNTHETIC: pink stroma with purple nuclei; malignant fields have denser,
larger, less regular nuclei. Folder and file naming are exactly the real ones:
BreaKHis_v1/histology_slides/breast/<class>/SOB/<subtype>/<patient folder>/<mag>X/<file>.png
"""
from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from ..errors import UserError, guard
from .dataset import MAGNIFICATIONS, SUBTYPE_CODES


def patient_names(code: str, slide: str, year: int = 14) -> tuple[str, str]:
    """(patient folder name, file-name stem) for a subtype code and slide id."""
    cls = SUBTYPE_CODES[code][0][0].upper()
    return f"SOB_{cls}_{code}_{year}-{slide}", f"SOB_{cls}_{code}-{year}-{slide}"


def image_path(root: Path, code: str, slide: str, mag: int, seq: int, year: int = 14) -> Path:
    """Where the real archive keeps image `seq` of a patient at a magnification."""
    cls, sub = SUBTYPE_CODES[code]
    folder, stem = patient_names(code, slide, year)
    return (root / "histology_slides" / "breast" / cls / "SOB" / sub / folder / f"{mag}X"
            / f"{stem}-{mag}-{seq:03d}.png")


def synth_field(rng: np.random.Generator, malignant: bool, size: tuple[int, int], mag: int) -> Image.Image:
    """One H&E-like field: stroma texture plus nuclei; size is (W, H)."""
    w, h = size
    base = np.array([233, 180, 205], np.float32) + rng.normal(0, 6, 3)
    noise = rng.normal(0, 10, (h // 4 + 1, w // 4 + 1, 3)).astype(np.float32)
    noise = np.kron(noise, np.ones((4, 4, 1), np.float32))[:h, :w]
    img = Image.fromarray(np.clip(base + noise, 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(img)
    zoom = {40: 0.6, 100: 0.8, 200: 1.0, 400: 1.3}[mag] * (w / 700)
    density = (2.2 if malignant else 0.8) * (w * h) / 20000
    r_mean = (9.0 if malignant else 5.5) * zoom
    irregular = 0.45 if malignant else 0.12
    for _ in range(int(rng.poisson(density * 10))):
        cx, cy = rng.uniform(0, w), rng.uniform(0, h)
        r = max(1.0, rng.normal(r_mean, r_mean * irregular))
        ax = r * (1 + rng.uniform(-irregular, irregular))
        colour = tuple(int(v) for v in np.clip(np.array([95, 45, 140]) + rng.normal(0, 18, 3), 0, 255))
        draw.ellipse([cx - ax, cy - r, cx + ax, cy + r], fill=colour)
    return img.filter(ImageFilter.GaussianBlur(0.6))


def make_demo(out: str | Path, patients: int = 16, images_per_patient: int = 12,
              size: tuple[int, int] = (350, 230), seed: int = 0) -> Path:
    """Write a synthetic tree under OUT/BreaKHis_v1 and return that root.

    Patients are spread over the 8 subtypes in turn; each patient's images are spread over
    the 4 magnifications in turn.
    """
    if patients < 4:
        raise UserError(f"--patients {patients}: need at least 4 (two per class) for a train/val/test split")
    if images_per_patient < 1:
        raise UserError(f"--images-per-patient {images_per_patient}: must be at least 1")
    root = Path(out) / "BreaKHis_v1"
    rng = np.random.default_rng(seed)
    codes = list(SUBTYPE_CODES)
    for p in range(patients):
        # alternate benign / malignant subtypes so that both classes grow together
        code = codes[(p % 2) * 4 + (p // 2) % 4]
        slide = f"{10000 + 37 * p}{'AB' if p % 5 == 0 else ''}"
        malignant = SUBTYPE_CODES[code][0] == "malignant"
        for i in range(images_per_patient):
            mag = MAGNIFICATIONS[i % 4]
            path = image_path(root, code, slide, mag, i // 4 + 1)
            path.parent.mkdir(parents=True, exist_ok=True)
            synth_field(rng, malignant, size, mag).save(path, compress_level=1)
    return root


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("out", help="folder to create the BreaKHis_v1 tree in")
    ap.add_argument("--patients", type=int, default=16)
    ap.add_argument("--images-per-patient", type=int, default=12)
    ap.add_argument("--size", default="350x230", help="image size WxH (the real one is 700x460)")
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args(argv)
    try:
        w, h = (int(v) for v in a.size.lower().split("x"))
    except ValueError:
        raise UserError(f"--size {a.size!r}: give WxH in pixels, e.g. 700x460") from None
    root = make_demo(a.out, a.patients, a.images_per_patient, (w, h), a.seed)
    print(f"wrote a SYNTHETIC BreakHis-shaped tree: {root} ({a.patients} patients x {a.images_per_patient} images)")
    return 0


if __name__ == "__main__":
    raise SystemExit(guard(main))
