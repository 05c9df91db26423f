"""The eva protocol (data/eva.py, probe.py, protocol.py, train.py --protocol eva): eva's split by its own rule,
the probe against torch's optimizer and autograd, nothing chosen on test patients, and the run end to end."""
import dataclasses
import glob
import json
import os
import re

import numpy as np
import pytest
import torch
from sklearn.metrics import balanced_accuracy_score
from torch import nn

import evaluate
import train
from breakhis.data import dataset as D
from breakhis.data import eva
from breakhis.data.demo import FULL_COUNTS, full_layout, make_demo
from breakhis.errors import UserError
from breakhis.probe import WARMUP_EPOCHS, WARMUP_FACTOR, ProbeSettings, balanced_accuracy, fit_probe, fit_probes
from breakhis.protocol import probe_split

# eva's list, typed again from its source (kaiko-ai/eva, .../classification/breakhis.py, _val_patient_ids)
EVA_VAL = {"18842D", "19979", "15275", "15792", "16875", "3909", "5287", "16716", "2773", "5695", "16184CD", "23060CD",
           "21998CD", "21998EF"}
EVA_CLASSES = ["TA", "MC", "F", "DC"]


def eva_rule(root):
    """eva's own _make_indices, re-done on file names: sorted glob of **/40X/*.png, class = code after the last '_'
    of the first '-' field, patient = third '-' field."""
    files = sorted(glob.glob(os.path.join(root, "**/40X", "*.png"), recursive=True))
    train_, val = [], []
    for f in files:
        name = os.path.basename(f)
        if name.split("-")[0].split("_")[-1] not in EVA_CLASSES:
            continue
        (val if name.split("-")[2] in EVA_VAL else train_).append(os.path.relpath(f, root))
    return train_, val


@pytest.fixture(scope="module")
def eva_tree(tmp_path_factory):
    return make_demo(tmp_path_factory.mktemp("eva"), images_per_patient=8, size=(140, 92), slides=eva.DEMO_SLIDES)


def test_the_slide_list_is_evas():
    assert eva.VAL_SLIDES == EVA_VAL and list(eva.CODES) == EVA_CLASSES
    assert eva.slide_of("SOB_B_TA-14-16184CD") == "16184CD"


def test_the_split_follows_evas_rule_on_the_demo_tree(eva_tree):
    records = eva.task_records(D.index_tree(eva_tree).records, "40")
    m = eva.eva_manifest(records)
    want_train, want_val = eva_rule(str(eva_tree))
    assert sorted(m["train"]) == sorted(want_train) and sorted(m["val"]) == sorted(want_val)
    assert m["test"] == [] and len(m["patients"]["val"]) == 14
    assert eva.labels(records, "subtype").tolist() == [EVA_CLASSES.index(os.path.basename(r.path).split("-")[0].split("_")[-1])
                                                       for r in records]


def test_the_archive_layout_gives_evas_total_and_the_per_patient_rule():
    """The published 40X counts of TA, MC, F and DC sum to eva's 1,471; with eva's slide ids in the layout, the
    validation side is exactly the 40X images of those 14 patients. (The real archive's per-patient counts are
    not known here, so 1,132 / 339 itself is checked on the user's tree: count_problem.)"""
    assert sum(FULL_COUNTS[c][0] for c in EVA_CLASSES) == 1471
    ids = {"TA": ["15275", "16184CD"], "MC": ["18842D", "19979"], "F": ["23060CD", "21998CD", "21998EF"],
           "DC": ["15792", "16875", "3909", "5287", "16716", "2773", "5695"]}
    records, val_by_hand = [], 0
    for code, year, slide, mags in full_layout():
        if code in ids and ids[code]:
            slide = ids[code].pop()
            val_by_hand += mags[40]
        for mag, n in mags.items():
            for seq in range(1, n + 1):
                r = D.parse_name(f"SOB_{'B' if code in ('A', 'F', 'PT', 'TA') else 'M'}_{code}-{year}-{slide}-{mag}-{seq:03d}.png")
                records.append(dataclasses.replace(r, path=r.expected_path()))
    recs = eva.task_records(records, "40")
    m = eva.eva_manifest(recs)
    assert len(m["train"]) + len(m["val"]) == 1471 and len(m["val"]) == val_by_hand
    assert eva.count_problem(recs, m, archive=True)  # these made-up per-patient counts are not eva's 1,132 / 339
    assert eva.count_problem(recs, m, archive=False) == ""
    fake = {"train": ["x"] * 1132, "val": ["y"] * 339}
    assert eva.count_problem(recs, fake, archive=True) == ""


