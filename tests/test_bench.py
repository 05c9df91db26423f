"""The benchmarks (python -m breakhis.bench loader|train|pipeline|gpu): they run on the CPU and print their figures."""
import csv
import json
import os
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from test_loader import S, images

from breakhis.bench import train as bench_train
from breakhis.bench.__main__ import main
from breakhis.errors import UserError, guard

pytestmark = pytest.mark.slow  # end to end: the bench commands, the bench pipeline on a generated tree


# ---------------------------------------------------------------------------- python -m breakhis.bench loader
def test_bench_loader_json_last_line(demo_root, cache_dir, capsys):
    assert main(["loader", "--data", str(demo_root), "--json", "--batches", "2", "--batch-size", "8",
                 "--image-size", "32", "--workers", "1", "--cache-dir", str(cache_dir)]) == 0
    out = capsys.readouterr()
    last = json.loads(out.out.strip().splitlines()[-1])
    assert list(last) == ["ours_img_s", "baseline_img_s", "ratio", "cache_build_s", "file_kb", "he", "stain"]
    assert last["ours_img_s"] > 0 and last["baseline_img_s"] > 0 and last["cache_build_s"] > 0
    assert last["ratio"] == pytest.approx(last["ours_img_s"] / last["baseline_img_s"], rel=0.02)
    stained = last["stain"]  # ours with each stain normalisation, side by side with ours without
    assert set(stained) == {"macenko", "reinhard"} and "img_s" in stained["reinhard"]
    for s in stained.values():
        assert "error" in s or (s["img_s"] > 0 and s["normalise_s"] > 0
                                and s["ratio"] == pytest.approx(s["img_s"] / last["ours_img_s"], rel=0.02))
    assert "needs a GPU" in out.err  # the table goes to stderr with --json
    assert list(cache_dir.iterdir())  # --cache-dir kept the cache


def test_bench_loader_on_real_he_fields(he_picture, capsys):
    """--he N: a temporary tree of real-H&E 700x460 PNGs, the archive's file sizes (the synthetic demo's are
    3-5x smaller, which flatters Pillow's decode); the tree is removed afterwards."""
    import tempfile

    before = set(Path(tempfile.gettempdir()).glob("breakhis-bench-he-*"))
    assert main(["loader", "--he", "8", "--json", "--batches", "1", "--batch-size", "4", "--image-size", "32",
                 "--workers", "1", "--no-baseline"]) == 0
    last = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert last["he"] is True and 300 < last["file_kb"] < 800 and last["ours_img_s"] > 0
    assert set(Path(tempfile.gettempdir()).glob("breakhis-bench-he-*")) == before


@pytest.mark.parametrize("argv, match", [([], "choose a benchmark"), (["loader"], "--data ROOT, or --he N"), (["speed"], "unknown benchmark 'speed'"),
                                         (["loader", "--data", "/no/such/folder"], "not found"),
                                         (["loader", "--data", ".", "--batches", "0"], "--batches 0"),
                                         (["loader", "--data", ".", "--workers", "-1"], "--workers -1"),
                                         (["loader", "--data", "DEMO", "--batch-size", "100"], "at most 96"),
                                         (["eva", "--seeds", "0"], "--seeds 0"), (["coverage", "--fold-reps", "0"], "--fold-reps")])
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
    assert main(["coverage", "--reps", "2", "--fold-reps", "2", "--boot", "40", "--patients", "8,24", "--json"]) == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    regs = out["regimes"]
    assert {(r["accuracy"], r["icc"], r["patients"], r["images"]) for r in regs} >= {(0.97, 0.7, 24, "10-120"),
                                                                                 (0.85, 0.1, 8, "10-120"), (0.97, 0.4, 8, "3-30")}
    for r in regs:
        for method in ("percentile", "cluster"):
            for d in r[method].values():
                assert 0 <= d["coverage"] <= 1 and d["below"] + d["above"] == pytest.approx(1 - d["coverage"])
    good = next(r for r in regs if r["accuracy"] == 0.97)
    assert 0.96 < good["truth"]["accuracy"] < 0.98  # 0.97 at 30% benign; this design has 2 of 8
    assert [e["true_ece"] < 0.002 for e in out["ece"]][:2] == [True, True]
    tests = out["recipe_tests"]
    assert {(e["runs"], e["recipe_x_patient_sd"], e["true_gain"]) for e in tests} == {
        (n, sd, g) for n in (3, 5) for sd in (0.0, 0.5) for g in (0.0, 0.02)}
    assert all(0 <= e["welch"] <= 1 and 0 <= e["ours"] <= 1 for e in tests)
    folds = out["fold_tests"]
    assert {(e["recipe_x_patient_sd"], e["training_set_sd"], e["true_gain"]) for e in folds} == {
        (sd, t, g) for sd in (0.0, 0.5) for t in (0.0, 0.3, 0.6, 1.0) for g in (0.0, 0.02)}
    assert all(0 <= e["nadeau_bengio"] <= 1 and 0 <= e["ours"] <= 1 and e["replicates"] == 2 for e in folds)


