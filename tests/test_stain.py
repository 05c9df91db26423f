"""Stain normalisation: Macenko and Reinhard against torchstain's numpy normalizers, normalised copies of
one field stained two ways come closer, the loader normalises before augmenting, the run fits on training
images only and evaluation applies the saved reference, bad input is one line and writes nothing."""
import json
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torchstain.numpy.normalizers import NumpyMacenkoNormalizer, NumpyReinhardNormalizer

import evaluate
import score
import train
from breakhis import stain
from breakhis.config import make_config
from breakhis.data.demo import make_demo
from breakhis.data.prepare import prepare
from breakhis.errors import UserError, guard
from breakhis.features import feature_key
from breakhis.io import read_json
from breakhis.loader import DeviceImages, Loader

pytestmark = pytest.mark.slow  # end to end: stain-normalised runs (its torchstain references run with them)

# stain vectors (OD per RGB channel, columns H and E): Ruifrok-Johnston's, and a bluer H with a redder E,
# as another lab's protocol or scanner would give
RUIFROK = ((0.65, 0.07), (0.70, 0.99), (0.29, 0.11))
SHIFTED = ((0.52, 0.22), (0.80, 0.90), (0.30, 0.38))
OTHER = ((0.60, 0.15), (0.75, 0.95), (0.27, 0.25))


