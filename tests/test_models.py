"""Backbone registry, head, freezing, weight files, safetensors round trip, AMP choice."""
from urllib.error import URLError

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn
from torchvision.models import get_model

from breakhis import models
from breakhis.config import make_config
from breakhis.device import prepare_model
from breakhis.errors import UserError
from breakhis.models import build_model, portable_state_dict, set_frozen, train_mode
from breakhis.registry import BACKBONES, PATHOLOGY

REQUIRED = ([f"resnet{n}" for n in (18, 34, 50, 101, 152)] + [f"efficientnet_b{i}" for i in range(8)]
            + ["densenet121", "densenet169", "densenet201", "alexnet", "convnext_tiny"]
            + [f"vgg{n}{bn}" for n in (11, 13, 16, 19) for bn in ("", "_bn")])


def head_in(model):
    """Width F of the backbone's features, as the head sees it (the in_features of its first linear layer)."""
    return next(m for m in model.head if isinstance(m, nn.Linear)).in_features


def test_registry_has_the_logbook_backbones():
    assert set(REQUIRED) <= set(BACKBONES)
    assert set(QUICK) <= set(BACKBONES)  # the quick set's names are real ones


# The smallest of each family runs in the quick set (-m "not slow"); its larger members build the same
# layers deeper or wider (the VGGs' 100 M-parameter classifiers take seconds each to initialise).
QUICK = ("resnet18", "efficientnet_b0", "densenet121", "vgg11", "alexnet", "convnext_tiny")


@pytest.mark.parametrize("name", [n if n in QUICK else pytest.param(n, marks=pytest.mark.slow) for n in sorted(BACKBONES)])
def test_every_backbone_builds_and_runs(name):
    # 64 px is about the smallest AlexNet accepts (its third max-pool needs a 3x3 map);
    # VGG and AlexNet pool adaptively to 7x7 / 6x6, so their linear layers still fit
    torch.manual_seed(0)
    model = build_model(name, num_classes=3, head=(16,), dropout=(0.5,), pretrained=False).eval()
    assert isinstance(model.backbone, nn.Module) and isinstance(model.head, nn.Sequential)
    assert not [m for m in model.backbone.modules() if isinstance(m, nn.Linear) and m.out_features == 1000]
    with torch.no_grad():
        feats = model.backbone(torch.randn(1, 3, 64, 64))
        out = model(torch.randn(1, 3, 64, 64))
    assert feats.shape == (1, head_in(model))
    assert out.shape == (1, 3) and torch.isfinite(out).all()


def test_unknown_backbone_lists_choices():
    # TrainConfig.validate() refuses the name before anything is built; build_model trusts its caller
    with pytest.raises(UserError, match="resnet50.*efficientnet_b7.*convnext_tiny"):
        make_config({"backbone": "resnet9000", "pretrained": False})
    with pytest.raises(KeyError, match="resnet9000"):
        build_model("resnet9000", pretrained=False)


def _layout(head):
    return [(type(m).__name__, getattr(m, "p", None) if isinstance(m, nn.Dropout) else
             (m.in_features, m.out_features) if isinstance(m, nn.Linear) else None) for m in head]


def test_head_structure():
    model = build_model("resnet18", head=(1000, 512, 128), dropout=(0.5, 0.5, 0.5), pretrained=False)
    assert _layout(model.head) == [("Dropout", 0.5), ("Linear", (512, 1000)), ("ReLU", None),
                                   ("Dropout", 0.5), ("Linear", (1000, 512)), ("ReLU", None),
                                   ("Dropout", 0.5), ("Linear", (512, 128)), ("ReLU", None),
                                   ("Linear", (128, 2))]
    # the logbook's best entry: 2048 -> 1000 -> 2 with a dropout before each linear layer
    model = build_model("resnet50", head=(1000,), dropout=(0.5, 0.5), pretrained=False)
    assert _layout(model.head) == [("Dropout", 0.5), ("Linear", (2048, 1000)), ("ReLU", None),
                                   ("Dropout", 0.5), ("Linear", (1000, 2))]
    model = build_model("resnet18", num_classes=8, head=(), dropout=(), pretrained=False)
    assert _layout(model.head) == [("Linear", (512, 8))]
    model = build_model("resnet18", head=(), dropout=(0.3,), pretrained=False)
    assert _layout(model.head) == [("Dropout", 0.3), ("Linear", (512, 2))]


