"""The device loader on the CPU: views, per-sample augmentation, determinism, sampling, transfer."""
import numpy as np
import pytest
import torch
import torch.nn.functional as F
import torchvision.transforms.v2.functional as TF

from breakhis.augment import MEAN, STD, Augment, colour_maps, dihedral, stain_maps, tta_views
from breakhis.config import TrainConfig, make_config
from breakhis.errors import UserError
from breakhis.loader import DeviceImages, Loader

S = 32
NONE = dict(crop_scale=(1.0, 1.0), dihedral=False, color_jitter=0.0, stain_jitter=0.0)
mean = torch.tensor(MEAN).view(1, 3, 1, 1)
std = torch.tensor(STD).view(1, 3, 1, 1)


def images(n=24, h=40, w=60, seed=0):
    """Smooth, asymmetric uint8 fields (N, H, W, 3): upsampled noise plus a ramp."""
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(n, 3, h // 4, w // 4, generator=g) * 180
    x = F.interpolate(x, size=(h, w), mode="bilinear", align_corners=False)
    x = x + torch.linspace(0, 60, w).view(1, 1, 1, w) + torch.linspace(0, 15, h).view(1, 1, h, 1)
    return x.clamp(0, 255).round().to(torch.uint8).permute(0, 2, 3, 1).contiguous().numpy()


def loader(imgs, train=True, augment=None, labels=None, budget_gb=8.0, **kw):
    n = len(imgs)
    labels = np.arange(n) % 2 if labels is None else labels
    kw.setdefault("batch_size", 10)
    return Loader(DeviceImages(imgs, "cpu", budget_gb=budget_gb), np.arange(n), labels, image_size=S,
                  train=train, augment=augment, **kw)


def rgb255(x):
    """De-normalise a batch back to [0, 255] float."""
    return (x.float() * std + mean) * 255


def batches(ld):
    return [(x.clone(), y.clone(), i.clone()) for x, y, i in ld]


def central(imgs, idx):
    """Independent reference of the evaluation view: central H x H square, float bilinear resize."""
    t = torch.from_numpy(imgs[idx.numpy()]).permute(0, 3, 1, 2).float()
    H, W = t.shape[-2:]
    x0 = (W - H) // 2
    return F.interpolate(t[..., x0:x0 + H], size=(S, S), mode="bilinear", align_corners=False)


# ---------------------------------------------------------------------------- shapes and views
@pytest.mark.parametrize("train", [False, True])
def test_batch_shapes_dtype_layout(train):
    ld = loader(images(), train=train, augment=Augment() if train else None)
    x, y, idx = next(iter(ld))
    assert x.shape == (10, 3, S, S) and x.dtype == torch.float32 and x.device.type == "cpu"
    assert x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()
    assert y.dtype == torch.int64 and idx.dtype == torch.int64 and y.shape == idx.shape == (10,)
    assert torch.equal(y, idx % 2)  # labels follow their images
    rgb = rgb255(x)
    assert rgb.min() >= -1e-3 and rgb.max() <= 255 + 1e-3
    nchw = Loader(ld.data, ld.indices, ld.labels, batch_size=10, image_size=S, train=train,
                  augment=ld.augment, channels_last=False)
    assert next(iter(nchw))[0].is_contiguous()


def test_eval_view_is_central_square_in_order():
    imgs = images()
    got = batches(loader(imgs, train=False))
    assert torch.equal(torch.cat([i for _, _, i in got]), torch.arange(24))
    for x, _, idx in got:
        ref = central(imgs, idx)
        assert (rgb255(x) - ref).abs().max() <= 1.001  # uint8 resize: within one grey level


def test_indices_are_positions_into_the_array():
    imgs = images()
    sub = np.array([3, 5, 7, 11, 13])
    ld = Loader(DeviceImages(imgs, "cpu"), sub, [0, 1, 0, 1, 1], batch_size=4, image_size=S, train=False)
    (x1, y1, i1), (x2, y2, i2) = list(ld)
    assert i1.tolist() + i2.tolist() == sub.tolist() and y1.tolist() + y2.tolist() == [0, 1, 0, 1, 1]
    assert (rgb255(x2) - central(imgs, i2)).abs().max() <= 1.001


def test_all_augmentation_off_is_the_whole_field_resized():
    imgs = images()
    ratio = 60 / 40  # the field's own aspect: the crop is the whole field
    for x, _, idx in loader(imgs, augment=Augment(crop_ratio=(ratio, ratio), **NONE), batch_size=24):  # 2 chunks per thread
        whole = F.interpolate(torch.from_numpy(imgs[idx.numpy()]).permute(0, 3, 1, 2).float(), size=(S, S),
                              mode="bilinear", align_corners=False)
        assert (rgb255(x) - whole).abs().max() <= 1.001


def test_augmentation_off_on_a_square_field_equals_the_eval_view():
    imgs = images(h=48, w=48)
    for x, _, idx in loader(imgs, augment=Augment(crop_ratio=(1.0, 1.0), **NONE)):
        assert (rgb255(x) - central(imgs, idx)).abs().max() <= 1.001
    # training without augmentation shows the evaluation view, shuffled
    for x, _, idx in loader(imgs, augment=None, train=True):
        assert (rgb255(x) - central(imgs, idx)).abs().max() <= 1.001


def test_dihedral_alone_gives_flips_and_rotations_of_the_eval_view():
    imgs = images(h=48, w=48)
    aug = Augment(crop_ratio=(1.0, 1.0), **{**NONE, "dihedral": True})
    seen = set()
    for x, _, idx in loader(imgs, augment=aug):
        ref = central(imgs, idx)
        for i in range(len(x)):
            errs = [(rgb255(x[i:i + 1]) - dihedral(ref[i:i + 1], k)).abs().max() for k in range(8)]
            assert min(errs) <= 1.001
            seen.add(int(np.argmin(errs)))
    assert len(seen) >= 6  # 24 draws of 8 transforms


@pytest.mark.parametrize("switch", ["color_jitter", "stain_jitter"])
def test_each_jitter_changes_the_view_and_its_switch_turns_it_off(switch):
    imgs = images(h=48, w=48)
    aug = Augment(crop_ratio=(1.0, 1.0), **{**NONE, switch: 0.2})
    x, _, idx = next(iter(loader(imgs, augment=aug)))
    diff = (rgb255(x) - central(imgs, idx)).abs().flatten(1).max(1).values
    assert (diff > 3).all()  # every sample jittered


def test_random_crop_stays_inside_the_field_and_varies():
    imgs = np.zeros((4, 40, 60, 3), np.uint8)
    imgs[:, :, :30] = 200  # left half bright: crops see different fractions of it
    aug = Augment(crop_scale=(0.2, 0.5), dihedral=False, color_jitter=0, stain_jitter=0)
    ld = loader(np.repeat(imgs, 6, 0), augment=aug, batch_size=24)
    x, _, _ = next(iter(ld))
    frac = (rgb255(x)[:, 0] > 100).float().mean((1, 2))
    assert frac.unique().numel() > 5
    assert rgb255(x).min() > -1e-3  # no padding outside the field (would be black only if sampled)


# ---------------------------------------------------------------------------- per sample, seeds
def test_identical_images_in_one_batch_get_different_augmentations():
    one = images(n=1)
    imgs = np.repeat(one, 8, 0)
    for aug in [Augment(stain_jitter=0, color_jitter=0, dihedral=False), Augment(**{**NONE, "color_jitter": 0.2}),
                Augment(**{**NONE, "stain_jitter": 0.05}), Augment()]:
        x, _, _ = next(iter(loader(imgs, augment=aug, batch_size=8)))
        flat = x.flatten(1)
        d = torch.cdist(flat, flat) + torch.eye(8) * 1e9
        assert d.min() > 1e-2, aug


def test_same_seed_and_epoch_same_batches_other_epoch_or_seed_differs():
    imgs = images()
    a, b, c = loader(imgs, augment=Augment(), seed=7), loader(imgs, augment=Augment(), seed=7), \
        loader(imgs, augment=Augment(), seed=8)
    first = batches(a)
    for (x1, y1, i1), (x2, y2, i2) in zip(first, batches(b)):
        assert torch.equal(x1, x2) and torch.equal(y1, y2) and torch.equal(i1, i2)
    assert all(torch.equal(p[0], q[0]) for p, q in zip(first, batches(a)))  # no set_epoch: same epoch again
    a.set_epoch(1)
    assert not torch.equal(batches(a)[0][2], first[0][2])
    b.set_epoch(3), a.set_epoch(3)
    assert all(torch.equal(p[0], q[0]) for p, q in zip(batches(a), batches(b)))
    assert not torch.equal(batches(c)[0][0], first[0][0])


def test_switching_one_augmentation_off_keeps_the_other_draws():
    imgs = images()
    with_cj = batches(loader(imgs, augment=Augment(color_jitter=0.2, stain_jitter=0)))
    without = batches(loader(imgs, augment=Augment(color_jitter=0.0, stain_jitter=0)))
    assert all(torch.equal(p[2], q[2]) for p, q in zip(with_cj, without))  # same order


# ---------------------------------------------------------------------------- jitter references
def skimage_stain(rgb, st):
    """skimage.color.rgb2hed, scale and shift per stain, hed2rgb (Ruifrok-Johnston), written out
    without clipping negative stains: rgb (B, 3, H, W) in [0, 1], st (B, 6) -> [0, 1]."""
    rgb_from_hed = np.array([[0.65, 0.70, 0.29], [0.07, 0.99, 0.11], [0.27, 0.57, 0.78]])
    log_adjust = np.log(1e-6)
    px = rgb.permute(0, 2, 3, 1).double().numpy()  # (B, H, W, 3)
    hed = (np.log(np.maximum(px, 1e-6)) / log_adjust) @ np.linalg.inv(rgb_from_hed)
    hed = hed * st[:, None, None, :3].numpy() + st[:, None, None, 3:].numpy()
    out = np.clip(np.exp(-(hed * -log_adjust) @ rgb_from_hed), 0, 1)
    return torch.from_numpy(out).permute(0, 3, 1, 2).float()


def photometric(x, cj=None, st=None):
    """Our stain then colour jitter and normalisation (Loader._photometric) of x (B, 3, H, W) in
    [0, 1], with colour factors cj (B, 4) and stain factors st (B, 6); back in [0, 1]."""
    p = dict.fromkeys(["rs", "coef", "stain_m", "stain_t"])
    if cj is not None:
        p["rs"], p["coef"] = (v.float() for v in colour_maps(cj.double()))
    if st is not None:
        p["stain_m"], p["stain_t"] = (v.float() for v in stain_maps(st.double()))
    out = torch.empty(x.shape, memory_format=torch.channels_last)
    loader(images())._photometric((x * 255).flatten(2), p, out)
    return rgb255(out) / 255


def fields(n=2, scale=1.0):
    return torch.from_numpy(images(n=n, h=8, w=8)).permute(0, 3, 1, 2).float() / 255 * scale


def test_stain_jitter_matches_skimage_formulas():
    x = fields()
    st = torch.tensor([[1.05, 0.93, 1.02, 0.03, -0.04, 0.01], [0.96, 1.08, 0.99, -0.02, 0.05, -0.03]])
    assert (photometric(x, st=st) - skimage_stain(x, st)).abs().max() < 1e-4
    zero = torch.tensor([[1.0, 1, 1, 0, 0, 0]] * 2)
    assert (photometric(x, st=zero) - x).abs().max() < 1e-4  # zero jitter: the identity
    assert (photometric(x, st=st) - x).abs().max() > 0.05


@pytest.mark.parametrize("which", ["brightness", "contrast", "saturation"])
def test_colour_jitter_matches_torchvision_one_factor_at_a_time(which):
    x = fields()
    col = ["brightness", "contrast", "saturation"].index(which)
    cj = torch.tensor([[1.0, 1.0, 1.0, 0.0]]).repeat(2, 1)
    cj[:, col] = torch.tensor([1.3, 0.8])
    fn = {"brightness": TF.adjust_brightness, "contrast": TF.adjust_contrast, "saturation": TF.adjust_saturation}[which]
    ref = torch.stack([fn(x[i], float(cj[i, col])) for i in range(2)])
    assert (photometric(x, cj) - ref).abs().max() < 1e-4


def test_colour_jitter_composes_brightness_contrast_saturation_in_order():
    x = fields(n=1, scale=0.6)  # no clipping between the steps
    ref = TF.adjust_saturation(TF.adjust_contrast(TF.adjust_brightness(x[0], 1.1), 0.85), 1.15)
    assert (photometric(x, torch.tensor([[1.1, 0.85, 1.15, 0.0]]))[0] - ref).abs().max() < 1e-4


def test_stain_jitter_comes_before_colour_jitter():
    x = fields(scale=0.5) + 0.2  # no clipping between the steps
    st = torch.tensor([[1.04, 0.97, 1.0, 0.02, -0.01, 0.0]] * 2)
    cj = torch.tensor([[1.1, 0.9, 1.2, 0.0], [0.9, 1.1, 0.8, 0.0]])
    stained = skimage_stain(x, st)
    ref = torch.stack([TF.adjust_saturation(TF.adjust_contrast(TF.adjust_brightness(stained[i], float(cj[i, 0])),
                                                               float(cj[i, 1])), float(cj[i, 2])) for i in range(2)])
    assert (photometric(x, cj, st) - ref).abs().max() < 1e-4


def test_hue_is_a_rotation_about_the_grey_axis():
    from scipy.spatial.transform import Rotation

    x = fields(scale=0.5) + 0.25
    hue = torch.tensor([0.04, -0.03])
    got = photometric(x, torch.stack([torch.ones(2), torch.ones(2), torch.ones(2), hue], 1))
    for i in range(2):
        r = Rotation.from_rotvec(np.ones(3) / 3 ** 0.5 * 2 * np.pi * float(hue[i])).as_matrix()
        ref = torch.einsum("ck,khw->chw", torch.tensor(r, dtype=torch.float32), x[i])
        assert (got[i] - ref).abs().max() < 1e-4
    # the same direction as torchvision's HSV hue shift: red turns towards green for a positive shift
    red = torch.tensor([0.8, 0.2, 0.2]).view(1, 3, 1, 1)
    ours = photometric(red, torch.tensor([[1.0, 1.0, 1.0, 0.05]])).view(3)
    tv = TF.adjust_hue(red[0], 0.05).view(3)
    assert ours[1] > 0.25 and tv[1] > 0.25 and (ours - tv).abs().max() < 0.12


# ---------------------------------------------------------------------------- TTA
def test_tta_views_are_the_eight_dihedral_views_identity_first():
    x = torch.from_numpy(images(n=2, h=S, w=S)).permute(0, 3, 1, 2).float().contiguous(
        memory_format=torch.channels_last)
    views = tta_views(x)
    assert len(views) == 8 and views[0] is x
    assert all(v.is_contiguous(memory_format=torch.channels_last) for v in views)
    ref = [torch.rot90(x, r, (2, 3)) for r in range(4)] + [torch.rot90(x.flip(3), r, (2, 3)) for r in range(4)]
    for v in views:
        assert sum(torch.equal(v, r) for r in ref) == 1
    for i in range(8):
        for j in range(i):
            assert not torch.equal(views[i], views[j])


# ---------------------------------------------------------------------------- sampling
def test_balanced_sampling_draws_classes_equally():
    labels = np.array([1] * 8 + [0] * 32)  # 1:4
    ld = loader(images(n=40), augment=None, labels=labels, balanced=True, batch_size=8)
    ys = []
    for e in range(25):
        ld.set_epoch(e)
        ys += [y for _, y, _ in ld]
    share = torch.cat(ys).float().mean().item()
    assert len(torch.cat(ys)) == 25 * 40 and abs(share - 0.5) < 0.05
    plain = loader(images(n=40), augment=None, labels=labels, batch_size=8)
    idx = torch.cat([i for _, _, i in plain])
    assert sorted(idx.tolist()) == list(range(40))  # a permutation: the natural 1:4 mix


def test_partial_batches_and_len():
    imgs = images()
    cases = [(True, True, [10, 10]), (True, False, [10, 10, 4]), (False, True, [10, 10, 4]), (False, False, [10, 10, 4])]
    for train, drop, sizes in cases:
        ld = loader(imgs, train=train, drop_last=drop)
        assert len(ld) == len(sizes)
        got = [len(x) for x, _, _ in ld]
        assert got == sizes, (train, drop)
    idx = torch.cat([i for _, _, i in loader(imgs, train=True)])
    assert sorted(idx.tolist()) == list(range(24)) and idx.tolist() != list(range(24))


# ---------------------------------------------------------------------------- transfer, buffers, dtype
@pytest.mark.parametrize("geometry", ["slice", "grid"])
@pytest.mark.parametrize("augment", [None, Augment()])
def test_streaming_path_equals_resident_path(augment, geometry):
    imgs = images()
    res, stream = loader(imgs, augment=augment), loader(imgs, augment=augment, budget_gb=0)
    res._geometry = stream._geometry = geometry
    assert res.data.resident and not stream.data.resident and not stream.data.pin
    for e in (0, 1):
        res.set_epoch(e), stream.set_epoch(e)
        for p, q in zip(batches(res), batches(stream)):
            assert all(torch.equal(a, b) for a, b in zip(p, q))


def test_grid_sample_route_matches_the_slicing_route():
    imgs = images(n=12, h=64, w=96)  # crops larger than S: both routes sample the same points
    for aug in [None, Augment(stain_jitter=0)]:
        sl = loader(imgs, augment=aug, train=aug is not None)
        gr = loader(imgs, augment=aug, train=aug is not None)
        gr._geometry = "grid"
        for (x1, _, i1), (x2, _, i2) in zip(batches(sl), batches(gr)):
            assert torch.equal(i1, i2)
            assert (rgb255(x1) - rgb255(x2)).abs().max() < 3.0  # uint8 rounding, amplified by the jitter


def test_output_buffers_are_reused_only_when_released():
    imgs = images()
    ld = loader(imgs, augment=Augment(), batch_size=4)
    ptrs, view = [], None
    for j, (x, _, _) in enumerate(ld):
        ptrs.append(x.data_ptr())
        if j == 0:
            view, first = x[0], x[0].clone()  # a view keeps its buffer from being reused
        del x
    assert len(set(ptrs)) < len(ptrs)  # released buffers were recycled
    assert torch.equal(view, first)
    conv = torch.nn.Conv2d(3, 2, 3)
    for j, (x, _, _) in enumerate(ld):
        if j == 0:
            graph, held = conv(x), x.data_ptr()  # the graph keeps x for the backward pass
        else:
            assert x.data_ptr() != held
        del x
    graph.sum().backward()
    kept = list(ld)  # all held: six distinct buffers, none overwritten
    assert len({x.data_ptr() for x, _, _ in kept}) == 6
    assert all(torch.equal(a[0], b[0]) for a, b in zip(kept, batches(ld)))


def test_threads_and_chunks_do_not_change_the_batches():
    imgs = images()
    ref = batches(loader(imgs, augment=Augment(), batch_size=24))
    threads = torch.get_num_threads()
    try:
        for n in (1, 3):
            torch.set_num_threads(n)
            for p, q in zip(ref, batches(loader(imgs, augment=Augment(), batch_size=24))):
                assert torch.equal(p[2], q[2]) and torch.allclose(p[0], q[0], atol=1e-5)
    finally:
        torch.set_num_threads(threads)


@pytest.mark.parametrize("train", [True, False])
def test_bf16_output(train):
    imgs = images()
    aug = Augment() if train else None
    x32 = next(iter(loader(imgs, train=train, augment=aug)))[0]
    x16 = next(iter(loader(imgs, train=train, augment=aug, dtype=torch.bfloat16)))[0]
    assert x16.dtype == torch.bfloat16 and x16.is_contiguous(memory_format=torch.channels_last)
    assert torch.allclose(x16.float(), x32, atol=0.02, rtol=0.01)


# ---------------------------------------------------------------------------- config and errors
def test_augment_from_config():
    assert Augment.from_config(TrainConfig(augment=False)) is None
    a = Augment.from_config(TrainConfig(crop_scale=(0.5, 0.9), color_jitter=0.1, dihedral=False))
    assert a == Augment(crop_scale=(0.5, 0.9), crop_ratio=(0.75, 1.3333), dihedral=False, color_jitter=0.1,
                        stain_jitter=0.05)


@pytest.mark.parametrize("kw, flag", [({"crop_scale": (0.0, 1.0)}, "--crop-scale"), ({"crop_scale": (0.8, 0.5)}, "--crop-scale"),
                                      ({"crop_ratio": (1.5, 1.0)}, "--crop-ratio"), ({"color_jitter": 1.0}, "--color-jitter"),
                                      ({"stain_jitter": -0.1}, "--stain-jitter")])
def test_bad_augment_settings_are_user_errors(kw, flag):  # TrainConfig.validate() holds the rules
    with pytest.raises(UserError, match=flag):
        make_config(kw)


def test_bad_arrays_and_indices_raise():
    imgs = images()
    with pytest.raises(ValueError, match="uint8"):
        DeviceImages(imgs.astype(np.float32), "cpu")
    with pytest.raises(ValueError, match=r"\(N, H, W, 3\)"):
        DeviceImages(imgs[..., :2], "cpu")
    data = DeviceImages(imgs, "cpu")
    with pytest.raises(ValueError, match="labels"):
        Loader(data, [0, 1], [0], batch_size=2, image_size=S, train=False)
    with pytest.raises(ValueError, match="no images"):
        Loader(data, [], [], batch_size=2, image_size=S, train=False)
    with pytest.raises(ValueError, match="indices"):
        Loader(data, [0, 24], [0, 1], batch_size=2, image_size=S, train=False)
    with pytest.raises(ValueError, match="batch_size"):
        Loader(data, [0, 1], [0, 1], batch_size=0, image_size=S, train=False)


def test_tensor_and_memmap_inputs(tmp_path):
    imgs = images()
    mm = np.lib.format.open_memmap(tmp_path / "a.npy", mode="w+", dtype=np.uint8, shape=imgs.shape)
    mm[:] = imgs
    mm.flush()
    ro = np.load(tmp_path / "a.npy", mmap_mode="r")
    ref = batches(loader(imgs, augment=Augment()))
    for src in (ro, torch.from_numpy(imgs)):
        for budget in (8.0, 0.0):
            ld = Loader(DeviceImages(src, "cpu", budget_gb=budget), np.arange(24), np.arange(24) % 2,
                        batch_size=10, image_size=S, train=True, augment=Augment())
            assert all(torch.equal(p[0], q[0]) for p, q in zip(ref, batches(ld)))
