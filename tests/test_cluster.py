"""tune.py against a real two-node Ray cluster on this machine: trials spread over both nodes, resume.

The cluster is two `ray start --block` processes (a head and a worker node, one CPU each, each with
its own temp folder). Terminating a `--block` process stops the Ray processes it started, and only
those: `ray stop` would stop every Ray process of this user on the machine, other clusters included.
A cluster started with `ray start` uses token authentication here: nodes and drivers need
RAY_AUTH_MODE=token (the token is ~/.ray/auth_token).
"""
import csv
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from breakhis import runs
from breakhis.io import read_csv

pytestmark = [pytest.mark.cluster, pytest.mark.slow]  # end to end: a two-node Ray cluster
ROOT = Path(__file__).resolve().parents[1]
FLAGS = ["--backbone", "resnet18", "--no-pretrained", "--image-size", "32", "--batch-size", "8", "--head", "32",
         "--device", "cpu", "--lr", "1e-7"]
SPACE = '"""Four seeds: the same short run four times."""\nSPACE = {"seed": [0, 1, 2, 3]}\n'
RUN_FILES = ("config.json", "split.json", "status.json", "history.csv", "metrics.json", "predictions.csv",
             "model.safetensors")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def ray_env() -> dict:
    return {**os.environ, "RAY_AUTH_MODE": "token", "RAY_USAGE_STATS_ENABLED": "0", "PYTHONPATH": str(ROOT)}


def wait_for_nodes(address: str, n: int, env: dict, timeout: float = 90) -> None:
    """Until the cluster at address has n live nodes (checked from a separate driver process)."""
    probe = (f"import ray, sys; ray.init(address={address!r}, logging_level='ERROR'); "
             f"sys.exit(0 if sum(x['Alive'] for x in ray.nodes()) >= {n} else 1)")
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True, timeout=60).returncode == 0:
            return
        time.sleep(1)
    raise TimeoutError(f"the Ray cluster at {address} did not reach {n} nodes in {timeout:.0f} s")


@pytest.fixture(scope="module")
def cluster():
    """A head and a worker node, one CPU each; always stopped, with their temp folders removed."""
    if shutil.which("ray") is None:
        pytest.fail("the `ray` command is not on PATH (pip install -r requirements.txt installs it)")
    env, port = ray_env(), free_port()
    temps = [tempfile.mkdtemp(prefix="rc", dir="/tmp") for _ in range(2)]  # short: Ray's socket paths must fit 107 chars
    common = ["--block", "--num-cpus", "1", "--num-gpus", "0", "--disable-usage-stats"]
    procs = []
    try:
        procs.append(subprocess.Popen(["ray", "start", "--head", "--port", str(port), "--node-ip-address", "127.0.0.1",
                                       "--include-dashboard", "false", "--temp-dir", temps[0], *common], env=env,
                                      stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True))
        address = f"127.0.0.1:{port}"
        wait_for_nodes(address, 1, env)
        procs.append(subprocess.Popen(["ray", "start", "--address", address, "--node-ip-address", "127.0.0.1",
                                       "--temp-dir", temps[1], *common], env=env,
                                      stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True))
        wait_for_nodes(address, 2, env)
        yield address
    finally:
        for p in reversed(procs):  # the worker node first, then the head
            p.terminate()
            try:
                p.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(p.pid, signal.SIGKILL)  # the session ray start began: only processes it started
                p.wait()
        for t in temps:
            shutil.rmtree(t, ignore_errors=True)


@pytest.fixture(scope="module")
def tree(tmp_path_factory):
    from breakhis.data.demo import make_demo

    return make_demo(tmp_path_factory.mktemp("cluster-demo"), patients=12, images_per_patient=6, size=(64, 48))


def tune_cmd(tmp: Path, address: str, *extra: str) -> list[str]:
    return [sys.executable, str(ROOT / "tune.py"), "--address", address, "--results", str(tmp / "results"),
            "--name", "c", *extra]


def read_trials(exp: Path) -> list[dict]:
    with open(exp / "trials.csv") as f:
        return list(csv.DictReader(f))


def test_tune_on_two_nodes_with_resume(cluster, tree, tmp_path):
    """Interrupted after its first epoch, then resumed on the cluster: 4 trials, both nodes, complete run folders."""
    space = tmp_path / "space.py"
    space.write_text(SPACE)
    exp = tmp_path / "results" / "tune" / "c"
    cmd = tune_cmd(tmp_path, cluster, "--space", str(space), "--data", str(tree), "--cache-dir", str(tmp_path / "cache"),
                   "--max-epochs", "3", "--grace-period", "3", *FLAGS)
    env = ray_env()
    first = subprocess.Popen(cmd, env=env, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    # Ctrl-C once some trial has finished an epoch: the experiment is left part done
    deadline = time.monotonic() + 150
    while first.poll() is None and time.monotonic() < deadline:
        if any(read_csv(h) for h in exp.glob("runs/*/history.csv")):
            first.send_signal(signal.SIGINT)
            break
        time.sleep(0.2)
    out, _ = first.communicate(timeout=120)
    assert first.returncode == 130, out[-3000:]
    rows = read_trials(exp)
    assert len(rows) == 4 and any(r["status"] == runs.INTERRUPTED for r in rows), rows

    again = subprocess.run(tune_cmd(tmp_path, cluster, "--resume"), env=env, cwd=tmp_path, capture_output=True,
                           text=True, timeout=300)
    assert again.returncode == 0, (again.stdout + again.stderr)[-3000:]
    rows = read_trials(exp)
    assert sorted(r["seed"] for r in rows) == ["0", "1", "2", "3"]
    for r in rows:
        assert r["status"] == runs.FINISHED and r["epochs"] == "3" and r["error"] == "", r
        run = Path(r["run"])
        assert run.parent == exp / "runs" and runs.is_run(run)
        missing = [f for f in RUN_FILES if not (run / f).is_file()]
        assert not missing, (run, missing)
        assert [int(h["epoch"]) for h in read_csv(run / "history.csv")] == [1, 2, 3]
    nodes = {r["node"] for r in rows}
    assert "" not in nodes and len(nodes) == 2, nodes  # both nodes ran trials (one CPU each, two at a time)
    assert (exp / "best.json").is_file()
