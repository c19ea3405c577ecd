"""A reward term of pure Gaussian noise, N(0, 1) per completion (its `weight` sets sigma): the
reward-noise ablation of benchmarks/paper_table.py. Seeded by REWARD_NOISE_SEED and call count."""

import os

import numpy as np

_calls = [0]


def gaussian(completions, **kwargs):
    _calls[0] += 1
    rng = np.random.default_rng([int(os.environ.get("REWARD_NOISE_SEED", "0")), _calls[0]])
    return rng.standard_normal(len(completions)).tolist()
