"""breakhis.data.near: near-duplicate fields across patients, hash candidates verified by correlation, linked
patients kept together, groups reported, too large a group refused with the flag that turns linking off."""
import io
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from trees import full_spec, records_for

from breakhis.config import make_config
from breakhis.data import __main__ as cli
from breakhis.data import near
from breakhis.data import splits as S
from breakhis.data.cache import build_cache
from breakhis.data.dataset import index_tree, parse_name
from breakhis.data.demo import make_demo
from breakhis.data.integrity import integrity_report
from breakhis.data.prepare import prepare
from breakhis.errors import UserError, guard

CACHE = (64, 96)  # cached field H x W of these tests' trees: cells of 2x3 px under the 32x32 thumbnails


def grey(x: np.ndarray) -> np.ndarray:
    return x.astype(np.float64) @ np.array([0.299, 0.587, 0.114])


def thumb_by_hand(field: np.ndarray) -> np.ndarray:
    """(32, 32) block means of a (H, W, 3) uint8 field, one cell at a time (H and W multiples of 32 or not)."""
    g = grey(field)
    ys = np.linspace(0, g.shape[0], 33).astype(int)
    xs = np.linspace(0, g.shape[1], 33).astype(int)
    return np.array([[g[ys[a]:ys[a + 1], xs[b]:xs[b + 1]].mean() for b in range(32)] for a in range(32)])


def correlation_by_hand(a: np.ndarray, b: np.ndarray) -> float:
    """The largest np.corrcoef of a's high-passed thumbnail with the 8 rotations/flips of b's (np.rot90, np.fliplr)."""
    def hp(t):
        out = t.copy()
        for y in range(0, 32, 4):
            for x in range(0, 32, 4):
                out[y:y + 4, x:x + 4] -= t[y:y + 4, x:x + 4].mean()
        return out

    ta, tb = hp(thumb_by_hand(a)), hp(thumb_by_hand(b))
    turns = [np.rot90(tb, k) for k in range(4)]
    return max(np.corrcoef(ta.ravel(), v.ravel())[0, 1] for v in turns + [np.fliplr(v) for v in turns])


def twin_path(root: Path, rec, seq: int = 99) -> Path:
    """A new file of `rec`'s patient and magnification (sequence number seq)."""
    return (root / rec.path).with_name(rec.path.rsplit("/", 1)[1].rsplit("-", 1)[0] + f"-{seq:03d}.png")


def pairs_of(root: Path, cache_dir: Path):
    idx = index_tree(root)
    cache = build_cache(idx.root, [r.path for r in idx.records], CACHE, cache_dir=cache_dir, workers=1, progress=False)
    return idx, cache, near.cache_pairs(cache, idx.records)


def test_thumbnails_and_dhash_by_hand():
    """Thumbnails are cell means (a loop over cells here); a field brighter to the right sets every hash bit,
    a flipped one clears them; a grey copy has the same hash; popcounts agree with bin().count."""
    rng = np.random.default_rng(0)
    fields = rng.integers(0, 256, (3, 70, 100, 3), dtype=np.uint8)
    t = near.thumbnails(fields)
    for k in range(3):
        np.testing.assert_allclose(t[k], thumb_by_hand(fields[k]), atol=1e-3)
    ramp = np.tile(np.linspace(0, 255, 32, dtype=np.float32), (32, 1))[None]
    assert near.dhash(ramp)[0] == np.uint64(2**64 - 1) and near.dhash(ramp[:, :, ::-1])[0] == 0
    g = np.repeat(np.round(grey(fields)).astype(np.uint8)[..., None], 3, axis=3)
    assert (near.dhash(near.thumbnails(g)) == near.dhash(t)).all()
    h = near.dhash(t)
    assert [bin(int(h[0]) ^ int(h[k])).count("1") for k in (1, 2)] == np.bitwise_count(h[0] ^ h[1:]).tolist()


