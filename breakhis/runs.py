"""Run folders: create them (never reusing one), write their files atomically, read them back.

A run folder is self-describing (results/<name>/):
  config.json       the resolved TrainConfig plus environment (versions, git commit, device)
  split.json        the patient split manifest the run used
  status.json       one of STATUSES, the last epoch done, a message
  history.csv       one row per epoch
  model.safetensors the best checkpoint by --select
  last.pt           the full training state of the last epoch (resume); removed when finished
  metrics.json      {"val": {...}, "test": {...}, "best_epoch": N}
  predictions.csv   one row per val and test image
  plots/            PNG figures
"""
from __future__ import annotations

import platform
import re
import subprocess
import time
from importlib.metadata import version
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save

from .config import FIELDS, TrainConfig, make_config, renamed
from .errors import UserError
from .io import atomic_path, read_json, write_bytes, write_json
from .models import portable_state_dict

RUN_MARKER = "config.json"
# what status.json (and a tune trial's row in trials.csv) says of a run; one vocabulary everywhere
RUNNING, INTERRUPTED, FAILED, STOPPED, FINISHED = "running", "interrupted", "failed", "stopped", "finished"
STATUSES = (RUNNING, INTERRUPTED, FAILED, STOPPED, FINISHED)  # stopped: cut early by ASHA, then scored


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
    env = {"python": platform.python_version(), "torch": torch.__version__,
           **{name: version(dist) for name, dist in (("torchvision", "torchvision"), ("numpy", "numpy"),
                                                     ("sklearn", "scikit-learn"))},
           "git_commit": git_commit(),
           "host": platform.node(), "device": str(device)}
    if device.type == "cuda":
        env["gpu"] = torch.cuda.get_device_name(device)
    return env


def start_run(run_dir: Path, cfg: TrainConfig, manifest: dict, device: torch.device) -> None:
    """Write config.json and split.json: from here on the folder is a (not yet finished) run."""
    write_json(run_dir / "split.json", manifest)
    write_json(run_dir / "config.json", {**cfg.to_dict(), "_env": environment(device)})
    set_status(run_dir, RUNNING, epoch=0)


def set_status(run_dir: Path, status: str, epoch: int, message: str = "") -> None:
    if status not in STATUSES:
        raise ValueError(f"status must be one of {STATUSES}, not {status!r}")
    write_json(run_dir / "status.json", {"status": status, "epoch": epoch, "message": message,
                                         "time": time.strftime("%Y-%m-%dT%H:%M:%S")})


def status_of(run_dir: Path) -> str | None:
    """The status word of a run folder (None when it has no status.json)."""
    return (read_json(run_dir / "status.json") or {}).get("status")


def abandon(run_dir: Path, error: BaseException) -> None:
    """After a failure: an empty folder (nothing written yet) is removed, a started run is marked
    failed with the error's message, so that no folder is left saying "running"."""
    if not run_dir.is_dir():
        return
    if not any(run_dir.iterdir()):
        run_dir.rmdir()
    elif status_of(run_dir) == RUNNING:
        epoch = (read_json(run_dir / "status.json") or {}).get("epoch", 0)
        text = str(error) if isinstance(error, UserError) else f"{type(error).__name__}: {error}"
        set_status(run_dir, FAILED, epoch=epoch, message=text.splitlines()[0] if text.strip() else type(error).__name__)


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
    d = renamed({k: v for k, v in (read_json(run_dir / RUN_MARKER) or {}).items() if not k.startswith("_")},
                str(run_dir / RUN_MARKER))
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
    """The model's state dict as safetensors (see models.portable_state_dict)."""
    write_bytes(path, save(portable_state_dict(model)))


def load_weights(model: torch.nn.Module, path: Path) -> None:
    sd = load_file(str(path))
    try:
        model.load_state_dict(sd)
    except RuntimeError as e:
        raise UserError(f"{path} does not fit the model of this run's config: {str(e).splitlines()[0]}") from None


def save_state(path: Path, state: dict) -> None:
    with atomic_path(path) as tmp:
        torch.save(state, tmp)


def load_state(path: Path) -> dict:
    if not path.is_file():
        raise UserError(f"{path.parent} has no last.pt training state to resume from "
                        f"(the run finished, or stopped before its first epoch ended)")
    return torch.load(path, map_location="cpu", weights_only=False)
