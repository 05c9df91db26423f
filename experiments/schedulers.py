"""Which learning-rate schedule? None, step, multistep at 20,40,60 and at 10,30,50, exponential, one-cycle, plateau.

    python tune.py --space experiments/schedulers.py

A grid of 7 trials. Each schedule is a preset, so that it comes with its own parameters.
"""
PRESETS = {
    "none": {"scheduler": "none"},
    "step": {"scheduler": "step", "step_size": 10, "gamma": 0.1},
    "multistep_20_40_60": {"scheduler": "multistep", "milestones": (20, 40, 60), "gamma": 0.1},
    "multistep_10_30_50": {"scheduler": "multistep", "milestones": (10, 30, 50), "gamma": 0.1},
    "exponential": {"scheduler": "exponential", "gamma": 0.95},
    "onecycle": {"scheduler": "onecycle", "pct_start": 0.3},
    # on the validation loss: patience 5 epochs, factor 0.1 (the logbook's ReduceLROnPlateau)
    "plateau": {"scheduler": "plateau", "plateau_patience": 5, "plateau_factor": 0.1},
}
SPACE = {"preset": list(PRESETS)}