def test_a_grey_copy_of_another_patients_field_is_found_and_kept_on_its_side(fresh_demo, cache_dir):
    """A field stored again as grayscale under another patient is not pixel-identical: it escaped the
    duplicate check and was split from its twin. It is found now, reported, and its patients share a side."""
    idx = index_tree(fresh_demo)
    a = idx.records[0]
    b = next(r for r in idx.records if r.patient != a.patient and r.magnification == a.magnification)
    twin = twin_path(fresh_demo, b)
    Image.open(fresh_demo / a.path).convert("L").save(twin)
    idx, cache, (pairs, note) = pairs_of(fresh_demo, cache_dir)
    assert note == ""
    assert [x["paths"] for x in pairs] == [sorted([a.path, twin.relative_to(fresh_demo).as_posix()])]
    assert pairs[0]["correlation"] > 0.99
    rep = integrity_report(idx, cache.info, cache.paths, near=pairs)
    assert rep["near_duplicates"] == pairs and "near-duplicate" in rep["verdict"]
    assert rep["near_groups"] == [{"patients": sorted([a.patient, b.patient]), "size": 2, "pairs": 1,
                                   "classes": {"benign": (a.cls == "benign") + (b.cls == "benign"),
                                               "malignant": (a.cls == "malignant") + (b.cls == "malignant")},
                                   "subtypes": sorted({a.subtype, b.subtype})}]
    for seed in range(12):
        cfg = make_config({"data": str(fresh_demo), "cache_dir": str(cache_dir), "cache_size": "64x96",
                           "split_seed": seed, "workers": 1, "split_ratio": "50:25:25"})
        m = prepare(cfg, progress=False).manifest
        side = {p for p in ("train", "val", "test") for q in m["patients"][p] if q in (a.patient, b.patient)}
        assert len(side) == 1, (seed, side)
        assert m["near_duplicates"] == pairs and m["near_duplicates_linked"] is True


def test_blank_or_identical_looking_fields_stop_the_search():
    """A tree of near-blank fields (all hashes alike) would pair every field with every other: 31 million
    pairs for the archive. Blank fields are not compared, and a search that finds too many candidates stops."""
    recs = [parse_name(f"SOB_B_A-14-{1000 + i // 10}-40-{i % 10 + 1:03d}.png") for i in range(300)]
    same = np.random.default_rng(0).normal(128, 20, (32, 32)).astype(np.float32)
    with pytest.raises(near.TooAlike):
        near.near_duplicates(recs, {r.path: same for r in recs})
    flat = np.zeros(3, bool)
    near.dhash(near.thumbnails(np.full((3, 16, 18, 3), 128, np.uint8)), flat=flat)
    assert flat.all()


def _jpeg(im: Image.Image, quality: int) -> Image.Image:
    buf = io.BytesIO()
    im.save(buf, "JPEG", quality=quality)
    return Image.open(io.BytesIO(buf.getvalue()))


COPIES = {  # how a field may be stored again under another patient; each must still be found
    "grey": lambda im: im.convert("L"),
    "jpeg q50": lambda im: _jpeg(im, 50),
    "rescaled 0.8": lambda im: im.resize((round(im.width * 0.8), round(im.height * 0.8)), Image.Resampling.BICUBIC),
    "flipped": lambda im: im.transpose(Image.Transpose.FLIP_LEFT_RIGHT),
    "rotated 90": lambda im: im.transpose(Image.Transpose.ROTATE_90),
    "rotated 180, grey, jpeg q70": lambda im: _jpeg(im.transpose(Image.Transpose.ROTATE_180).convert("L"), 70),
}