def accession(patient):  # '14-16184' from 'SOB_B_TA-14-16184CD', by hand
    return re.sub(r"[A-Za-z]+$", "", patient.split("-", 1)[1])


def test_the_held_out_split_shares_no_slide_id_across_sides(eva_tree):
    records = eva.task_records(D.index_tree(eva_tree).records, "all")
    for seed in range(4):
        m = eva.honest_manifest(records, (50, 25, 25), seed)
        sides = {p: {accession(x) for x in m["patients"][p]} for p in D.PARTS}
        assert not (sides["train"] & sides["val"] or sides["train"] & sides["test"] or sides["val"] & sides["test"])
        assert all(sides.values())
    # the four pairs eva splits (16184 / 16184CD and the like) are on one side here
    m = eva.honest_manifest(records, (50, 25, 25), 0)
    side = {p: s for s in D.PARTS for p in m["patients"][s]}
    for a, b in (("TA", ("16184", "16184CD")), ("MC", ("18842", "18842D")), ("F", ("23060AB", "23060CD")),
                 ("MC", ("19979", "19979C"))):
        cls = "B" if a in ("TA", "F") else "M"
        assert side[f"SOB_{cls}_{a}-14-{b[0]}"] == side[f"SOB_{cls}_{a}-14-{b[1]}"]


@pytest.mark.filterwarnings("ignore:y_pred contains classes not in y_true")
def test_balanced_accuracy_is_sklearns():
    rng = np.random.default_rng(0)
    for k in (2, 4):
        y, p = rng.integers(0, k, 200), rng.integers(0, k, 200)
        y[y == k - 1] = 0  # a class absent from y but predicted
        p[:3] = k - 1
        got = balanced_accuracy(torch.as_tensor(p), torch.as_tensor(y))
        assert got == pytest.approx(balanced_accuracy_score(y, p), abs=1e-6)


def reference_probe(x, y, xv, yv, s: ProbeSettings, k: int, seed: int):
    """eva's recipe with the libraries themselves: nn.Linear, cross_entropy, torch.optim.AdamW, ConstantLR-like
    warmup per epoch, validation every epoch, strictly-better checkpoint, patience in epochs."""
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    head = nn.Linear(x.shape[1], k)
    opt = torch.optim.AdamW(head.parameters(), lr=s.lr, weight_decay=s.weight_decay)
    best, best_epoch, stale, step, epoch = -1.0, 0, 0, 0, 0
    while step < s.steps:
        epoch += 1
        for grp in opt.param_groups:
            grp["lr"] = s.lr * (WARMUP_FACTOR if epoch <= WARMUP_EPOCHS else 1)
        order = torch.randperm(len(x), generator=g)
        for i in range(0, len(x), s.batch_size):
            c = order[i:i + s.batch_size]
            opt.zero_grad()
            nn.functional.cross_entropy(head(x[c]), y[c]).backward()
            opt.step()
            step += 1
            if step >= s.steps:
                break
        with torch.no_grad():
            score = balanced_accuracy_score(yv.numpy(), head(xv).argmax(1).numpy())
        if score > best:
            best, best_epoch, stale, w = score, epoch, 0, head.weight.detach().clone()
        else:
            stale += 1
            if s.patience and stale >= s.patience:
                break
    return best, best_epoch, w


def blobs(n, f=32, k=4, sep=0.4, seed=0):
    g = torch.Generator().manual_seed(seed)
    mu = torch.randn(k, f, generator=g)
    y = torch.randint(0, k, (n,), generator=g)
    return mu[y] * sep + torch.randn(n, f, generator=g), y


def test_the_probe_is_torchs_adamw_and_evas_selection():
    x, y = blobs(300)
    xv, yv = blobs(90, seed=1)
    s = ProbeSettings(steps=400, batch_size=64, lr=3e-3, weight_decay=0.01, patience=30)
    p = fit_probe(x, y, xv, yv, s, 4, seed=3)
    best, best_epoch, w = reference_probe(x, y, xv, yv, s, 4, seed=3)
    assert p.best_epoch == best_epoch and p.val_score == pytest.approx(best, abs=1e-6)
    torch.testing.assert_close(p.weight, w, atol=2e-5, rtol=1e-4)
    assert p.steps <= s.steps and p.best_step <= p.steps


