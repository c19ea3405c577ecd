"""jit, vmap, and 4 fake CPU devices under shard_map, pmap and jit+NamedSharding all
agree with the single-device answer on the whole batch: loss, metrics and gradients."""

from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P

import jaxrl_llm
from _batches import random_batch
from tests._tolerances import float32_tolerance

DEVICES = 4
N, T, D, V, K = 16, 5, 3, 7, 4
# Sums over the N * T tokens (and the V logits) in another order: devices, micro-batches, vmap.
TOLERANCE = float32_tolerance(N * T, V)


def make_problem(seed=0):
    rng = np.random.default_rng(seed)
    b = random_batch(rng, n=N, t=T)
    b["features"] = rng.normal(size=(N, T, D)).astype(np.float32)
    b["tokens"] = rng.integers(0, V, size=(N, T)).astype(np.int32)
    b["advantages"] = rng.normal(size=(N, T)).astype(np.float32)
    params = {"w": jnp.asarray(rng.normal(size=(D, V)), jnp.float32)}
    return params, b


def policy_logprobs(params, b):
    logits = b["features"] @ params["w"]
    return jaxrl_llm.token_logprobs(logits, b["tokens"], temperature=0.9, chunk_size=8)


LOSSES = {
    "reinforce": lambda lp, b, ax: jaxrl_llm.reinforce_loss(
        lp, b["ref_logprobs"], b["scores"], b["mask"], kl_coef=0.05, axis_name=ax),
    "reinforce-token-mean": lambda lp, b, ax: jaxrl_llm.reinforce_loss(
        lp, b["ref_logprobs"], b["scores"], b["mask"], kl_coef=0.05, aggregation="token-mean", axis_name=ax),
    "rloo": lambda lp, b, ax: jaxrl_llm.rloo_loss(
        lp, b["ref_logprobs"], b["scores"], b["mask"], num_samples=K, kl_coef=0.05, axis_name=ax),
    "ppo": lambda lp, b, ax: jaxrl_llm.ppo_loss(
        lp, b["old_logprobs"], jaxrl_llm.whiten(b["advantages"], b["mask"], axis_name=ax), b["mask"],
        values=b["values"], old_values=b["old_values"], returns=b["returns"], axis_name=ax),
    "grpo": lambda lp, b, ax: jaxrl_llm.grpo_loss(
        lp, b["old_logprobs"], b["ref_logprobs"],
        jaxrl_llm.grpo_advantages(b["scores"], num_samples=K, scale="batch", axis_name=ax), b["mask"],
        axis_name=ax),
    "raft": lambda lp, b, ax: jaxrl_llm.raft_loss(lp, b["scores"], b["mask"], num_samples=K, axis_name=ax),
}


def loss_fn(params, b, name, axis_name=None):
    return LOSSES[name](policy_logprobs(params, b), b, axis_name)


def single_device(params, b, name):
    (loss, aux), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, b, name)
    return loss, jaxrl_llm.summarize(aux), grads


def assert_same(result, expected):
    loss, metrics, grads = result
    np.testing.assert_allclose(loss, expected[0], rtol=2e-5, atol=TOLERANCE)
    for key, value in expected[1].items():
        np.testing.assert_allclose(metrics[key], value, rtol=2e-5, atol=TOLERANCE, err_msg=key)
    np.testing.assert_allclose(grads["w"], expected[2]["w"], rtol=2e-5, atol=TOLERANCE)


def shard(b):
    return jax.tree.map(lambda x: x.reshape(DEVICES, -1, *x.shape[1:]), b)


@pytest.fixture(scope="module", autouse=True)
def _need_devices():
    if jax.device_count() < DEVICES:
        pytest.skip(f"needs {DEVICES} devices (XLA_FLAGS=--xla_force_host_platform_device_count={DEVICES})")


@pytest.mark.parametrize("name", list(LOSSES))
def test_jit_equals_eager(name):
    params, b = make_problem()
    expected = single_device(params, b, name)
    assert_same(jax.jit(single_device, static_argnums=2)(params, b, name), expected)


@pytest.mark.parametrize("name", list(LOSSES))
def test_pmap_equals_single_device(name):
    params, b = make_problem()
    expected = single_device(params, b, name)

    @partial(jax.pmap, axis_name="data", in_axes=(None, 0))
    def step(params, local):
        (loss, aux), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, local, name, "data")
        # Each device's gradient is its share of the global one.
        return loss, aux, jax.lax.psum(grads, "data")

    loss, aux, grads = step(params, shard(b))
    np.testing.assert_allclose(loss, np.full(DEVICES, expected[0]), rtol=2e-5, atol=1e-6)
    aux0, grads0 = jax.tree.map(lambda x: x[0], (aux, grads))
    assert_same((loss[0], jaxrl_llm.summarize(aux0), grads0), expected)


