"""How much should missing a malignant image cost? Class weights (0.5, w), w from 0.5 to 0.85 as in the logbook.

    python tune.py --space experiments/weights.py --data data/BreaKHis_v1

A grid of 8 trials on the best entry's other settings (train.py's defaults).
"""
SPACE = {"class_weights": [(0.5, w) for w in (0.5, 0.55, 0.6, 0.65, 0.7, 0.75, 0.8, 0.85)]}
METRIC = "val_acc"
MODE = "max"