def test_head_errors():  # the rules are TrainConfig.validate()'s: before any model is built
    with pytest.raises(UserError, match="--dropout has 2 rates.*1 linear"):
        make_config({"backbone": "resnet18", "head": (), "dropout": (0.5, 0.5)})
    with pytest.raises(UserError, match=r"\[0, 1\)"):
        make_config({"backbone": "resnet18", "dropout": (1.0,)})
    with pytest.raises(UserError, match="--head"):
        make_config({"backbone": "resnet18", "head": (0,)})
    with pytest.raises(ValueError, match="dropout rates"):  # a caller that skipped validation is a bug
        build_model("resnet18", head=(), dropout=(0.5, 0.5), pretrained=False)


def test_probability_of_malignant_is_softmax_of_two_logits():
    model = build_model("resnet18", head=(), dropout=(), pretrained=False).eval()
    with torch.no_grad():
        logits = model(torch.randn(4, 3, 32, 32))
    p = logits.softmax(1)[:, 1]
    assert torch.allclose(p, torch.sigmoid(logits[:, 1] - logits[:, 0]), atol=1e-6)


def test_freeze_trains_only_the_head_and_keeps_bn_statistics():
    model = build_model("resnet18", head=(8,), pretrained=False)
    set_frozen(model, True)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {n for n, _ in model.named_parameters() if n.startswith("head.")}
    before = {k: v.clone() for k, v in model.backbone.state_dict().items()}
    train_mode(model)
    assert model.training and model.head.training and not model.backbone.training
    model(torch.randn(4, 3, 32, 32)).sum().backward()
    after = model.backbone.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # running_mean/var and num_batches_tracked
    # unfreezing: everything trains and BatchNorm statistics move again
    set_frozen(model, False)
    train_mode(model)
    assert all(p.requires_grad for p in model.parameters()) and model.backbone.training
    model(torch.randn(4, 3, 32, 32))
    bn = model.backbone.bn1
    assert not torch.equal(bn.running_mean, before["bn1.running_mean"])


def _save(state, path):
    if path.suffix == ".safetensors":
        save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    else:
        torch.save(state, path)


@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_weights_from_local_file(tmp_path, suffix):
    torch.manual_seed(1)
    source = get_model("resnet18", weights=None)  # a torchvision state dict, classifier 'fc' included
    path = tmp_path / f"resnet18{suffix}"
    _save(source.state_dict(), path)
    torch.manual_seed(2)
    model = build_model("resnet18", weights=str(path), pretrained=True)  # the file wins over downloading
    want = {k: v for k, v in source.state_dict().items() if not k.startswith("fc.")}
    got = model.backbone.state_dict()
    assert set(got) == set(want)
    assert all(torch.equal(got[k], want[k]) for k in want)
    # the file without its classifier loads too
    _save(want, path)
    model = build_model("resnet18", weights=str(path), pretrained=False)
    assert torch.equal(model.backbone.conv1.weight, source.conv1.weight)


def test_densenet_weights_with_old_key_names(tmp_path):
    # the DenseNet files torchvision downloads still name layers 'norm.1' for 'norm1', and
    # (saved before PyTorch 0.4.1) have no BatchNorm num_batches_tracked
    source = get_model("densenet121", weights=None)
    state = {k.replace("norm1", "norm.1").replace("conv2", "conv.2"): v for k, v in source.state_dict().items()
             if not k.endswith("num_batches_tracked")}
    assert "features.denseblock1.denselayer1.norm.1.weight" in state
    torch.save(state, tmp_path / "d.pth")
    model = build_model("densenet121", weights=str(tmp_path / "d.pth"), pretrained=False)
    key = "features.denseblock1.denselayer1.conv2.weight"
    assert torch.equal(model.backbone.state_dict()[key], source.state_dict()[key])


