"""breakhis.data.dataset: name parsing, root forms, the index, duplicates."""
import hashlib
import shutil

import numpy as np
import pytest
from PIL import Image
from trees import REAL, check_split, demo_spec, full_spec, records_for  # noqa: F401

from breakhis.data import dataset as D
from breakhis.data.cache import build_cache
from breakhis.data.demo import make_demo
from breakhis.data.integrity import integrity_report
from breakhis.errors import UserError


# ---------------------------------------------------------------- names and roots
@pytest.mark.parametrize("name, patient, label, subtype, mag, seq, accession", [
    ("SOB_B_A-14-22549AB-40-001.png", "SOB_B_A-14-22549AB", 0, "adenosis", 40, 1, "14-22549"),
    ("SOB_B_A-14-22549CD-200-003.png", "SOB_B_A-14-22549CD", 0, "adenosis", 200, 3, "14-22549"),
    ("SOB_B_A-14-22549G-400-010.png", "SOB_B_A-14-22549G", 0, "adenosis", 400, 10, "14-22549"),
    ("SOB_M_PC-15-190EF-100-012.png", "SOB_M_PC-15-190EF", 1, "papillary_carcinoma", 100, 12, "15-190"),
    ("SOB_M_DC-14-13412-40-021.png", "SOB_M_DC-14-13412", 1, "ductal_carcinoma", 40, 21, "14-13412"),
    ("SOB_B_TA-14-16184CD-100-004.png", "SOB_B_TA-14-16184CD", 0, "tubular_adenoma", 100, 4, "14-16184"),
])
def test_parse_name(name, patient, label, subtype, mag, seq, accession):
    r = D.parse_name(name)
    assert (r.patient, r.label, r.subtype, r.magnification, r.seq, r.accession) == (
        patient, label, subtype, mag, seq, accession)
    assert r.cls == ("benign", "malignant")[label] and D.SUBTYPES[r.subtype_index] == subtype


def test_parse_name_layout_and_order():
    r = D.parse_name("SOB_M_PC-15-190EF-100-012.png")
    assert r.expected_path() == ("histology_slides/breast/malignant/SOB/papillary_carcinoma/SOB_M_PC_15-190EF/100X/"
                                 "SOB_M_PC-15-190EF-100-012.png")
    assert D.SUBTYPES == ("adenosis", "fibroadenoma", "phyllodes_tumor", "tubular_adenoma", "ductal_carcinoma",
                          "lobular_carcinoma", "mucinous_carcinoma", "papillary_carcinoma")


@pytest.mark.parametrize("name", ["SOB_B_DC-14-13412-40-001.png", "SOB_B_A-14-22549AB-50-001.png",
                                  "SOB_B_A-14-22549AB-40.png", "SOB_X_A-14-22549AB-40-001.png", "foo.png",
                                  "SOB_B_A-14-22549AB-40-001.jpg", "SOB_B_A_14-22549AB-40-001.png"])
def test_parse_name_refuses(name):
    assert D.parse_name(name) is None


def test_root_forms(tmp_path, demo_root):
    assert D.find_root(demo_root) == demo_root
    assert D.find_root(demo_root.parent) == demo_root
    inner = make_demo(tmp_path / "kaggle" / "BreaKHis_v1", patients=4, images_per_patient=4, size=(8, 8))
    assert inner.parent.name == inner.name == "BreaKHis_v1"
    assert D.find_root(tmp_path / "kaggle") == inner
    assert D.find_root(tmp_path / "kaggle" / "BreaKHis_v1") == inner
    idx = D.index_tree(tmp_path / "kaggle")
    assert idx.root == inner and len(idx.records) == 16 and len(idx.patients) == 4


def test_index_demo(demo_root):
    idx = D.index_tree(demo_root)
    assert len(idx.records) == 16 * 12 and len(idx.patients) == 16 and idx.strays == []
    assert [r.path for r in idx.records] == sorted(r.path for r in idx.records)
    for r in idx.records:
        assert (demo_root / r.path).is_file() and r.expected_path() == r.path


