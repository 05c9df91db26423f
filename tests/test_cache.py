"""Decode-once cache: round trip against a direct Pillow decode, odd images, keys, atomicity."""
import hashlib
import os
import random
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from breakhis.data import cache as C
from breakhis.data.cache import Cache, build_cache, cache_root, decode_resize, default_cache_size

SIZE = (40, 61)  # (H, W): a small cache field, downscaled from the 96x64 demo images


def rel_pngs(root):
    return sorted(p.relative_to(root).as_posix() for p in root.rglob("*.png"))


def reference(path, size):
    """Direct decode + resize, written independently of the cache module."""
    im = Image.open(path).convert("RGB")
    return np.asarray(im.resize((size[1], size[0]), Image.Resampling.BILINEAR))


def valid_folders(base):
    return [d for d in Path(base).iterdir() if (d / "index.json").exists() and not d.name.startswith(".")]


def test_default_cache_size():
    assert default_cache_size(224) == (256, 390)
    h, w = default_cache_size(112)
    assert (h, w) == (128, 195) and abs(w / h - 700 / 460) < 0.01


@pytest.mark.parametrize("workers", [1, 2])  # in this process, and two worker processes
def test_round_trip_equals_direct_decode(fresh_demo, cache_dir, workers):
    paths = rel_pngs(fresh_demo)
    assert len(paths) >= C.INPROCESS_BELOW  # so workers=2 really uses the process pool
    random.Random(0).shuffle(paths)  # the requested order is kept, not sorted
    c = build_cache(fresh_demo, paths, SIZE, cache_dir=cache_dir, workers=workers, progress=False)
    assert isinstance(c, Cache) and c.build_s is not None
    assert c.images.shape == (len(paths), *SIZE, 3) and c.images.dtype == np.uint8
    assert not c.images.flags.writeable and isinstance(c.images, np.memmap)
    assert c.paths == paths and c.folder.parent == cache_dir
    for i, p in enumerate(paths):
        full = fresh_demo / p
        np.testing.assert_array_equal(c.images[i], reference(full, SIZE))
        rgb = np.asarray(Image.open(full).convert("RGB"))
        assert c.info[i] == {"ok": True, "error": None, "mode": "RGB", "width": 96, "height": 64,
                             "sha1": hashlib.sha1(rgb.tobytes()).hexdigest()}
        assert c.index_of(p) == i
    with pytest.raises(KeyError, match="not in the cache"):
        c.index_of("nope.png")


def test_workers_and_inprocess_give_identical_caches(fresh_demo, tmp_path):
    paths = rel_pngs(fresh_demo)
    a = build_cache(fresh_demo, paths, SIZE, cache_dir=tmp_path / "a", workers=1, progress=False)
    b = build_cache(fresh_demo, paths, SIZE, cache_dir=tmp_path / "b", workers=3, progress=False)
    np.testing.assert_array_equal(a.images, b.images)
    assert a.info == b.info and a.key == b.key


def test_native_size_is_not_resampled(fresh_demo, cache_dir):
    paths = rel_pngs(fresh_demo)[:5]
    c = build_cache(fresh_demo, paths, (64, 96), cache_dir=cache_dir, progress=False)
    for i, p in enumerate(paths):
        np.testing.assert_array_equal(c.images[i], np.asarray(Image.open(fresh_demo / p)))


