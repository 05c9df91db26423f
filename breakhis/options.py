"""What evaluate.py and score.py are asked to do: one dataclass each, with one validate().

    opts = EvalOptions(runs=["results/<run>"], tta=True, threshold="youden").validate(n_runs=1)
    opts.check_run(run.cfg)      # the rules that depend on the run (its task), before any work

As TrainConfig is for training, these are the one place an evaluation's settings are checked:
validate() before anything is read but the run folders' names (no torch import), check_run()
once the run's config.json is read and before a model is loaded or an image decoded. A bad
setting is one UserError (one line, exit 2). The library steps (evaluation.py, newimages.py)
take these objects, never an argparse namespace.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from .compare import SORT_KEYS
from .config import TrainConfig
from .errors import UserError
from .io import number
from .metrics import check_threshold_rule

BY = ("magnification", "subtype", "patient")
PARTS = ("val", "test")
# options that need one run's model: refused when several runs are compared (the logbook reads predictions.csv)
MODEL_OPTIONS = ("tta", "data", "by", "export", "model", "cam", "calibrate", "plots")


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _check_threshold(rule: str, cam: int) -> None:
    check_threshold_rule(rule)
    if cam < 0:
        raise UserError(f"--cam {cam}: give the number of images to explain, e.g. --cam 8")


@dataclass
class EvalOptions:
    """evaluate.py: one run's figures (one run folder), or the logbook (several)."""
    runs: list[str] = field(default_factory=list)  # run folders, or folders holding runs (results/)
    part: str = "test"              # partition scored: val or test
    tta: bool = False               # average the 8 dihedral views of each image
    threshold: str = "0.5"          # a number in [0, 1], youden or recall=R (chosen on validation)
    data: str | None = None         # another tree to score whole (the run's train/val patients left out)
    include_seen: bool = False      # with data: keep the run's train/val patients (then not a test figure)
    device: str | None = None       # auto, cpu, cuda (None: the run's)
    by: str | None = None           # break the figures down by magnification, subtype or patient
    json: bool = False              # print one JSON object instead of tables
    export: str | None = None       # write a torch.export program (.pt2) of the model
    model: str | None = None        # evaluate an exported program of the run instead of its checkpoint
    trust_model: bool = False       # load `model` even if the run did not record it (it can run code)
    cam: int = 0                    # Grad-CAM overlays of this many images
    plots: bool = False             # draw RUN/plots/ from the scored partition (tune trials are trained without them)
    calibrate: bool = False         # fit a temperature on val, show the test figures before and after
    save_temperature: bool = False  # with calibrate: keep it in calibration.json
    sort: str = "accuracy"          # logbook: the figure that ranks the rows (on validation)
    csv: str | None = None          # logbook: write the table as CSV
    markdown: str | None = None     # logbook: write the table as Markdown
    n_boot: int = 1000              # bootstrap resamples for the intervals
    boot_seed: int = 0              # seed of the bootstrap draws

    def validate(self, n_runs: int = 1) -> EvalOptions:
        """Every rule that needs no run: values, combinations, and those of one run (n_runs 1) or the logbook."""
        if self.part not in PARTS:
            raise UserError(f"--part {self.part!r}: choose val or test")
        if self.by is not None and self.by not in BY:
            raise UserError(f"--by {self.by!r}: choose one of {', '.join(BY)}")
        if self.n_boot < 1:
            raise UserError(f"--n-boot {self.n_boot}: give at least 1 resample (1000 or more for a paper)")
        if self.sort not in SORT_KEYS:
            raise UserError(f"--sort {self.sort!r}: choose one of {', '.join(SORT_KEYS)}")
        _check_threshold(self.threshold, self.cam)
        if self.save_temperature and not self.calibrate:
            raise UserError("--save-temperature saves the temperature --calibrate fits: add --calibrate")
        if self.calibrate and self.data:
            raise UserError(f"--calibrate with --data {self.data}: the temperature is fitted on the run's own validation "
                            f"split, which another tree does not have; calibrate without --data")
        if self.calibrate and self.part != "test":
            raise UserError("--calibrate reports the test partition (the temperature is fitted on val): drop --part val")
        if self.data and number(self.threshold) is None:
            raise UserError(f"--threshold {self.threshold} with --data: give a number (the other tree has no "
                            f"validation split)")
        if self.plots and self.data:
            raise UserError(f"--plots draws RUN/plots/ from the run's own partitions; with --data {self.data} they would "
                            f"show another tree: drop --plots (or --data)")
        if self.include_seen and not self.data:
            raise UserError("--include-seen keeps the run's own patients of another tree: add --data OTHER_TREE")
        if self.export and not str(self.export).endswith(".pt2"):
            raise UserError(f"--export {self.export}: the file name must end in .pt2")
        if self.trust_model and not self.model:
            raise UserError("--trust-model vouches for the file --model loads: add --model FILE.pt2")
        if n_runs > 1:
            used = [_flag(k) for k in MODEL_OPTIONS if getattr(self, k)]
            if used:
                raise UserError(f"{', '.join(used)} apply to one run (they need its model); the comparison of "
                                f"{n_runs} runs reads their predictions.csv: give a single run folder")
        elif self.csv or self.markdown:
            raise UserError(f"{'--csv' if self.csv else '--markdown'} writes the logbook table of several runs; "
                            f"{self.runs[0] if self.runs else 'this'} is one run: give more runs (e.g. results/), "
                            f"or use --json for this one")
        return self

    def check_run(self, cfg: TrainConfig) -> None:
        """The rules that depend on the run's own settings (its task), checked before any work."""
        if cfg.task != "binary" and number(self.threshold) is None:
            raise UserError(f"--threshold {self.threshold}: thresholds apply to the binary task only")
        if self.calibrate and cfg.task != "binary":
            raise UserError(f"--calibrate: the {cfg.task} task is not supported (calibration figures are those of the "
                            f"malignant probability); calibrate a binary run")


@dataclass
class ScoreOptions:
    """score.py: new image files scored with one run into a CSV (no labels, no metrics)."""
    run: str                        # the run folder
    paths: list[str]                # image files (data.images.find_images has expanded folders and globs)
    threshold: str = "0.5"          # a number, youden or recall=R (chosen on the run's validation images)
    tta: bool = False               # average the 8 dihedral views
    device: str | None = None       # auto, cpu, cuda (None: the run's)
    out: str | None = None          # the CSV to write (None: RUN/scores/<time>.csv); never overwritten
    cam: int = 0                    # Grad-CAM overlays of this many scored images, most confident first
    json: bool = False              # print one JSON object instead of the table

    def validate(self) -> ScoreOptions:
        if not self.paths:
            raise UserError("no image file given: name files, folders or glob patterns after the run folder")
        _check_threshold(self.threshold, self.cam)
        if self.out is not None and Path(self.out).suffix.lower() != ".csv":
            raise UserError(f"--out {self.out}: give a file name ending in .csv")
        return self

    def check_run(self, cfg: TrainConfig) -> None:
        if cfg.task != "binary" and number(self.threshold) is None:
            raise UserError(f"--threshold {self.threshold}: thresholds apply to the binary task only")
