"""Which learning rate and weight decay? lr log-uniform in [1e-5, 1e-2], weight decay log-uniform in [1e-5, 1e-1].

    python tune.py --space experiments/lr.py --samples 16

The logbook used AdamW at lr 1e-4, weight decay 0.01 (train.py's defaults); this asks how far that
is from the best pair. Use --samples: each sample is one random draw.
"""
from ray import tune

SPACE = {
    "lr": tune.loguniform(1e-5, 1e-2),
    "weight_decay": tune.loguniform(1e-5, 1e-1),
}