def test_real_he_fields_never_link_and_their_copies_always_do(he_picture, tmp_path):
    """12 patients x 4 fields of real H&E texture cut from different places, scales and angles of one picture
    (so all of one carcinoma, as alike as unrelated fields get), plus one copy of a field of patient 2k under
    patient 2k+1 for each way of storing it again. Before: a flipped or rotated copy was missed (the hash of
    one view only). Now: exactly the copies are linked, each pair's correlation agrees with a numpy
    computation by hand, and no two unrelated fields come near the threshold."""
    root = make_demo(tmp_path / "t", patients=12, images_per_patient=4, size=(140, 92), seed=3, content="he")
    recs = index_tree(root).records
    patients = sorted({r.patient for r in recs})
    expected = set()
    for k, (name, copy) in enumerate(COPIES.items()):
        src = next(r for r in recs if r.patient == patients[2 * k])
        dst = next(r for r in recs if r.patient == patients[2 * k + 1])
        twin = twin_path(root, dst)
        copy(Image.open(root / src.path)).save(twin)
        expected.add((name, tuple(sorted([src.path, twin.relative_to(root).as_posix()]))))
    idx, cache, (pairs, note) = pairs_of(root, tmp_path / "c")
    assert note == ""
    assert sorted(tuple(x["paths"]) for x in pairs) == sorted(p for _, p in expected), [x["paths"] for x in pairs]
    fields = {p: cache.images[cache.index_of(p)] for p in cache.paths}
    for x in pairs:
        assert x["correlation"] == pytest.approx(correlation_by_hand(*(fields[p] for p in x["paths"])), abs=2e-3)
        assert x["correlation"] >= near.MIN_CORRELATION
    copies = {p for _, pair in expected for p in pair}
    originals = [p for p in cache.paths if p not in copies][:24]
    unrelated = max(correlation_by_hand(fields[a], fields[b]) for i, a in enumerate(originals) for b in originals[i + 1:])
    assert unrelated < 0.6 < near.MIN_CORRELATION  # measured: about 0.3 at this size


def test_a_shared_illumination_falloff_links_nobody(he_picture, tmp_path):
    """Real H&E fields under one strong left-to-right illumination falloff have the same coarse layout: their
    hashes match (before: every patient linked to every other, and the split refused with '1 benign and 0
    malignant patients'). Their textures do not: no pair is verified and the split goes ahead."""
    root = make_demo(tmp_path / "t", patients=8, images_per_patient=4, size=(140, 92), seed=5, content="he")
    falloff = np.linspace(0.1, 1.0, 140)[None, :, None]
    for p in root.rglob("*.png"):
        x = np.asarray(Image.open(p).convert("RGB"), np.float64)
        Image.fromarray(np.clip(x * falloff, 0, 255).astype(np.uint8)).save(p)
    idx, cache, (pairs, note) = pairs_of(root, tmp_path / "c")
    stored = json.loads(near.pairs_file(cache).read_text())
    assert pairs == [] and stored["candidates"] >= 20  # the hashes matched; the verification refused them
    h = near.dhash(near.thumbnails(np.asarray(cache.images)))  # the old rule: view 0 within 5 bits is a link
    pat = np.array([r.patient for r in idx.records])
    i, j = np.nonzero((np.bitwise_count(h[:, None] ^ h[None]) <= 5) & (pat[:, None] != pat[None]))
    old = near.groups([{"patients": sorted({pat[a], pat[b]})} for a, b in zip(i, j)], idx.records)
    assert old and old[0]["size"] > near.max_group(8), old  # 5 of the 8 patients in one unit, formed silently
    cfg = make_config({"data": str(root), "cache_dir": str(tmp_path / "c"), "cache_size": "64x96", "workers": 1,
                       "split_ratio": "50:25:25"})
    assert len(prepare(cfg, progress=False).parts["test"]) > 0


def _linked_tree(fresh_demo: Path, copies: int) -> tuple[list, str]:
    """One field of the first patient copied under `copies` other patients, each stored another way (copies
    that are pixel-identical to each other would be dropped as duplicates); (records, its patient)."""
    recs = index_tree(fresh_demo).records
    a = recs[0]
    others = sorted({r.patient for r in recs} - {a.patient})[:copies]
    for q, copy in zip(others, COPIES.values(), strict=False):
        dst = next(r for r in recs if r.patient == q)
        copy(Image.open(fresh_demo / a.path)).save(twin_path(fresh_demo, dst))
    return index_tree(fresh_demo).records, a.patient


