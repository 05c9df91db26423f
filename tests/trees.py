"""Record lists and checks shared by the data tests: the real archive's per-subtype counts, demo-like specs."""
import dataclasses

import numpy as np

from breakhis.data import dataset as D

# the published archive: subtype code -> (patients, images)
REAL = {"A": (4, 444), "F": (10, 1014), "PT": (3, 453), "TA": (7, 569),
        "DC": (38, 3451), "LC": (5, 626), "MC": (9, 792), "PC": (6, 560)}


def full_spec() -> list[tuple[str, int]]:
    """(file-name patient id, images) of 82 patients with the real per-subtype counts."""
    rng = np.random.default_rng(0)
    spec = []
    for code, (k, total) in REAL.items():
        w = rng.uniform(0.5, 1.5, k)
        sizes = np.floor(w / w.sum() * total).astype(int)
        sizes[0] += total - sizes.sum()
        slides = {"A": ["22549AB", "22549CD", "22549G"], "DC": ["13412"], "LC": ["13412"], "PC": ["190EF"]}.get(code, [])
        slides = slides + [str(1000 + i) for i in range(k - len(slides))]
        cls = "B" if code in ("A", "F", "PT", "TA") else "M"
        for slide, n in zip(slides, sizes):
            spec.append((f"SOB_{cls}_{code}-{15 if slide == '190EF' else 14}-{slide}", int(n)))
    return spec


def records_for(spec) -> list[D.Record]:
    """Records (no files) for (patient id, images) pairs; images cycle over the magnifications."""
    out = []
    for patient, n in spec:
        for j in range(n):
            r = D.parse_name(f"{patient}-{D.MAGNIFICATIONS[j % 4]}-{j // 4 + 1:03d}.png")
            out.append(dataclasses.replace(r, path=r.expected_path()))
    return sorted(out, key=lambda r: r.path)


def demo_spec(patients: int, images: int = 12) -> list[tuple[str, int]]:
    """Patients spread over the subtypes in turn, alternating classes (as breakhis.data.demo does)."""
    codes = list(REAL)
    return [(f"SOB_{'BM'[p % 2]}_{codes[(p % 2) * 4 + (p // 2) % 4]}-14-{10000 + p}", images) for p in range(patients)]


def check_split(m, records, ratio, tol):
    chosen = {p: set(m[p]) for p in D.PARTS}
    parts = {p: [r for r in records if r.path in chosen[p]] for p in D.PARTS}
    assert sum(map(len, parts.values())) == len(records)
    pats = {p: {r.patient for r in rs} for p, rs in parts.items()}
    assert not (pats["train"] & pats["val"]) and not (pats["train"] & pats["test"]) and not (pats["val"] & pats["test"])
    assert {p: sorted(v) for p, v in pats.items()} == m["patients"]
    for p, target in zip(D.PARTS, ratio):
        if target:
            assert {r.label for r in parts[p]} == {0, 1}, p
        assert abs(len(parts[p]) / len(records) - target / 100) <= tol, (p, len(parts[p]))
    return parts
