"""Fault injection through the scripts: crafted files, interruptions, killed processes, damaged files and bad
input. Each case says what used to happen; each must now end in one line (exit 2), or be completed later,
with nothing half-written and no code run from a file."""
import csv as csv_module
import errno
import hashlib
import hmac
import io as io_module
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file
from test_train import tiny

import breakhis.fit
import breakhis.io
import evaluate
import score
import train
import tune
from breakhis import runs
from breakhis.errors import guard
from breakhis.io import read_csv, read_json, write_json
from breakhis.models import build_model
from breakhis.tuning import experiment as tune_exp

pytestmark = pytest.mark.slow  # end to end: faults injected through train.py, evaluate.py and tune.py on trained runs

ROOT = Path(__file__).resolve().parents[1]


class Payload:
    """Unpickling this runs os.makedirs(marker): the stand-in for an attacker's code."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return os.makedirs, (self.marker,)


@pytest.fixture
def run(demo_root, cache_dir, tmp_path):
    """A finished two-epoch run of its own (tests may damage it)."""
    assert guard(train.main, tiny(demo_root, cache_dir, name="r") + ["--results", str(tmp_path / "res")]) == 0
    return tmp_path / "res" / "r"


def one_line_error(capsys, *words):
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and "Traceback" not in err, err
    for w in words:
        assert w in err, (w, err)
    return err


# --- 1, 2: nothing unpickles a file it cannot vouch for ---------------------------------------------------------

def test_crafted_last_pt_is_refused_and_its_code_not_run(run, tmp_path, capsys):
    marker = tmp_path / "pwned"
    runs.set_status(run, runs.INTERRUPTED, epoch=1)
    torch.save({"model": Payload(marker)}, run / "last.pt")  # before: resume ran it, then trained on
    assert guard(train.main, ["--resume", str(run), "--quiet"]) == 2
    one_line_error(capsys, "last.pt is not a training state this toolkit wrote")
    assert not marker.exists()


@pytest.mark.parametrize("content", [b"", b"hello, not a checkpoint\n", b"PK\x03\x04 truncated"])
def test_damaged_last_pt_is_one_line(run, content, capsys):
    runs.set_status(run, runs.INTERRUPTED, epoch=1)
    (run / "last.pt").write_bytes(content)
    assert guard(train.main, ["--resume", str(run), "--quiet"]) == 2
    one_line_error(capsys, "last.pt")


def test_unknown_export_is_refused_unless_trusted(run, tmp_path, capsys):
    marker = tmp_path / "pwned"
    crafted = tmp_path / "model.pt2"
    torch.save(Payload(marker), crafted)  # before: evaluate --model unpickled it and ran the payload
    assert guard(evaluate.main, [str(run), "--model", str(crafted)]) == 2
    one_line_error(capsys, "not an export recorded by", "--trust-model")
    assert not marker.exists()
    # an export the run wrote itself is recorded and loads without the flag
    mine = tmp_path / "mine.pt2"
    assert guard(evaluate.main, [str(run), "--export", str(mine), "--json"]) == 0
    assert list(read_json(run / "exports.json").values())[0]["file"] == str(mine.resolve())
    capsys.readouterr()
    assert guard(evaluate.main, [str(run), "--model", str(mine), "--json"]) == 0


def test_ray_state_is_checked_before_it_is_restored(tmp_path):
    exp = tmp_path / "exp"
    exp.mkdir()
    (exp / "tuner.pkl").write_bytes(b"ray's own pickle")
    (exp / "tune.json").write_text("{}")
    with pytest.raises(Exception, match="no state.sha256.json"):
        tune_exp.check_state(exp, trust=False)  # a killed tune.py never sealed it
    tune_exp.seal_state(exp)
    tune_exp.check_state(exp, trust=False)
    (exp / "tuner.pkl").write_bytes(b"someone else's pickle")
    with pytest.raises(Exception, match="changed: tuner.pkl.*--trust-state"):
        tune_exp.check_state(exp, trust=False)
    tune_exp.check_state(exp, trust=True)


# --- 3, 6, 7: interrupted work is completed, or it says truthfully that nothing was saved ----------------------

def test_ctrl_c_during_scoring_is_completed_by_resume(demo_root, cache_dir, tmp_path, capsys, monkeypatch):
    real = breakhis.fit.finalize

    def interrupted(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(breakhis.fit, "finalize", interrupted)
    res = tmp_path / "res"
    assert guard(train.main, tiny(demo_root, cache_dir, name="s") + ["--results", str(res)]) == 130
    run = res / "s"
    status = read_json(run / "status.json")  # before: "finished", and --resume refused it
    assert status["status"] == "interrupted" and "during the scoring" in status["message"]
    assert (run / "last.pt").is_file() and not (run / "metrics.json").exists()
    (run / ".tmp-last.pt.x1y2z3").write_bytes(b"half of a killed write")  # 6: left by a SIGKILL mid-write
    monkeypatch.setattr(breakhis.fit, "finalize", real)
    capsys.readouterr()
    assert guard(train.main, ["--resume", str(run), "--quiet"]) == 0
    assert read_json(run / "status.json")["status"] == "finished" and (run / "metrics.json").is_file()
    assert [int(h["epoch"]) for h in read_csv(run / "history.csv")] == [1, 2]  # nothing retrained
    assert not list(run.glob(".tmp-*")) and not (run / "last.pt").exists()


def test_ctrl_c_in_the_first_epoch_says_nothing_was_saved(demo_root, cache_dir, tmp_path, capsys, monkeypatch):
    def interrupted(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(breakhis.fit, "train_one_epoch", interrupted)
    res = tmp_path / "res"
    assert guard(train.main, tiny(demo_root, cache_dir, name="e1") + ["--results", str(res)]) == 130
    err = capsys.readouterr().err
    assert "nothing was saved" in err and "--resume" not in err  # before: "continue with --resume", which failed
    assert not (res / "e1").exists()


# --- 4: a trial finished on disk is reported from its folder, never retrained ----------------------------------

def test_finished_trial_is_reported_not_retrained(run, tmp_path, monkeypatch):
    exp = tmp_path / "exp"
    (exp / "runs").mkdir(parents=True)
    os.rename(run, exp / "runs" / "t1")
    reported = []
    monkeypatch.setattr(tune_exp.tune, "get_context", lambda: type("C", (), {"get_trial_id": lambda self: "t1"})())
    monkeypatch.setattr(tune_exp.tune, "report", reported.append)
    monkeypatch.setattr(tune_exp, "fit", lambda *a, **k: pytest.fail("a finished trial was trained again"))
    cfg = runs.load_config(exp / "runs" / "t1")
    tune_exp.trial({}, base=cfg.to_dict(), presets={}, exp_dir=str(exp), cwd=str(tmp_path))
    assert len(reported) == 1 and reported[0]["epoch"] == 2 and "test_accuracy" in reported[0]
    assert (exp / "runs" / "t1" / "metrics.json").is_file()


# --- 5: decode workers die with the process that started them ---------------------------------------------------

def _children(pid: int) -> list[int]:
    out = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                stat = (d / "stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                out.append(int(d.name))
    return out


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state not in ("Z", "X")


@pytest.mark.skipif(sys.platform != "linux", reason="reads /proc; the parent-death signal is Linux's")
def test_decode_workers_die_with_their_parent(demo_root, tmp_path):
    script = f"""
