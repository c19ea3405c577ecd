"""Mixed precision: float32 master parameters and optimizer state, bfloat16 forward/backward.

Stored in bfloat16, a weight of size 0.02 has an ulp of ~1.2e-4, so AdamW steps of lr 1e-6
round away: the update silently does nothing. With float32 masters they land.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxrl_llm.training import Trainer

LR = "optim.learning_rate=1e-6"


def changed_fraction(before, trainer):
    """Share of the master weights that received a gradient (Adam's first moment is not 0) and
    whose value changed."""
    mu = optax.tree_utils.tree_get(trainer.state.opt_state, "mu")
    changed = touched = 0
    for old, new, m in zip(jax.tree.leaves(before), jax.tree.leaves(trainer.state.params), jax.tree.leaves(mu)):
        got_gradient = np.asarray(m) != 0
        touched += got_gradient.sum()
        changed += (np.asarray(old) != np.asarray(new))[got_gradient].sum()
    return changed / touched


def test_bf16_compute_keeps_float32_masters_and_every_small_step_lands(toy_config):
    trainer = Trainer(toy_config("model.dtype=bfloat16", LR, "train.steps=3"))
    assert {x.dtype for x in jax.tree.leaves(trainer.state.params)} == {jnp.dtype(jnp.float32)}
    assert {x.dtype for x in jax.tree.leaves(optax.tree_utils.tree_get(trainer.state.opt_state, "nu"))} == {
        jnp.dtype(jnp.float32)}
    # The frozen reference is only read by forward passes: it is stored in the compute dtype.
    assert {x.dtype for x in jax.tree.leaves(trainer.state.ref_params)} == {jnp.dtype(jnp.bfloat16)}
    before = jax.tree.map(np.array, trainer.state.params)
    for _ in range(3):
        trainer.step()
    assert changed_fraction(before, trainer) > 0.99


def test_bf16_parameters_are_an_explicit_choice_and_lose_small_steps(toy_config):
    trainer = Trainer(toy_config("model.dtype=bfloat16", "model.param_dtype=bfloat16", LR))
    assert {x.dtype for x in jax.tree.leaves(trainer.state.params)} == {jnp.dtype(jnp.bfloat16)}
    before = jax.tree.map(np.array, trainer.state.params)
    for _ in range(3):
        trainer.step()
    assert changed_fraction(before, trainer) < 0.2  # the failure mode float32 masters fix


@pytest.mark.parametrize("algo", [pytest.param("rloo", marks=pytest.mark.slow), "ppo"])
def test_bf16_first_update_matches_float32_within_bf16_tolerance(toy_config, tmp_path, algo):
    """Same batch, same initial weights: the bfloat16 loss and gradient are the float32 ones up
    to bfloat16 rounding (8 significant bits, ~0.4% per operation)."""
    fp32 = Trainer(toy_config(f"train.run_dir={tmp_path / 'a'}", algo=algo))
    bf16 = Trainer(toy_config(f"train.run_dir={tmp_path / 'b'}", "model.dtype=bfloat16", algo=algo))
    batch = fp32.collect()[0]
    results = []
    for trainer in (fp32, bf16):
        state, train_batch, _ = trainer._prepare(jax.tree.map(jnp.copy, trainer.state), batch)
        (loss, (aux, _)), grads = jax.jit(trainer.algorithm.value_and_grad)(state.params, train_batch)
        results.append((float(loss), aux, grads))
    (loss32, aux32, grads32), (loss16, aux16, grads16) = results
    # The loss is a difference of terms of size |A| * |sum_t log pi|: compare at that scale.
    scale = abs(float(aux32["advantage"].mean)) + float(aux32["advantage"].std) + abs(loss32)
    assert abs(loss16 - loss32) <= 2e-2 * scale, (loss16, loss32, scale)
    flat32 = jnp.concatenate([g.ravel() for g in jax.tree.leaves(grads32)])
    flat16 = jnp.concatenate([g.ravel() for g in jax.tree.leaves(grads16)])
    assert flat16.dtype == jnp.float32  # gradients of the float32 masters
    cosine = float(flat16 @ flat32 / (jnp.linalg.norm(flat16) * jnp.linalg.norm(flat32)))
    assert cosine > 0.99, cosine
    np.testing.assert_allclose(float(jnp.linalg.norm(flat16)), float(jnp.linalg.norm(flat32)), rtol=0.05)
