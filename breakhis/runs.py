"""Run folders: create them (never reusing one), write their files atomically, read them back.

A run folder is self-describing (results/<name>/):
  config.json       the resolved TrainConfig plus environment (versions, git commit, device), and
                    "_repeats" (train.py --seeds) or "_cv" (train.py --folds) when it is one of several
  split.json        the patient split manifest the run used
  status.json       one of STATUSES, the last epoch done, a message
  history.csv       one row per epoch
  model.safetensors the best checkpoint by --select
  last.pt           the full training state of the last epoch (resume); removed when finished
  metrics.json      {"val": {...}, "test": {...}, "best_epoch": N}
  stain.json        with --stain-norm: the fitted reference (breakhis/stain.py), applied again by evaluation
  predictions.csv   one row per val and test image
  plots/            PNG figures
  calibration.json  later, evaluate.py --calibrate --save-temperature: the temperature every later evaluation applies
  exports.json      later, evaluate.py --export: the programs this run wrote (export.py)
  .owner            {"host", "pid"} of the process that made the folder or continues the run: a folder a
                    killed process left before its run began (nothing else in it) is taken again by the
                    same --name, and a fold a killed --folds call left is continued by running that call again
"""
from __future__ import annotations

import dataclasses
import os
import platform
import re
import shutil
import subprocess
import time
from importlib.metadata import version
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save

from .calibration import T_RANGE, is_fitted_temperature
from .config import FIELDS, TrainConfig, make_config, renamed
from .errors import UserError
from .io import HOST, atomic_path, read_json, write_bytes, write_json
from .models import Classifier, backbone_of, mismatch, portable_state_dict
from .stain import StainParams
from .stain import save as save_stain

RUN_MARKER = "config.json"
SPLIT = "split.json"  # the patient split manifest a run trained on: every later step reads its partitions from it
CALIBRATION = "calibration.json"
# what status.json (and a tune trial's row in trials.csv) says of a run; one vocabulary everywhere
RUNNING, INTERRUPTED, FAILED, STOPPED, FINISHED = "running", "interrupted", "failed", "stopped", "finished"
STATUSES = (RUNNING, INTERRUPTED, FAILED, STOPPED, FINISHED)  # stopped: cut early by ASHA, then scored
STATE_KEYS = {"model", "optimizer", "schedule", "scaler", "rng", "history", "best", "best_epoch", "stale", "epoch"}


def check_name(name: str | None) -> None:
    """A run name is a relative path inside --results: letters, digits, '-', '_', '.', '/'; no '..'."""
    if name and (not re.fullmatch(r"[\w.\-/]+", name) or ".." in name.split("/") or name.startswith("/")):
        raise UserError(f"--name {name!r}: use letters, digits, '-', '_', '.' and '/' only, as a path inside "
                        f"--results (no leading '/', no '..')")


def check_results(results: str | Path) -> None:
    """--results must be a folder this process can write (or one it can create); checked before any work."""
    p = Path(results)
    if p.exists() and not p.is_dir():
        raise UserError(f"--results {p} is a file, not a folder: give a folder that holds run folders")
    existing = next(q for q in (p, *p.absolute().parents) if q.exists())
    if not existing.is_dir() or not os.access(existing, os.W_OK | os.X_OK):
        raise UserError(f"--results {p}: cannot write in {existing} (permission denied); give a folder you can write")


OWNER = ".owner"


def claim(run_dir: Path) -> None:
    """Record this process as the one making or continuing the run in run_dir (OWNER)."""
    write_json(run_dir / OWNER, {"host": HOST, "pid": os.getpid()})


