"""breakhis.data.splits: patient-level splits, ratios, manifests, official folds."""

import numpy as np
import pytest
from trees import REAL, check_split, demo_spec, full_spec, records_for  # noqa: F401

from breakhis.data import dataset as D
from breakhis.data import splits as S
from breakhis.errors import UserError
from breakhis.io import write_json


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
    # slide numbers shared across subtype codes (13412 DC/LC, 21998 F/PT, 29960 A/F) stay on one side too
    pairs = [("SOB_M_DC-14-13412", "SOB_M_LC-14-13412"), ("SOB_B_F-14-21998CD", "SOB_B_PT-14-21998AB"),
             ("SOB_B_A-14-29960AB", "SOB_B_F-14-29960CD")]
    recs = records_for([(p, 20) for pair in pairs for p in pair] + demo_spec(16, 30))
    for s in range(20):
        m = S.make_split(recs, (60, 10, 30), s, group="accession")
        for a, b in pairs:
            assert [p for p in D.PARTS if a in m["patients"][p]] == [p for p in D.PARTS if b in m["patients"][p]]
    with pytest.raises(ValueError, match="group"):  # users meet TrainConfig.validate()'s --group message first
        S.make_split(recs, (60, 10, 30), 0, group="slide")


@pytest.mark.parametrize("bad", ["50:50", "70:10:30", "a:b:c", "0:50:50", "70:-10:40", (60.5, 10, 29.5)])
def test_bad_ratio(bad):
    with pytest.raises(UserError, match="--split"):
        S.make_split(records_for(demo_spec(8)), bad)


def test_select_and_magnification():
    recs = records_for(demo_spec(16))
    m = S.make_split(recs, (60, 10, 30), 0)
    at40 = [r for p in D.PARTS for r in S.part_records(recs, m, p, 40)]
    assert sorted(r.path for r in at40) == sorted(r.path for r in recs if r.magnification == 40)
    assert S.part_records(recs, m, "val", "100X") == [r for r in recs if r.path in m["val"] and r.magnification == 100]
    assert len(S.part_records(recs, m, "test")) == len(m["test"])
    with pytest.raises(ValueError, match="magnification"):  # TrainConfig.validate() refuses it for users
        S.part_records(recs, m, "train", "50")


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
    with pytest.raises(UserError, match="14-22549 in more than one"):
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
        assert {r.label for r in S.part_records(idx.records, m, "val")} == {0, 1}
        assert (m["fold"], m["unlisted"], m["missing"]) == (1, 0, 0)
    m2 = S.fold_split(fresh_demo, idx.records, 2, val_fraction=0)
    assert set(m2["patients"]["train"]) == test_pats and m2["val"] == []
    with pytest.raises(UserError, match="no rows for fold 3"):
        S.fold_split(fresh_demo, idx.records, 3)
    with pytest.raises(ValueError, match="fold 6"):  # TrainConfig.validate() refuses it for users
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
