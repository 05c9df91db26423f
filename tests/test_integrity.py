"""breakhis.data.integrity and python -m breakhis.data: the report, the CLI, a full-size-shaped tree."""
import json
import re
import shutil

import numpy as np
import pytest
from PIL import Image
from trees import REAL, check_split, demo_spec, full_spec, records_for  # noqa: F401

from breakhis.data import __main__ as cli
from breakhis.data import dataset as D
from breakhis.data import splits as S
from breakhis.data.integrity import integrity_report
from breakhis.errors import guard
from breakhis.io import write_json


# ---------------------------------------------------------------- report
def test_report_from_info(demo_root):
    idx = D.index_tree(demo_root)
    info = [{"ok": True, "error": None, "mode": "RGB", "width": 96, "height": 64, "sha1": r.path} for r in idx.records]
    info[0] = {"ok": False, "error": "truncated", "mode": None, "width": None, "height": None, "sha1": None}
    info[1] = {**info[1], "mode": "P"}
    info[2] = {**info[2], "mode": "LA", "width": 90}
    rep = integrity_report(idx, info)
    assert rep["unreadable"] == [{"path": idx.records[0].path, "error": "truncated"}]
    assert rep["modes"] == {"P": 1, "LA": 1} and rep["odd_sizes"] == [{"path": idx.records[2].path, "size": "90x64"}]
    assert rep["verdict"].startswith("FAIL") and "full_dataset" not in rep
    assert rep["counts"]["adenosis"] == {"class": "benign", "40": 6, "100": 6, "200": 6, "400": 6, "images": 24, "patients": 2}
    ok = integrity_report(idx, info, skip_bad=True)
    assert ok["verdict"].startswith("OK: 191 usable images") and "1 unreadable image(s) skipped" in ok["verdict"]
    json.dumps(rep)


def test_report_flags_incomplete_full_dataset(tmp_path):
    recs = records_for(full_spec())
    assert "full_dataset" in integrity_report(D.Index(tmp_path, recs, []))
    assert integrity_report(D.Index(tmp_path, recs, []))["full_dataset"]["matches"]
    rep = integrity_report(D.Index(tmp_path, recs[:-9], []))
    assert not rep["full_dataset"]["matches"] and "images 7,900 (the archive has 7,909)" in rep["verdict"]


# ---------------------------------------------------------------- command line
def run_cli(capsys, *argv):
    rc = guard(cli.main, [str(a) for a in argv])
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
    assert m == {**S.make_split(D.index_tree(demo_root).records, (70, 10, 20), 2), "task": "binary", "near_duplicates": [],
                 "near_duplicates_linked": False}
    rc, out, _ = run_cli(capsys, demo_root, "--split-file", tmp_path / "s.json", "--magnification", "200",
                         "--cache-dir", tmp_path / "c", "--cache-size", "16x24")
    assert rc == 0 and "magnification 200" in out


def test_cli_download_then_report(fresh_demo, tmp_path, capsys, monkeypatch):
    calls = []
    monkeypatch.setattr(cli, "download_and_extract",
                        lambda url, dest, progress=True: calls.append((url, dest)) or fresh_demo.parent)
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
    (["{missing}"], "not found.*python -m breakhis.data.demo"),
    (["{empty}"], "no BreakHis images"),
    ([], "give the data folder"),
    (["{demo}", "--split", "50:50"], "--split-ratio '50:50'"),
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


def test_report_names_slide_ids_shared_across_subtypes(tmp_path):
    recs = records_for([("SOB_M_DC-14-13412", 2), ("SOB_M_LC-14-13412", 2), ("SOB_B_F-14-21998CD", 2),
                        ("SOB_B_PT-14-21998AB", 2), ("SOB_B_A-14-22549AB", 2), ("SOB_B_A-14-22549CD", 2)])
    rep = integrity_report(D.Index(tmp_path, recs, []))
    assert rep["cross_subtype_ids"] == [  # 22549AB/CD share a subtype: not listed
        {"accession": "14-13412", "patients": ["SOB_M_DC-14-13412", "SOB_M_LC-14-13412"]},
        {"accession": "14-21998", "patients": ["SOB_B_F-14-21998CD", "SOB_B_PT-14-21998AB"]}]
    assert any("14-13412" in n for n in rep["notes"])