def test_weights_of_a_whole_classifier(tmp_path):
    model = build_model("resnet18", head=(8,), dropout=(0.5,), pretrained=False)
    save_file(portable_state_dict(model), str(tmp_path / "m.safetensors"))
    again = build_model("resnet18", head=(8,), dropout=(0.5,), weights=str(tmp_path / "m.safetensors"))
    assert all(torch.equal(v, again.state_dict()[k]) for k, v in model.state_dict().items())
    with pytest.raises(UserError, match="head.1.weight"):
        build_model("resnet18", head=(16,), weights=str(tmp_path / "m.safetensors"))


def test_mismatched_weights(tmp_path):
    torch.save(get_model("resnet34", weights=None).state_dict(), tmp_path / "r34.pth")
    with pytest.raises(UserError, match=r"r34.pth.*resnet18.*unexpected: layer1.2"):
        build_model("resnet18", weights=str(tmp_path / "r34.pth"))
    state = get_model("resnet18", weights=None).state_dict()
    state["conv1.weight"] = torch.zeros(64, 3, 5, 5)
    torch.save(state, tmp_path / "shape.pth")
    with pytest.raises(UserError, match=r"conv1.weight \(64, 3, 5, 5\) vs \(64, 3, 7, 7\)"):
        build_model("resnet18", weights=str(tmp_path / "shape.pth"))
    (tmp_path / "junk.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(UserError, match="junk.pth: cannot read"):
        build_model("resnet18", weights=str(tmp_path / "junk.pth"))


def test_missing_weights_file(tmp_path):
    with pytest.raises(UserError, match="not found"):
        build_model("resnet18", weights=str(tmp_path / "nope.pth"))


def test_pretrained_without_network_suggests_weights(monkeypatch, tmp_path):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))  # an empty cache: the download would be needed

    def offline(*args, **kwargs):
        raise URLError("no network")

    import torchvision.models._api as api
    monkeypatch.setattr(api, "load_state_dict_from_url", offline)
    with pytest.raises(UserError, match="--weights PATH.*--no-pretrained"):
        build_model("resnet18", pretrained=True)
    assert not any(tmp_path.iterdir())


def test_pretrained_weights_are_loaded(monkeypatch):
    # stand in for the download: the backbone must receive exactly those tensors
    source = get_model("resnet18", weights=None)
    monkeypatch.setattr(models, "_download", lambda name: source.state_dict())
    model = build_model("resnet18", pretrained=True)
    assert torch.equal(model.backbone.layer4[1].conv2.weight, source.layer4[1].conv2.weight)


def test_safetensors_round_trip(tmp_path):
    model = build_model("efficientnet_b0", head=(8,), pretrained=False)
    save_file(model.state_dict(), str(tmp_path / "plain.safetensors"))  # the lead's plain save works
    loaded = load_file(str(tmp_path / "plain.safetensors"))
    assert set(loaded) == set(model.state_dict())
    # channels-last weights are not contiguous: portable_state_dict makes them storable
    prepare_model(model, torch.device("cpu"), channels_last=True, compile=False)
    with pytest.raises(ValueError, match="non contiguous"):
        save_file(model.state_dict(), str(tmp_path / "cl.safetensors"))
    save_file(portable_state_dict(model), str(tmp_path / "cl.safetensors"))
    fresh = build_model("efficientnet_b0", head=(8,), pretrained=False)
    fresh.load_state_dict(load_file(str(tmp_path / "cl.safetensors")))
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(fresh.eval()(x), model.eval()(x.to(memory_format=torch.channels_last)), atol=1e-5)


def test_portable_state_dict_copies():
    model = build_model("resnet18", head=(), dropout=(), pretrained=False)
    state = portable_state_dict(model)
    state["head.0.weight"].zero_()
    assert model.head[0].weight.abs().sum() > 0


# ---------------------------------------------------------------------- timm backbones
TINY_TIMM = ("timm:vit_tiny_patch16_224", "timm:convnext_atto")


@pytest.mark.parametrize("name", TINY_TIMM)
def test_timm_backbone_with_our_head_freezes_and_runs(name):
    import timm
    model = build_model(name, num_classes=2, head=(8,), dropout=(0.2,), pretrained=False, image_size=32)
    width = timm.create_model(name[5:], pretrained=False, num_classes=0, **({"img_size": 32} if "vit" in name else {})).num_features
    assert head_in(model) == model.backbone.num_features == width
    x = torch.randn(3, 3, 32, 32)
    assert model(x).shape == (3, 2)
    assert model.backbone(x).shape == (3, width)  # pooled features, no timm classifier
    set_frozen(model, True)
    train_mode(model)
    assert not model.backbone.training and model.head.training
    model(x).sum().backward()
    assert all(p.grad is None for p in model.backbone.parameters())


