"""Synthetic BreakHis-shaped tree, so every command can be tried without the 4 GB archive.

    python -m breakhis.data.demo data/demo --patients 16 --images-per-patient 12 --size 350x230
    python -m breakhis.data.demo data/demo --folds                 # also a Folds.csv: train.py --folds 1-5 on it
    python -m breakhis.data.demo /tmp/full --full                  # the archive's layout: 82 patients, 7,909 x 700x460
    python -m breakhis.data.demo /tmp/half --full --fraction 0.5   # every patient, half of each one's images
    python -m breakhis.data.demo /tmp/he --content he --size 700x460   # real H&E texture: real PNG sizes (~500 KB)

--full: the published per-subtype, per-magnification image counts (Spanhol et al. 2016, Table 1;
they sum to the per-subtype totals and to 7,909) and patients per subtype. The per-PATIENT
split of those counts is NOT the archive's (not known here): it is a deterministic, seeded,
plausible split that sums exactly to the published counts. Patient ids: A 22549AB, 22549CD,
22549G, DC and LC 13412, PC 15-190EF are real; the others are made-up ids of the same form.
As in the archive, SOB_M_LC-14-13412 holds pixel-identical copies of images of SOB_M_DC-14-13412.

The pictures are SYNTHETIC: pink stroma with purple nuclei; malignant fields have denser,
larger, less regular nuclei. With --content he they are real H&E texture instead, cut from one real
field (../shared/data/he-field.png; see he_field) at random places, scales, angles and flips, and
re-stained per patient in optical-density space; they carry NO class signal (one picture of one
carcinoma cannot teach benign from malignant). Folder and file naming are exactly the real ones:
BreaKHis_v1/histology_slides/breast/<class>/SOB/<subtype>/<patient folder>/<mag>X/<file>.png

--folds (and train.py --demo) also writes OUT/Folds.csv in the official layout (fold,mag,filename,grp,
every fold listing every image): five independent, seeded patient splits with 30% of each class's
patients on the test side, as the official folds are five random 70/30 patient splits. They are
SYNTHETIC folds of a synthetic tree, there so that --fold and --folds can be tried.
"""
from __future__ import annotations

import argparse
import os
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from ..errors import UserError, guard
from ..io import write_text
from .dataset import MAGNIFICATIONS, SUBTYPE_CODES, index_tree


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


# --- real H&E texture (--content he) -------------------------------------------------------------

CONTENTS = ("synthetic", "he")  # what the fields show: drawn nuclei, or real H&E texture
HE_FIELD = Path(__file__).resolve().parents[3] / "shared" / "data" / "he-field.png"  # ../shared/data from the repo root
SCALES = (0.45, 0.9)  # source pixels per output pixel: a 700x460 field covers 315-630 px of the 1000 px picture
# Ruifrok & Johnston's H&E optical densities per RGB channel (columns H, E), the stains a field is split into
RUIFROK = np.array([[0.65, 0.07], [0.70, 0.99], [0.29, 0.11]])
RESTAIN = 0.25  # per-patient spread: stain amounts scaled by exp(N(0, RESTAIN)), vectors tilted by N(0, RESTAIN / 2) OD


def he_source(path: str | Path | None = None) -> Image.Image:
    """The real H&E field the he content is cut from (RGB); a UserError naming it when it is absent."""
    p = Path(path or os.environ.get("BREAKHIS_HE_FIELD") or HE_FIELD)
    try:
        with Image.open(p) as im:
            return im.convert("RGB")
    except (OSError, ValueError) as e:
        raise UserError(f"--content he needs the real H&E field {p} ({e}); give its path with --he-field "
                        f"(see ../shared/data/README.md)") from None


def patient_stain(rng: np.random.Generator) -> np.ndarray:
    """(3, 3) map of one patient's staining in optical-density space: OD' = OD @ map.

    OD is split into H and E amounts with the Ruifrok vectors (least squares; the residual third
    component is kept as it is), the amounts are scaled and re-stained with slightly tilted vectors."""
    basis = np.concatenate([RUIFROK / np.linalg.norm(RUIFROK, axis=0), np.zeros((3, 1))], 1)
    basis[:, 2] = np.cross(basis[:, 0], basis[:, 1])
    tilted = np.abs(basis[:, :2] + rng.normal(0, RESTAIN / 2, (3, 2)))
    tilted /= np.linalg.norm(tilted, axis=0)
    new = np.concatenate([tilted * np.exp(rng.normal(0, RESTAIN, 2)), basis[:, 2:]], 1)
    return np.linalg.inv(basis).T @ new.T  # OD (row vector) -> amounts -> re-stained OD


