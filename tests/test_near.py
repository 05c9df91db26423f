"""breakhis.data.near: near-duplicate fields across patients, found by a perceptual hash and kept together."""
import numpy as np
from PIL import Image

from breakhis.config import make_config
from breakhis.data import near
from breakhis.data.cache import build_cache
from breakhis.data.dataset import index_tree
from breakhis.data.integrity import integrity_report
from breakhis.data.prepare import prepare


def test_dhash_by_hand():
    """A field brighter to the right sets every bit; a flipped one clears them all; grey copies keep them."""
    ramp = np.tile(np.linspace(0, 255, 90, dtype=np.float32), (80, 1))
    field = np.repeat(ramp[:, :, None], 3, axis=2).astype(np.uint8)[None]  # (1, 80, 90, 3)
    assert near.dhash(field)[0] == np.uint64(2**64 - 1)
    assert near.dhash(field[:, :, ::-1])[0] == 0
    rgb = np.random.default_rng(0).integers(0, 256, (2, 64, 96, 3), dtype=np.uint8)
    grey = (rgb.astype(np.float32) @ np.array([0.299, 0.587, 0.114], np.float32)).round().astype(np.uint8)
    h = near.dhash(np.concatenate([rgb, np.repeat(grey[..., None], 3, axis=3)]))
    assert [bin(int(h[i]) ^ int(h[i + 2])).count("1") for i in range(2)] == [0, 0]  # popcount by hand
    assert near._popcount(np.array([0, 1, 2**64 - 1, 0b1011], np.uint64)).tolist() == [0, 1, 64, 3]


def test_a_grey_copy_of_another_patients_field_is_found_and_kept_on_its_side(fresh_demo, cache_dir):
    """A field stored again as grayscale under another patient is not pixel-identical: it escaped the
    duplicate check and was split from its twin. It is found now, reported, and its patients share a side."""
    idx = index_tree(fresh_demo)
    a = idx.records[0]
    b = next(r for r in idx.records if r.patient != a.patient and r.magnification == a.magnification)
    twin = (fresh_demo / b.path).with_name(b.path.rsplit("/", 1)[1].rsplit("-", 1)[0] + "-099.png")
    Image.open(fresh_demo / a.path).convert("L").save(twin)
    idx = index_tree(fresh_demo)
    cache = build_cache(idx.root, [r.path for r in idx.records], (32, 48), cache_dir=cache_dir, workers=1,
                        progress=False)
    pairs, note = near.cache_pairs(cache, idx.records)
    assert note == ""
    assert [x["paths"] for x in pairs] == [sorted([a.path, twin.relative_to(fresh_demo).as_posix()])]
    rep = integrity_report(idx, cache.info, cache.paths, near=pairs)
    assert rep["near_duplicates"] == pairs and "near-duplicate" in rep["verdict"]
    for seed in range(12):
        cfg = make_config({"data": str(fresh_demo), "cache_dir": str(cache_dir), "cache_size": "32x48",
                           "split_seed": seed, "workers": 1, "split_ratio": "50:25:25"})
        m = prepare(cfg, progress=False).manifest
        side = {p for p in ("train", "val", "test") for q in m["patients"][p] if q in (a.patient, b.patient)}
        assert len(side) == 1, (seed, side)
        assert m["near_duplicates"] == pairs


def test_blank_or_identical_looking_fields_stop_the_search():
    """A tree of near-blank fields (all hashes alike) would pair every field with every other: 31 million
    pairs for the archive. Blank fields are not compared, and a search that finds too many pairs stops."""
    from breakhis.data.dataset import parse_name

    recs = [parse_name(f"SOB_B_A-14-{1000 + i // 10}-40-{i % 10 + 1:03d}.png") for i in range(300)]
    with np.testing.assert_raises(near.TooAlike):
        near.near_duplicates(recs, {r.path: 7 for r in recs})
    flat = np.zeros(3, bool)
    near.dhash(np.full((3, 16, 18, 3), 128, np.uint8), flat=flat)
    assert flat.all()