def test_missing_and_empty_roots(tmp_path):
    with pytest.raises(UserError, match=r"not found.*--download data.*python -m breakhis\.data\.demo data/demo"):
        D.find_root(tmp_path / "nowhere")
    (tmp_path / "BreaKHis_v1" / "histology_slides" / "breast").mkdir(parents=True)
    with pytest.raises(UserError, match="no BreakHis images.*python -m breakhis.data.demo"):
        D.index_tree(tmp_path)


def test_strays_are_ignored_and_counted(fresh_demo):
    mag_dir = next(fresh_demo.rglob("40X"))
    for p in (fresh_demo / ".DS_Store", mag_dir / "Thumbs.db", fresh_demo / "notes.txt",
              mag_dir / ("._" + next(mag_dir.glob("*.png")).name)):
        p.write_bytes(b"x")
    idx = D.index_tree(fresh_demo)
    assert len(idx.records) == 64 and len(idx.strays) == 4
    assert ".DS_Store" in idx.strays and "notes.txt" in idx.strays
    assert integrity_report(idx)["strays"] == idx.strays


def test_names_disagreeing_with_folders(fresh_demo):
    files = sorted(fresh_demo.rglob("*.png"))
    forty = next(f for f in files if f.parent.name == "40X")
    moved = forty.parent.parent / "100X" / forty.name  # a 40X file in the 100X folder
    forty.rename(moved)
    files = [f for f in files if f != forty]
    other = D.parse_name(files[-1].name)
    renamed = files[1].with_name(f"{other.patient}-{D.parse_name(files[1].name).magnification}-009.png")
    files[1].rename(renamed)  # another patient's name in this patient's folder
    (files[2].parent / "scan.png").write_bytes(files[2].read_bytes())
    with pytest.raises(UserError) as e:
        D.index_tree(fresh_demo)
    msg = str(e.value)
    assert msg.startswith("3 file(s)") and moved.name in msg and renamed.name in msg and "scan.png" in msg


# ---------------------------------------------------------------- duplicates
def test_duplicates_from_hashes():
    recs = records_for([("SOB_M_DC-14-13412", 4), ("SOB_M_LC-14-13412", 4), ("SOB_M_DC-14-2000", 4),
                        ("SOB_B_A-14-3000", 4)])
    by = {p: [r.path for r in recs if r.patient == p] for p in {r.patient for r in recs}}
    hashes = {r.path: r.path for r in recs}  # unique by default
    for a, b in zip(by["SOB_M_DC-14-13412"], by["SOB_M_LC-14-13412"]):
        hashes[b] = hashes[a]  # the LC folder holds the DC pictures
    hashes[by["SOB_M_DC-14-2000"][0]] = hashes[by["SOB_B_A-14-3000"][0]]  # benign = malignant copy
    hashes[by["SOB_M_DC-14-2000"][1]] = hashes[by["SOB_M_DC-14-2000"][2]]  # same patient: not a leak
    groups = D.find_duplicates(recs, hashes)
    assert len(groups) == 5 and all(len(g) == 2 for g in groups)
    kept, dropped = D.drop_duplicates(recs, groups, "binary")
    lc_dropped = [d for d in dropped if d["patient"] == "SOB_M_LC-14-13412"]
    assert len(lc_dropped) == 4 and all(d["kept"].startswith("histology_slides/breast/malignant/SOB/ductal")
                                        for d in lc_dropped)
    assert len(dropped) == 6 and len(kept) == 16 - 6  # benign/malignant copies conflict: both go
    assert {d["path"] for d in dropped if d["kept"] is None} == {by["SOB_M_DC-14-2000"][0], by["SOB_B_A-14-3000"][0]}
    kept, dropped = D.drop_duplicates(recs, groups, "subtype")
    assert len(dropped) == 10 and all(d["kept"] is None for d in dropped)
    assert not {r.patient for r in kept} & {"SOB_M_LC-14-13412"}
    with pytest.raises(ValueError, match="task"):  # users meet TrainConfig.validate()'s --task message first
        D.drop_duplicates(recs, groups, "multiclass")