def he_field(rng: np.random.Generator, source: Image.Image, size: tuple[int, int], stain: np.ndarray) -> Image.Image:
    """One field of real texture: a rectangle of `source` at a random place, scale (SCALES), angle (any)
    and flip, resampled to size (W, H), re-stained with `stain` (patient_stain) in optical density.
    Two such fields share texture only where their rectangles overlap at a similar angle."""
    w, h = size
    sw, sh = source.size
    scale = rng.uniform(*SCALES) * 700 / w  # source pixels per output pixel, whatever the output size
    angle = rng.uniform(0, 2 * np.pi)
    half = scale * (abs(np.cos(angle)) * w + abs(np.sin(angle)) * h) / 2, scale * (abs(np.sin(angle)) * w + abs(np.cos(angle)) * h) / 2
    cx, cy = rng.uniform(half[0], sw - half[0]), rng.uniform(half[1], sh - half[1])
    c, s = np.cos(angle) * scale, np.sin(angle) * scale
    # output (x, y) -> source (a x + b y + c0, d x + e y + f0): rotation and scale about the field's centre
    coeffs = (c, -s, cx - c * w / 2 + s * h / 2, s, c, cy - s * w / 2 - c * h / 2)
    img = source.transform((w, h), Image.Transform.AFFINE, coeffs, resample=Image.Resampling.BICUBIC)
    if scale > 1.5:  # a small field (tests): cut at about one source pixel per pixel, then downscale antialiased
        k = int(scale)
        coeffs = (c / k, -s / k, coeffs[2], s / k, c / k, coeffs[5])
        img = source.transform((w * k, h * k), Image.Transform.AFFINE, coeffs, resample=Image.Resampling.BICUBIC)
        img = img.resize((w, h), Image.Resampling.BOX)
    if rng.random() < 0.5:
        img = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    od = -np.log((np.asarray(img, np.float32) + 1) / 256)  # (H, W, 3) optical density
    out = 256 * np.exp(-np.maximum(od @ stain.astype(np.float32), 0)) - 1
    return Image.fromarray(np.clip(out + 0.5, 0, 255).astype(np.uint8))