def owner_alive(run_dir: Path) -> bool | None:
    """Whether the process recorded in run_dir's OWNER still runs; None when that cannot be told (no or a
    damaged record, another host)."""
    try:
        o = read_json(run_dir / OWNER)
    except UserError:
        return None
    if not isinstance(o, dict) or o.get("host") != HOST or not isinstance(o.get("pid"), int):
        return None
    if o["pid"] == os.getpid():
        return True
    try:
        os.kill(o["pid"], 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # another user's process
    return True


def unstarted(path: Path) -> bool:
    """A folder made for a run that has not begun: no config.json, nothing but OWNER and temporary files."""
    return path.is_dir() and not (path / RUN_MARKER).exists() and all(
        p.name == OWNER or p.name.startswith(".tmp-") for p in path.iterdir())


def abandoned_start(path: Path) -> bool:
    """A folder a killed train.py made and left before its run began (in the data, feature or model
    build): no config.json, nothing in it but OWNER and temporary files, its owner gone."""
    return unstarted(path) and owner_alive(path) is False


def check_new(results: str | Path, name: str) -> Path:
    """results/name, refused if it exists (finished runs are never overwritten); nothing is created. A
    folder left by a killed start (abandoned_start) does not count: new_run_dir takes it again."""
    check_name(name)
    path = Path(results) / name
    if path.exists() and not abandoned_start(path):
        if path.is_dir() and not any(path.iterdir()):
            raise UserError(f"run folder {path} exists and is empty (made by a run killed before it began, by an "
                            f"older version?): remove it with `rmdir {path}`, or choose another --name")
        raise UserError(f"run folder {path} already exists; finished runs are never overwritten: "
                        f"choose another --name, or continue it with --resume {path}")
    return path


def label_of(backbone: str) -> str:
    """The backbone as part of a folder name: timm:hf-hub:ORG/REPO -> timm-hf-hub-ORG-REPO."""
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", backbone)


def new_run_dir(results: str | Path, name: str | None, backbone: str) -> Path:
    """Create and return a fresh run folder; an explicit name that exists is refused."""
    results = Path(results)
    check_name(name)
    if name:
        path = check_new(results, name)
        if abandoned_start(path):
            shutil.rmtree(path)  # nothing in it but the killed process's marker
        try:
            path.mkdir(parents=True)
        except FileExistsError:
            raise UserError(f"run folder {path} was just created by another process; choose another --name") from None
        claim(path)
        return path
    stamp = time.strftime("%Y%m%d-%H%M%S")
    for i in range(1000):
        label = label_of(backbone)
        path = results / (f"{stamp}-{label}" + (f"-{i}" if i else ""))
        try:
            path.mkdir(parents=True)
            claim(path)
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
           **{name: version(dist) for name, dist in (("torchvision", "torchvision"), ("timm", "timm"), ("numpy", "numpy"),
                                                     ("sklearn", "scikit-learn"))},
           "git_commit": git_commit(),
           "host": platform.node(), "device": str(device)}
    if device.type == "cuda":
        env["gpu"] = torch.cuda.get_device_name(device)
    return env


def start_run(run_dir: Path, cfg: TrainConfig, manifest: dict, device: torch.device,
              repeats: dict | None = None, cv: dict | None = None, stain_params: StainParams | None = None) -> None:
    """Write config.json and split.json: from here on the folder is a (not yet finished) run.

    repeats: for one of the runs of `train.py --seeds`, {"id", "seeds", "resplit"}: the logbook pools
    runs on different test splits only when they share this record with resplit true.
    cv: for one of the runs of `train.py --folds` (or a tune trial with --folds), {"id", "folds", "name"}:
    the logbook shows the runs that share this record as one cross-validation row.
    stain_params: the fitted stain normalisation, written as stain.json before config.json, so that
    every run folder with --stain-norm holds it."""
    save_stain(stain_params, run_dir)
    write_json(run_dir / SPLIT, manifest)
    write_json(run_dir / "config.json", {**cfg.to_dict(), "_env": environment(device),
                                         **({"_repeats": repeats} if repeats else {}), **({"_cv": cv} if cv else {})})
    set_status(run_dir, RUNNING, epoch=0)