def test_duplicates_from_decoded_pixels(fresh_demo, cache_dir):
    idx = D.index_tree(fresh_demo)
    dc = next(r for r in idx.records if r.subtype == "ductal_carcinoma" and r.magnification == 40)
    lc = next(r for r in idx.records if r.subtype == "lobular_carcinoma")
    copy = D.parse_name(f"{lc.patient}-40-009.png")
    shutil.copy(fresh_demo / dc.path, fresh_demo / copy.expected_path())
    rgba = fresh_demo / idx.records[5].path  # stored as RGBA: converted, counted, not a duplicate of anything
    Image.open(rgba).convert("RGBA").save(rgba)
    idx = D.index_tree(fresh_demo)
    paths = [r.path for r in idx.records]
    cache = build_cache(idx.root, paths, (16, 16), cache_dir=cache_dir, progress=False)
    rep = integrity_report(idx, cache.info, paths)
    assert [d["paths"] for d in rep["duplicates"]] == [sorted([dc.path, copy.expected_path()])]
    assert rep["duplicate_patients"] == [{"patients": sorted([dc.patient, lc.patient]), "images": 1,
                                          "conflicting_labels": ["subtype"]}]
    assert rep["dropped"] == {"binary": 1, "subtype": 2} and rep["modes"] == {"RGBA": 1}
    assert dc.patient in rep["verdict"] and rep["verdict"].startswith("OK")


# --- python -m breakhis.data.demo OUT --full ---------------------------------------------------------
# the published images per magnification (40X, 100X, 200X, 400X) over all subtypes
PUBLISHED_MAGS = {40: 1995, 100: 2081, 200: 2013, 400: 1820}


def test_full_layout_has_the_published_counts():
    from breakhis.data.demo import full_layout

    layout = full_layout()
    assert len(layout) == D.FULL["patients"] and len({(c, y, s) for c, y, s, _ in layout}) == 82
    assert sum(sum(m.values()) for *_, m in layout) == D.FULL["images"]
    for code, (patients, images) in REAL.items():
        mine = [m for c, _, _, m in layout if c == code]
        assert (len(mine), sum(sum(m.values()) for m in mine)) == (patients, images), code
    assert {mag: sum(m[mag] for *_, m in layout) for mag in D.MAGNIFICATIONS} == PUBLISHED_MAGS
    benign = sum(sum(m.values()) for c, _, _, m in layout if D.SUBTYPE_CODES[c][0] == "benign")
    assert (benign, D.FULL["images"] - benign) == (D.FULL["benign"], D.FULL["malignant"])
    slides = {(c, y, s) for c, y, s, _ in layout}
    assert {("A", 14, "22549AB"), ("A", 14, "22549CD"), ("A", 14, "22549G"), ("DC", 14, "13412"), ("LC", 14, "13412"),
            ("PC", 15, "190EF")} <= slides
    dc, lc = (next(m for c, _, s, m in layout if (c, s) == (code, "13412")) for code in ("DC", "LC"))
    assert all(dc[mag] >= lc[mag] for mag in D.MAGNIFICATIONS)  # every LC 13412 picture has its DC twin
    assert full_layout() == layout and full_layout(seed=1) != layout  # seeded
    half = full_layout(fraction=0.5)
    assert len(half) == 82 and all(h[3][m] == max(1, round(f[3][m] * 0.5)) for h, f in zip(half, layout) for m in f[3])