def make_demo(out: str | Path, patients: int = 16, images_per_patient: int | Sequence[int] = 12,
              size: tuple[int, int] = (350, 230), seed: int = 0, content: str = "synthetic",
              he_path: str | Path | None = None, slides: list[tuple[str, str]] | None = None) -> Path:
    """Write a synthetic tree under OUT/BreaKHis_v1 and return that root.

    Patients are spread over the 8 subtypes in turn (slides: [(subtype code, slide id)] instead, one
    patient each, e.g. data.eva.DEMO_SLIDES); each patient's images are spread over the 4 magnifications in turn.
    images_per_patient: one count for all, or one per patient (in slides' order).
    content: "synthetic" (synth_field: drawn nuclei, with a class
    signal) or "he" (he_field: real H&E texture cut from he_path, re-stained per patient; NO class
    signal: one picture cannot teach benign from malignant, so a model trained on it stays at chance).
    """
    if content not in CONTENTS:
        raise UserError(f"--content {content!r}: choose one of {', '.join(CONTENTS)}")
    source = he_source(he_path) if content == "he" else None
    if slides:
        patients = len(slides)
    if patients < 4:
        raise UserError(f"--patients {patients}: need at least 4 (two per class) for a train/val/test split")
    counts = [images_per_patient] * patients if isinstance(images_per_patient, int) else list(images_per_patient)
    if len(counts) != patients or min(counts) < 1:
        raise UserError(f"--images-per-patient {images_per_patient}: must be at least 1 (one count, or one per patient)")
    root = Path(out) / "BreaKHis_v1"
    rng = np.random.default_rng(seed)
    codes = list(SUBTYPE_CODES)
    for p in range(patients):
        # alternate benign / malignant subtypes so that both classes grow together
        code = codes[(p % 2) * 4 + (p // 2) % 4]
        slide = f"{10000 + 37 * p}{'AB' if p % 5 == 0 else ''}"
        if slides:
            code, slide = slides[p]
        malignant = SUBTYPE_CODES[code][0] == "malignant"
        stain = patient_stain(rng) if source is not None else None
        for i in range(counts[p]):
            mag = MAGNIFICATIONS[i % 4]
            path = image_path(root, code, slide, mag, i // 4 + 1)
            path.parent.mkdir(parents=True, exist_ok=True)
            if source is None:
                synth_field(rng, malignant, size, mag).save(path, compress_level=1)
            else:  # the archive's PNGs are compressed at the default level: real file sizes
                he_field(rng, source, size, stain).save(path)
    return root


def write_folds(root: str | Path, seed: int = 0, folds: int = 5, test_share: float = 0.3) -> Path:
    """Write ROOT/../Folds.csv: `folds` seeded patient splits, round(test_share x patients) of each class
    (at least one, never all) on each fold's test side; returns its path (see the module docstring)."""
    records = index_tree(root).records
    by_class: dict[str, list[str]] = {}
    for r in records:
        by_class.setdefault(r.cls, [])
        if r.patient not in by_class[r.cls]:
            by_class[r.cls].append(r.patient)
    rows = ["fold,mag,filename,grp"]
    for f in range(1, folds + 1):
        rng = np.random.default_rng([seed, f])
        test = set()
        for patients in by_class.values():
            k = min(max(1, round(test_share * len(patients))), len(patients) - 1)
            test |= {patients[i] for i in rng.choice(len(patients), k, replace=False)}
        rows += [f"{f},{r.magnification},BreaKHis_v1/{r.path},{'test' if r.patient in test else 'train'}"
                 for r in records]
    path = Path(root).parent / "Folds.csv"
    write_text(path, "\n".join(rows) + "\n")
    return path


# --- the full archive's layout ------------------------------------------------------------------

# images per magnification (40X, 100X, 200X, 400X) of each subtype, as published; patients per subtype
FULL_COUNTS = {"A": (114, 113, 111, 106), "F": (253, 260, 264, 237), "PT": (109, 121, 108, 115),
               "TA": (149, 150, 140, 130), "DC": (864, 903, 896, 788), "LC": (156, 170, 163, 137),
               "MC": (205, 222, 196, 169), "PC": (145, 142, 135, 138)}
FULL_PATIENTS = {"A": 4, "F": 10, "PT": 3, "TA": 7, "DC": 38, "LC": 5, "MC": 9, "PC": 6}
KNOWN_SLIDES = {"A": [(14, "22549AB"), (14, "22549CD"), (14, "22549G")], "DC": [(14, "13412")],
                "LC": [(14, "13412")], "PC": [(15, "190EF")]}
DUPLICATED = ("LC", "DC", "13412")  # the LC patient's images are pixel-identical copies of the DC patient's


def _split(total: int, weights: np.ndarray) -> np.ndarray:
    """total split in proportion to weights, summing exactly (largest remainders get the rest)."""
    raw = weights / weights.sum() * total
    out = np.floor(raw).astype(int)
    out[np.argsort(raw - out, kind="stable")[::-1][: total - out.sum()]] += 1
    return out


def full_layout(seed: int = 0, fraction: float = 1.0) -> list[tuple[str, int, str, dict[int, int]]]:
    """[(code, year, slide, {magnification: images})] of the 82 patients; sums are the published counts.

    fraction < 1 keeps every patient with round(fraction x) of each of its per-magnification counts
    (at least 1). The DC 13412 patient gets the largest DC count at each magnification; the LC 13412
    images with a (magnification, seq) that DC 13412 also has are copies of those pictures.
    """
    rng = np.random.default_rng(seed)
    layout = []
    for code, counts in FULL_COUNTS.items():
        k = FULL_PATIENTS[code]
        known = KNOWN_SLIDES.get(code, [])
        made_up = 10000 + 1000 * list(FULL_COUNTS).index(code)  # ids unique across subtypes
        slides = known + [(14, str(made_up + 37 * i)) for i in range(k - len(known))]
        weights = rng.uniform(0.5, 1.5, k)  # patient sizes vary about 3x, as in the archive
        per_mag = [_split(n, weights) for n in counts]  # (4, k)
        for j, (year, slide) in enumerate(slides):
            layout.append((code, year, slide, {m: int(per_mag[i][j]) for i, m in enumerate(MAGNIFICATIONS)}))
    if fraction < 1:
        layout = [(c, y, s, {m: max(1, round(n * fraction)) for m, n in mags.items()}) for c, y, s, mags in layout]
    # the duplicated pair: the DC 13412 patient takes the largest DC count at each magnification (a swap)
    dc = [x[3] for x in layout if x[0] == DUPLICATED[1]]
    mine = next(x[3] for x in layout if x[0] == DUPLICATED[1] and x[2] == DUPLICATED[2])
    for m in MAGNIFICATIONS:
        big = max(dc, key=lambda c: c[m])
        big[m], mine[m] = mine[m], big[m]
    return layout


_SOURCE: dict[str, Image.Image] = {}  # the he picture, read once per writer process


def _render(job: tuple) -> None:
    """Write one field; its pixels depend only on (seed, picture number, patient), not on the worker."""
    path, size, mag, malignant, key, he_path, patient_key = job
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    if he_path is None:
        synth_field(np.random.default_rng(key), malignant, size, mag).save(path, compress_level=1)
        return
    if he_path not in _SOURCE:
        _SOURCE[he_path] = he_source(he_path)
    stain = patient_stain(np.random.default_rng(patient_key))
    he_field(np.random.default_rng(key), _SOURCE[he_path], size, stain).save(path)


def make_full(out: str | Path, size: tuple[int, int] = (700, 460), seed: int = 0, fraction: float = 1.0,
              workers: int = 0, content: str = "synthetic", he_path: str | Path | None = None) -> Path:
    """Write the full archive's layout (see the module docstring) under OUT/BreaKHis_v1; return that root.
    content: as make_demo's (he: about 0.3 s and 500 KB per 700x460 field)."""
    if not 0 < fraction <= 1:
        raise UserError(f"--fraction {fraction}: give a share of each patient's images in (0, 1]")
    if content not in CONTENTS:
        raise UserError(f"--content {content!r}: choose one of {', '.join(CONTENTS)}")
    if content == "he":
        he_source(he_path)  # absent: one line now, not in every worker
        he_path = str(Path(he_path or os.environ.get("BREAKHIS_HE_FIELD") or HE_FIELD))
    else:
        he_path = None
    root = Path(out) / "BreaKHis_v1"
    layout = full_layout(seed, fraction)
    jobs, pictures = [], {}
    dc13412 = next(mags for code, _, slide, mags in layout if (code, slide) == DUPLICATED[1:])
    for code, year, slide, mags in layout:
        malignant = SUBTYPE_CODES[code][0] == "malignant"
        for mag, n in mags.items():
            for seq in range(1, n + 1):
                # the LC 13412 images reuse the DC 13412 pictures of the same (magnification, seq): pixel-identical
                dup = (code, slide) == (DUPLICATED[0], DUPLICATED[2]) and seq <= dc13412[mag]
                owner = DUPLICATED[1] if dup else code
                key = pictures.setdefault((owner, year, slide, mag, seq), len(pictures))
                jobs.append((str(image_path(root, code, slide, mag, seq, year)), size, mag, malignant,
                             seed * 1_000_003 + key, he_path,  # the stain of the picture's owner: copies stay identical
                             [seed, list(FULL_COUNTS).index(owner), year, int("".join(filter(str.isdigit, slide)))]))
    workers = workers or os.cpu_count() or 1
    with ProcessPoolExecutor(workers) as pool:
        for _ in pool.map(_render, jobs, chunksize=32):
            pass
    return root


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("out", help="folder to create the BreaKHis_v1 tree in")
    ap.add_argument("--patients", type=int, default=16)
    ap.add_argument("--images-per-patient", type=int, default=12)
    ap.add_argument("--size", help="image size WxH (default 350x230; with --full 700x460, the real one)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--full", action="store_true", help="the archive's layout: 82 patients, 7,909 images at 700x460")
    ap.add_argument("--fraction", type=float, help="with --full: this share of each patient's images (default 1)")
    ap.add_argument("--workers", type=int, default=0, help="with --full: writer processes (0: one per core)")
    ap.add_argument("--folds", action="store_true", help="also write OUT/Folds.csv: 5 seeded 70/30 patient splits")
    ap.add_argument("--content", default="synthetic", choices=CONTENTS,
                    help="synthetic: drawn nuclei with a class signal (default); he: real H&E texture cut from "
                         "--he-field at random places, scales, angles and flips, re-stained per patient, no class signal")
    ap.add_argument("--he-field", help=f"with --content he: the real H&E picture (default $BREAKHIS_HE_FIELD, else {HE_FIELD})")
    a = ap.parse_args(argv)
    if a.he_field and a.content != "he":
        raise UserError("--he-field is the picture --content he cuts fields from; add --content he")
    if a.fraction is not None and not a.full:
        raise UserError("--fraction applies to --full trees only; for a small tree give --patients and --images-per-patient")
    a.size = a.size or ("700x460" if a.full else "350x230")
    try:
        w, h = (int(v) for v in a.size.lower().split("x"))
    except ValueError:
        raise UserError(f"--size {a.size!r}: give WxH in pixels, e.g. 700x460") from None
    what = "; real H&E texture re-stained per patient, no class signal" if a.content == "he" else ""
    if a.full:
        root = make_full(a.out, (w, h), a.seed, 1.0 if a.fraction is None else a.fraction, a.workers, a.content,
                         a.he_field)
        n = sum(1 for _ in root.rglob("*.png"))
        print(f"wrote a SYNTHETIC tree in the archive's layout: {root} (82 patients, {n} images{what})")
    else:
        root = make_demo(a.out, a.patients, a.images_per_patient, (w, h), a.seed, a.content, a.he_field)
        print(f"wrote a SYNTHETIC BreakHis-shaped tree: {root} ({a.patients} patients x {a.images_per_patient} "
              f"images{what})")
    if a.folds:
        print(f"wrote {write_folds(root, a.seed)} (5 SYNTHETIC 70/30 patient splits, in the official layout)")
    return 0


if __name__ == "__main__":
    raise SystemExit(guard(main))
