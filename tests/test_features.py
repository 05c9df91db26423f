"""The feature cache: a head trained on cached frozen features equals one trained through the frozen
backbone; views follow the loader's seeded augmentation; the cache is keyed and reused."""
import dataclasses

import numpy as np
import pytest
import torch

from breakhis.config import make_config
from breakhis.data.prepare import prepare
from breakhis.features import FeatureLoader, feature_key, run_features
from breakhis.fit import fit, with_inputs
from breakhis.io import read_csv, read_json
from breakhis.loader import DeviceImages, Loader
from breakhis.models import build_model

pytestmark = pytest.mark.slow  # end to end: frozen-backbone runs with and without the feature cache


def frozen_cfg(demo_root, cache_dir, **extra):
    return with_inputs(make_config({
        "data": str(demo_root), "cache_dir": str(cache_dir), "backbone": "resnet18", "pretrained": False,
        "image_size": 32, "batch_size": 16, "epochs": 3, "head": (16,), "dropout": (0.3,), "lr": 1e-2,
        "milestones": (2,), "device": "cpu", "freeze": True, "augment": False, **extra}))


@pytest.mark.parametrize("backbone", ["resnet18", "timm:vit_tiny_patch16_224"])
def test_cached_features_train_the_same_head_as_the_frozen_backbone(backbone, demo_root, cache_dir, tmp_path):
    """Same seed, no augmentation: per-epoch losses and the test metrics of a run on cached features
    equal those of a run through the frozen backbone, up to the float16 rounding of the features."""
    cfg = frozen_cfg(demo_root, cache_dir, backbone=backbone)
    prep = prepare(cfg, progress=False)
    runs = {}
    for cached in (False, True):
        run = tmp_path / f"cached-{cached}"
        run.mkdir()
        runs[cached] = (fit(dataclasses.replace(cfg, feature_cache=cached), run, data=prep, progress=False), run)
    (slow, slow_dir), (fast, fast_dir) = runs[False], runs[True]
    for a, b in zip(read_csv(slow_dir / "history.csv"), read_csv(fast_dir / "history.csv")):
        for k in ("train_loss", "val_loss"):
            assert float(b[k]) == pytest.approx(float(a[k]), rel=2e-3, abs=1e-4), k
        assert float(b["train_acc"]) == pytest.approx(float(a["train_acc"]), abs=2 / 100)
    for k in ("accuracy", "auroc", "f1", "patient_recognition_rate"):
        assert fast["test"][k] == pytest.approx(slow["test"][k], abs=0.02), k
    assert any((cache_dir / "features").glob("*.npy"))


def test_training_views_are_the_loaders_augmented_epochs(demo_root, cache_dir):
    """View v of an image is the backbone's features of what the training loader shows at epoch v + 1."""
    cfg = frozen_cfg(demo_root, cache_dir, augment=True, feature_views=2)
    prep = prepare(cfg, progress=False)
    torch.manual_seed(0)
    backbone = build_model("resnet18", head=(8,), pretrained=False).backbone.eval()
    images = DeviceImages(prep.cache.images, "cpu")
    feats = run_features(backbone, prep, cfg, torch.device("cpu"), None, images, parts=("train",))["train"]
    assert feats.shape[:2] == (2, len(prep.positions["train"])) and feats.dtype == torch.float16
    rows = {int(p): i for i, p in enumerate(prep.positions["train"])}
    loader = Loader.for_run(images, prep.positions["train"], prep.labels("train"), cfg, train=True, dtype=torch.float32)
    for view in (0, 1):
        loader.set_epoch(view + 1)
        x, _, idx = next(iter(loader))
        with torch.no_grad():
            want = backbone(x)
        got = feats[view, [rows[int(i)] for i in idx]].float()
        torch.testing.assert_close(got, want, rtol=2e-3, atol=2e-3)
    assert not torch.equal(feats[0], feats[1])  # two different augmentations


def test_feature_loader_visits_the_loaders_order(demo_root, cache_dir):
    cfg = frozen_cfg(demo_root, cache_dir)
    prep = prepare(cfg, progress=False)
    n = len(prep.positions["train"])
    feats = torch.arange(n, dtype=torch.float16)[:, None].expand(n, 4)
    fl = FeatureLoader.for_run(feats, prep, "train", cfg)
    loader = Loader.for_run(DeviceImages(prep.cache.images, "cpu"), prep.positions["train"], prep.labels("train"), cfg,
                            train=True, dtype=torch.float32)
    for epoch in (1, 2):
        fl.set_epoch(epoch)
        loader.set_epoch(epoch)
        assert len(fl) == len(loader)
        for (f, y, idx), (_, y2, idx2) in zip(fl, loader):
            assert torch.equal(idx, idx2) and torch.equal(y, y2)
            assert np.array_equal(prep.positions["train"][f[:, 0].long().numpy()], idx.numpy())