import time
from breakhis.data import cache as C
from breakhis.data.dataset import index_tree
real = C.decode_resize
def slow(path, size):
    time.sleep(0.5)
    return real(path, size)
C.decode_resize = slow  # the forked workers inherit it: a build of minutes
idx = index_tree({str(demo_root)!r})
C.build_cache(idx.root, [r.path for r in idx.records], (16, 24), cache_dir={str(tmp_path / 'cache')!r}, workers=2,
              progress=False)
"""
    proc = subprocess.Popen([sys.executable, "-c", script], cwd=ROOT)
    try:
        deadline, workers = time.time() + 30, []
        while time.time() < deadline and len(workers) < 2:
            time.sleep(0.2)
            workers = _children(proc.pid)
        assert len(workers) >= 2, "the build never started its workers"
        os.kill(proc.pid, signal.SIGKILL)  # before: the workers decoded on for minutes at ~470 MB each
        proc.wait(10)
        deadline = time.time() + 10
        while time.time() < deadline and any(_alive(w) for w in workers):
            time.sleep(0.1)
        assert not any(_alive(w) for w in workers)
    finally:
        if proc.poll() is None:
            proc.kill()
        for w in _children(proc.pid):
            os.kill(w, signal.SIGKILL)


# --- 8: damaged files and bad paths are one line -------------------------------------------------------------

@pytest.mark.parametrize("damage", ["empty", "truncated"])
def test_damaged_model_safetensors(run, damage, capsys):
    data = (run / "model.safetensors").read_bytes()
    (run / "model.safetensors").write_bytes(b"" if damage == "empty" else data[: len(data) // 2])
    assert guard(evaluate.main, [str(run), "--json"]) == 2
    one_line_error(capsys, "model.safetensors is damaged")


def test_model_of_another_backbone_names_keys_and_backbone(run, capsys):
    other = build_model("resnet34", head=(32,), dropout=(0.2,), pretrained=False)
    save_file({k: v.contiguous() for k, v in other.state_dict().items()}, str(run / "model.safetensors"))
    assert guard(evaluate.main, [str(run), "--json"]) == 2
    one_line_error(capsys, "unexpected: backbone.layer1.2", "the file fits a resnet34 backbone")


def test_config_json_that_is_not_an_object(run, capsys):
    (run / "config.json").write_text("[1, 2, 3]\n")
    assert guard(evaluate.main, [str(run), "--json"]) == 2
    one_line_error(capsys, "config.json is not a JSON object of settings")


def test_results_that_is_a_file_or_not_writable(demo_root, cache_dir, tmp_path, capsys, monkeypatch):
    f = tmp_path / "results.txt"
    f.write_text("x")
    assert guard(train.main, tiny(demo_root, cache_dir) + ["--results", str(f)]) == 2
    one_line_error(capsys, "is a file, not a folder")
    monkeypatch.setattr(runs.os, "access", lambda path, mode: False)  # root ignores permissions: simulate them
    assert guard(train.main, tiny(demo_root, cache_dir) + ["--results", str(tmp_path / "ro")]) == 2
    one_line_error(capsys, "permission denied")
    assert not (tmp_path / "ro").exists()


def test_read_only_cache_dir(demo_root, tmp_path, capsys, monkeypatch):
    real = Path.mkdir
    ro = tmp_path / "ro-cache"

    def mkdir(self, *a, **k):
        if str(self).startswith(str(ro)):
            raise PermissionError(13, "Permission denied")
        return real(self, *a, **k)

    monkeypatch.setattr(Path, "mkdir", mkdir)
    assert guard(train.main, tiny(demo_root, ro) + ["--results", str(tmp_path / "res")]) == 2
    one_line_error(capsys, "cannot write the decode cache", "--cache-dir")
    assert not (tmp_path / "res").exists()


# --- 9: what can be refused first leaves no folder -----------------------------------------------------------

@pytest.mark.parametrize("flags, words", [
    (["--backbone", "foo"], "--backbone 'foo'"), (["--optimizer", "foo"], "--optimizer 'foo'"),
    (["--scheduler", "foo"], "--scheduler 'foo'"), (["--weight-decay", "-1"], "--weight-decay"),
    (["--amp", "fp16"], "fp16 needs a CUDA device"), (["--weights", "/no/such.pth"], "file not found"),
    (["--batch-size", "100000"], "fewer than one batch"), (["--lr", "nan"], "--lr nan"), (["--lr", "inf"], "--lr inf"),
    (["--image-size", "100000"], "--image-size 100000"), (["--name", "/abs/path"], "--name '/abs/path'"),
] + ([] if torch.cuda.is_available() else [(["--device", "cuda"], "no CUDA device")]))
def test_refused_before_any_folder(flags, words, demo_root, cache_dir, tmp_path, capsys):
    args = tiny(demo_root, cache_dir, device="cpu") + ["--results", str(tmp_path / "res")]
    if "--device" in flags:
        args = [a for a in args if a != "cpu" and a != "--device"]
    assert guard(train.main, args + flags) == 2
    one_line_error(capsys, words)
    assert not (tmp_path / "res").exists() or not any((tmp_path / "res").iterdir())


# --- 10: nothing silently does something else ----------------------------------------------------------------

def test_resume_refuses_settings_it_would_ignore(run, capsys):
    runs.set_status(run, runs.INTERRUPTED, epoch=1)
    assert guard(train.main, ["--resume", str(run), "--epochs", "5", "--lr", "0.5"]) == 2
    one_line_error(capsys, "drop --epochs --lr")


@pytest.mark.parametrize("flags, words", [
    (["--threshold", "1.5"], "a fixed threshold must be in [0, 1]"), (["--threshold", "nan"], "bad threshold rule 'nan'"),
    (["--boot", "-5"], "--n-boot -5"), (["--markdown", "x.md"], "--markdown writes the logbook table of several runs"),
    (["--csv", "x.csv"], "--csv writes the logbook table of several runs"),
])
def test_evaluate_refuses_before_work(run, flags, words, capsys, tmp_path):
    assert guard(evaluate.main, [str(run), *flags]) == 2
    one_line_error(capsys, words)
    assert not (Path.cwd() / "x.md").exists()


@pytest.mark.parametrize("flags, words", [(["--max-epochs", "0"], "--max-epochs 0"), (["--samples", "0"], "--samples 0")])
def test_tune_zero_is_not_a_default(flags, words, demo_root, tmp_path, capsys):
    space = ROOT / "experiments" / "weights.py"
    argv = ["--space", str(space), "--data", str(demo_root), "--results", str(tmp_path), *flags]
    assert guard(tune.main, argv) == 2  # before: 0 epochs meant 60, 0 samples meant 1
    one_line_error(capsys, words)
    assert not (tmp_path / "tune").exists()


def test_seal_written_by_tune_run_is_json(tmp_path):
    exp = tmp_path / "e"
    exp.mkdir()
    (exp / "experiment_state-x.json").write_text("{}")
    tune_exp.seal_state(exp)
    assert set(read_json(exp / "state.sha256.json")["files"]) == {"experiment_state-x.json"}
    (exp / "experiment_state-x.json").write_text('{"changed": 1}')
    with pytest.raises(Exception, match="changed"):
        tune_exp.check_state(exp, trust=False)


# --- 11 (issue 20 B): no file in a folder someone else could write vouches for itself ---------------------------

@pytest.fixture(scope="module")
def base_run(demo_root, tmp_path_factory):
    """One finished run for the tests below; each gets its own copy (`copy_run`)."""
    tmp = tmp_path_factory.mktemp("base")
    assert guard(train.main, tiny(demo_root, tmp / "cache", name="b") + ["--results", str(tmp / "res")]) == 0
    return tmp / "res" / "b"


@pytest.fixture
def copy_run(base_run, tmp_path):
    dst = tmp_path / "run"
    shutil.copytree(base_run, dst)
    return dst


def _sha256(path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


@pytest.mark.parametrize("mac", ["none", "other key"])
def test_exports_json_listing_a_crafted_program_does_not_vouch_for_it(copy_run, tmp_path, mac, capsys):
    marker = tmp_path / "pwned"
    evil = tmp_path / "evil.pt2"
    torch.save(Payload(marker), evil)
    entry = {"file": str(evil), "temperature": 1.0, "time": "2024-01-01T00:00:00"}
    if mac == "other key":  # a seal made with a key that is not this user's
        entry["hmac"] = hmac.new(b"k" * 32, _sha256(evil).encode(), hashlib.sha256).hexdigest()
    # before: the received folder's own exports.json listed the SHA-256, and --model ran the payload
    write_json(copy_run / "exports.json", {_sha256(evil): entry})
    assert guard(evaluate.main, [str(copy_run), "--model", str(evil), "--json"]) == 2
    one_line_error(capsys, "not an export recorded by", "under your seal", "--trust-model")
    assert not marker.exists()


def test_own_export_is_sealed_and_the_seal_covers_the_run_folder(copy_run, tmp_path, capsys):
    mine = tmp_path / "mine.pt2"
    assert guard(evaluate.main, [str(copy_run), "--export", str(mine), "--json"]) == 0
    entry = read_json(copy_run / "exports.json")[_sha256(mine)]
    assert len(entry["hmac"]) == 64
    capsys.readouterr()
    assert guard(evaluate.main, [str(copy_run), "--model", str(mine), "--json"]) == 0
    capsys.readouterr()
    moved = tmp_path / "elsewhere"  # the entry vouches for this run folder only, not for one it was copied into
    shutil.copytree(copy_run, moved)
    assert guard(evaluate.main, [str(moved), "--model", str(mine), "--json"]) == 2
    one_line_error(capsys, "under your seal")


def test_rewritten_ray_state_seal_is_refused(tmp_path):
    exp = tmp_path / "exp"
    exp.mkdir()
    (exp / "tuner.pkl").write_bytes(b"ray's own pickle")
    tune_exp.seal_state(exp)
    tune_exp.check_state(exp, trust=False)
    (exp / "tuner.pkl").write_bytes(b"someone else's pickle")
    digest = _sha256(exp / "tuner.pkl")
    # before: a seal rewritten to match the replaced pickle let Ray unpickle it; now in both layouts it is refused
    for forged in ({"tuner.pkl": digest}, {"files": {"tuner.pkl": digest}, "hmac": "0" * 64},
                   {**read_json(exp / "state.sha256.json"), "files": {"tuner.pkl": digest}}):
        (exp / "state.sha256.json").write_text(json.dumps(forged))
        with pytest.raises(Exception, match="--trust-state") as e:
            tune_exp.check_state(exp, trust=False)
        assert "seal" in str(e.value) or "not one tune.py wrote" in str(e.value)
    tune_exp.check_state(exp, trust=True)


def test_secret_key_is_private_and_outside_results(tmp_path, monkeypatch):
    from breakhis import seal

    key = tmp_path / "k" / "secret.key"
    monkeypatch.setenv("BREAKHIS_SECRET", str(key))
    mac = seal.seal("a", "b")
    assert (key.stat().st_mode & 0o777) == 0o600 and len(key.read_bytes()) == 32
    assert mac == hmac.new(key.read_bytes(), b"a\0b", hashlib.sha256).hexdigest()
    key.chmod(0o644)  # others could read it, so forge seals with it
    with pytest.raises(Exception, match="not private to you"):
        seal.seal("a", "b")


# --- 12 (issue 20 C): every number read back is one the toolkit can have written ---------------------------------

@pytest.mark.parametrize("t", [-1, 1e-300, 1e308, 0.001, 5000])
def test_calibration_temperature_outside_the_fit_range(copy_run, t, capsys):
    write_json(copy_run / "calibration.json", {"temperature": t})  # before: -1 inverted every prediction, exit 0
    assert guard(evaluate.main, [str(copy_run), "--json"]) == 2
    one_line_error(capsys, "calibration.json", "[0.01, 1000]")


@pytest.mark.parametrize("method, values", [
    ("macenko", {"he": [[0, 0], [0, 0], [0, 0]], "max_c": [1, 1]}),  # zero stain vectors
    ("macenko", {"he": [[1e308, 0.2], [0.7, 0.8], [0.3, 0.5]], "max_c": [1, 1]}),
    ("macenko", {"he": "unit", "max_c": [0, 1]}), ("macenko", {"he": "unit", "max_c": [-1, 1]}),
    ("macenko", {"he": "unit", "max_c": [1e308, 1]}), ("macenko", {"he": "negative", "max_c": [1, 1]}),
    ("reinhard", {"mean": [50, 1e308, 0], "std": [10, 5, 5]}), ("reinhard", {"mean": [50, 30, -10], "std": [0, 5, 5]}),
    ("reinhard", {"mean": [50, 30, -10], "std": [-3, 5, 5]}), ("reinhard", {"mean": [50, 30, -10], "std": [1e308, 5, 5]}),
])
def test_stain_json_outside_what_a_fit_gives(tmp_path, method, values):
    from breakhis import stain
    from breakhis.config import make_config
    from breakhis.errors import UserError

    unit = np.array([[0.65, 0.70, 0.29], [0.07, 0.99, 0.11]]).T
    unit = unit / np.sqrt((unit ** 2).sum(0))  # (3, 2) columns of length 1, positive OD
    if values.get("he") == "unit":
        values = {**values, "he": unit.tolist()}
    if values.get("he") == "negative":
        values = {**values, "he": (unit * [1, -1]).tolist()}  # unit length, negative optical density
    cfg = make_config({"stain_norm": method})
    write_json(tmp_path / "stain.json", {"method": method, **values})  # before: accepted, AUROC 0.725 -> 0.46..0.90
    with pytest.raises(UserError, match="stain.json is not a stain normalisation"):
        stain.load(tmp_path, cfg)
    good = {"he": unit.tolist(), "max_c": [1.8, 0.9]} if method == "macenko" else {"mean": [60, 25, -8], "std": [12, 6, 5]}
    write_json(tmp_path / "stain.json", {"method": method, **good})
    assert stain.load(tmp_path, cfg).values == good


# --- 13 (issue 20 C, D): a feature-cache file that is not what the toolkit writes is rebuilt; a full disk is one line

def _bad_feature_file(path, damage, good):
    if damage == "zeroed":
        np.save(path, np.zeros_like(good))  # before: trained on, AUROC 0.903 -> 0.250
    elif damage == "nan":
        np.save(path, np.full_like(good, np.nan))
    elif damage == "truncated":
        np.save(path, good)
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])  # before: ValueError from np.load
    elif damage == "object":
        np.save(path, np.array([{"a": 1}] * 3, dtype=object), allow_pickle=True)  # before: a traceback
    elif damage == "float32":
        np.save(path, good.astype(np.float32))
    elif damage == "shape":
        np.save(path, good[:, :-1])


@pytest.mark.parametrize("damage", ["zeroed", "nan", "truncated", "object", "float32", "shape"])
def test_damaged_feature_cache_file_is_rebuilt(tmp_path, damage):
    from breakhis import features

    good = np.random.default_rng(0).normal(size=(2, 5, 7)).astype(np.float16)  # (views, images, features)
    path = tmp_path / "features" / "x.npy"
    path.parent.mkdir()
    _bad_feature_file(path, damage, good)
    made = []
    arr = features._stored(path, lambda: made.append(1) or good, (2, 5))
    assert made == [1]
    np.testing.assert_array_equal(np.asarray(arr), good)
    np.testing.assert_array_equal(np.load(path), good)  # the file on disk was replaced too
    assert np.asarray(features._stored(path, lambda: pytest.fail("rebuilt a good file"), (2, 5))).shape == (2, 5, 7)


def _enospc(*a, **k):
    raise OSError(errno.ENOSPC, "No space left on device")


def test_feature_cache_on_a_full_disk(tmp_path, monkeypatch):
    from breakhis import features
    from breakhis.errors import UserError

    good = np.ones((1, 4096, 64), dtype=np.float16)
    good[0, 0, 0] = 0
    monkeypatch.setattr(np, "save", _enospc)  # before: OSError ... written, a traceback
    path = tmp_path / "features" / "x.npy"
    with pytest.raises(UserError, match=r"no space left on /.* for the feature cache at .*x\.npy \(needs about 1 MB\)"):
        features._stored(path, lambda: good, (1, 4096))
    assert not list(path.parent.iterdir())  # no half-written file left


@pytest.mark.skipif(not hasattr(os, "posix_fallocate"), reason="the decode cache reserves its blocks with posix_fallocate")
def test_decode_cache_on_a_full_disk(demo_root, tmp_path, capsys, monkeypatch):
    # the kernel's answer when the disk is full (before: the workers wrote into a sparse memmap: SIGBUS, BrokenProcessPool)
    monkeypatch.setattr(os, "posix_fallocate", _enospc)
    assert guard(train.main, tiny(demo_root, tmp_path / "cache") + ["--results", str(tmp_path / "res")]) == 2
    one_line_error(capsys, "no space left on /", "for the decode cache at", "(needs about 1 MB)")  # 192 fields of 36x55
    assert not [p for p in (tmp_path / "cache").rglob("*") if p.is_file()]


# --- 14 (issue 20 D): damaged files and outputs that cannot be written are one line, never a traceback --------

@pytest.mark.parametrize("content", [[1, 2], "a string", 7, {"DIGEST": {"temperature": "abc"}},
                                     {"DIGEST": {"temperature": -1}}, {"DIGEST": "not an entry"}])
def test_malformed_exports_json(copy_run, tmp_path, content, capsys):
    program = tmp_path / "m.pt2"
    program.write_bytes(b"any bytes")
    text = json.dumps(content).replace("DIGEST", _sha256(program))
    (copy_run / "exports.json").write_text(text)  # before: AttributeError, TypeError or ValueError tracebacks
    assert guard(evaluate.main, [str(copy_run), "--model", str(program), "--json"]) == 2
    err = one_line_error(capsys, "exports.json")
    if isinstance(content, dict) and isinstance(content["DIGEST"], dict):
        assert f"temperature {content['DIGEST']['temperature']!r}" in err


@pytest.mark.parametrize("crafted", [{"pairs": [1]}, {"pairs": [{"paths": "ab"}]}, {"pairs": []}, [1], "x"])
def test_crafted_near_duplicate_file_is_searched_again(fresh_demo, tmp_path, crafted):
    from breakhis.data.cache import build_cache
    from breakhis.data.dataset import index_tree
    from breakhis.data.near import cache_pairs, pairs_file

    idx = index_tree(fresh_demo)
    cache = build_cache(idx.root, [r.path for r in idx.records], (16, 24), cache_dir=tmp_path / "c", workers=1, progress=False)
    path = pairs_file(cache)
    path.write_text(json.dumps(crafted))  # before: TypeError or KeyError from the split
    pairs, note = cache_pairs(cache, idx.records)
    assert isinstance(note, str) and all(isinstance(x, dict) and len(x["paths"]) == 2 for x in pairs)
    stored = json.loads(path.read_text())
    assert isinstance(stored, dict) and isinstance(stored["note"], str)  # rewritten as the search left it
    assert all(isinstance(x, dict) and set(x["paths"]) <= {r.path for r in idx.records} for x in stored["pairs"])


def _images(demo_root, n=3):
    return sorted(Path(demo_root).rglob("*.png"))[:n]


def test_score_out_that_cannot_be_written_is_refused_before_scoring(copy_run, demo_root, tmp_path, capsys, monkeypatch):
    import breakhis.newimages

    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    monkeypatch.setattr(breakhis.newimages, "decode_images", lambda *a, **k: pytest.fail("scored before the check"))
    # before: every image was scored, then the write failed with a traceback
    argv = [str(copy_run), *map(str, _images(demo_root)), "--out", str(blocker / "scores.csv"), "--json"]
    assert guard(score.main, argv) == 2
    one_line_error(capsys, "--out", "cannot write there")


@pytest.mark.skipif(sys.platform != "linux", reason="file names are bytes on Linux")
def test_non_utf8_file_name_is_scored_and_written_escaped(copy_run, demo_root, tmp_path, capsys):
    src = _images(demo_root, 1)[0]
    folder = tmp_path / "new"
    folder.mkdir()
    odd = os.path.join(os.fsencode(folder), b"caf\xe9-" + os.fsencode(src.name))  # Latin-1 bytes: not UTF-8
    with open(odd, "wb") as f:
        f.write(src.read_bytes())
    out = tmp_path / "s.csv"
    # before: UnicodeEncodeError after scoring everything, and no CSV
    assert guard(score.main, [str(copy_run), str(folder), "--out", str(out), "--json"]) == 0
    rows = list(csv_module.DictReader(io_module.StringIO(out.read_bytes().decode("utf-8"))))  # valid UTF-8
    assert len(rows) == 1 and rows[0]["path"] == str(folder) + "/caf\\xe9-" + src.name
    assert 0 <= float(rows[0]["p_malignant"]) <= 1 and not rows[0]["error"]


def test_logbook_over_a_folder_with_a_config_json_list(base_run, tmp_path, capsys):
    for name in ("a", "b"):
        shutil.copytree(base_run, tmp_path / "runs" / name)
    (tmp_path / "runs" / "b" / "config.json").write_text("[1, 2]\n")  # before: AttributeError from load_run
    assert guard(evaluate.main, [str(tmp_path / "runs")]) == 2
    one_line_error(capsys, str(tmp_path / "runs" / "b" / "config.json"), "not a JSON object")


# --- 15 (issue 20 E): nothing lost, nothing stuck ----------------------------------------------------------------

@pytest.mark.parametrize("explicit", [True, False])
def test_two_scorings_of_one_csv_name_keep_both(copy_run, demo_root, tmp_path, capsys, monkeypatch, explicit):
    """A second call that writes the same --out (or the default name in the same second) while the first one
    scores. Before: both printed "wrote" and the later write replaced the other's CSV. Now: each result is
    kept (exclusive creation), the later under <name>-2.csv, with a note saying why."""
    import breakhis.newimages as N

    imgs = _images(demo_root, 2)
    out = tmp_path / "s.csv" if explicit else copy_run / "scores" / "20260101-000000.csv"
    monkeypatch.setattr(N.time, "strftime", lambda fmt: "20260101-000000")  # the same second for both calls
    flags = ["--out", str(out)] if explicit else []
    real, other = N.decode_images, {}

    def the_other_call_finishes_meanwhile(paths, size, workers=0):
        if not other:
            other["running"] = True
            assert guard(score.main, [str(copy_run), str(imgs[1]), *flags, "--json"]) == 0
            other["summary"] = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
        return real(paths, size, workers=workers)

    monkeypatch.setattr(N, "decode_images", the_other_call_finishes_meanwhile)
    assert guard(score.main, [str(copy_run), str(imgs[0]), *flags, "--json"]) == 0
    mine = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    second = out.with_name(out.stem + "-2.csv")
    assert other["summary"]["csv"] == str(out) and mine["csv"] == str(second) and "another call" in mine["note"]
    assert read_csv(out)[0]["path"] == str(imgs[1]) and read_csv(second)[0]["path"] == str(imgs[0])


def test_a_folder_linked_to_itself_and_to_its_parent_lists_each_file_once(tmp_path):
    """Before: two links of a folder to itself made find_images explore 2^40 paths (it hung); a link to the
    parent listed files under 40-level paths. Now each real folder is walked once: each file once, under its
    own path (a folder argument and a ** pattern alike)."""
    folder = tmp_path / "new"
    (folder / "sub").mkdir(parents=True)
    for p in (folder / "a.png", folder / "sub" / "b.png"):
        p.write_bytes(b"")
    (folder / "again").symlink_to(folder)
    (folder / "twice").symlink_to(folder)
    (folder / "sub" / "up").symlink_to(folder)
    script = ("import json, sys; from breakhis.data.images import find_images; "
              "print(json.dumps([find_images([sys.argv[1]]), find_images([sys.argv[1] + '/**/*.png'])]))")
    done = subprocess.run([sys.executable, "-c", script, str(folder)], cwd=ROOT, capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == 0, done.stderr
    walked, globbed = json.loads(done.stdout)
    assert walked == globbed == [str(folder / "a.png"), str(folder / "sub" / "b.png")]


FEATURE_PASS = """
import os, signal, sys, time
import breakhis.features as F
real = F.run_features
def feature_pass(*a, **k):
    print("in the feature pass", flush=True)
    {action}
    return real(*a, **k)
