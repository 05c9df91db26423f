"""How many dropout layers, and how strong? One to three dropout layers, rates drawn from 0.1 to 0.6,
on the logbook's two heads: 2048->1000->2 and 2048->1000->512->128->2.

    python tune.py --space experiments/dropout.py --samples 4      # 4 draws per head: 8 trials

A head with hidden sizes H has len(H) + 1 linear layers; the dropout layers sit before the first
ones, so a draw never has more rates than the head has linear layers.
"""
import random

from ray import tune


def _rates(config):
    # (n,) rates, 1 <= n <= min(3, linear layers of the sampled head)
    n = random.randint(1, min(3, len(config["head"]) + 1))
    return tuple(round(random.uniform(0.1, 0.6), 2) for _ in range(n))


SPACE = {
    "head": [(1000,), (1000, 512, 128)],
    "dropout": tune.sample_from(_rates),
}