def test_feature_key_changes_with_what_the_features_depend_on(demo_root, cache_dir, tmp_path):
    cfg = frozen_cfg(demo_root, cache_dir, augment=True)
    prep = prepare(cfg, progress=False)
    key = feature_key(prep, cfg, "train", None)
    assert key == feature_key(prep, cfg, "train", None)
    w = tmp_path / "w.pth"
    w.write_bytes(b"x")
    for change in ({"backbone": "resnet34"}, {"image_size": 48}, {"seed": 1}, {"feature_views": 2},
                   {"stain_jitter": 0.1}, {"weights": str(w)}, {"mean": (0.5, 0.5, 0.5)}):
        assert feature_key(prep, dataclasses.replace(cfg, **change), "train", None) != key, change
    assert feature_key(prep, cfg, "val", None) != key
    # the evaluation view does not depend on the augmentation settings
    assert feature_key(prep, dataclasses.replace(cfg, stain_jitter=0.1), "val", None) == feature_key(prep, cfg, "val", None)


def test_a_second_run_reads_the_cache(demo_root, cache_dir, tmp_path, monkeypatch):
    cfg = frozen_cfg(demo_root, cache_dir, epochs=1)
    prep = prepare(cfg, progress=False)
    (tmp_path / "a").mkdir()
    fit(cfg, tmp_path / "a", data=prep, progress=False)
    files = sorted((cache_dir / "features").glob("*.npy"))
    import breakhis.features
    monkeypatch.setattr(breakhis.features, "compute", lambda *a: pytest.fail("features computed again"))
    (tmp_path / "b").mkdir()
    fit(cfg, tmp_path / "b", data=prep, progress=False)
    assert sorted((cache_dir / "features").glob("*.npy")) == files
    assert read_json(tmp_path / "b" / "metrics.json")["test"] == read_json(tmp_path / "a" / "metrics.json")["test"]


def test_scoring_and_tta_read_cached_evaluation_views(demo_root, cache_dir, tmp_path, monkeypatch):
    """finalize and evaluate --tta of a cached run read cached val/test features (computed once) and
    give the probabilities of the whole model, backbone and head, up to float16 rounding."""
    import breakhis.features
    from breakhis.augment import tta_views
    from breakhis.evaluation import evaluate_run
    from breakhis.options import EvalOptions
    from breakhis.predict import open_run

    cfg = frozen_cfg(demo_root, cache_dir, epochs=1)
    prep = prepare(cfg, progress=False)
    run = tmp_path / "run"
    run.mkdir()
    fit(cfg, run, data=prep, progress=False)
    parts = {p.name.split("-")[-2] for p in (cache_dir / "features").glob("*.npy")}
    assert parts == {"train", "val", "test"}
    opts = EvalOptions(runs=[str(run)], tta=True, device="cpu", n_boot=0)
    first = evaluate_run(open_run(run, device="cpu"), opts)
    monkeypatch.setattr(breakhis.features, "compute", lambda *a, **k: pytest.fail("features computed again"))
    again = evaluate_run(open_run(run, device="cpu"), opts)
    assert again["test"] == first["test"]
    # reference: the whole loaded model over the 8 dihedral views of each test image, softmax averaged
    opened = open_run(run, device="cpu")
    model, rcfg = opened.model, opened.cfg
    loader = Loader.for_run(DeviceImages(prep.cache.images, "cpu"), prep.positions["test"], prep.labels("test"), rcfg,
                            train=False, dtype=torch.float32)
    with torch.no_grad():
        want = torch.cat([torch.stack([torch.softmax(model(v), -1) for v in tta_views(x)]).mean(0) for x, _, _ in loader])
    got = opened.predict("test", tta=True)["probs"]
    np.testing.assert_allclose(got, want.double().numpy(), atol=2e-3)
    plain = opened.predict("test")["probs"]
    assert np.abs(plain - got).max() > 1e-6  # the views differ from the plain evaluation view