def smooth(rng, h, w, cell):
    """(h, w) float field in [0, 1]: coarse uniform noise, bilinearly upsampled."""
    coarse = rng.random((h // cell + 2, w // cell + 2)).astype(np.float32)
    return np.asarray(Image.fromarray(coarse, mode="F").resize((w, h), Image.Resampling.BILINEAR))


def he_field(seed, stains=RUIFROK, amounts=(1.0, 1.0), h=64, w=96):
    """An H&E-like field by Beer-Lambert: nuclei (haematoxylin), stroma (eosin, with a little haematoxylin
    so that, as on real slides, most tissue pixels absorb some red light), some background;
    I = 240 exp(-OD), OD = stains @ amounts. The same seed gives the same tissue whatever the stains."""
    rng = np.random.default_rng(seed)
    he = np.asarray(stains, float) / np.linalg.norm(stains, axis=0)
    eosin = 0.25 + 0.9 * smooth(rng, h, w, 12)
    nuclei = np.clip((smooth(rng, h, w, 4) - 0.65) * 6, 0, 1.3) + 0.25  # some haematoxylin everywhere
    background = smooth(rng, h, w, 24) > 0.8
    c = np.stack([nuclei * amounts[0], eosin * amounts[1]])
    c[:, background] *= 0.05
    od = np.einsum("ck,khw->hwc", he, c) + rng.normal(0, 0.02, (h, w, 3))
    return np.clip(240 * np.exp(-od), 0, 255).astype(np.uint8)


def torchstain_normalizer(method, ref):
    t = NumpyMacenkoNormalizer() if method == "macenko" else NumpyReinhardNormalizer()
    t.fit(ref)
    return t


def torchstain_normalise(t, img):
    out = t.normalize(img)
    return out[0] if isinstance(out, tuple) else out


# ---------------------------------------------------------------------------- the maths against torchstain

@pytest.mark.parametrize("q", [1, 37.5, 50, 99])
def test_percentile_equals_numpy_over_the_valid_entries(q):
    rng = np.random.default_rng(0)
    v, valid = rng.normal(size=(5, 300)), rng.random((5, 300)) < rng.uniform(0.05, 1, (5, 1))
    ours = stain.percentile(torch.from_numpy(v), q, torch.from_numpy(valid)).numpy()
    assert ours == pytest.approx([np.percentile(v[i][valid[i]], q) for i in range(5)], abs=1e-12)
    assert stain.percentile(torch.from_numpy(v), q).numpy() == pytest.approx(np.percentile(v, q, axis=1), abs=1e-12)


@pytest.mark.parametrize("method", ["macenko", "reinhard"])
def test_fit_and_normalise_match_torchstain(method):
    """The fitted reference equals torchstain's numpy fit; each image of a batch, normalised with its own
    statistics in one batched call, equals torchstain's normalize of that image alone, within one grey level:
    torchstain truncates to uint8 where we round, and computes in float64 where we use float32 (differences of
    1e-5 in OD, far below a grey level)."""
    ref = he_field(0)
    fields = np.stack([he_field(1, SHIFTED, (1.3, 0.7)), he_field(2, OTHER, (0.8, 1.2)), he_field(3)])
    t = torchstain_normalizer(method, ref)
    params = stain.fit(method, ref[None], {}, "the reference")
    if method == "macenko":
        assert np.array(params.values["he"]) == pytest.approx(t.HERef, rel=1e-4, abs=1e-5)
        assert np.array(params.values["max_c"]) == pytest.approx(t.maxCRef, rel=1e-4)
    else:
        assert np.array(params.values["mean"]) == pytest.approx(t.target_means, rel=1e-4, abs=1e-4)
        assert np.array(params.values["std"]) == pytest.approx(t.target_stds, rel=1e-4)
    ours = stain.Normaliser(params, "cpu")(torch.from_numpy(fields)).numpy()
    for i in range(len(fields)):
        theirs = torchstain_normalise(t, fields[i]).astype(int)
        diff = ours[i].astype(int) - theirs
        assert diff.min() >= -1 and diff.max() <= 1, (i, diff.min(), diff.max())
        assert 0.3 < diff.mean() < 0.7  # rounding instead of truncation: half a level up on average
        if i < 2:  # stained otherwise than the reference: the images did change
            assert np.abs(ours[i].astype(int) - fields[i]).mean() > 5


@pytest.mark.parametrize("method", ["macenko", "reinhard"])
def test_two_stainings_of_one_field_come_closer(method):
    """One tissue stained two ways (stain vectors and amounts), both normalised to a third staining: the
    normalised copies are much closer to each other than the originals (mean absolute RGB difference)."""
    a, b = he_field(5), he_field(5, SHIFTED, (1.4, 0.6))
    params = stain.fit(method, he_field(6, OTHER)[None], {}, "the reference")
    na, nb = stain.Normaliser(params, "cpu")(torch.from_numpy(np.stack([a, b]))).numpy().astype(float)
    before, after = np.abs(a.astype(float) - b).mean(), np.abs(na - nb).mean()
    assert before > 15 and after < 0.5 * before, (before, after)


def test_a_blank_field_is_left_unchanged_and_a_blank_reference_refused():
    white = np.full((64, 96, 3), 250, np.uint8)
    for method in ("macenko", "reinhard"):
        params = stain.fit(method, he_field(0)[None], {}, "the reference")
        out = stain.Normaliser(params, "cpu")(torch.from_numpy(np.stack([he_field(1, SHIFTED), white]))).numpy()
        assert np.array_equal(out[1], white) and not np.array_equal(out[0], he_field(1, SHIFTED))
        with pytest.raises(UserError, match="shows no H&E tissue"):
            stain.fit(method, white[None], {}, "the reference")
    flat = np.full((64, 96, 3), (90, 40, 130), np.uint8)  # stained but one colour: no two stain vectors
    with pytest.raises(UserError, match="two separable stain colours"):
        stain.fit("macenko", flat[None], {}, "the reference")


# ---------------------------------------------------------------------------- on real H&E texture

def lab_by_hand(rgb: np.ndarray) -> np.ndarray:
    """CIELAB (D65) of (..., 3) uint8 sRGB, from the CIE formulas (IEC 61966-2-1 sRGB, Bruce Lindbloom's
    sRGB->XYZ matrix), independent of breakhis.stain and torchstain."""
    c = rgb.astype(np.float64) / 255
    lin = np.where(c > 0.04045, ((c + 0.055) / 1.055) ** 2.4, c / 12.92)
    m = np.array([[0.4124564, 0.3575761, 0.1804375], [0.2126729, 0.7151522, 0.0721750],
                  [0.0193339, 0.1191920, 0.9503041]])
    xyz = lin @ m.T / np.array([0.95047, 1.0, 1.08883])
    f = np.where(xyz > (6 / 29) ** 3, np.cbrt(xyz), xyz / (3 * (6 / 29) ** 2) + 4 / 29)
    return np.stack([116 * f[..., 1] - 16, 500 * (f[..., 0] - f[..., 1]), 200 * (f[..., 1] - f[..., 2])], -1)


def he_patients(picture, patients=8, fields=3, seed=0):
    """(patients, fields, 92, 140, 3) uint8: real H&E texture cut from the picture, each patient stained its own
    way (breakhis.data.demo.he_field / patient_stain: OD-space re-staining)."""
    from breakhis.data import demo

    rng = np.random.default_rng(seed)
    out = []
    for _ in range(patients):
        st = demo.patient_stain(rng)
        out.append([np.asarray(demo.he_field(rng, picture, (140, 92), st)) for _ in range(fields)])
    return np.array(out)


def patient_spread(f: np.ndarray) -> float:
    """Mean over L, a, b of the standard deviation across patients of each patient's mean (lab_by_hand)."""
    means = np.array([lab_by_hand(p).reshape(-1, 3).mean(0) for p in f])
    return float(means.std(0).mean())


@pytest.mark.parametrize("method,most", [("macenko", 0.6), ("reinhard", 0.1)])
def test_real_he_patients_come_closer_after_a_fit_on_train_patients(he_picture, method, most):
    """8 patients of real H&E texture, each re-stained its own way; fitted on 3 (train) patients' fields, the
    normalisation brings the other 5 patients' LAB means together (measured: spread 7.3 -> 3.8 Macenko,
    -> 0.13 Reinhard; Macenko maps stain amounts, not lightness, so L keeps most of its spread)."""
    f = he_patients(he_picture)
    params = stain.fit(method, f[:3].reshape(-1, 92, 140, 3), {}, "the train patients' fields")
    norm = stain.Normaliser(params, "cpu")
    held = f[3:].reshape(-1, 92, 140, 3)
    assert norm.stats(torch.from_numpy(held.copy()))["ok"].all()  # real tissue: every field is normalised
    out = norm(torch.from_numpy(held.copy())).numpy().reshape(f[3:].shape)
    before, after = patient_spread(f[3:]), patient_spread(out)
    assert before > 4 and after < most * before, (before, after)


def test_tissue_detection_keeps_real_tissue_and_leaves_background_white(he_picture):
    """A real field with its right half replaced by slide background (RGB 245): the tissue fraction both
    methods rest on is the left half's own (the OD >= BETA rule applied by hand to the original); Macenko
    leaves the background white (zero OD maps to zero OD) and re-stains the tissue half. (Reinhard, as
    torchstain's, matches the whole field's LAB statistics, background included: such a field's background
    comes out pink, about RGB 180,132,178; not asserted here, see docs/data.md.)"""
    f = he_patients(he_picture, patients=2, fields=1)[:, 0]
    half = f[1].copy()
    half[:, 70:] = 245
    od = -np.log((half.astype(np.float64) + 1) / stain.IO)
    x = torch.from_numpy(half[None]).reshape(1, -1, 3).float()
    frac_m = stain.macenko_stats(stain.optical_density(x))[2].item()
    frac_r = stain.reinhard_stats(stain.rgb_to_lab(x / 255), x)[2].item()
    assert frac_m == pytest.approx((od >= stain.BETA).all(-1).mean(), abs=1e-6)
    assert frac_r == pytest.approx((od >= stain.BETA).any(-1).mean(), abs=1e-6)
    assert frac_r > 0.4  # the left half is nearly all tissue: about 94% of its pixels
    out = stain.Normaliser(stain.fit("macenko", f[:1], {}, "a reference"), "cpu")(torch.from_numpy(half[None])).numpy()[0]
    assert out[:, 75:].min() >= 225  # background (a few pixels in from the seam) stays near white
    assert np.abs(out[:, :70].astype(int) - half[:, :70]).mean() > 3


# ---------------------------------------------------------------------------- the loader

@pytest.mark.parametrize("method", ["macenko", "reinhard"])
def test_the_loader_normalises_fields_before_cropping_and_augmenting(method):
    """Batches of a loader over DeviceImages with a stain normalisation equal those of a plain loader over
    fields normalised beforehand (torchstain, up to its truncation: the same within a grey level per pixel
    before the augmentation), resident and streamed alike."""
    fields = np.stack([he_field(s, SHIFTED if s % 2 else RUIFROK, (1 + 0.1 * s, 1)) for s in range(8)])
    params = stain.fit(method, he_field(20, OTHER)[None], {}, "the reference")
    ts = torchstain_normalizer(method, he_field(20, OTHER))
    theirs = np.stack([torchstain_normalise(ts, f) for f in fields])
    batches = {}
    for name, data in {"resident": DeviceImages(fields, "cpu", stain=params),
                       "streamed": DeviceImages(fields, "cpu", budget_gb=0, stain=params),
                       "beforehand": DeviceImages(theirs, "cpu")}.items():
        ld = Loader(data, np.arange(8), np.arange(8) % 2, batch_size=4, image_size=32, train=True, seed=3)
        ld.set_epoch(1)
        batches[name] = torch.cat([x for x, _, _ in ld])
    assert torch.equal(batches["resident"], batches["streamed"])
    # a grey level is 1/255/std (about 0.018) after normalisation; interpolation averages the +-1 differences
    assert (batches["resident"] - batches["beforehand"]).abs().max() < 1.2 / 255 / 0.225 + 1e-4


# ---------------------------------------------------------------------------- runs

def he_tree(out, stains=RUIFROK, amounts=(1.0, 1.0)):
    """The small demo tree's names and folders, every image replaced by an H&E-like field; the same
    tissue (seeded by file order) for any stains: a stain-shifted copy of a tree."""
    root = make_demo(out, patients=8, images_per_patient=8, size=(96, 64))
    for i, p in enumerate(sorted(root.rglob("*.png"))):
        malignant = "/malignant/" in str(p)
        Image.fromarray(he_field(100 + i, stains, (amounts[0] * (1.3 if malignant else 0.8), amounts[1]))).save(p)
    return root


@pytest.fixture(scope="module")
def stained_run(tmp_path_factory):
    base = tmp_path_factory.mktemp("stain")
    root, cache, res = he_tree(base / "tree"), base / "cache", base / "results"
    args = ["--data", str(root), "--cache-dir", str(cache), "--backbone", "resnet18", "--no-pretrained",
            "--image-size", "32", "--batch-size", "8", "--epochs", "1", "--head", "16", "--dropout", "0.2",
            "--milestones", "1", "--device", "cpu", "--quiet", "--stain-norm", "macenko", "--results", str(res),
            "--name", "run"]
    assert guard(train.main, args) == 0
    return res / "run", root, cache


def test_a_run_fits_on_training_images_only_and_saves_stain_json(stained_run):
    run, root, cache = stained_run
    saved = read_json(run / "stain.json")
    split = read_json(run / "split.json")
    sample = saved["source"]["train_sample"]
    assert saved["method"] == "macenko" and np.array(saved["he"]).shape == (3, 2) and len(saved["max_c"]) == 2
    assert len(sample) == min(stain.SAMPLE, len(split["train"])) and set(sample) <= set(split["train"])
    # the saved reference is torchstain's fit on the same training images pooled as one picture
    cfg = make_config({"data": str(root), "cache_dir": str(cache), "image_size": 32,
                       "split_file": str(run / "split.json")})
    prep = prepare(cfg, progress=False)
    pooled = np.concatenate([prep.cache.images[prep.cache.index_of(p)] for p in sample])
    t = torchstain_normalizer("macenko", pooled)
    assert np.array(saved["he"]) == pytest.approx(t.HERef, rel=1e-3, abs=1e-4)
    assert np.array(saved["max_c"]) == pytest.approx(t.maxCRef, rel=1e-3)


def test_evaluation_applies_the_saved_normalisation(stained_run, capsys, tmp_path):
    run, _, _ = stained_run
    assert guard(evaluate.main, [str(run), "--json", "--device", "cpu"]) == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    saved = read_json(run / "metrics.json")["test"]
    for k in ("accuracy", "auroc", "f1", "patient_recognition_rate"):
        assert out["test"][k] == pytest.approx(saved[k]), k
    assert out["test"]["loss"] == pytest.approx(saved["loss"], rel=1e-5)
    # without its stain.json the run is refused, not evaluated on raw fields
    copy = tmp_path / "copy"
    shutil.copytree(run, copy)
    (copy / "stain.json").unlink()
    assert guard(evaluate.main, [str(copy), "--device", "cpu"]) == 2
    assert "no stain.json" in capsys.readouterr().err


def test_resume_uses_the_runs_own_stain_json(stained_run, tmp_path, monkeypatch):
    """An interrupted run resumes with the stain.json it wrote (no new fit: fitting is refused here), and
    continues as an uninterrupted run with the same settings would (same losses)."""
    from breakhis.fit import fit
    from breakhis.io import read_csv

    run, root, cache = stained_run
    cfg = make_config({"data": str(root), "cache_dir": str(cache), "backbone": "resnet18", "pretrained": False,
                       "image_size": 32, "batch_size": 8, "epochs": 2, "head": (16,), "dropout": (0.2,),
                       "milestones": (1,), "device": "cpu", "stain_norm": "reinhard"})
    prep = prepare(cfg, progress=False)
    full, cut = tmp_path / "full", tmp_path / "cut"
    full.mkdir(), cut.mkdir()
    fit(cfg, full, data=prep, progress=False)

    def stop(row):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        fit(cfg, cut, data=prep, progress=False, on_epoch=stop)
    saved = (cut / "stain.json").read_text()
    monkeypatch.setattr(stain, "fit_run", lambda *a, **k: pytest.fail("a resumed run must not fit again"))
    fit(cfg, cut, data=prep, progress=False, resume=True)
    assert (cut / "stain.json").read_text() == saved == (full / "stain.json").read_text()
    for a, b in zip(read_csv(full / "history.csv"), read_csv(cut / "history.csv"), strict=True):
        assert float(a["val_loss"]) == pytest.approx(float(b["val_loss"]), rel=1e-6)


@pytest.mark.parametrize("method", ["macenko", "reinhard"])
def test_a_stain_shifted_copy_of_the_tree_comes_closer(stained_run, tmp_path, method):
    """The run's tree and a copy with the same tissue stained otherwise (stain vectors and amounts): fitted on
    the tree's training sample (fit_run) and applied by DeviceImages as runs do, the normalised fields of the
    two trees are much closer to each other than the raw ones (mean absolute RGB difference per field)."""
    run, root, cache = stained_run
    shifted = he_tree(tmp_path / "shifted", SHIFTED, (1.3, 0.7))
    cfg = make_config({"data": str(root), "cache_dir": str(cache), "image_size": 32, "stain_norm": method,
                       "split_file": str(run / "split.json")})
    prep = prepare(cfg, progress=False)
    other = prepare(make_config({**cfg.to_dict(), "data": str(shifted)}), progress=False)
    assert [r.path for r in other.parts["train"]] == [r.path for r in prep.parts["train"]]
    params = stain.fit_run(cfg, prep)
    raw = [torch.from_numpy(np.array(p.cache.images)).float() for p in (prep, other)]
    norm = [DeviceImages.for_run(p.cache.images, cfg, "cpu", params).images.float() for p in (prep, other)]
    before, after = ((a - b).abs().mean() for a, b in (raw, norm))
    assert before > 15 and after < 0.5 * before, (before, after)


def test_the_feature_cache_key_holds_the_stain_parameters(stained_run):
    run, root, cache = stained_run
    cfg = make_config({"data": str(root), "cache_dir": str(cache), "image_size": 32, "freeze": True,
                       "split_file": str(run / "split.json")})
    prep = prepare(cfg, progress=False)
    params = stain.load(run, make_config({"stain_norm": "macenko"}))
    other = stain.StainParams("macenko", {**params.values, "max_c": [v * 1.01 for v in params.values["max_c"]]})
    keys = {feature_key(prep, cfg, "val", None, stain=s) for s in (None, params, other)}
    assert len(keys) == 3


# ---------------------------------------------------------------------------- bad input

def test_bad_stain_settings_are_one_line_and_write_nothing(tmp_path, capsys):
    root = he_tree(tmp_path / "tree")
    (tmp_path / "blank.png").write_bytes(b"")
    Image.fromarray(np.full((64, 96, 3), 255, np.uint8)).save(tmp_path / "white.png")
    (tmp_path / "text.png").write_text("not an image")
    res, cache = tmp_path / "res", tmp_path / "cache"
    cases = [(["--stain-norm", "vahadane"], "--stain-norm 'vahadane': choose one of none, macenko, reinhard"),
             (["--stain-ref", str(tmp_path / "white.png")], "add --stain-norm macenko or reinhard"),
             (["--stain-norm", "macenko", "--stain-ref", str(tmp_path / "missing.png")], "file not found"),
             (["--stain-norm", "reinhard", "--stain-ref", str(tmp_path / "text.png")], "not a readable image"),
             (["--stain-norm", "macenko", "--stain-ref", str(tmp_path / "white.png")], "shows no H&E tissue")]
    for flags, words in cases:
        code = guard(train.main, ["--data", str(root), "--cache-dir", str(cache), "--results", str(res),
                                  "--backbone", "resnet18", "--no-pretrained", "--device", "cpu", "--quiet"] + flags)
        err = capsys.readouterr().err
        assert code == 2 and err.startswith("error: ") and err.count("\n") == 1 and words in err, (flags, err)
    assert not res.exists() and not cache.exists()  # refused before any run folder or decode cache


def test_setting_errors_come_before_torch_is_imported(tmp_path):
    import subprocess
    code = ("import sys, train; from breakhis.errors import guard\n"
            f"rc = guard(train.main, ['--stain-ref', 'ref.png', '--data', {str(tmp_path)!r}])\n"
            "print('torch' in sys.modules); sys.exit(rc)")
    out = subprocess.run([sys.executable, "-c", code], cwd=Path(train.__file__).parent, capture_output=True, text=True)
    assert out.returncode == 2 and out.stdout.strip() == "False" and "--stain-norm" in out.stderr


def test_new_images_are_normalised_with_the_runs_stain_json(stained_run, tmp_path, capsys):
    """score.py RUN PATH: renamed copies of the run's test images get the run's own saved
    probabilities (predictions.csv), so their fields were normalised as the test fields were."""
    import csv

    run, root, _ = stained_run
    test = [r for r in csv.DictReader(open(run / "predictions.csv")) if r["split"] == "test"][:4]
    folder = tmp_path / "new"
    folder.mkdir()
    for k, r in enumerate(test):
        shutil.copy(next(root.rglob(Path(r["path"]).name)), folder / f"field {k}.png")
    out = tmp_path / "scores.csv"
    assert guard(score.main, [str(run), str(folder), "--out", str(out), "--device", "cpu"]) == 0
    got = {Path(r["path"]).name: float(r["p_malignant"]) for r in csv.DictReader(open(out))}
    want = {f"field {k}.png": float(r["p_malignant"]) for k, r in enumerate(test)}
    assert got == pytest.approx(want, abs=1e-5)
    # the same files read as raw (un-normalised) fields would score differently
    raw = tmp_path / "raw"
    shutil.copytree(run, raw, ignore=shutil.ignore_patterns("scores"))
    cfg = json.loads((raw / "config.json").read_text())
    cfg["stain_norm"] = "none"
    (raw / "config.json").write_text(json.dumps(cfg))
    out2 = tmp_path / "raw.csv"
    assert guard(score.main, [str(raw), str(folder), "--out", str(out2), "--device", "cpu"]) == 0
    plain = {Path(r["path"]).name: float(r["p_malignant"]) for r in csv.DictReader(open(out2))}
    assert max(abs(plain[k] - want[k]) for k in want) > 1e-4
