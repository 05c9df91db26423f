"""score.py RUN PATH...: new image files scored with a run (breakhis/newimages.py, breakhis/data/images.py).

References: the run's own predictions.csv (written by the normal evaluation at the end of training)
for exact copies of its test images; Pillow by hand for the decoding; numpy for the per-patient
votes; a brute-force Youden threshold over the saved validation probabilities.
"""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from test_train import tiny

import breakhis.newimages
import score
import train
from breakhis.data.images import decode_images, find_images
from breakhis.errors import UserError, guard
from breakhis.io import read_csv
from breakhis.newimages import patient_votes

pytestmark = pytest.mark.slow  # end to end: score.py on a trained run

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def trained(demo_root, tmp_path_factory):
    res, cache = tmp_path_factory.mktemp("results"), tmp_path_factory.mktemp("cache")
    assert guard(train.main, tiny(demo_root, cache, name="r", epochs=1) + ["--results", str(res)]) == 0
    return res / "r"


@pytest.fixture(scope="module")
def new_folder(trained, demo_root, tmp_path_factory):
    """Renamed exact PNG copies, a lossless TIFF, resized, JPEG and tiny copies of test images, BreakHis-named
    copies (two patients, one as JPEG), a truncated PNG, a text file named .png and a stray .txt.
    Returns the folder and {file name: the predictions.csv row of its source image}."""
    test = [r for r in read_csv(trained / "predictions.csv") if r["split"] == "test"]
    pats = sorted({r["patient"] for r in test})[:2]
    named = [r for r in test if r["patient"] == pats[0]][:3] + [r for r in test if r["patient"] == pats[1]][:2]
    src = {id(r): next(demo_root.rglob(r["path"].rsplit("/", 1)[-1])) for r in test}
    d = tmp_path_factory.mktemp("new")
    (d / "sub" / "deeper").mkdir(parents=True)
    made = {}
    for k, r in enumerate(test[:4]):  # exact copies under names that are not BreakHis names
        shutil.copy(src[id(r)], d / f"field {k}.png")
        made[f"field {k}.png"] = r
    for k, r in enumerate(named):  # BreakHis names, in a sub-folder; the last one as a JPEG
        name = Path(r["path"]).name
        if k == len(named) - 1:
            name = name[:-4] + ".jpg"
            Image.open(src[id(r)]).convert("RGB").save(d / "sub" / name, quality=90)
        else:
            shutil.copy(src[id(r)], d / "sub" / name)
        made[name] = r
    im = Image.open(src[id(test[0])]).convert("RGB")
    im.save(d / "sub" / "deeper" / "copy.tif")  # uncompressed TIFF: the same pixels
    made["copy.tif"] = test[0]
    im.resize((350, 230)).save(d / "sub" / "deeper" / "big.png")
    im.resize((500, 500)).save(d / "sub" / "deeper" / "square.jpeg")
    im.resize((20, 13)).save(d / "sub" / "tiny.PNG")
    data = src[id(test[1])].read_bytes()
    (d / "truncated.png").write_bytes(data[:len(data) // 2])
    (d / "text.png").write_text("not an image\n")
    (d / "notes.txt").write_text("a stray file, not an image: not listed\n")
    (d / ".hidden.png").write_text("hidden: not listed\n")
    return d, made


def scored(out: Path) -> dict[str, dict]:
    return {Path(r["path"]).name: r for r in read_csv(out)}


def test_scores_match_the_runs_predictions_and_every_file_is_accounted_for(trained, new_folder, tmp_path, capsys,
                                                                            monkeypatch):
    d, made = new_folder
    monkeypatch.setattr(breakhis.newimages, "CHUNK", 4)  # 15 files in 4 chunks, unreadable ones among them
    out = tmp_path / "scores.csv"
    assert guard(score.main, [str(trained), str(d), "--out", str(out)]) == 0
    text = capsys.readouterr().out
    rows = scored(out)
    assert set(rows) == set(made) | {"big.png", "square.jpeg", "tiny.PNG", "truncated.png", "text.png"}
    assert list(read_csv(out)[0])[:6] == ["path", "width", "height", "p_benign", "p_malignant", "prediction"]
    # exact copies (PNG renamed or re-filed, lossless TIFF): the run's own saved probabilities
    exact = [n for n in made if not n.endswith(".jpg")]
    got = np.array([[float(rows[n]["p_benign"]), float(rows[n]["p_malignant"])] for n in exact])
    want = np.array([[float(made[n]["p_benign"]), float(made[n]["p_malignant"])] for n in exact])
    # batches are made of other images than in the run's evaluation; only float rounding may differ
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-6)
    # lossy or resized copies: valid probabilities, and the prediction follows the threshold (0.5)
    for n in ("big.png", "square.jpeg", "tiny.PNG") + tuple(n for n in made if n.endswith(".jpg")):
        p = np.array([float(rows[n]["p_benign"]), float(rows[n]["p_malignant"])])
        assert np.all((p >= 0) & (p <= 1)) and p.sum() == pytest.approx(1, abs=1e-6)
        assert rows[n]["prediction"] == ("malignant" if p[1] >= 0.5 else "benign") and rows[n]["error"] == ""
    assert (rows["square.jpeg"]["width"], rows["square.jpeg"]["height"]) == ("500", "500")
    # unreadable files are listed, with why, and not scored
    for n in ("truncated.png", "text.png"):
        assert rows[n]["error"] and rows[n]["p_malignant"] == "" and rows[n]["prediction"] == ""
        assert n in text
    assert "accuracy" not in text.lower() and "wrote" in text


def test_breakhis_names_get_per_patient_votes(trained, new_folder, tmp_path, capsys):
    d, made = new_folder
    out = tmp_path / "votes.csv"
    assert guard(score.main, [str(trained), str(d / "sub"), "--out", str(out), "--threshold", "0.52"]) == 0
    rows = scored(out)
    named = {n: made[n] for n in made if n.startswith("SOB_")}
    assert len(named) == 5
    for n, r in rows.items():  # other names: no patient
        if n not in named:
            assert r["patient"] == r["patient_vote"] == r["magnification"] == ""
    patients = np.array([named[n]["patient"] for n in named])  # from the run's own file, not from our parser
    p = np.array([float(rows[n]["p_malignant"]) for n in named])
    for n, q in zip(named, patients):
        r = rows[n]
        mean = p[patients == q].mean()
        assert r["patient"] == q and r["magnification"] == named[n]["magnification"]
        assert int(r["patient_images"]) == (patients == q).sum()
        assert float(r["patient_p_malignant"]) == pytest.approx(mean, abs=1e-12)
        assert r["patient_vote"] == ("malignant" if mean >= 0.52 else "benign")
        assert r["prediction"] == ("malignant" if float(r["p_malignant"]) >= 0.52 else "benign")


def test_youden_threshold_is_chosen_on_the_runs_validation_images(trained, new_folder, tmp_path, capsys):
    d, _ = new_folder
    out = tmp_path / "y.csv"
    assert guard(score.main, [str(trained), str(d / "sub"), "--out", str(out), "--threshold",
                                 "youden", "--json"]) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    val = [r for r in read_csv(trained / "predictions.csv") if r["split"] == "val"]
    y, p = np.array([int(r["label"]) for r in val]), np.array([float(r["p_malignant"]) for r in val])
    j = {t: (p[y == 1] >= t).mean() - (p[y == 0] >= t).mean() for t in np.unique(p)}
    best = max(t for t in j if j[t] == max(j.values()))  # the highest threshold among the ties
    assert summary["threshold"] == pytest.approx(best, abs=1e-6)
    rows = read_csv(out)
    assert {float(r["threshold"]) for r in rows} == {summary["threshold"]}
    assert all(r["prediction"] == ("malignant" if float(r["p_malignant"]) >= summary["threshold"] else "benign")
               for r in rows if r["p_malignant"])
    assert summary["scored"] == len(rows) and summary["skipped"] == [] and sum(summary["counts"].values()) == len(rows)


def test_tta_and_cam_overlays_beside_the_default_csv(trained, new_folder, capsys):
    d, made = new_folder
    exact = [str(d / n) for n in made if n.startswith("field ")]
    assert guard(score.main, [str(trained), *exact, str(d / "text.png"), "--tta", "--cam", "2",
                                 "--json"]) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    csv_path = Path(summary["csv"])
    assert csv_path.parent == trained / "scores" and csv_path.is_file() and summary["tta"] is True
    rows = scored(csv_path)
    plain = np.array([float(made[n]["p_malignant"]) for n in sorted(made) if n.startswith("field ")])
    tta = np.array([float(rows[n]["p_malignant"]) for n in sorted(made) if n.startswith("field ")])
    assert np.all((tta > 0) & (tta < 1)) and not np.allclose(tta, plain, atol=1e-7)  # 8 views averaged
    assert [s["path"] for s in summary["skipped"]] == [str(d / "text.png")]
    cams = [Path(c) for c in summary["cam"]]
    assert len(cams) == 2 and all(c.is_file() and c.parent == csv_path.with_name(csv_path.stem + "-cam") for c in cams)
    conf = {n: max(float(rows[n]["p_benign"]), float(rows[n]["p_malignant"])) for n in rows if rows[n]["p_benign"]}
    first = max(conf, key=conf.get)  # the most confident image is explained first
    assert cams[0].name == f"cam-01-{rows[first]['prediction']}-{Path(first).stem}.png"
    with Image.open(cams[0]) as im:
        assert im.format == "PNG"
    # a second scoring never overwrites the first (within the same second: a -2 suffix)
    assert guard(score.main, [str(trained), exact[0], "--json"]) == 0
    again = Path(json.loads(capsys.readouterr().out.strip().splitlines()[-1])["csv"])
    assert again != csv_path and csv_path.is_file() and len(read_csv(csv_path)) == 5


def test_a_run_whose_tree_is_gone_still_scores_at_a_fixed_threshold(trained, new_folder, tmp_path, capsys):
    d, made = new_folder
    run = tmp_path / "moved"
    shutil.copytree(trained, run, ignore=shutil.ignore_patterns("scores"))
    cfg = json.loads((run / "config.json").read_text())
    cfg["data"] = str(tmp_path / "gone")
    (run / "config.json").write_text(json.dumps(cfg))
    out = tmp_path / "s.csv"
    assert guard(score.main, [str(run), str(d / "field 0.png"), "--out", str(out)]) == 0
    assert float(read_csv(out)[0]["p_malignant"]) == pytest.approx(float(made["field 0.png"]["p_malignant"]), abs=1e-6)
    capsys.readouterr()
    assert guard(score.main, [str(run), str(d / "field 0.png"), "--threshold", "youden"]) == 2
    err = capsys.readouterr().err
    assert "give a number" in err and err.count("\n") == 1 and not (run / "scores").exists()


BAD = [
    ("score", ["NOWHERE/none.png"], "no image file found"),
    ("score", ["EMPTY/*.png"], "no image file found"),
    ("score", ["EMPTY"], "no image file found"),  # a folder holding only non-image files
    ("score", ["NEW", "--out", "x.txt"], "--out x.txt: give a file name ending in .csv"),
    ("score", ["NEW", "--cam", "-1"], "--cam -1"),
    ("score", ["NEW", "--threshold", "bogus"], "bad threshold rule 'bogus'"),
    ("evaluate", ["--images", "NEW"], "python score.py RUN PATH"),  # the old command line: where it went
]


def test_bad_input_is_one_line_exit_2_before_torch_and_writes_nothing(trained, new_folder, tmp_path):
    """In one fresh process, each case: refused in one line, exit 2, before torch is imported, no file written."""
    d, _ = new_folder
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "readme.txt").write_text("no images here\n")
    cases = [[script, [str(trained)] + [f.replace("NOWHERE", str(tmp_path / "nowhere")).replace("EMPTY", str(empty))
                                        .replace("NEW", str(d)) for f in flags]] for script, flags, _ in BAD]
    before = sorted(p.name for p in trained.iterdir())
    code = ("import contextlib, io, json, sys, evaluate, score; from breakhis.errors import guard\n"
            "out = []\n"
            f"for script, argv in {cases!r}:\n"
            "    err = io.StringIO()\n"
            "    with contextlib.redirect_stderr(err):\n"
            "        out.append([guard({'score': score, 'evaluate': evaluate}[script].main, argv), err.getvalue()])\n"
            "print(json.dumps({'torch': 'torch' in sys.modules, 'results': out}))")
    run = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True,
                         env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert run.returncode == 0, run.stderr
    got = json.loads(run.stdout)
    assert got["torch"] is False  # every check ran before the heavy imports
    for (_, flags, words), (rc, err) in zip(BAD, got["results"]):
        assert rc == 2 and err.startswith("error: ") and words in err and err.count("\n") == 1, (flags, err)
    assert sorted(p.name for p in trained.iterdir()) == before and sorted(os.listdir(tmp_path)) == ["empty"]