def test_make_full_writes_the_layout_with_the_13412_duplicates(tmp_path):
    from breakhis.data.demo import full_layout, make_full

    root = make_full(tmp_path, size=(12, 8), fraction=0.02, workers=2)
    idx = D.index_tree(root)
    layout = full_layout(fraction=0.02)
    assert len(idx.records) == sum(sum(m.values()) for *_, m in layout)
    assert len({r.patient for r in idx.records}) == 82
    assert "SOB_B_A-14-22549AB" in {r.patient for r in idx.records} and "SOB_M_PC-15-190EF" in {r.patient for r in idx.records}
    assert (root / "histology_slides/breast/malignant/SOB/papillary_carcinoma/SOB_M_PC_15-190EF/40X").is_dir()
    pixels = lambda p: np.asarray(Image.open(root / p))
    by_name = {(r.patient, r.magnification, r.seq): r.path for r in idx.records}
    twins = [(by_name[("SOB_M_DC-14-13412", m, q)], p) for (pat, m, q), p in by_name.items() if pat == "SOB_M_LC-14-13412"]
    assert twins and all(np.array_equal(pixels(a), pixels(b)) for a, b in twins)
    others = [p for (pat, m, q), p in by_name.items() if pat.startswith("SOB_M_MC")]
    assert not any(np.array_equal(pixels(twins[0][0]), pixels(p)) for p in others)
    hashes = {r.path: hashlib.sha1(pixels(r.path).tobytes()).hexdigest() for r in idx.records}
    groups = D.find_duplicates(idx.records, hashes)
    assert sorted(map(sorted, groups)) == sorted(sorted(pair) for pair in twins)


def test_full_fraction_errors(tmp_path):
    from breakhis.data.demo import main

    with pytest.raises(UserError, match="--fraction 0"):
        main([str(tmp_path), "--full", "--fraction", "0"])
    with pytest.raises(UserError, match="--fraction applies to --full"):
        main([str(tmp_path), "--fraction", "0.5"])
    assert not list(tmp_path.iterdir())


def test_demo_content_he_cuts_real_fields_stained_per_patient(he_picture, tmp_path, capsys):
    """--content he: real H&E texture (the picture's own pixels, re-sampled) at BreakHis' 700x460 with the
    archive's PNG sizes; one patient's fields share a staining, patients differ (mean optical density per
    channel, by hand); no two fields are the same cut. A missing picture is one line, nothing written."""
    from breakhis.data.demo import main

    assert main([str(tmp_path / "t"), "--content", "he", "--patients", "4", "--images-per-patient", "2",
                 "--size", "700x460"]) == 0
    assert "real H&E texture" in capsys.readouterr().out
    files = sorted((tmp_path / "t").rglob("*.png"))
    assert len(files) == 8 and all(300_000 < f.stat().st_size < 800_000 for f in files)  # the archive: ~500 KB
    od = {}
    for f in files:
        x = np.asarray(Image.open(f).convert("RGB"), np.float64)
        assert x.shape == (460, 700, 3)
        od.setdefault(f.parent.parent.name, []).append((-np.log((x + 1) / 256)).reshape(-1, 3).mean(0))
    within = max(np.abs(a - b).max() for a, b in od.values())
    means = np.array([np.mean(v, 0) for v in od.values()])
    between = max(np.abs(means[i] - means[j]).max() for i in range(4) for j in range(i))
    assert between > within and between > 0.05, (between, within)
    pixels = [np.asarray(Image.open(f)) for f in files]
    assert all(not np.array_equal(pixels[i], pixels[j]) for i in range(8) for j in range(i))
    with pytest.raises(UserError, match="--content he needs the real H&E field /no/such.png"):
        main([str(tmp_path / "u"), "--content", "he", "--he-field", "/no/such.png"])
    assert not (tmp_path / "u").exists()


def test_demo_counts_per_patient(tmp_path):
    """images_per_patient as one count per slide: each patient folder holds its own number of images, spread
    over the magnifications in turn (40X first); a wrong-length list or a zero is a UserError."""
    slides = [("TA", "111"), ("DC", "222"), ("F", "333"), ("MC", "444")]
    root = make_demo(tmp_path / "t", images_per_patient=[1, 5, 2, 9], size=(8, 8), slides=slides)
    got = {s: sorted(p.name.split("-")[3] for p in root.rglob(f"*-{s}-*.png")) for _, s in slides}
    assert got == {"111": ["40"], "222": sorted(["40", "100", "200", "400", "40"]), "333": sorted(["40", "100"]),
                   "444": sorted(["40", "100", "200", "400"] * 2 + ["40"])}
    for bad in ([1, 2, 3], [1, 2, 0, 4]):
        with pytest.raises(UserError, match="images-per-patient"):
            make_demo(tmp_path / "u", images_per_patient=bad, size=(8, 8), slides=slides)
