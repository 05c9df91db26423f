"""breakhis.data: name parsing, root forms, integrity checks, duplicates, patient-level splits, folds, CLI."""
import dataclasses
import json
import re
import shutil
import sys
import types

import numpy as np
import pytest
from PIL import Image

from breakhis import data as D
from breakhis import splits as S
from breakhis.atomic import write_json
from breakhis.cache import build_cache
from breakhis.demo import make_demo
from breakhis.errors import UserError, guard

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
    """Patients spread over the subtypes in turn, alternating classes (as breakhis.demo does)."""
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


# ---------------------------------------------------------------- names and roots
@pytest.mark.parametrize("name, patient, label, subtype, mag, seq, accession", [
    ("SOB_B_A-14-22549AB-40-001.png", "SOB_B_A-14-22549AB", 0, "adenosis", 40, 1, "SOB_B_A-14-22549"),
    ("SOB_B_A-14-22549CD-200-003.png", "SOB_B_A-14-22549CD", 0, "adenosis", 200, 3, "SOB_B_A-14-22549"),
    ("SOB_B_A-14-22549G-400-010.png", "SOB_B_A-14-22549G", 0, "adenosis", 400, 10, "SOB_B_A-14-22549"),
    ("SOB_M_PC-15-190EF-100-012.png", "SOB_M_PC-15-190EF", 1, "papillary_carcinoma", 100, 12, "SOB_M_PC-15-190"),
    ("SOB_M_DC-14-13412-40-021.png", "SOB_M_DC-14-13412", 1, "ductal_carcinoma", 40, 21, "SOB_M_DC-14-13412"),
    ("SOB_B_TA-14-16184CD-100-004.png", "SOB_B_TA-14-16184CD", 0, "tubular_adenoma", 100, 4, "SOB_B_TA-14-16184"),
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
    with pytest.raises(UserError, match=r"not found.*--download data.*python -m breakhis\.demo data/demo"):
        D.find_root(tmp_path / "nowhere")
    (tmp_path / "BreaKHis_v1" / "histology_slides" / "breast").mkdir(parents=True)
    with pytest.raises(UserError, match="no BreakHis images.*python -m breakhis.demo"):
        D.index_tree(tmp_path)


def test_strays_are_ignored_and_counted(fresh_demo):
    mag_dir = next(fresh_demo.rglob("40X"))
    for p in (fresh_demo / ".DS_Store", mag_dir / "Thumbs.db", fresh_demo / "notes.txt",
              mag_dir / ("._" + next(mag_dir.glob("*.png")).name)):
        p.write_bytes(b"x")
    idx = D.index_tree(fresh_demo)
    assert len(idx.records) == 64 and len(idx.strays) == 4
    assert ".DS_Store" in idx.strays and "notes.txt" in idx.strays
    assert D.integrity_report(idx)["strays"] == idx.strays


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
    with pytest.raises(UserError, match="--task"):
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
    rep = D.integrity_report(idx, cache.info, paths)
    assert [d["paths"] for d in rep["duplicates"]] == [sorted([dc.path, copy.expected_path()])]
    assert rep["duplicate_patients"] == [{"patients": sorted([dc.patient, lc.patient]), "images": 1,
                                          "conflicting_labels": ["subtype"]}]
    assert rep["dropped"] == {"binary": 1, "subtype": 2} and rep["modes"] == {"RGBA": 1}
    assert dc.patient in rep["verdict"] and rep["verdict"].startswith("OK")


# ---------------------------------------------------------------- splits
@pytest.mark.parametrize("ratio", [(70, 10, 20), (60, 10, 30)])
def test_split_invariants_full_size(ratio):
    recs = records_for(full_spec())
    assert len(recs) == 7909 and len({r.patient for r in recs}) == 82
    tests = set()
    for seed in range(12):
        m = S.make_split(recs, ratio, seed)
        parts = check_split(m, recs, ratio, tol=0.01)
        for p in D.PARTS:  # every subtype has >= 3 patients: each partition holds all 8
            assert len({r.subtype for r in parts[p]}) == 8, (seed, p)
            assert abs(np.mean([r.label == 0 for r in parts[p]]) - 2480 / 7909) < 0.1
        tests.add(tuple(m["test"]))
    assert len(tests) == 12  # seeds give different splits


@pytest.mark.parametrize("ratio", [(70, 10, 20), (60, 10, 30), (80, 0, 20)])
@pytest.mark.parametrize("patients", [6, 8, 16])
def test_split_invariants_small_trees(ratio, patients):
    recs = records_for(demo_spec(patients))
    # each patient holds 1/N of the images; 3 benign + 3 malignant over 3 partitions forces 2/2/2
    tol = 0.4 if patients == 6 and ratio[1] else 1.5 / patients + 0.1
    for seed in range(20):
        m = S.make_split(recs, ratio, seed)
        check_split(m, recs, ratio, tol)
        if ratio[1] == 0:
            assert m["val"] == []


def test_split_needs_enough_patients_per_class():
    recs = records_for(demo_spec(4))
    with pytest.raises(UserError, match=r"2 benign and 2 malignant patients.*at least 3.*80:0:20"):
        S.make_split(recs, (60, 10, 30))
    check_split(S.make_split(recs, (80, 0, 20)), recs, (80, 0, 20), tol=0.31)  # 2 + 2 patients: forced 50:50


def test_split_repairs_when_no_trial_has_both_classes():
    # one patient per subtype and tiny val/test shares: random trials almost never cover every class
    recs = records_for([(f"SOB_{c}_{code}-14-{i}", 12) for i, (c, code) in
                        enumerate([("B", "A"), ("B", "F"), ("B", "PT"), ("M", "DC"), ("M", "LC"), ("M", "MC")])])
    for seed in range(5):
        m = S.make_split(recs, (98, 1, 1), seed)
        check_split(m, recs, (98, 1, 1), tol=0.7)
        assert [len(m["patients"][p]) for p in D.PARTS] == [2, 2, 2]  # the only split with both classes everywhere


def test_split_is_deterministic_and_manifest_fields():
    recs = records_for(demo_spec(16))
    a, b = S.make_split(recs, "70:10:20", 3), S.make_split(recs, (70, 10, 20), 3)
    assert a == b
    assert (a["seed"], a["ratio"], a["group"], a["fold"], a["skipped"], a["dropped"]) == (3, [70, 10, 20], "patient", 0, [], [])
    assert a["counts"]["train"]["images"] == len(a["train"]) and sum(c["images"] for c in a["counts"].values()) == 192


def test_accession_grouping():
    spec = [("SOB_B_A-14-22549AB", 30), ("SOB_B_A-14-22549CD", 30), ("SOB_B_A-14-22549G", 30)] + demo_spec(16, 30)
    recs = records_for(spec)
    trio = {"SOB_B_A-14-22549AB", "SOB_B_A-14-22549CD", "SOB_B_A-14-22549G"}
    side = lambda m: {p for p in D.PARTS for x in m["patients"][p] if x in trio}  # noqa: E731
    assert all(len(side(S.make_split(recs, (60, 10, 30), s, group="accession"))) == 1 for s in range(20))
    assert any(len(side(S.make_split(recs, (60, 10, 30), s))) > 1 for s in range(20))
    assert S.make_split(recs, (60, 10, 30), 0, group="accession")["group"] == "accession"
    with pytest.raises(UserError, match="--group"):
        S.make_split(recs, (60, 10, 30), 0, group="slide")


@pytest.mark.parametrize("bad", ["50:50", "70:10:30", "a:b:c", "0:50:50", "70:-10:40", (60.5, 10, 29.5)])
def test_bad_ratio(bad):
    with pytest.raises(UserError, match="--split"):
        S.make_split(records_for(demo_spec(8)), bad)


def test_select_and_magnification():
    recs = records_for(demo_spec(16))
    m = S.make_split(recs, (60, 10, 30), 0)
    at40 = [r for p in D.PARTS for r in S.select(recs, m, p, 40)]
    assert sorted(r.path for r in at40) == sorted(r.path for r in recs if r.magnification == 40)
    assert S.select(recs, m, "val", "100X") == [r for r in recs if r.path in m["val"] and r.magnification == 100]
    assert len(S.select(recs, m, "test")) == len(m["test"])
    with pytest.raises(UserError, match="--magnification '50'"):
        S.select(recs, m, "train", "50")


# ---------------------------------------------------------------- manifests
def test_load_split(tmp_path):
    recs = records_for(demo_spec(16))
    m = S.make_split(recs, (60, 10, 30), 1)
    write_json(tmp_path / "s.json", m)
    assert S.load_split(tmp_path / "s.json", recs) == m
    leak = {**m, "test": m["test"] + [m["train"][0]], "train": m["train"][1:]}
    write_json(tmp_path / "leak.json", leak)
    leaked = D.parse_name(m["train"][0].rsplit("/", 1)[1]).patient
    with pytest.raises(UserError, match=f"puts {leaked} in more than one of train/val/test"):
        S.load_split(tmp_path / "leak.json")
    twice = {**m, "patients": {**m["patients"], "val": m["patients"]["val"] + m["patients"]["test"][:1]}}
    write_json(tmp_path / "twice.json", twice)
    with pytest.raises(UserError, match="more than one"):
        S.load_split(tmp_path / "twice.json")
    with pytest.raises(UserError, match="not among the usable images"):
        S.load_split(tmp_path / "s.json", recs[1:])
    (tmp_path / "bad.json").write_text("{not json")
    for name, pattern in [("bad.json", "not valid JSON"), ("none.json", "not found")]:
        with pytest.raises(UserError, match=pattern):
            S.load_split(tmp_path / name)
    write_json(tmp_path / "list.json", [1, 2])
    with pytest.raises(UserError, match="expected a JSON object"):
        S.load_split(tmp_path / "list.json")


def test_load_split_accession_leak(tmp_path):
    recs = records_for([("SOB_B_A-14-22549AB", 4), ("SOB_B_A-14-22549CD", 4)] + demo_spec(8, 4))
    ab = [r.path for r in recs if r.patient.endswith("AB")]
    cd = [r.path for r in recs if r.patient.endswith("CD")]
    m = {"train": ab, "val": [], "test": cd, "group": "patient"}
    write_json(tmp_path / "p.json", m)
    S.load_split(tmp_path / "p.json", recs)
    write_json(tmp_path / "a.json", {**m, "group": "accession"})
    with pytest.raises(UserError, match="SOB_B_A-14-22549 in more than one"):
        S.load_split(tmp_path / "a.json", recs)


# ---------------------------------------------------------------- official folds
def write_folds(path, idx, test_patients, fold=1, leak=None):
    rows = ["fold,mag,filename,grp"]
    for f in (1, 2):
        for r in idx.records:
            grp = "test" if (r.patient in test_patients) == (f == fold) else "train"
            if leak and r.path == leak:
                grp = "test"
            rows.append(f"{f},{r.magnification},BreaKHis_v1/{r.path},{grp}")
    path.write_text("\n".join(rows) + "\n")


def test_folds_csv(fresh_demo):
    idx = D.index_tree(fresh_demo)
    test_pats = {idx.patients[0], idx.patients[-1]}  # one benign, one malignant
    assert {p.split("_")[1] for p in test_pats} == {"B", "M"}
    write_folds(fresh_demo.parent / "Folds.csv", idx, test_pats)
    for seed in range(5):
        m = S.fold_split(fresh_demo, idx.records, 1, seed=seed)
        assert set(m["patients"]["test"]) == test_pats
        assert set(m["patients"]["train"]) | set(m["patients"]["val"]) == set(idx.patients) - test_pats
        assert len(m["patients"]["val"]) >= 2 and not set(m["patients"]["train"]) & set(m["patients"]["val"])
        assert {r.label for r in S.select(idx.records, m, "val")} == {0, 1}
        assert (m["fold"], m["unlisted"], m["missing"]) == (1, 0, 0)
    m2 = S.fold_split(fresh_demo, idx.records, 2, val_fraction=0)
    assert set(m2["patients"]["train"]) == test_pats and m2["val"] == []
    with pytest.raises(UserError, match="no rows for fold 3"):
        S.fold_split(fresh_demo, idx.records, 3)
    with pytest.raises(UserError, match="--fold 6"):
        S.fold_split(fresh_demo, idx.records, 6)


def test_folds_csv_leak_and_columns(fresh_demo):
    idx = D.index_tree(fresh_demo)
    victim = idx.records[10]
    write_folds(fresh_demo.parent / "Folds.csv", idx, {idx.patients[0], idx.patients[-1]}, leak=victim.path)
    with pytest.raises(UserError, match=f"puts 1 patient.*{victim.patient}.*leak"):
        S.fold_split(fresh_demo, idx.records, 1)
    (fresh_demo.parent / "Folds.csv").write_text("fold,file,group\n1,x.png,train\n")
    with pytest.raises(UserError, match="fold,mag,filename,grp"):
        S.fold_split(fresh_demo, idx.records, 1)
    (fresh_demo.parent / "Folds.csv").unlink()
    with pytest.raises(UserError, match="no Folds.csv or mkfold/dsfold1.txt"):
        S.fold_split(fresh_demo, idx.records, 1)


def test_dsfold(fresh_demo):
    idx = D.index_tree(fresh_demo)
    test_pats = {idx.patients[1], idx.patients[-2]}
    (fresh_demo.parent / "mkfold").mkdir()
    lines = [f"{r.path.rsplit('/', 1)[1]}|{r.magnification}|1|{'test' if r.patient in test_pats else 'train'}"
             for r in idx.records[4:]]  # the first 4 images are not listed
    (fresh_demo.parent / "mkfold" / "dsfold1.txt").write_text("\n".join(lines) + "\n")
    m = S.fold_split(fresh_demo, idx.records, 1, seed=0)
    assert set(m["patients"]["test"]) == test_pats and m["unlisted"] == 4
    assert len(m["train"]) + len(m["val"]) + len(m["test"]) == len(idx.records) - 4
    (fresh_demo.parent / "mkfold" / "dsfold1.txt").write_text("a|b|c\n")
    with pytest.raises(UserError, match="line 1"):
        S.fold_split(fresh_demo, idx.records, 1)


# ---------------------------------------------------------------- report
def test_report_from_info(demo_root):
    idx = D.index_tree(demo_root)
    info = [{"ok": True, "error": None, "mode": "RGB", "width": 96, "height": 64, "sha1": r.path} for r in idx.records]
    info[0] = {"ok": False, "error": "truncated", "mode": None, "width": None, "height": None, "sha1": None}
    info[1] = {**info[1], "mode": "P"}
    info[2] = {**info[2], "mode": "LA", "width": 90}
    rep = D.integrity_report(idx, info)
    assert rep["unreadable"] == [{"path": idx.records[0].path, "error": "truncated"}]
    assert rep["modes"] == {"P": 1, "LA": 1} and rep["odd_sizes"] == [{"path": idx.records[2].path, "size": "90x64"}]
    assert rep["verdict"].startswith("FAIL") and "full_dataset" not in rep
    assert rep["counts"]["adenosis"] == {"class": "benign", "40": 6, "100": 6, "200": 6, "400": 6, "images": 24, "patients": 2}
    ok = D.integrity_report(idx, info, skip_bad=True)
    assert ok["verdict"].startswith("OK: 191 usable images") and "1 unreadable image(s) skipped" in ok["verdict"]
    json.dumps(rep)


def test_report_flags_incomplete_full_dataset(tmp_path):
    recs = records_for(full_spec())
    assert "full_dataset" in D.integrity_report(D.Index(tmp_path, recs, []))
    assert D.integrity_report(D.Index(tmp_path, recs, []))["full_dataset"]["matches"]
    rep = D.integrity_report(D.Index(tmp_path, recs[:-9], []))
    assert not rep["full_dataset"]["matches"] and "images 7,900 (the archive has 7,909)" in rep["verdict"]


# ---------------------------------------------------------------- command line
def run_cli(capsys, *argv):
    rc = guard(D.main, [str(a) for a in argv])
    out, err = capsys.readouterr()
    return rc, out, err


def test_cli_report_and_split(demo_root, tmp_path, capsys):
    rc, out, err = run_cli(capsys, demo_root.parent, "--cache-dir", tmp_path / "c", "--cache-size", "16x24")
    assert rc == 0 and "papillary_carcinoma" in out and "OK: 192 usable images of 16 patients" in out
    rc, out, _ = run_cli(capsys, demo_root, "--json", "--split", "70:10:20", "--seed", "2", "--out", tmp_path / "s.json",
                         "--cache-dir", tmp_path / "c", "--cache-size", "16x24")
    rep = json.loads(out.strip().splitlines()[-1])
    assert rc == 0 and rep["images"] == 192 and rep["split"]["counts"]["train"]["images"] > 100
    m = S.load_split(tmp_path / "s.json", D.index_tree(demo_root).records)
    assert (m["ratio"], m["seed"], m["task"]) == ([70, 10, 20], 2, "binary")
    assert m == {**S.make_split(D.index_tree(demo_root).records, (70, 10, 20), 2), "task": "binary"}
    rc, out, _ = run_cli(capsys, demo_root, "--split-file", tmp_path / "s.json", "--magnification", "200",
                         "--cache-dir", tmp_path / "c", "--cache-size", "16x24")
    assert rc == 0 and "magnification 200" in out


def test_cli_download_then_report(fresh_demo, tmp_path, capsys, monkeypatch):
    calls = []
    fake = types.SimpleNamespace(
        download_and_extract=lambda url, dest, progress=True: calls.append((url, dest)) or fresh_demo.parent)
    monkeypatch.setitem(sys.modules, "breakhis.download", fake)
    rc, out, _ = run_cli(capsys, "--download", tmp_path / "dl", "--cache-dir", tmp_path / "c", "--cache-size", "8x8")
    assert rc == 0 and calls == [(D.URL, str(tmp_path / "dl"))] and "OK: 64 usable images of 8 patients" in out


def test_cli_unreadable(fresh_demo, tmp_path, capsys):
    bad = sorted(fresh_demo.rglob("*.png"))[:2]
    bad[0].write_bytes(b"not a png")
    bad[1].write_bytes(bad[1].read_bytes()[:60])  # truncated
    args = [fresh_demo, "--cache-dir", tmp_path / "c", "--cache-size", "8x8"]
    rc, out, err = run_cli(capsys, *args)
    assert rc == 2 and err.count("\n") == 1 and "Traceback" not in err and "--skip-bad" in err
    assert all(b.name in err for b in bad) and "FAIL: 2 unreadable" in out
    rc, out, err = run_cli(capsys, *args, "--skip-bad", "--split", "50:0:50", "--out", tmp_path / "s.json")
    m = json.loads((tmp_path / "s.json").read_text())
    assert rc == 0 and err == "" and sorted(s["path"].rsplit("/", 1)[1] for s in m["skipped"]) == sorted(b.name for b in bad)
    assert len(m["train"]) + len(m["test"]) == 62


@pytest.mark.parametrize("args, pattern", [
    (["{missing}"], "not found.*python -m breakhis.demo"),
    (["{empty}"], "no BreakHis images"),
    ([], "give the data folder"),
    (["{demo}", "--split", "50:50"], "--split '50:50'"),
    (["{demo}", "--split", "70:20:20"], "summing to 100"),
    (["{demo}", "--magnification", "50"], "--magnification '50'"),
    (["{demo}", "--fold", "7"], "--fold 7"),
    (["{demo}", "--fold", "1"], "no Folds.csv or mkfold/dsfold1.txt"),
    (["{demo}", "--group", "slide"], "--group 'slide'"),
    (["{demo}", "--task", "multi"], "--task 'multi'"),
    (["{demo}", "--cache-size", "big"], "--cache-size 'big'"),
    (["{demo}", "--split-file", "{missing}"], "split file .* not found"),
])
def test_cli_errors(args, pattern, demo_root, tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    subst = {"{missing}": str(tmp_path / "missing"), "{empty}": str(tmp_path / "empty"), "{demo}": str(demo_root)}
    size = [] if "--cache-size" in args else ["--cache-size", "8x8"]
    rc, out, err = run_cli(capsys, *[subst.get(a, a) for a in args], "--cache-dir", tmp_path / "c", *size)
    assert rc == 2 and "Traceback" not in err and err.count("\n") == 1
    assert err.startswith("error: ") and re.search(pattern, err), err


def test_cli_refuses_leaking_split_file(demo_root, tmp_path, capsys):
    recs = D.index_tree(demo_root).records
    m = S.make_split(recs, (60, 10, 30), 0)
    m["val"].append(m["test"][0])
    m["test"] = m["test"][1:]
    write_json(tmp_path / "leak.json", m)
    rc, _, err = run_cli(capsys, demo_root, "--split-file", tmp_path / "leak.json", "--cache-dir", tmp_path / "c",
                         "--cache-size", "8x8")
    assert rc == 2 and "more than one of train/val/test" in err


# ---------------------------------------------------------------- a full-size-shaped tree
@pytest.fixture(scope="session")
def full_tree(tmp_path_factory):
    """82 patients / 7,909 tiny 8x8 PNGs with the real per-class counts; the LC 13412 folder holds
    copies of DC 13412 pictures, as in the archive."""
    root = tmp_path_factory.mktemp("full") / "BreaKHis_v1"
    pixels = np.zeros((8, 8, 3), np.uint8)
    dc = []
    for i, r in enumerate(records_for(full_spec())):
        path = root / r.path
        path.parent.mkdir(parents=True, exist_ok=True)
        if r.patient == "SOB_M_LC-14-13412" and r.seq <= 5:  # 20 pictures shared with DC 13412
            shutil.copy(root / next(p for p in dc if p.endswith(f"-{r.magnification}-{r.seq:03d}.png")), path)
            continue
        pixels[0, 0] = (i % 256, i // 256, 7)  # unique content per image
        Image.fromarray(pixels).save(path, compress_level=0)
        if r.patient == "SOB_M_DC-14-13412":
            dc.append(r.path)
    (root / "histology_slides" / "breast" / "README.txt").write_text("stray")
    return root


def test_full_size_tree_report(full_tree, tmp_path, capsys):
    rc, out, err = run_cli(capsys, full_tree.parent, "--json", "--cache-dir", tmp_path / "c", "--cache-size", "8x8",
                           "--split", "70:10:20", "--out", tmp_path / "s.json")
    rep = json.loads(out.strip().splitlines()[-1])
    assert rc == 0, err
    assert (rep["patients"], rep["images"], rep["classes"]["benign"]["images"], rep["classes"]["malignant"]["images"]) == (
        82, 7909, 2480, 5429)
    assert rep["full_dataset"]["matches"] and len(rep["strays"]) == 1
    assert rep["duplicate_patients"] == [{"patients": ["SOB_M_DC-14-13412", "SOB_M_LC-14-13412"], "images": 20,
                                          "conflicting_labels": ["subtype"]}]
    assert "SOB_M_DC-14-13412 = SOB_M_LC-14-13412 share 20 pixel-identical image(s)" in rep["verdict"]
    assert rep["dropped"] == {"binary": 20, "subtype": 40}
    m = S.load_split(tmp_path / "s.json")
    assert len(m["train"]) + len(m["val"]) + len(m["test"]) == 7909 - 20 and len(m["dropped"]) == 20
    for p, target in zip(D.PARTS, (0.7, 0.1, 0.2)):
        assert abs(m["counts"][p]["fraction"] - target) < 0.01 and len(m["counts"][p]["subtypes"]) == 8
