"""Exported programs: write one from a run, load one back, and the rule for which files are trusted.

    export_program(run, "model.pt2")              # torch.export program; RUN/exports.json records it
    program = load_exported("model.pt2", run_dir)  # only a file this run recorded, unless trust=True

A program takes (B, 3, S, S) float32 normalised evaluation views (already stain-normalised when
the run has a stain normalisation) and gives (B, C) logits divided by the temperature it carries:
the run's saved temperature when it had one at export time, else 1 (raw logits). exports.json
records each file's SHA-256 and that temperature, so that a program's probabilities can be
brought back to the raw logits' (TrainedRun.predict undoes it) and scaled once, never twice.

torch.export.load unpickles, so a crafted .pt2 can run code: only files whose SHA-256 the run
recorded when this user exported them are loaded, unless the user vouches for the file
(--trust-model). The record alone proves nothing (whoever wrote the file can write exports.json):
each entry carries an HMAC under this user's secret key (seal.py) over the SHA-256, the run folder
and the temperature, and an entry without a valid one is not trusted.
"""
from __future__ import annotations

import time
from pathlib import Path

import torch

from .calibration import T_RANGE, is_fitted_temperature
from .errors import UserError
from .io import atomic_path, read_json, sha256_of, write_json
from .seal import seal, verify

EXPORTS = "exports.json"  # in a run folder: SHA-256 -> what evaluate.py --export wrote from this run


class Exported(torch.nn.Module):
    """A torch.export program behind the nn.Module calls the engine makes.

    It was exported in eval mode, and exported modules refuse train()/eval(): keep it out of
    the module tree so that eval() does not reach it.
    """

    def __init__(self, module, temperature: float = 1.0):
        super().__init__()
        object.__setattr__(self, "program", module)
        self.temperature = temperature  # the T the program already divides its logits by (exports.json)

    def train(self, mode: bool = True):
        return self

    def forward(self, x):
        return self.program(x)


class Tempered(torch.nn.Module):
    """model(x) / factor: logits whose softmax is the temperature-scaled probabilities. temperature:
    what the result carries in all, from the raw logits (an exported program's own included)."""

    def __init__(self, model: torch.nn.Module, factor: float):
        super().__init__()
        self.model = model
        self.factor = float(factor)
        self.temperature = self.factor * getattr(model, "temperature", 1.0)

    def forward(self, x):
        return self.model(x) / self.factor


def _records(run_dir: Path) -> dict:
    """exports.json: {SHA-256: {"file", "temperature", "time", "hmac"}}; {} when there is none, anything
    else a UserError naming the file."""
    path = run_dir / EXPORTS
    known = read_json(path)
    if known is None:
        return {}
    if not isinstance(known, dict) or not all(isinstance(v, dict) for v in known.values()):
        raise UserError(f"{path} is not a record of exports this toolkit wrote (a JSON object of SHA-256 -> "
                        f"{{file, temperature}}); the run folder is damaged: delete the file and export again "
                        f"with evaluate.py {run_dir} --export FILE.pt2")
    return known


def _temperature(entry: dict, where: Path) -> float:
    """An entry's temperature: a number the toolkit can have written (1, or a fit within T_RANGE)."""
    t = entry.get("temperature", 1.0)
    if not is_fitted_temperature(t):
        raise UserError(f"{where}: temperature {t!r} is not one the toolkit writes (a number in "
                        f"[{T_RANGE[0]:g}, {T_RANGE[1]:g}]); the run folder is damaged: delete the file and export again")
    return float(t)


def _sealed(digest: str, run_dir: Path, temperature: float) -> tuple:
    """What an entry's HMAC covers: the program's bytes, the run it was exported from, the temperature it carries."""
    return "export", digest, str(Path(run_dir).resolve()), repr(float(temperature))


def trusted_temperature(path: str | Path, run_dir: Path, trust: bool = False) -> float:
    """The temperature the program at path carries, when run_dir's exports.json records its SHA-256 under this
    user's seal (seal.py; 1 for an unrecorded file trusted by the user); a UserError for a missing file, a
    damaged record, or a file this user did not export from this run (unless trust). Checked when the run
    is opened, and again when the file is loaded."""
    p = Path(path)
    if not p.is_file():
        raise UserError(f"--model {p}: file not found (write one with evaluate.py RUN --export {p.name})")
    run_dir = Path(run_dir)
    known = _records(run_dir)
    digest = sha256_of(p)
    entry = known.get(digest)
    t = _temperature(entry, run_dir / EXPORTS) if entry is not None else 1.0
    if trust:  # the user vouches for the file and the run's record of it
        return t
    again = (f"Loading a torch.export file can run code stored in it: export it again with evaluate.py {run_dir} "
             f"--export {p.name}, or pass --trust-model for a file you trust")
    if entry is None:
        raise UserError(f"--model {p}: not an export recorded by {run_dir} ({run_dir / EXPORTS} lacks its SHA-256). "
                        + again)
    if not verify(entry.get("hmac"), *_sealed(digest, run_dir, t)):
        raise UserError(f"--model {p}: not an export recorded by {run_dir} under your seal ({run_dir / EXPORTS} lists "
                        f"its SHA-256, but a file in the run folder cannot vouch for itself: only an export made by "
                        f"you, from this run folder, carries your seal). " + again)
    # a program this run exported with a temperature divides its logits by it already
    return t


def load_exported(path: str | Path, run_dir: Path, trust: bool = False) -> Exported:
    """The program at path, loaded only when run_dir recorded its SHA-256 (or trust: --trust-model)."""
    temperature = trusted_temperature(path, run_dir, trust)
    try:
        program = torch.export.load(str(path))
    except Exception as e:  # a damaged or foreign file: say so in the user's words
        raise UserError(f"--model {path}: not a torch.export program ({type(e).__name__}: {e})") from None
    return Exported(program.module(), temperature)


def export_program(model: torch.nn.Module, image_size: int, device: torch.device, path: str | Path,
                   run_dir: Path | None = None, temperature: float = 1.0) -> None:
    """Save model as a torch.export program whose logits carry `temperature` in all, from the raw
    logits (1: the raw logits); a model that divides by a temperature already (an Exported program)
    is divided by what remains. run_dir: the run records the file's SHA-256 and that temperature."""
    factor = temperature / getattr(model, "temperature", 1.0)
    if factor != 1.0:
        model = Tempered(model, factor)
    carried = float(getattr(model, "temperature", 1.0))
    model = model.float().eval()
    x = torch.randn(2, 3, image_size, image_size, device=device)
    batch = torch.export.Dim("batch", min=1, max=4096)
    prog = torch.export.export(model, (x,), dynamic_shapes=({0: batch},))
    with atomic_path(path) as tmp:
        torch.export.save(prog, str(tmp))
        digest = sha256_of(tmp)
    if run_dir is not None:  # the run vouches for what it wrote: evaluate.py RUN --model loads it without --trust-model
        known = _records(run_dir)
        write_json(run_dir / EXPORTS, {**known, digest: {"file": str(Path(path).resolve()), "temperature": carried,
                                                         "time": time.strftime("%Y-%m-%dT%H:%M:%S"),
                                                         "hmac": seal(*_sealed(digest, run_dir, carried))}})
