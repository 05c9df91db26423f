"""Grad-CAM (breakhis.cam): heat maps against a hand-computed reference, the layer finder, the PNG overlays."""
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from breakhis.cam import choose, grad_cam, save_cams, target_layer
from breakhis.errors import UserError
from breakhis.models import build_model, set_frozen
from breakhis.options import EvalOptions

pytestmark = pytest.mark.slow  # end to end: evaluate.py --cam on a trained run, overlays of a predicted tree (its Grad-CAM references run with them)


def tiny(name="resnet18"):
    torch.manual_seed(0)
    return build_model(name, 2, (), (), pretrained=False).eval()


def reference(model, features, rest, x, cls):
    """Grad-CAM by hand: activations A = features(x), gradient of the class logit by autograd.grad."""
    a = features(x)
    logits = model.head(rest(a))
    (g,) = torch.autograd.grad(logits[:, cls].sum(), a)
    cam = F.relu((g.mean((2, 3), keepdim=True) * a).sum(1)).detach()
    peak = cam.amax((1, 2), keepdim=True)
    return torch.where(peak > 0, cam / peak, cam)


def test_grad_cam_shape_range_and_reference_on_resnet18():
    model, x = tiny(), torch.randn(3, 3, 64, 64)
    bb = model.backbone
    head = torch.nn.Sequential(bb.conv1, bb.bn1, bb.relu, bb.maxpool, bb.layer1, bb.layer2, bb.layer3, bb.layer4)
    for cls in (0, 1):
        cam = grad_cam(model, x, cls)
        assert cam.shape == (3, 2, 2)  # 64 px / stride 32
        assert cam.min() >= 0 and cam.max() <= 1
        assert torch.allclose(cam, reference(model, head, lambda a: bb.avgpool(a).flatten(1), x, cls), atol=1e-5)
    maps = grad_cam(model, x, torch.tensor([0, 1, 1]))
    assert torch.allclose(maps[0], grad_cam(model, x[:1], 0)[0], atol=1e-5)
    assert torch.allclose(maps[1:], grad_cam(model, x[1:], 1), atol=1e-5)
    assert all(m.max() in (0, 1) for m in maps)  # each map scaled to its own peak
    assert not model.training


def test_grad_cam_densenet_reads_features_before_the_inplace_relu():
    model, x = tiny("densenet121"), torch.randn(1, 3, 64, 64)
    bb = model.backbone

    def rest(a):
        return F.adaptive_avg_pool2d(F.relu(a), 1).flatten(1)  # DenseNet.forward after .features

    cam = grad_cam(model, x, 1)
    assert cam.max() > 0 and torch.allclose(cam, reference(model, bb.features, rest, x, 1), atol=1e-5)


def test_grad_cam_with_a_frozen_backbone():
    model = tiny()
    set_frozen(model, True)
    cam = grad_cam(model, torch.randn(2, 3, 64, 64), 1)
    assert cam.shape == (2, 2, 2) and cam.max() > 0


@pytest.mark.parametrize("name, expected", [
    ("resnet18", "backbone.layer4"), ("densenet121", "backbone.features"), ("efficientnet_b0", "backbone.features"),
    ("vgg11", "backbone.features"), ("alexnet", "backbone.features"), ("convnext_tiny", "backbone.features"),
])
def test_target_layer_is_the_last_convolutional_stage(name, expected):
    model = tiny(name)
    found = target_layer(model, torch.randn(1, 3, *(64, 64) if name == "alexnet" else (32, 32)))  # AlexNet needs 63 px
    assert found is model.get_submodule(expected)


def test_a_model_without_convolutions_is_refused():
    with pytest.raises(ValueError, match="no convolutional layer"):
        target_layer(torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(12, 2)), torch.randn(1, 3, 2, 2))


def test_choose_puts_confident_errors_first():
    probs = np.array([[0.9, 0.1], [0.3, 0.7], [0.2, 0.8], [0.6, 0.4], [0.55, 0.45], [0.1, 0.9]])
    labels = np.array([0, 0, 0, 1, 0, 1])
    # errors: 1 (conf 0.7), 2 (0.8), 3 (0.6); correct: 0 (0.9), 4 (0.55), 5 (0.9)
    assert choose(probs, labels, 6).tolist() == [2, 1, 3, 0, 5, 4]
    assert choose(probs, labels, 2).tolist() == [2, 1]


@pytest.fixture
def evaluated(demo_root, cache_dir):
    from breakhis.config import make_config
    from breakhis.data.prepare import prepare
    from breakhis.predict import TrainedRun

    cfg = make_config({"data": str(demo_root), "image_size": 48, "cache_dir": str(cache_dir), "backbone": "resnet18",
                       "pretrained": False, "head": "none", "dropout": "none", "device": "cpu", "workers": 1,
                       "class_weights": "none"})
    prep = prepare(cfg, progress=False)
    run = TrainedRun(cfg, torch.device("cpu"), model=tiny(), data=prep)
    return run, prep, run.predict("test"), cfg


def test_save_cams_writes_n_overlays_errors_first_and_none_for_zero(evaluated, tmp_path):
    run, prep, ev, cfg = evaluated
    order = choose(ev["probs"], ev["labels"], 5)
    files = save_cams(run, ev, "test", tmp_path / "plots", 5)
    assert len(files) == 5 and all(f.is_file() and f.parent == tmp_path / "plots" for f in files)
    for k, (f, j) in enumerate(zip(files, order)):
        wrong = ev["probs"][j].argmax() != ev["labels"][j]
        stem = prep.parts["test"][j].path.rsplit("/", 1)[-1][:-4]
        assert f.name == f"cam-{k + 1:02d}-{'error' if wrong else 'correct'}-{stem}.png"
        with Image.open(f) as im:
            assert im.format == "PNG" and im.size[0] > 300
    assert not list((tmp_path / "plots").glob(".tmp-*"))
    few = {k: ev[k][:3] for k in ("probs", "labels", "idx")}  # more asked for than there are: all of them
    assert len(save_cams(run, few, "test", tmp_path / "few", 8)) == 3
    assert save_cams(run, ev, "test", tmp_path / "none", 0) == [] and not (tmp_path / "none").exists()
    with pytest.raises(UserError, match="--cam -1"):  # a negative count is refused with the options, before any work
        EvalOptions(runs=["r"], cam=-1).validate()


def test_evaluate_cli_writes_cams_into_the_run_plots(demo_root, cache_dir, tmp_path, capsys):
    import evaluate
    import train

    assert train.main(["--data", str(demo_root), "--backbone", "resnet18", "--no-pretrained", "--image-size", "32",
                       "--epochs", "1", "--batch-size", "16", "--head", "none", "--dropout", "none", "--class-weights",
                       "none", "--device", "cpu", "--cache-dir", str(cache_dir), "--results", str(tmp_path),
                       "--name", "run", "--quiet"]) == 0
    capsys.readouterr()
    assert evaluate.main([str(tmp_path / "run"), "--cam", "2", "--boot", "20"]) == 0
    written = sorted((tmp_path / "run" / "plots").glob("cam-*.png"))
    assert [p.name[:7] for p in written] == ["cam-01-", "cam-02-"]
    assert "cam-01-" in capsys.readouterr().out
