"""The benchmarks (python -m breakhis.bench loader|train): they run on the CPU and print their figures."""
import json

import numpy as np
import pytest
import torch
from test_loader import S, images

from breakhis.bench import train as bench_train
from breakhis.bench.__main__ import main
from breakhis.errors import UserError, guard


# ---------------------------------------------------------------------------- python -m breakhis.bench loader
def test_bench_loader_json_last_line(demo_root, cache_dir, capsys):
    assert main(["loader", "--data", str(demo_root), "--json", "--batches", "2", "--batch-size", "8",
                 "--image-size", "32", "--workers", "1", "--cache-dir", str(cache_dir)]) == 0
    out = capsys.readouterr()
    last = json.loads(out.out.strip().splitlines()[-1])
    assert list(last) == ["ours_img_s", "baseline_img_s", "ratio", "cache_build_s"]
    assert last["ours_img_s"] > 0 and last["baseline_img_s"] > 0 and last["cache_build_s"] > 0
    assert last["ratio"] == pytest.approx(last["ours_img_s"] / last["baseline_img_s"], rel=0.02)
    assert "needs a GPU" in out.err  # the table goes to stderr with --json
    assert list(cache_dir.iterdir())  # --cache-dir kept the cache


@pytest.mark.parametrize("argv, match", [([], "choose a benchmark"), (["speed"], "unknown benchmark 'speed'"),
                                         (["loader", "--data", "/no/such/folder"], "not found"),
                                         (["loader", "--data", ".", "--batches", "0"], "--batches 0"),
                                         (["loader", "--data", ".", "--workers", "-1"], "--workers -1"),
                                         (["loader", "--data", "DEMO", "--batch-size", "100"], "at most 96")])
def test_bench_user_errors(argv, match, capsys, demo_root):
    argv = [str(demo_root) if a == "DEMO" else a for a in argv]

    with pytest.raises(UserError, match=match):
        main(argv)
    assert guard(main, argv) == 2 and capsys.readouterr().err.startswith("error: ")


def test_bench_train_is_dispatched_to_bench_train(monkeypatch):
    import breakhis.bench.__main__ as dispatch

    seen = []
    monkeypatch.setitem(dispatch.BENCHMARKS, "train", lambda argv: seen.append(list(argv)) or 0)
    assert main(["train", "--backbone", "resnet18"]) == 0 and seen == [["--backbone", "resnet18"]]


def test_bench_training_epoch_comparison_runs_on_cpu():
    from breakhis.bench.loader import train_epochs

    tiny = lambda: torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(),
                                       torch.nn.Linear(4, 2))
    fed, premade = train_epochs(images(n=16), np.arange(16) % 2, torch.device("cpu"), 8, S, model_fn=tiny)
    assert fed > 0 and premade > 0


# ---------------------------------------------------------------------------- python -m breakhis.bench train

def test_bench_train_on_cpu(capsys):



    assert bench_train.main(["--backbone", "resnet18", "--image-size", "64", "--batch-size", "2", "--steps", "1",
                             "--warmup", "0", "--device", "cpu", "--json"]) == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert out["gflop_forward_per_image"] == pytest.approx(1.82 * 2 * (64 / 224) ** 2, rel=0.05)  # torchvision: 1.82 GMACs at 224
    timed = [r for r in out["rows"] if not r["skipped"]]
    assert [(r["channels_last"], r["amp"], r["compile"]) for r in timed] == [(False, "off", False), (True, "off", False)]
    assert timed[0]["ratio"] == 1.0 and timed[1]["img_s"] > 0 and "mfu" not in timed[0]
    assert len(out["rows"]) == 8 and all("CPU" in r["skipped"] for r in out["rows"] if r not in timed)


def test_bench_train_errors():

    with pytest.raises(UserError, match="resnet50"):
        bench_train.main(["--backbone", "lenet", "--device", "cpu"])
    with pytest.raises(UserError, match="--image-size 16"):
        bench_train.main(["--image-size", "16", "--device", "cpu"])
    with pytest.raises(UserError, match="fp16 needs a CUDA device"):
        bench_train.main(["--amp", "fp16", "--device", "cpu", "--backbone", "resnet18"])
    if not torch.cuda.is_available():
        with pytest.raises(UserError, match="no CUDA device"):
            bench_train.main(["--device", "cuda"])


def test_peak_table(monkeypatch):
    from breakhis.bench.train import peak_tflops
    assert peak_tflops(torch.device("cpu"), "bf16") is None
    for name, bf16, tf32 in [("NVIDIA H100 80GB HBM3", 989.0, 494.5), ("NVIDIA H100 PCIe", 756.0, 378.0),
                             ("NVIDIA H200", 989.0, 494.5), ("NVIDIA A100-SXM4-80GB", 312.0, 156.0),
                             ("Tesla T4", None, None)]:
        monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None, n=name: n)
        assert (peak_tflops(torch.device("cuda"), "bf16"), peak_tflops(torch.device("cuda"), "tf32")) == (bf16, tf32)


# ---------------------------------------------------------------------------- python -m breakhis.bench coverage
def test_bench_coverage_prints_coverage_and_false_positives(capsys):
    assert main(["coverage", "--reps", "3", "--boot", "40", "--patients", "8,24", "--json"]) == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert set(out["coverage"]) == {"8", "24"}
    for size in ("8", "24"):
        for method in ("percentile", "bca"):
            assert all(v is None or 0 <= v <= 1 for v in out["coverage"][size][method].values())
    fp = out["false_positives"]
    assert fp["replicates"] == 3 and all(0 <= v <= 1 for k, v in fp.items() if isinstance(v, float))
    assert 0.5 < out["truth"]["accuracy"] < 1


# ---------------------------------------------------------------------------- python -m breakhis.bench frozen
def test_bench_frozen_prints_three_runs_side_by_side(demo_root, cache_dir, capsys):
    assert main(["frozen", "--data", str(demo_root), "--epochs", "2", "--image-size", "32", "--batch-size", "16",
                 "--cache-dir", str(cache_dir), "--device", "cpu", "--json"]) == 0
    out = capsys.readouterr().out
    last = json.loads(out.strip().splitlines()[-1])
    runs = last["runs"]
    assert list(runs) == ["through the backbone", "feature cache, cold", "feature cache, warm"]
    assert all(r["seconds"] > 0 and r["epoch_seconds"] > 0 for r in runs.values())
    # no augmentation: the same test metrics, up to the float16 rounding of the features
    assert runs["feature cache, cold"]["accuracy"] == pytest.approx(runs["through the backbone"]["accuracy"], abs=0.02)
    assert runs["feature cache, warm"]["accuracy"] == runs["feature cache, cold"]["accuracy"]
    assert "one-time feature pass" in out and "speed-up" in out