def test_bench_coverage_truth_matches_a_large_sample():
    """The population's exact figures against one very large simulated test set (scikit-learn's formulas)."""
    from sklearn.metrics import average_precision_score, roc_auc_score

    from breakhis.bench import coverage as cov
    mu = cov.mu_for(0.85)
    true = cov.truth(mu, 0.4, 0.3, seed=1)
    y, p, _ = cov.draw(np.random.default_rng(2), mu, 0.4, 6000, 14000)
    assert true["accuracy"] == pytest.approx(((p >= 0.5) == (y == 1)).mean(), abs=0.004)
    assert true["auroc"] == pytest.approx(roc_auc_score(y, p), abs=0.003)
    assert true["aucpr"] == pytest.approx(average_precision_score(y, p), abs=0.003)
    assert true["recall"] == pytest.approx((p[y == 1] >= 0.5).mean(), abs=0.004)


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


# ---------------------------------------------------------------------------- python -m breakhis.bench pipeline
PIPE_STAGES = ["cache_cold", "decode_limit", "cache_warm", "index_report", "split", "train", "finalize", "logbook"]


def test_bench_pipeline_stages_on_a_small_tree(demo_root, tmp_path, capsys):
    """Every stage but tune (Ray: covered by test_gpu_share_check_on_cpu and test_tune) in its own process."""
    from breakhis.data.cache import default_cache_size
    from breakhis.data.dataset import index_tree

    work = tmp_path / "work"
    assert main(["pipeline", "--data", str(demo_root), "--json", "--image-size", "32", "--batch-size", "8",
                 "--workers", "2", "--runs", "3", "--stages", ",".join(PIPE_STAGES), "--work", str(work)]) == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    n = len(index_tree(demo_root).records)
    h, w = default_cache_size(32)
    stages = out["stages"]
    assert list(stages) == PIPE_STAGES and out["images"] == n and out["cache_hw"] == [h, w]
    assert stages["cache_cold"]["built"] and not stages["cache_warm"]["built"]
    assert stages["cache_cold"]["cache_bytes"] == stages["cache_warm"]["cache_bytes"] == n * h * w * 3
    assert all(stages[s]["images"] == n for s in ("cache_cold", "decode_limit", "cache_warm", "index_report"))
    assert 0 < stages["split"]["train"] and stages["split"]["train"] + stages["split"]["val"] + stages["split"]["test"] == n
    assert stages["logbook"]["runs"] == 3 and sorted(p.name for p in (work / "results").iterdir()) == ["run0", "run1", "run2"]
    for s in stages.values():
        assert s["seconds"] > 0 and s["process_s"] >= s["seconds"] and s["peak_rss"] > 0 and s["peak_pss"] > 0
    goals = {g["goal"]: g for g in out["goals"]}
    ratio = stages["decode_limit"]["seconds"] / stages["cache_cold"]["seconds"]
    assert goals["cache build >= 0.8 of the decode limit"]["figures"] == f"{ratio:.2f}"
    assert goals["cache build >= 0.8 of the decode limit"]["met"] == (ratio >= 0.8)
    slowest = max(stages[s]["seconds"] for s in ("finalize", "logbook"))
    assert goals["every stage after training < 15 s"]["met"] == (slowest < 15)


def test_bench_pipeline_user_errors(demo_root):
    with pytest.raises(UserError, match="unknown stage"):
        main(["pipeline", "--data", str(demo_root), "--stages", "cache_cold,warp"])
    with pytest.raises(UserError, match="needs the train stage"):
        main(["pipeline", "--data", str(demo_root), "--stages", "finalize"])
    with pytest.raises(UserError, match="--runs 0"):
        main(["pipeline", "--data", str(demo_root), "--runs", "0"])