@pytest.fixture
def odd_tree(tmp_path):
    """Images in the modes and states the real archive may hold, all 12x8 unless noted."""
    root = tmp_path / "odd"
    root.mkdir()
    rgba = np.zeros((8, 12, 4), np.uint8)
    rgba[..., :3] = (200, 40, 90)
    rgba[:, :4, 3] = 0  # transparent: becomes white
    rgba[:, 4:8, 3] = 255  # opaque: keeps its colour
    rgba[:, 8:, 3] = 128  # half: blended with white
    Image.fromarray(rgba, "RGBA").save(root / "rgba.png")
    grey = np.arange(96, dtype=np.uint8).reshape(8, 12) * 2
    Image.fromarray(grey, "L").save(root / "grey.png")
    pal = Image.new("P", (12, 8))
    pal.putpalette([255, 0, 0, 0, 255, 0, 0, 0, 255] + [0] * (256 * 3 - 9))
    pal.putdata([i % 3 for i in range(96)])
    pal.save(root / "palette.png")
    Image.new("RGB", (30, 20), (10, 20, 30)).save(root / "odd_size.png")
    big = Image.fromarray(np.random.default_rng(0).integers(0, 255, (200, 300, 3), dtype=np.uint8))
    big.save(root / "whole.png")
    data = (root / "whole.png").read_bytes()
    (root / "truncated.png").write_bytes(data[: len(data) // 2])  # header intact, pixels cut
    (root / "not_png.png").write_text("this is not an image\n")
    return root, rgba, grey


def test_odd_images(odd_tree, cache_dir):
    root, rgba, grey = odd_tree
    names = ["rgba.png", "grey.png", "palette.png", "odd_size.png", "truncated.png", "not_png.png",
             "missing.png"]
    c = build_cache(root, names, (8, 12), cache_dir=cache_dir, progress=False)
    info = dict(zip(names, c.info))
    img = {n: c.images[i] for i, n in enumerate(names)}

    assert info["rgba.png"]["mode"] == "RGBA" and info["rgba.png"]["ok"]
    np.testing.assert_array_equal(img["rgba.png"][:, :4], 255)
    np.testing.assert_array_equal(img["rgba.png"][:, 4:8], np.broadcast_to([200, 40, 90], (8, 4, 3)))
    half = np.round((np.array([200, 40, 90]) * 128 + 255 * 127) / 255)
    assert np.abs(img["rgba.png"][:, 8:].astype(int) - half).max() <= 1
    assert info["rgba.png"]["sha1"] == hashlib.sha1(img["rgba.png"].tobytes()).hexdigest()

    assert info["grey.png"]["mode"] == "L"
    np.testing.assert_array_equal(img["grey.png"], np.repeat(grey[..., None], 3, axis=2))
    assert info["palette.png"]["mode"] == "P"
    colours = np.array([[255, 0, 0], [0, 255, 0], [0, 0, 255]])
    np.testing.assert_array_equal(img["palette.png"].reshape(-1, 3), colours[np.arange(96) % 3])

    odd = info["odd_size.png"]
    assert odd["ok"] and (odd["width"], odd["height"]) == (30, 20)
    np.testing.assert_array_equal(img["odd_size.png"], np.broadcast_to([10, 20, 30], (8, 12, 3)))

    bad = info["truncated.png"]
    assert not bad["ok"] and "truncated" in bad["error"] and bad["sha1"] is None
    assert (bad["mode"], bad["width"], bad["height"]) == ("RGB", 300, 200)  # the header was read
    for name in ("truncated.png", "not_png.png", "missing.png"):
        assert not info[name]["ok"] and info[name]["error"] and info[name]["sha1"] is None
        assert not img[name].any()  # zero pixels
    assert "FileNotFoundError" in info["missing.png"]["error"]


def test_decode_resize_matches_cache_and_reports_size(odd_tree):
    root, _, _ = odd_tree
    px, inf = decode_resize(root / "whole.png", (20, 30))
    np.testing.assert_array_equal(px, reference(root / "whole.png", (20, 30)))
    assert inf["ok"] and (inf["width"], inf["height"], inf["mode"]) == (300, 200, "RGB")


def forbid_decoding(monkeypatch):
    def boom(*a, **k):
        raise AssertionError("decoded although the cache is valid")
    monkeypatch.setattr(C, "decode_resize", boom)


def test_second_call_decodes_nothing(fresh_demo, cache_dir, monkeypatch):
    paths = rel_pngs(fresh_demo)
    first = build_cache(fresh_demo, paths, SIZE, cache_dir=cache_dir, workers=2, progress=False)
    forbid_decoding(monkeypatch)
    second = build_cache(str(fresh_demo), [fresh_demo / p for p in paths], SIZE, cache_dir=cache_dir,
                         workers=2, progress=False)  # str root, absolute paths: same cache
    assert second.build_s is None and second.folder == first.folder and second.key == first.key
    assert second.paths == paths
    np.testing.assert_array_equal(first.images, second.images)
    with pytest.raises(AssertionError, match="decoded although"):  # the patch does bite
        build_cache(fresh_demo, paths[:-1], SIZE, cache_dir=cache_dir, workers=1, progress=False)


def test_change_add_remove_rebuild(fresh_demo, cache_dir):
    paths = rel_pngs(fresh_demo)
    base = build_cache(fresh_demo, paths, SIZE, cache_dir=cache_dir, workers=1, progress=False)

    # changed: new pixels, mtime bumped (a rewrite within one clock tick keeps the old mtime)
    target = fresh_demo / paths[3]
    old3 = reference(target, SIZE)
    Image.new("RGB", (96, 64), (1, 2, 3)).save(target)
    st = target.stat()
    os.utime(target, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    changed = build_cache(fresh_demo, paths, SIZE, cache_dir=cache_dir, workers=1, progress=False)
    assert changed.key != base.key and changed.build_s is not None
    np.testing.assert_array_equal(changed.images[3], np.broadcast_to([1, 2, 3], (*SIZE, 3)))
    np.testing.assert_array_equal(base.images[3], old3)  # the old cache is left as it was

    # added
    extra = Path(paths[0]).with_name("SOB_B_A-14-10000AB-40-099.png").as_posix()
    Image.new("RGB", (96, 64), (9, 9, 9)).save(fresh_demo / extra)
    added = build_cache(fresh_demo, paths + [extra], SIZE, cache_dir=cache_dir, workers=1, progress=False)
    assert added.key not in (base.key, changed.key) and added.images.shape[0] == len(paths) + 1
    assert added.index_of(extra) == len(paths)

    # removed
    removed = build_cache(fresh_demo, paths[1:], SIZE, cache_dir=cache_dir, workers=1, progress=False)
    assert removed.key not in (base.key, changed.key, added.key) and removed.build_s is not None
    np.testing.assert_array_equal(removed.images, changed.images[1:])

    # another size is another cache
    other = build_cache(fresh_demo, paths, (20, 30), cache_dir=cache_dir, workers=1, progress=False)
    assert other.key != changed.key and other.images.shape[1:3] == (20, 30)
    assert len(valid_folders(cache_dir)) == 5  # old caches are left, each complete


def test_interrupted_build_leaves_nothing_valid(fresh_demo, cache_dir, monkeypatch):
    paths = rel_pngs(fresh_demo)
    real, calls = C.decode_resize, []

    def fail_midway(path, size):
        calls.append(path)
        if len(calls) == 10:
            raise KeyboardInterrupt
        return real(path, size)
    monkeypatch.setattr(C, "decode_resize", fail_midway)
    with pytest.raises(KeyboardInterrupt):
        build_cache(fresh_demo, paths, SIZE, cache_dir=cache_dir, workers=1, progress=False)
    assert list(cache_dir.iterdir()) == []  # the temp folder was removed, nothing looks valid
    monkeypatch.setattr(C, "decode_resize", real)
    c = build_cache(fresh_demo, paths, SIZE, cache_dir=cache_dir, workers=1, progress=False)
    assert c.build_s is not None
    np.testing.assert_array_equal(c.images[12], reference(fresh_demo / paths[12], SIZE))


def test_killed_build_is_not_reused(fresh_demo, cache_dir):
    """A build killed with SIGKILL (no clean-up runs) is rebuilt, and its temp folder pruned."""
    script = textwrap.dedent(f"""
        import os, signal
        from breakhis.data import cache as C
        real, n = C.decode_resize, [0]
        def die(path, size):
            n[0] += 1
            if n[0] == 20:
                os.kill(os.getpid(), signal.SIGKILL)
            return real(path, size)
        C.decode_resize = die
        paths = {rel_pngs(fresh_demo)!r}
        C.build_cache({str(fresh_demo)!r}, paths, {SIZE!r}, cache_dir={str(cache_dir)!r}, workers=1,
                      progress=False)
    """)
    repo = Path(__file__).resolve().parents[1]
    r = subprocess.run([sys.executable, "-c", script], cwd=repo, capture_output=True, text=True)
    assert r.returncode == -signal.SIGKILL, r.stderr
    leftovers = list(cache_dir.iterdir())
    assert len(leftovers) == 1 and leftovers[0].name.startswith(".tmp-")  # partial, unused
    assert not (leftovers[0] / "index.json").exists()
    c = build_cache(fresh_demo, rel_pngs(fresh_demo), SIZE, cache_dir=cache_dir, workers=1, progress=False)
    assert c.build_s is not None
    assert [d.name for d in cache_dir.iterdir()] == [c.folder.name]  # the dead temp was pruned


def test_invalid_final_folder_is_replaced(fresh_demo, cache_dir):
    paths = rel_pngs(fresh_demo)[:6]
    good = build_cache(fresh_demo, paths, SIZE, cache_dir=cache_dir, progress=False)
    (good.folder / "index.json").write_text("{ not json")  # e.g. damaged by hand
    again = build_cache(fresh_demo, paths, SIZE, cache_dir=cache_dir, progress=False)
    assert again.build_s is not None and again.folder == good.folder
    np.testing.assert_array_equal(again.images, good.images)
    (again.folder / "index.json").unlink()  # a folder without the marker
    third = build_cache(fresh_demo, paths, SIZE, cache_dir=cache_dir, progress=False)
    assert third.build_s is not None and (third.folder / "index.json").exists()


def test_concurrent_build_loser_keeps_the_winner(fresh_demo, cache_dir, monkeypatch):
    """Another process finishes the same key while we decode: our rename loses, theirs is used."""
    paths = rel_pngs(fresh_demo)[:10]
    real, rival = C._decode_all, {}

    def decode_while_rival_finishes(*args):
        if not rival:
            rival["cache"] = "building"
            rival["cache"] = build_cache(fresh_demo, paths, SIZE, cache_dir=cache_dir, progress=False)
        return real(*args)
    monkeypatch.setattr(C, "_decode_all", decode_while_rival_finishes)
    mine = build_cache(fresh_demo, paths, SIZE, cache_dir=cache_dir, progress=False)
    assert mine.folder == rival["cache"].folder
    assert os.path.samefile(mine.folder / "index.json", rival["cache"].folder / "index.json")
    assert [d.name for d in cache_dir.iterdir()] == [mine.folder.name]  # our copy was discarded
    np.testing.assert_array_equal(mine.images, rival["cache"].images)


def test_cache_root_precedence(monkeypatch, tmp_path):
    monkeypatch.delenv("BREAKHIS_CACHE", raising=False)
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert cache_root() == tmp_path / "home" / ".cache" / "breakhis"
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache_root() == tmp_path / "xdg" / "breakhis"
    monkeypatch.setenv("BREAKHIS_CACHE", str(tmp_path / "env"))
    assert cache_root() == tmp_path / "env"
    assert cache_root(tmp_path / "arg") == tmp_path / "arg"


def test_env_cache_dir_is_used(fresh_demo, tmp_path, monkeypatch):
    monkeypatch.setenv("BREAKHIS_CACHE", str(tmp_path / "envcache"))
    c = build_cache(fresh_demo, rel_pngs(fresh_demo)[:3], SIZE, progress=False)
    assert c.folder.parent == tmp_path / "envcache"


def test_bad_arguments(fresh_demo, cache_dir, tmp_path):
    with pytest.raises(ValueError, match="must be positive"):
        build_cache(fresh_demo, rel_pngs(fresh_demo), (0, 10), cache_dir=cache_dir)
    with pytest.raises(ValueError, match="is not inside the root"):
        build_cache(fresh_demo, [tmp_path / "elsewhere.png"], SIZE, cache_dir=cache_dir)


def test_root_through_a_symlink(fresh_demo, cache_dir, tmp_path):
    link = tmp_path / "link"
    link.symlink_to(fresh_demo, target_is_directory=True)
    paths = rel_pngs(fresh_demo)[:4]
    a = build_cache(link, [link / p for p in paths], SIZE, cache_dir=cache_dir, progress=False)
    b = build_cache(fresh_demo, paths, SIZE, cache_dir=cache_dir, progress=False)
    assert a.paths == paths and b.key == a.key and b.build_s is None