F.run_features = feature_pass
import train
from breakhis.errors import guard
sys.exit(guard(train.main, sys.argv[1:]))
"""


def test_ctrl_c_in_the_feature_pass_says_truthfully_that_nothing_was_saved(demo_root, cache_dir, tmp_path):
    """A real SIGINT while a frozen run computes its feature cache. Before: "the last finished epoch is saved,
    continue with --resume", but the folder was empty and --resume refused it. Now: nothing saved, said so,
    no folder left, and the same command trains."""
    args = tiny(demo_root, cache_dir, name="f") + ["--freeze", "--results", str(tmp_path / "res")]
    script = FEATURE_PASS.format(action="os.kill(os.getpid(), signal.SIGINT)")
    done = subprocess.run([sys.executable, "-c", script, *args], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 130 and "in the feature pass" in done.stdout, done.stderr
    assert "nothing was saved" in done.stderr and "--resume" not in done.stderr, done.stderr
    assert not (tmp_path / "res" / "f").exists()
    assert guard(train.main, args) == 0


def test_a_run_killed_in_the_feature_pass_does_not_block_its_name(demo_root, cache_dir, tmp_path):
    """SIGKILL while a frozen run computes its features leaves a folder with nothing but its owner record.
    Before: that empty folder refused the --name forever. Now the same command takes it again."""
    args = tiny(demo_root, cache_dir, name="k") + ["--freeze", "--results", str(tmp_path / "res")]
    script = FEATURE_PASS.format(action="os.kill(os.getpid(), signal.SIGKILL)")
    done = subprocess.run([sys.executable, "-c", script, *args], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == -signal.SIGKILL and "in the feature pass" in done.stdout
    left = tmp_path / "res" / "k"
    assert sorted(p.name for p in left.iterdir()) == [runs.OWNER]  # nothing of a run in it
    assert guard(train.main, args) == 0
    assert read_json(left / "status.json")["status"] == "finished"


def test_folds_killed_as_fold_2_starts_continue_with_the_same_command(tmp_path, capsys):
    """train.py --folds 1-3 SIGKILLed right after fold 2's folder became a run (config.json, status "running", no
    last.pt). Before: --resume refused it (no last.pt), the --folds command refused the existing names, and each
    message pointed to the other. Now --resume says to run the --folds call again, and that one command keeps
    fold 1, trains fold 2 from the start and fold 3, all under the first call's cross-validation record."""
    from breakhis.data.demo import make_demo, write_folds

    root = make_demo(tmp_path / "tree", patients=8, images_per_patient=8, size=(96, 64))
    write_folds(root)
    res = tmp_path / "res"
    args = tiny(root, tmp_path / "cache", name="cv", folds="1-3") + ["--results", str(res)]
    script = """
import os, signal, sys
from breakhis import runs
real = runs.start_run
def start_run(run_dir, *a, **k):
    real(run_dir, *a, **k)
    if run_dir.name.endswith("fold2"):
        os.kill(os.getpid(), signal.SIGKILL)
runs.start_run = start_run
import train
from breakhis.errors import guard
sys.exit(guard(train.main, sys.argv[1:]))
"""
    done = subprocess.run([sys.executable, "-c", script, *args], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert done.returncode == -signal.SIGKILL, done.stderr
    fold1, fold2 = res / "cv-fold1", res / "cv-fold2"
    assert runs.status_of(fold1) == "finished" and runs.status_of(fold2) == "running"
    assert not (fold2 / "last.pt").exists() and not (res / "cv-fold3").exists()
    kept = (fold1 / "model.safetensors").stat().st_mtime_ns
    assert guard(train.main, ["--resume", str(fold2), "--quiet"]) == 2
    one_line_error(capsys, "nothing to resume", "run that call again", "--name cv")
    assert guard(train.main, args) == 0
    assert "continuing the --folds call cv" in capsys.readouterr().out
    assert all(runs.status_of(res / f"cv-fold{k}") == "finished" for k in (1, 2, 3))
    assert (fold1 / "model.safetensors").stat().st_mtime_ns == kept  # fold 1 was not retrained
    cvs = [read_json(res / f"cv-fold{k}" / "config.json")["_cv"] for k in (1, 2, 3)]
    assert cvs[0] == cvs[1] == cvs[2]  # one cross-validation row in the logbook
    assert guard(train.main, args[:-2] + ["--results", str(res), "--lr", "0.5"]) == 2  # other settings: refused
    one_line_error(capsys, "exists with other settings", "lr")


def test_tune_address_with_nothing_listening_says_so_in_seconds_and_leaves_no_folder(demo_root, tmp_path):
    """Before: Ray's connection warnings for minutes, and a folder that blocked the name. Now: one line within
    seconds (a TCP probe before ray.init), no experiment folder."""
    argv = [sys.executable, "tune.py", "--space", str(ROOT / "experiments" / "weights.py"), "--data", str(demo_root),
            "--results", str(tmp_path), "--address", "127.0.0.1:1"]
    t0 = time.time()
    done = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and time.time() - t0 < 30, done.stderr[-2000:]
    err = done.stderr.strip()
    assert err.count("\n") == 0 and "nothing answers at 127.0.0.1:1" in err and "ray start --head" in err, err
    assert not (tmp_path / "tune").exists()


def test_a_killed_write_leaves_no_temp_file_after_the_next_write(tmp_path):
    """A SIGKILL in the middle of a calibration.json or CSV write leaves its .tmp-* file. Before: it stayed,
    even after a later successful write. Now the next write of the same file removes the dead writer's temp
    file, and keeps a live writer's."""
    script = """
import os, signal, sys, time
from breakhis.io import atomic_path
with atomic_path(sys.argv[1]) as tmp:
    tmp.write_text('{"temperature": ')  # half written
    if sys.argv[2] == "kill":
        os.kill(os.getpid(), signal.SIGKILL)
    print("writing", flush=True)
    time.sleep(60)
"""
    for target in (tmp_path / "calibration.json", tmp_path / "scores.csv"):
        done = subprocess.run([sys.executable, "-c", script, str(target), "kill"], cwd=ROOT, timeout=60)
        assert done.returncode == -signal.SIGKILL
        assert len(list(tmp_path.glob(f".tmp-{target.name}.*"))) == 1 and not target.exists()
        (runs.save_temperature(tmp_path, {"temperature": 1.5}) if target.suffix == ".json"
         else breakhis.io.write_csv(target, [{"path": "a.png"}]))
        assert not list(tmp_path.glob(f".tmp-{target.name}.*")) and target.is_file()
    live = subprocess.Popen([sys.executable, "-c", script, str(tmp_path / "scores.csv"), "live"], cwd=ROOT,
                            stdout=subprocess.PIPE, text=True)
    try:
        assert live.stdout.readline().strip() == "writing"
        breakhis.io.write_csv(tmp_path / "scores.csv", [{"path": "b.png"}])
        assert len(list(tmp_path.glob(".tmp-scores.csv.*"))) == 1  # another process is writing it: kept
    finally:
        live.kill()
        live.wait()
    breakhis.io.write_csv(tmp_path / "scores.csv", [{"path": "c.png"}])
    assert not list(tmp_path.glob(".tmp-*"))