def test_existing_out_and_only_unreadable_files_are_refused(trained, new_folder, tmp_path, capsys):
    d, _ = new_folder
    out = tmp_path / "taken.csv"
    out.write_text("mine\n")
    assert guard(score.main, [str(trained), str(d / "field 0.png"), "--out", str(out)]) == 2
    assert out.read_text() == "mine\n" and "never overwritten" in capsys.readouterr().err
    fresh = tmp_path / "fresh.csv"
    assert guard(score.main, [str(trained), str(d / "text.png"), str(d / "truncated.png"),
                                 "--out", str(fresh)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "text.png" in err and "truncated.png" in err and not fresh.exists()
    assert sorted(os.listdir(tmp_path)) == ["taken.csv"]


def test_find_images_expands_folders_and_globs_sorted_and_once(tmp_path, monkeypatch):
    for rel in ("a/x.png", "a/b/y.JPG", "a/b/z.tiff", "a/.h/w.png", "a/.hidden.png", "a/n.txt", "c/v.tif"):
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_bytes(b"")
    (tmp_path / "link.png").symlink_to(tmp_path / "a" / "x.png")
    monkeypatch.chdir(tmp_path)
    assert find_images(["a"]) == ["a/b/y.JPG", "a/b/z.tiff", "a/x.png"]
    # a folder and a pattern reaching the same files, a symlink, a file named outright: each file once
    assert find_images(["c/*.tif", "a/**/*.png", "a", "link.png", "a/n.txt"]) == \
        ["a/b/y.JPG", "a/b/z.tiff", "a/n.txt", "a/x.png", "c/v.tif"]
    assert find_images([str(tmp_path / "c")]) == [str(tmp_path / "c" / "v.tif")]
    with pytest.raises(UserError, match="nope, a/\\*.gif: no image file found"):
        find_images(["a", "nope", "a/*.gif"])


def test_decode_images_is_pillow_rgb_resized_bilinear(tmp_path):
    rng = np.random.default_rng(0)
    files = []
    for name, size, mode in (("s.png", (50, 50), "RGB"), ("t.png", (9, 7), "L"), ("u.tif", (140, 92), "RGB")):
        arr = rng.integers(0, 256, (size[1], size[0], 3 if mode == "RGB" else 1), dtype=np.uint8)
        Image.fromarray(arr.squeeze()).save(tmp_path / name)
        files.append(str(tmp_path / name))
    (tmp_path / "bad.png").write_text("x")
    pixels, info = decode_images(files + [str(tmp_path / "bad.png")], (24, 36), workers=2)
    assert pixels.shape == (4, 24, 36, 3) and pixels.dtype == np.uint8
    for k, f in enumerate(files):
        want = np.asarray(Image.open(f).convert("RGB").resize((36, 24), Image.Resampling.BILINEAR))
        assert np.array_equal(pixels[k], want) and info[k]["ok"]
    assert not info[3]["ok"] and info[3]["error"] and not pixels[3].any()
    assert [(i["width"], i["height"]) for i in info[:3]] == [(50, 50), (9, 7), (140, 92)]



def test_patient_votes_binary_at_the_threshold_and_subtype_by_mean_argmax():
    p = np.array([[0.7, 0.3], [0.4, 0.6], [0.9, 0.1], [0.45, 0.55]])
    v = patient_votes(["a", "a", "b", "b"], p, "binary", 0.4)
    assert v["a"]["images"] == 2 and np.allclose(v["a"]["mean"], [0.55, 0.45]) and v["a"]["vote"] == 1  # 0.45 >= 0.4
    assert np.allclose(v["b"]["mean"], [0.675, 0.325]) and v["b"]["vote"] == 0
    # subtype: the most probable class of the mean, not the most frequent per-image argmax (2, 2, 0 here)
    q = np.array([[0.3, 0.2, 0.5], [0.3, 0.2, 0.5], [0.95, 0.03, 0.02]])
    w = patient_votes(["c", "c", "c"], q, "subtype", 0.5)
    assert np.allclose(w["c"]["mean"], q.mean(0)) and w["c"]["vote"] == int(np.argmax(q.mean(0))) == 0


def test_a_saved_temperature_scales_new_images_as_every_later_evaluation(trained, new_folder, tmp_path, capsys):
    """calibration.json (evaluate.py --calibrate --save-temperature) applies to new images too:
    p = softmax(log p_raw / T), computed here with numpy from the run's own predictions.csv."""
    d, made = new_folder
    run = tmp_path / "calibrated"
    shutil.copytree(trained, run, ignore=shutil.ignore_patterns("scores"))
    (run / "calibration.json").write_text(json.dumps({"temperature": 1.5, "fitted_on": "val"}))
    out = tmp_path / "t.csv"
    names = [f"field {k}.png" for k in range(4)]
    assert guard(score.main, [str(run), *[str(d / n) for n in names], "--out", str(out)]) == 0
    rows = scored(out)
    raw = np.array([[float(made[n]["p_benign"]), float(made[n]["p_malignant"])] for n in names])
    scaled = raw ** (1 / 1.5)
    want = scaled / scaled.sum(1, keepdims=True)
    assert np.abs(want - raw).max() > 1e-3  # the temperature changes these probabilities
    got = np.array([[float(rows[n]["p_benign"]), float(rows[n]["p_malignant"])] for n in names])
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-6)