@pytest.mark.parametrize("name", TINY_TIMM)
def test_timm_weights_file_loads_and_mismatch_names_keys(name, tmp_path):
    from breakhis.errors import UserError
    src = build_model(name, head=(8,), dropout=(0.2,), pretrained=False, image_size=32)
    state = {k: v.contiguous() for k, v in src.backbone.state_dict().items()}
    classifier = src.backbone.pretrained_cfg["classifier"] + ".weight"  # timm's own classifier: ignored
    state[classifier] = torch.zeros(1000, src.backbone.num_features)
    save_file(state, str(tmp_path / "w.safetensors"))
    got = build_model(name, head=(8,), dropout=(0.2,), pretrained=True, weights=str(tmp_path / "w.safetensors"),
                      image_size=32)
    for k, v in src.backbone.state_dict().items():
        assert torch.equal(got.backbone.state_dict()[k], v), k
    torch.save({"model": state}, tmp_path / "w.pth")  # a training checkpoint's layout
    build_model(name, head=(8,), pretrained=False, weights=str(tmp_path / "w.pth"), image_size=32)
    bad = {k: v for k, v in state.items() if k != classifier}
    dropped = sorted(bad)[0]
    del bad[dropped]
    bad["extra.weight"] = torch.zeros(2)
    save_file(bad, str(tmp_path / "bad.safetensors"))
    with pytest.raises(UserError, match=rf"missing: {dropped}.*unexpected: extra\.weight"):
        build_model(name, head=(8,), weights=str(tmp_path / "bad.safetensors"), image_size=32)


def test_input_spec_comes_from_the_pretrained_config():
    import timm

    from breakhis.models import input_spec
    cfg = timm.create_model("vit_tiny_patch16_224", pretrained=False).pretrained_cfg
    spec = input_spec("timm:vit_tiny_patch16_224")
    assert spec == {"size": cfg["input_size"][-1], "mean": tuple(cfg["mean"]), "std": tuple(cfg["std"])}
    assert spec["mean"] != (0.485, 0.456, 0.406)  # not ImageNet's: this model was trained at 0.5/0.5
    assert input_spec("resnet18")["mean"] == (0.485, 0.456, 0.406)
    h = PATHOLOGY["hf-hub:bioptimus/H-optimus-0"]
    assert input_spec("timm:hf-hub:bioptimus/H-optimus-0") == {"size": 224, "mean": h["mean"], "std": h["std"]}


@pytest.mark.parametrize("hub", sorted(PATHOLOGY))
def test_pathology_architectures_build_offline_with_their_feature_width(hub):
    """Each pathology entry's offline architecture builds (on the meta device: no memory) with the
    width its model card gives, so a downloaded weights file has something to load into."""
    import timm

    from breakhis.models import _timm_layers
    e = PATHOLOGY[hub]
    with torch.device("meta"):
        m = timm.create_model(e["arch"], pretrained=False, num_classes=0, **_timm_layers(e["kwargs"]))
    assert m.num_features == e["features"]


def test_unknown_timm_name_lists_close_matches():
    from breakhis.errors import UserError
    from breakhis.models import check_timm
    with pytest.raises(UserError, match="close matches: .*timm:vit_tiny_patch16_224"):
        check_timm("timm:vit_tiny_patch16", pretrained=False, weights="")


def test_hub_without_network_or_weights_says_how_to_get_them(monkeypatch):
    import huggingface_hub.constants

    from breakhis.errors import UserError
    from breakhis.models import check_timm
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(UserError, match="huggingface-cli download MahmoodLab/UNI.*--weights FILE"):
        check_timm("timm:hf-hub:MahmoodLab/UNI", pretrained=True, weights="")
    check_timm("timm:hf-hub:MahmoodLab/UNI", pretrained=True, weights="uni.bin")  # the file serves it
    with pytest.raises(UserError, match="not known offline"):
        check_timm("timm:hf-hub:someone/unknown", pretrained=True, weights="w.bin")
