"""Run folders: create them (never reusing one), write their files atomically, read them back.

A run folder is self-describing (results/<name>/):
  config.json       the resolved TrainConfig plus environment (versions, git commit, device)
  split.json        the patient split manifest the run used
  status.json       running | interrupted | failed | finished, the last epoch done
  history.csv       one row per epoch
  model.safetensors the best checkpoint by --select
  last.pt           the full training state of the last epoch (resume); removed when finished
  metrics.json      {"val": {...}, "test": {...}, "best_epoch": N}
  predictions.csv   one row per val and test image
  plots/            PNG figures
"""
from __future__ import annotations

import csv
import io
import json
import platform
import re
import subprocess
import time
from pathlib import Path
from typing import Any

import torch

from . import atomic
from .config import FIELDS, TrainConfig, make_config
from .errors import UserError

RUN_MARKER = "config.json"


def new_run_dir(results: str | Path, name: str | None, backbone: str) -> Path:
    """Create and return a fresh run folder; an explicit name that exists is refused."""
    results = Path(results)
    if name:
        if not re.fullmatch(r"[\w.\-/]+", name) or ".." in name.split("/"):
            raise UserError(f"--name {name!r}: use letters, digits, '-', '_', '.' and '/' only")
        path = results / name
        if path.exists():
            raise UserError(f"run folder {path} already exists; finished runs are never overwritten: "
                            f"choose another --name, or continue it with --resume {path}")
        path.mkdir(parents=True)
        return path
    stamp = time.strftime("%Y%m%d-%H%M%S")
    for i in range(1000):
        path = results / (f"{stamp}-{backbone}" + (f"-{i}" if i else ""))
        try:
            path.mkdir(parents=True)
            return path
        except FileExistsError:
            continue
    raise RuntimeError(f"could not create a run folder under {results}")


def git_commit() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5,
                             cwd=Path(__file__).resolve().parent)
        return out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def environment(device: torch.device) -> dict[str, Any]:
    import numpy
    import sklearn
    import torchvision

    env = {"python": platform.python_version(), "torch": torch.__version__, "torchvision": torchvision.__version__,
           "numpy": numpy.__version__, "sklearn": sklearn.__version__, "git_commit": git_commit(),
           "host": platform.node(), "device": str(device)}
    if device.type == "cuda":
        env["gpu"] = torch.cuda.get_device_name(device)
    return env


def start_run(run_dir: Path, cfg: TrainConfig, manifest: dict, device: torch.device) -> None:
    """Write config.json and split.json: from here on the folder is a (not yet finished) run."""
    atomic.write_json(run_dir / "split.json", manifest)
    atomic.write_json(run_dir / "config.json", {**cfg.to_dict(), "_env": environment(device)})
    set_status(run_dir, "running", epoch=0)


def set_status(run_dir: Path, status: str, epoch: int, message: str = "") -> None:
    atomic.write_json(run_dir / "status.json", {"status": status, "epoch": epoch, "message": message,
                                                 "time": time.strftime("%Y-%m-%dT%H:%M:%S")})


def read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except json.JSONDecodeError as e:
        raise UserError(f"{path} is not valid JSON ({e}); the run folder is damaged") from None


def is_run(path: str | Path) -> bool:
    p = Path(path)
    return (p / RUN_MARKER).is_file() and (p / "split.json").is_file()


def check_run(path: str | Path) -> Path:
    """The folder as a run folder, or a UserError saying why it is not one."""
    p = Path(path)
    if not p.exists():
        raise UserError(f"run folder {p} does not exist (runs live under results/; list them with `ls results`)")
    if not is_run(p):
        raise UserError(f"{p} is not a run folder (no config.json and split.json); "
                        f"give a folder written by train.py, e.g. results/<run>")
    if not (p / "model.safetensors").is_file():
        raise UserError(f"run {p} has no model.safetensors yet (it stopped before its first epoch finished)")
    return p


def load_config(run_dir: Path) -> TrainConfig:
    """The run's TrainConfig (environment entries dropped)."""
    d = read_json(run_dir / RUN_MARKER) or {}
    return make_config({k: v for k, v in d.items() if k in FIELDS})


def find_runs(paths: list[str | Path]) -> list[Path]:
    """Expand folders that hold runs (e.g. results/) into the run folders below them, sorted."""
    out: list[Path] = []
    for p in map(Path, paths):
        if is_run(p):
            out.append(p)
        elif p.is_dir():
            found = sorted(c.parent for c in p.rglob(RUN_MARKER) if is_run(c.parent) and (c.parent / "model.safetensors").is_file())
            if not found:
                raise UserError(f"{p} holds no run folders (folders with config.json, split.json and model.safetensors)")
            out.extend(found)
        else:
            raise UserError(f"{p} does not exist")
    return list(dict.fromkeys(out))


# --- weights and training state ---------------------------------------------------------------

def save_weights(model: torch.nn.Module, path: Path) -> None:
    """The model's state dict as safetensors (contiguous copies: shared storage is not allowed)."""
    from safetensors.torch import save

    sd = {k: v.detach().to("cpu").contiguous().clone() for k, v in model.state_dict().items()}
    atomic.write_bytes(path, save(sd))


def load_weights(model: torch.nn.Module, path: Path) -> None:
    from safetensors.torch import load_file

    sd = load_file(str(path))
    try:
        model.load_state_dict(sd)
    except RuntimeError as e:
        raise UserError(f"{path} does not fit the model of this run's config: {str(e).splitlines()[0]}") from None


def save_state(path: Path, state: dict) -> None:
    with atomic.atomic_path(path) as tmp:
        torch.save(state, tmp)


def load_state(path: Path) -> dict:
    if not path.is_file():
        raise UserError(f"{path.parent} has no last.pt training state to resume from "
                        f"(the run finished, or stopped before its first epoch ended)")
    return torch.load(path, map_location="cpu", weights_only=False)


# --- tables -----------------------------------------------------------------------------------

def write_csv(path: Path, rows: list[dict]) -> None:
    """Rows as CSV with the union of their keys as columns, in first-seen order."""
    cols: dict[str, None] = {}
    for r in rows:
        cols.update(dict.fromkeys(r))
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=list(cols), lineterminator="\n")
    w.writeheader()
    w.writerows(rows)
    atomic.write_text(path, buf.getvalue())


def read_csv(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    with open(path, newline="") as f:
        return list(csv.DictReader(f))