def data_mesh():
    return jax.make_mesh((DEVICES,), ("data",), axis_types=(AxisType.Auto,))


@pytest.mark.parametrize("name", list(LOSSES))
def test_shard_map_equals_single_device(name):
    params, b = make_problem()
    expected = single_device(params, b, name)
    mesh = data_mesh()

    @jax.jit
    @partial(jax.shard_map, mesh=mesh, in_specs=(P(), P("data")), out_specs=(P("data"), P(), P()))
    def step(params, local):
        (loss, aux), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, local, name, "data")
        # Parameters are replicated (not varying over "data"), so JAX sums their
        # gradient over the axis itself: no explicit psum here. The loss carries
        # this shard's gradient, so its type varies over "data" though its value
        # is the global loss on every device.
        return loss[None], aux, grads

    loss, aux, grads = step(params, b)
    np.testing.assert_allclose(loss, np.full(DEVICES, expected[0]), rtol=2e-5, atol=1e-6)
    assert_same((loss[0], jaxrl_llm.summarize(aux), grads), expected)


@pytest.mark.parametrize("name", ["rloo", "ppo", "grpo"])
def test_jit_with_named_sharding_equals_single_device(name):
    params, b = make_problem()
    expected = single_device(params, b, name)
    mesh = data_mesh()
    b_sharded = jax.device_put(b, NamedSharding(mesh, P("data")))
    params_replicated = jax.device_put(params, NamedSharding(mesh, P()))
    result = jax.jit(single_device, static_argnums=2)(params_replicated, b_sharded, name)
    assert_same(result, expected)


@pytest.mark.parametrize("name", ["reinforce", "ppo", "grpo"])
def test_vmap_with_axis_name_equals_single_device(name):
    """`vmap` with an axis name runs the same collectives: a cheap stand-in for devices."""
    params, b = make_problem()
    expected = single_device(params, b, name)

    def local_step(local):
        (loss, aux), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, local, name, "data")
        return loss, aux, grads

    loss, aux, grads = jax.vmap(local_step, axis_name="data")(shard(b))
    grads = jax.tree.map(lambda g: g.sum(0), grads)
    aux0 = jax.tree.map(lambda x: x[0], aux)
    assert_same((loss[0], jaxrl_llm.summarize(aux0), grads), expected)


def test_vmap_over_independent_batches_equals_a_loop():
    batches = [make_problem(seed)[1] for seed in range(3)]
    stacked = jax.tree.map(lambda *xs: jnp.stack(xs), *batches)
    fn = lambda b: jaxrl_llm.rloo_loss(b["logprobs"], b["ref_logprobs"], b["scores"], b["mask"], num_samples=K)[0]
    np.testing.assert_allclose(jax.vmap(fn)(stacked), [fn(b) for b in batches], rtol=TOLERANCE, atol=TOLERANCE)


def test_micro_batches_aggregate_exactly():
    """Summing `Stat`s of micro-batches gives the full-batch metrics; passing the global
    denominator makes the micro-batch losses add up to the full-batch loss."""
    _, b = make_problem()
    full_loss, full_aux = jaxrl_llm.ppo_loss(b["logprobs"], b["old_logprobs"], b["advantages"], b["mask"])
    total_tokens = b["mask"].sum()
    halves = [jax.tree.map(lambda x: x[:8], b), jax.tree.map(lambda x: x[8:], b)]
    losses, auxes = [], []
    for half in halves:
        per_token, *_ = jaxrl_llm.clipped_surrogate(
            jnp.asarray(half["logprobs"]), jnp.asarray(half["old_logprobs"]), jnp.asarray(half["advantages"]))
        loss, _ = jaxrl_llm.aggregate_loss(per_token, half["mask"], denominator=total_tokens)
        losses.append(loss)
        auxes.append(jaxrl_llm.ppo_loss(half["logprobs"], half["old_logprobs"], half["advantages"], half["mask"])[1])
    merged = jax.tree.map(jnp.add, *auxes)
    np.testing.assert_allclose(sum(losses), full_loss, rtol=TOLERANCE, atol=TOLERANCE)
    for key in full_aux:
        np.testing.assert_allclose(merged[key].mean, full_aux[key].mean, rtol=1e-5, atol=TOLERANCE, err_msg=key)
        np.testing.assert_allclose(merged[key].std, full_aux[key].std, rtol=1e-4, atol=1e-6, err_msg=key)
