"""Ray Tune searches over the training config: space files (space.py), the experiment (experiment.py), its results (results.py)."""