def test_a_grid_trains_side_by_side_as_each_setting_alone():
    x, y = blobs(300, sep=0.2)
    xv, yv = blobs(90, sep=0.2, seed=1)
    grid = [ProbeSettings(steps=300, batch_size=64, lr=lr, weight_decay=wd, patience=20)
            for lr in (1e-3, 1e-2) for wd in (0.0, 0.1)]
    together = fit_probes(x, y, xv, yv, grid, 4, seed=1)
    for s, p in zip(grid, together):
        best, best_epoch, w = reference_probe(x, y, xv, yv, s, 4, seed=1)
        assert (p.best_epoch, p.val_score) == (best_epoch, pytest.approx(best, abs=1e-6))
        torch.testing.assert_close(p.weight, w, atol=2e-5, rtol=1e-4)
    with pytest.raises(ValueError, match="lr and weight_decay only"):
        fit_probes(x, y, xv, yv, [grid[0], ProbeSettings(steps=10)], 4, seed=1)


def test_test_patients_never_choose(eva_tree):
    """The held-out probe's checkpoint, validation figure and steps are the same whatever the test side holds."""
    records = eva.task_records(D.index_tree(eva_tree).records, "all")
    m = eva.honest_manifest(records, (50, 25, 25), 0)
    f, y = blobs(len(records), k=4)
    y = torch.as_tensor(eva.labels(records, "subtype"))
    f = f + torch.nn.functional.one_hot(y, 32).float()
    test_rows = [i for i, r in enumerate(records) if r.path in set(m["test"])]
    s = [ProbeSettings(steps=300, batch_size=32, lr=lr, patience=50) for lr in (1e-3, 1e-2, 1e-1)]  # a sweep too
    a = probe_split(f, y, records, m, s, 4, seed=0)
    f2, y2 = f.clone(), y.clone()
    f2[test_rows] = torch.randn(len(test_rows), 32) * 5
    y2[test_rows] = y2[test_rows].flip(0)
    b = probe_split(f2, y2, records, m, s, 4, seed=0)
    rows = {p: [i for i, r in enumerate(records) if r.path in set(m[p])] for p in ("train", "val")}
    alone = [fit_probe(f[rows["train"]], y[rows["train"]], f[rows["val"]], y[rows["val"]], g, 4, seed=0).val_score for g in s]
    assert a["val"] == pytest.approx(max(alone), abs=1e-6) and a["lr"] == s[int(np.argmax(alone))].lr
    keys = ("val", "best_epoch", "best_step", "steps", "lr", "weight_decay")
    assert {k: a[k] for k in keys} == {k: b[k] for k in keys}
    assert a["test"] != b["test"]


def test_the_evaluation_square_moves_across_the_field():
    from breakhis.augment import draw

    u = torch.rand(3, 15, dtype=torch.float64)
    for pos, x0 in ((0.0, 0), (0.5, 117), (1.0, 234)):  # a 224 x 458 field: squares of 224 at left, centre, right
        assert draw(u, None, 224, 458, pos)["box"].tolist() == [[0, x0, 224, 224]] * 3


def test_the_centre_view_is_evas_resize_and_crop_on_real_tissue(tmp_path, he_picture):
    """Our cache (short side to 224) and the loader's central square against eva's ResizeAndCrop (torchvision
    v2.Resize(224) then CenterCrop(224)) on a real H&E field of BreakHis size."""
    from torchvision.transforms import v2

    from breakhis.data.cache import decode_resize
    from breakhis.loader import DeviceImages, Loader

    field = he_picture.crop((0, 0, 700, 460))
    field.save(tmp_path / "f.png")
    cached, _ = decode_resize(tmp_path / "f.png", (224, 340))  # what protocol.eva_inputs caches
    ld = Loader(DeviceImages(cached[None], "cpu"), [0], [0], batch_size=1, image_size=224, train=False,
                mean=(0, 0, 0), std=(1, 1, 1))
    ours = next(iter(ld))[0][0].float()  # (3, 224, 224) in [0, 1]
    t = torch.from_numpy(np.asarray(field)).permute(2, 0, 1)
    evas = v2.CenterCrop(224)(v2.Resize(224, antialias=True)(t)).float() / 255
    d = (ours - evas).abs()
    assert d.max() <= 1 / 255 + 1e-6 and d.mean() < 1e-4  # the same pixels, up to a rounding of one level in a few