def set_status(run_dir: Path, status: str, epoch: int, message: str = "") -> None:
    if status not in STATUSES:
        raise ValueError(f"status must be one of {STATUSES}, not {status!r}")
    write_json(run_dir / "status.json", {"status": status, "epoch": epoch, "message": message,
                                         "time": time.strftime("%Y-%m-%dT%H:%M:%S")})


def status_of(run_dir: Path) -> str | None:
    """The status word of a run folder (None when it has no status.json)."""
    return (read_json(run_dir / "status.json") or {}).get("status")


def remove_temps(run_dir: Path) -> list[Path]:
    """Delete the `.tmp-*` files an interrupted atomic write left in the run folder (one process owns a run)."""
    stale = [p for p in run_dir.glob(".tmp-*") if p.is_file()]
    for p in stale:
        p.unlink(missing_ok=True)
    return stale


def abandon(run_dir: Path, error: BaseException) -> None:
    """After a failure: a folder with nothing written yet (unstarted) is removed, a started run is marked
    failed with the error's message, so that no folder is left saying "running"."""
    if not run_dir.is_dir():
        return
    if unstarted(run_dir):
        shutil.rmtree(run_dir)
    elif status_of(run_dir) == RUNNING:
        epoch = (read_json(run_dir / "status.json") or {}).get("epoch", 0)
        text = str(error) if isinstance(error, UserError) else f"{type(error).__name__}: {error}"
        set_status(run_dir, FAILED, epoch=epoch, message=text.splitlines()[0] if text.strip() else type(error).__name__)


def fold_plan(path: Path) -> str:
    """What running a --folds call again does with one fold's folder: "new" (absent, or a start killed
    before the run began), "finished" (kept as it is), "resume" (its last.pt is continued), "restart"
    (killed or interrupted before its first epoch was saved: nothing to keep, trained from the start).
    A folder another live process trains, or one that is not a run, is a UserError."""
    if not path.exists() or abandoned_start(path):
        return "new"
    if not is_run(path):
        raise UserError(f"run folder {path} already exists and holds no run (no config.json): move it away, or "
                        f"choose another --name")
    status = status_of(path)
    if status == FINISHED:
        return "finished"
    if owner_alive(path):
        raise UserError(f"{path} is being trained by another process right now (see {path / OWNER}); wait for it, "
                        f"or choose another --name")
    return "resume" if (path / "last.pt").is_file() else "restart"


def restart(path: Path) -> Path:
    """Empty a run folder that holds nothing to keep (fold_plan "restart") so that it is trained from the start."""
    shutil.rmtree(path)
    path.mkdir(parents=True)
    claim(path)
    return path


def settings_differ(path: Path, cfg: TrainConfig) -> str:
    """The settings in which the run in path differs from cfg, as 'key: theirs vs ours' ('' when none)."""
    theirs, ours = load_config(path).to_dict(), cfg.to_dict()
    return ", ".join(f"{k} {theirs[k]!r} there, {ours[k]!r} here" for k in ours if theirs.get(k) != ours[k])


def is_run(path: str | Path) -> bool:
    p = Path(path)
    return (p / RUN_MARKER).is_file() and (p / SPLIT).is_file()


def check_run(path: str | Path) -> Path:
    """The folder as a run folder, or a UserError saying why it is not one."""
    p = Path(path)
    if not p.exists():
        raise UserError(f"run folder {p} does not exist (runs live under results/; list them with `ls results`)")
    if not is_run(p):
        raise UserError(f"{p} is not a run folder (no config.json and split.json); "
                        f"give a folder written by train.py, e.g. results/<run>")
    if not (p / "model.safetensors").is_file():
        raise UserError(f"run {p} has no model.safetensors yet (it stopped before its first epoch finished; a frozen "
                        f"backbone's run writes it when its loop ends: a killed one gets it from train.py --resume {p})")
    return p


