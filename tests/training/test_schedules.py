"""The learning-rate schedule counts optimizer updates and ends its decay at the last one.

With U = train.steps x update_epochs x num_minibatches updates and w of warmup, update u gets
lr * u / w during the warmup, then lr * (U - u) / (U - w) (linear) or
lr * (1 + cos(pi (u - w) / (U - w))) / 2 (cosine): transformers' `get_*_schedule_with_warmup`.
"""

import math

import jax.numpy as jnp
import numpy as np
import pytest

from jaxrl_llm.training import load_config
from jaxrl_llm.training.setup import make_optimizer

STEPS, EPOCHS, MINIBATCHES, WARMUP = 10, 2, 2, 4
UPDATES = STEPS * EPOCHS * MINIBATCHES  # 40 optimizer updates


def applied_learning_rates(optimizer, updates: int) -> np.ndarray:
    """The learning rate of each update, read off AdamW's step on one weight whose gradient is
    constant: Adam's bias-corrected m / sqrt(v) is then 1 (to the float32 rounding of its
    moments, ~1e-5 here), so the step is -lr."""
    params, gradient = jnp.zeros(()), jnp.asarray(0.5)
    state, rates = optimizer.init(params), []
    for _ in range(updates):
        step, state = optimizer.update(gradient, state, params)
        rates.append(-float(step))
    return np.array(rates)


@pytest.mark.parametrize("schedule", ["linear", "cosine"])
def test_the_decay_ends_at_the_last_update_after_a_warmup_of_updates(schedule):
    config = load_config(None, [f"train.steps={STEPS}", f"algo.update_epochs={EPOCHS}",
                                f"algo.num_minibatches={MINIBATCHES}", "optim.learning_rate=1.0",
                                f"optim.schedule={schedule}", f"optim.warmup_steps={WARMUP}"])
    rates = applied_learning_rates(make_optimizer(config), UPDATES)
    decay = UPDATES - WARMUP
    last = 1.0 / decay if schedule == "linear" else 0.5 * (1 + math.cos(math.pi * (decay - 1) / decay))
    np.testing.assert_allclose(rates[[0, WARMUP - 1, WARMUP, UPDATES - 1]],
                               [0.0, (WARMUP - 1) / WARMUP, 1.0, last], rtol=1e-4, atol=1e-7)
    assert np.all(np.diff(rates[WARMUP:]) < 0)  # decays over every update after the warmup