def test_the_protocol_flags_are_checked_before_any_work(tmp_path):
    base = ["--protocol", "eva", "--data", str(tmp_path / "none"), "--results", str(tmp_path / "r")]
    for extra, words in ((["--no-freeze"], "--freeze"), (["--head", "128"], "linear layer"), (["--augment"], "--no-augment"),
                         (["--group", "patient"], "accession"), (["--fold", "2"], "--fold"),
                         (["--seeds", "3"], "at least two"), (["--resplit"], "--resplit")):
        with pytest.raises(UserError, match=words):
            train.main(base + extra)
    assert not (tmp_path / "r").exists()


def test_the_protocol_runs_end_to_end_with_a_timm_vit(tmp_path, eva_tree, capsys):
    """eva's rows and the held-out ones, recorded and shown again by evaluate.py, with the difference."""
    args = ["--protocol", "eva", "--data", str(eva_tree), "--cache-dir", str(tmp_path / "c"), "--results",
            str(tmp_path / "r"), "--name", "vit", "--backbone", "timm:vit_tiny_patch16_224", "--no-pretrained",
            "--image-size", "32", "--probe-steps", "150", "--seeds", "0,1,2", "--quiet", "--device", "cpu"]
    assert train.main(args) == 0
    run = tmp_path / "r" / "vit"
    out = json.loads((run / "protocol.json").read_text())
    cfg = json.loads((run / "config.json").read_text())
    assert cfg["protocol"] == "eva" and cfg["cache_size"] == "32x48" and cfg["weight_decay"] == 0.01
    names = [(r["row"], r["view"]) for r in out["rows"]]
    assert names == [("eva protocol (validation = selection = score)", "centre"), ("held-out patients", "centre"),
                     ("held-out patients", "whole")]
    eva_vals = [r["val"] for r in out["eva_runs"]]
    assert out["rows"][0]["mean"] == pytest.approx(np.mean(eva_vals)) and \
        out["rows"][0]["std"] == pytest.approx(np.std(eva_vals, ddof=1))
    tests = [r["test"] for r in out["held_out_runs"]["centre"]]
    assert out["difference"]["mean"] == pytest.approx(np.mean(eva_vals) - np.mean(tests))
    lo, hi = out["rows"][1]["ci"]
    assert lo <= np.mean(tests) <= hi
    assert all(r["steps"] <= 150 for r in out["eva_runs"])
    assert out["counts"]["eva"]["val"] == len(eva_rule(str(eva_tree))[1])
    capsys.readouterr()
    assert evaluate.main([str(run), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["difference"] == out["difference"]
    assert evaluate.main([str(run)]) == 0
    shown = capsys.readouterr().out
    assert "held-out patients" in shown and "difference" in shown and "selection bias" in shown
    with pytest.raises(UserError, match="already exists"):  # a finished protocol run is never overwritten
        train.main(args)


def test_the_sweep_chooses_per_seed_on_validation(tmp_path, eva_tree):
    """--preset eva:sweep's grid, smaller, end to end: every setting recorded, each repeat's choice one of them
    (that the choice is the best validation figure: test_test_patients_never_choose)."""
    args = ["--protocol", "eva", "--data", str(eva_tree), "--cache-dir", str(tmp_path / "c"), "--results",
            str(tmp_path / "r"), "--name", "s", "--backbone", "resnet18", "--no-pretrained", "--image-size", "32",
            "--probe-steps", "120", "--seeds", "0,1", "--probe-lrs", "1e-3,1e-2", "--probe-weight-decays", "0,0.1",
            "--probe-view", "centre", "--quiet", "--device", "cpu"]
    assert train.main(args) == 0
    out = json.loads((tmp_path / "r" / "s" / "protocol.json").read_text())
    assert len(out["settings"]) == 4 and [r["view"] for r in out["rows"]] == ["centre", "centre"]
    for r in out["eva_runs"] + out["held_out_runs"]["centre"]:
        assert r["lr"] in (1e-3, 1e-2) and r["weight_decay"] in (0.0, 0.1)