def test_tree_pss_counts_this_process_and_its_children():
    import subprocess
    import sys

    from breakhis.bench.pipeline import tree_pss

    alone = tree_pss(os.getpid())
    if alone is None:
        pytest.skip("no /proc/<pid>/smaps_rollup here")
    child = subprocess.Popen([sys.executable, "-c", "import time; b = bytearray(200 * 2**20); time.sleep(30)"])
    try:
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and (tree_pss(os.getpid()) or 0) < alone + 150 * 2**20:
            time.sleep(0.1)
        assert tree_pss(os.getpid()) >= alone + 150 * 2**20  # the child's 200 MiB buffer is counted
    finally:
        child.kill()
        child.wait()


# ---------------------------------------------------------------------------- python -m breakhis.bench gpu
@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-CUDA exit")
def test_bench_gpu_without_cuda_exits_2(capsys, tmp_path):
    assert guard(main, ["gpu", "--json", str(tmp_path / "gpu.json")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: bench gpu needs a CUDA device") and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "gpu.json").exists()
    with pytest.raises(UserError, match="unknown check"):
        main(["gpu", "--checks", "loader,warp"])


TINY = lambda: torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(),
                                   torch.nn.Linear(4, 2))


def test_gpu_loader_check_on_cpu():
    """The loader-overhead check with the streamed (budget 0) loader, on the CPU."""
    from breakhis.bench.gpu import loader_check

    res = loader_check(torch.device("cpu"), n=32, hw=(20, 30), batch_size=8, image_size=16, model_fn=TINY)
    assert res["overhead"] == pytest.approx(res["epoch_fed_s"] / res["epoch_premade_s"] - 1)
    assert res["met"] == (res["overhead"] <= 0.05)
    assert res["resident_img_s"] > 0 and res["streamed_img_s"] > 0


def test_gpu_train_check_on_cpu_with_autocast_and_grad_scaler():
    """bf16 autocast and fp16 autocast with an enabled GradScaler, both on the CPU; no MFU without a peak."""
    from breakhis.bench.gpu import train_check
    from breakhis.bench.train import train_flops
    from breakhis.models import build_model

    rows = (("fp32", None, False, False), ("bf16+channels-last", torch.bfloat16, True, False),
            ("fp16", torch.float16, False, False))
    res = train_check(torch.device("cpu"), "resnet18", batch_size=2, image_size=64, steps=1, warmup=1, rows=rows)
    assert [r["row"] for r in res["rows"]] == ["fp32", "bf16+channels-last", "fp16"]
    assert [r["grad_scaler"] for r in res["rows"]] == [False, False, True]
    assert all(r["img_s"] > 0 and r["mfu"] is None for r in res["rows"])
    ref = train_flops(build_model("resnet18", pretrained=False), 64, torch.device("cpu"))[1] / 1e9
    assert res["gflop_train_per_image"] == pytest.approx(ref)


def test_fractional_gpu_request_with_a_faked_cluster(monkeypatch):
    """Four trials per GPU: what Ray is asked for when the cluster reports one GPU."""
    import ray

    from breakhis.tuning import experiment as tuning

    monkeypatch.setattr(ray, "cluster_resources", lambda: {"CPU": 16.0, "GPU": 1.0})
    assert tuning.trial_resources(0.25, 1.0) == ({"cpu": 1.0, "gpu": 0.25}, "1 GPU(s); 0.25 per trial")
    assert tuning.trial_resources(None, 2.0)[0] == {"cpu": 2.0, "gpu": 1.0}
    with pytest.raises(UserError, match="--gpus-per-trial 1.5"):
        tuning.trial_resources(1.5, 1.0)
    monkeypatch.setattr(ray, "cluster_resources", lambda: {"CPU": 16.0})
    assert tuning.trial_resources(0.25, 1.0) == ({"cpu": 1.0, "gpu": 0},
                                                 "no GPU in the Ray cluster: trials run on the CPU (--gpus-per-trial ignored)")


def test_gpu_share_check_on_cpu(tmp_path):
    """Two one-epoch trials together, then one after another, through the package's tune code (CPU: no GPU share)."""
    import logging

    import ray

    from breakhis.bench.gpu import share_check

    ray.init(num_cpus=2, include_dashboard=False, logging_level=logging.WARNING)
    try:
        res = share_check(torch.device("cpu"), tmp_path, trials=2, patients=8, images_per_patient=4, size=(64, 48),
                          image_size=32, batch_size=8, backbone="resnet18")
    finally:
        ray.shutdown()
    assert res["gpu_per_trial"] == 0 and res["speedup"] == pytest.approx(res["one_after_another_s"] / res["together_s"])
    for name in ("together", "alone"):
        with open(tmp_path / "tune" / name / "trials.csv") as f:
            assert [r["status"] for r in csv.DictReader(f)] == ["finished", "finished"]


def test_gpu_end_to_end_check_on_cpu(tmp_path):
    from breakhis.bench.gpu import end_to_end_check

    res = end_to_end_check(torch.device("cpu"), tmp_path, patients=8, images_per_patient=4, size=(96, 64),
                           backbone="resnet18", image_size=32, batch_size=8, amp="off")
    assert res["problems"] == [] and res["met"] and 0 <= res["test_accuracy"] <= 1
    assert (tmp_path / "run" / "metrics.json").is_file()


def test_bench_pipeline_creates_a_work_folder_it_is_given(demo_root, tmp_path, capsys):
    """--work naming a folder that does not exist yet used to end in a traceback in the stage process."""
    work = tmp_path / "not" / "yet"
    assert main(["pipeline", "--data", str(demo_root), "--stages", "index_report,split", "--work", str(work),
                 "--json"]) == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert work.is_dir() and {"index_report", "split"} <= set(json.dumps(out).replace('"', " ").split())


def test_bench_sweep_prints_the_sweep_against_its_epochs_alone(demo_root, cache_dir, capsys):
    """A two-trial sweep bench: tune.py in its own process, its trials timed by their trial.json, the limit."""
    assert main(["sweep", "--data", str(demo_root), "--trials", "2", "--max-epochs", "2", "--image-size", "32",
                 "--batch-size", "8", "--cache-dir", str(cache_dir), "--json"]) == 0
    out = capsys.readouterr().out
    figures = json.loads(out.strip().splitlines()[-1])
    assert figures["trials"] == 2 and len(figures["per_trial"]) == 2 and figures["limit_s"] > 0
    assert figures["epochs"] == sum(t["epochs"] for t in figures["per_trial"]) >= 2
    assert {"driver_setup", "ray_start", "trials", "results"} <= set(figures["phases"])
    assert all(t["overhead"] == pytest.approx(t["seconds"] - t["epoch_seconds"]) for t in figures["per_trial"])
    assert "per-trial overhead, median / max" in out and "limit: the same epochs in one loop" in out


def test_bench_eva_times_our_probe_and_torch_optim_and_they_choose_alike(tmp_path, capsys):
    """The eva bench on a small tree with eva's ids: the counts follow eva's rule (recomputed here from the file
    names), and the baseline (torch.optim.AdamW + autograd + scikit-learn) picks what our probe picks."""
    from breakhis.data.demo import make_demo
    from breakhis.data.eva import DEMO_SLIDES, VAL_SLIDES

    root = make_demo(tmp_path / "tree", images_per_patient=8, size=(70, 46), slides=DEMO_SLIDES)
    assert main(["eva", "--data", str(root), "--image-size", "32", "--seeds", "2", "--probe-steps", "60",
                 "--cache-dir", str(tmp_path / "cache"), "--json"]) == 0
    out = capsys.readouterr().out
    figures = json.loads(out.strip().splitlines()[-1])
    names = [p.name for p in root.rglob("*-40-*.png") if p.name.split("-")[0].split("_")[-1] in ("TA", "MC", "F", "DC")]
    val = sum(n.split("-")[2] in VAL_SLIDES for n in names)
    assert (figures["train"], figures["val"]) == (len(names) - val, val) and val > 0
    ours, base = figures["picks"]["ours"], figures["picks"]["baseline: torch.optim + autograd"]
    assert [e for _, e in ours] == [e for _, e in base]
    assert [v for v, _ in ours] == pytest.approx([v for v, _ in base], abs=1e-6)
    assert figures["feature_seconds"] > 0 and figures["grid_seconds"] > 0 and "goal: 2 seeds in under 60 s" in out


def test_official_style_folds_overlap_and_keep_each_class_share():
    """Five folds of 82 patients (24 benign): 7 benign and 17 malignant test patients each, drawn afresh, so the
    test sides overlap (a patient in several, or none) as BreakHis's Folds.csv does."""
    from breakhis.bench.coverage import official_folds

    cls = np.r_[np.zeros(24, int), np.ones(58, int)]
    folds = official_folds(np.random.default_rng(0), cls)
    assert len(folds) == 5 and all(((~cls.astype(bool)) & t).sum() == 7 and (cls.astype(bool) & t).sum() == 17
                                   for t in folds)
    times = np.sum(folds, axis=0)
    assert times.max() > 1 and (times == 0).any()