def load_config(run_dir: Path) -> TrainConfig:
    """The run's TrainConfig (environment entries dropped)."""
    raw = read_json(run_dir / RUN_MARKER)
    if not isinstance(raw, dict):
        raise UserError(f"{run_dir / RUN_MARKER} is not a JSON object of settings; the run folder is damaged")
    d = renamed({k: v for k, v in raw.items() if not k.startswith("_")}, str(run_dir / RUN_MARKER))
    return make_config({k: v for k, v in d.items() if k in FIELDS})


def own_split(cfg: TrainConfig, run_dir: Path) -> TrainConfig:
    """cfg reading the run's own partitions (its split.json), the images it trained, selected and was
    tested on: what resuming, scoring and evaluating a run prepare."""
    return dataclasses.replace(cfg, split_file=str(Path(run_dir) / SPLIT))


def saved_temperature(run_dir: Path) -> float | None:
    """The temperature saved in the run (calibration.json), None when it has none; a damaged file is a UserError."""
    saved = read_json(run_dir / CALIBRATION)
    if saved is None:
        return None
    t = saved.get("temperature") if isinstance(saved, dict) else None
    if not is_fitted_temperature(t):
        raise UserError(f"{run_dir / CALIBRATION}: damaged (temperature {t!r}, need a number in "
                        f"[{T_RANGE[0]:g}, {T_RANGE[1]:g}], the range the fit searches); delete it, or "
                        f"fit it again with evaluate.py {run_dir} --calibrate --save-temperature")
    return float(t)


def save_temperature(run_dir: Path, record: dict) -> None:
    """calibration.json: {"temperature": T, ...how it was fitted}; the run's other files stay as they are."""
    write_json(run_dir / CALIBRATION, record)


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

def save_weights(model: torch.nn.Module, path: Path, head: dict[str, torch.Tensor] | None = None) -> None:
    """The model's state dict as safetensors (see models.portable_state_dict); head: the head's tensors
    to store instead of the model's current ones (fit.save_best: the best epoch's head)."""
    state = portable_state_dict(model)
    if head is not None:
        state.update({f"head.{k}": v.detach().to("cpu", memory_format=torch.contiguous_format, copy=True)
                      for k, v in head.items()})
    write_bytes(path, save(state))


def load_weights(model: Classifier, path: Path, backbone: str) -> None:
    """Load a run's model.safetensors; a damaged file or one of another model is one UserError."""
    try:
        sd = load_file(str(path))
    except Exception as e:  # safetensors raises its own error type for truncated or foreign files
        raise UserError(f"{path} is damaged or not a safetensors file ({type(e).__name__}: {e}); "
                        f"retrain the run, or resume it if it has a last.pt") from None
    problem = mismatch(f"{path} and the {backbone} model of this run's config.json", model, sd)
    if problem:
        fits = backbone_of(sd)
        raise UserError(problem + (f"; the file fits a {fits} backbone" if fits and fits != backbone else ""))
    model.load_state_dict(sd)


def save_state(path: Path, state: dict) -> None:
    with atomic_path(path) as tmp:
        torch.save(state, tmp)


def load_state(path: Path) -> dict:
    """The training state of a run (last.pt), loaded with weights_only=True: tensors and plain Python
    values only, so a crafted file cannot run code. Anything else is refused in one line."""
    if not path.is_file():
        raise UserError(f"{path.parent} has no last.pt training state to resume from "
                        f"(the run finished, or stopped before its first epoch ended)")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # damaged, empty, text, or holding objects other than tensors and plain values
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(f"{path} is not a training state this toolkit wrote, or it is damaged ({first}); "
                        f"it was not loaded. Delete it and train the run again") from None
    if not isinstance(state, dict) or not STATE_KEYS <= set(state):
        raise UserError(f"{path} is not a training state this toolkit wrote (no {', '.join(sorted(STATE_KEYS))}); "
                        f"delete it and train the run again")
    return state