def one_line(capsys, *parts):
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "Traceback" not in err, err
    for p in parts:
        assert p in err, (p, err)
    return err


def test_a_group_of_more_than_max_group_patients_is_refused_naming_the_flag(fresh_demo, tmp_path, capsys, monkeypatch):
    """One field copied under 5 other patients of 8 joins 6 patients into one unit. Before: formed silently
    (the split decided by it). Now: the report lists the group, the split is refused in one line naming
    near-duplicates, the group's size and classes, and the flag; report lists the pairs without linking,
    off does not search."""
    recs, _ = _linked_tree(fresh_demo, 5)
    assert near.max_group(8) == 4
    base = [str(fresh_demo), "--cache-dir", str(tmp_path / "c"), "--cache-size", "64x96", "--workers", "1",
            "--split-ratio", "50:25:25"]
    assert guard(cli.main, base + ["--out", str(tmp_path / "s.json")]) == 2
    out = capsys.readouterr()
    assert "patients linked by near-duplicate fields" in out.out
    err = out.err.strip()
    assert "\n" not in err and "near-duplicate links would join 6 patients" in err and "--near-duplicates report" in err
    assert "benign" in err and "malignant" in err and not (tmp_path / "s.json").exists()
    cfg = make_config({"data": str(fresh_demo), "cache_dir": str(tmp_path / "c"), "cache_size": "64x96",
                       "workers": 1, "split_ratio": "50:25:25"})
    with pytest.raises(UserError, match="near-duplicate links would join 6 patients"):
        prepare(cfg, progress=False)  # train.py, tune.py: the same refusal
    assert guard(cli.main, base + ["--near-duplicates", "report", "--out", str(tmp_path / "s.json")]) == 0
    m = json.loads((tmp_path / "s.json").read_text())
    assert len(m["near_duplicates"]) == 15 and m["near_duplicates_linked"] is False  # 6 alike fields: 6 x 5 / 2 pairs
    import breakhis.data.prepare as P

    monkeypatch.setattr(P, "cache_pairs", lambda *a, **k: pytest.fail("searched with --near-duplicates off"))
    m = prepare(make_config({"near_duplicates": "off"}, base=cfg), progress=False).manifest
    assert m["near_duplicates"] == [] and m["near_duplicates_linked"] is False
    with pytest.raises(UserError, match="--near-duplicates 'copy': choose one of link, report, off"):
        make_config({"near_duplicates": "copy"})


def test_an_infeasible_split_says_it_is_the_links():
    """Links that join all 82 patients into one unit leave nothing to split. Before: 'cannot split ...: 1 benign
    and 0 malignant patients' for a unit holding both classes. Now: the links, counted, and the flag."""
    records = records_for(full_spec())
    patients = sorted({r.patient for r in records})
    links = list(zip(patients, patients[1:]))
    with pytest.raises(UserError) as e:
        S.make_split(records, (60, 10, 30), links=links)
    msg = str(e.value)
    assert "near-duplicate links join 82 patients into 1 unit(s)" in msg and "1 with both classes" in msg
    assert "--near-duplicates report" in msg and "0 malignant patients" not in msg
    with pytest.raises(UserError, match="1 benign and 1 malignant patients"):  # no links: the counts are the reason
        S.make_split(records_for(full_spec()[:1] + full_spec()[-1:]), (60, 10, 30))


def test_the_pairs_of_an_older_version_are_never_read(fresh_demo, tmp_path):
    """Version 1 kept unverified hash pairs (near-5.json); they are not links and are not read."""
    idx, cache, (pairs, _) = pairs_of(fresh_demo, tmp_path / "c")
    a, b = idx.records[0], idx.records[-1]
    (cache.folder / "near-5.json").write_text(json.dumps({"pairs": [{"paths": [a.path, b.path],
                                                                       "patients": [a.patient, b.patient]}], "note": ""}))
    assert near.cache_pairs(cache, idx.records)[0] == pairs == []
    shutil.rmtree(tmp_path / "c")
