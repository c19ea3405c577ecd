"""The rollout engine (``jaxrl_llm.rollout.engine``): the same samples as the one-loop sampler, and a
step's work that follows the live rows and the tokens that exist.

* equality: for every model family, sampling option and ``slots``, ``generate`` (the engine)
  returns the tokens of the one-loop sampler (``sampler._one_loop_program``, what ``generate`` ran
  before the engine and still runs under a mesh) and its log-probabilities to float32 rounding;
* the schedule: each decode chunk's slots and cache length stay within 2x of its live rows and
  of the longest of them, with lengths imposed through the uniforms;
* XLA's cost analysis of the compiled decode step: its own-cache work grows with slots x cache
  length, and its prompt work with prompt entries x prompt length, not with the slots (the K
  samples of a prompt read its keys once).
"""

import functools
import inspect

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from jaxrl_llm import models
from jaxrl_llm.errors import UserError
from jaxrl_llm.rollout import engine, generate, sampler, sequence_logprobs
from jaxrl_llm.rollout.sampler import generate_with_schedule
from tests.models.conftest import build_hf_model

T = 40  # crosses the smallest cache bucket (32): the completion caches grow once
K = 3
FAMILIES = ("llama", "gemma3_sliding", "mistral_window_linear_rope", "qwen3_qknorm", "gpt_neox_parallel",
            "qwen2_bias")
OPTIONS = {
    "sampling": dict(temperature=1.0),
    "top_k_top_p": dict(temperature=0.8, top_k=20, top_p=0.9),
    "greedy": dict(temperature=0.0),
}


@functools.lru_cache(maxsize=None)
def family_model(name, tmp_root, *, sharpen=True):
    """Our model of family ``name`` (tiny, random). ``sharpen`` scales the output embedding so the
    next-token distributions are far from uniform (sampling tests then have power)."""
    hf = build_hf_model(name)
    if sharpen:  # tied embeddings scale the inputs too: less
        with torch.no_grad():
            hf.get_output_embeddings().weight.mul_(3.0 if hf.config.tie_word_embeddings else 8.0)
    path = f"{tmp_root}/{name}_{int(sharpen)}"
    hf.save_pretrained(path)
    return models.from_pretrained(path)


@pytest.fixture(scope="module")
def tmp_root(tmp_path_factory):
    return str(tmp_path_factory.mktemp("engine_models"))


def prompt_batch(vocab, batch=5, width=9, seed=0):
    """Left-padded prompts [batch, width] (0, 2, 4, ... pad tokens) and their mask."""
    rng = np.random.RandomState(seed)
    ids = rng.randint(1, vocab, (batch, width)).astype(np.int32)
    mask = np.ones_like(ids)
    for row in range(batch):
        mask[row, :(2 * row) % width] = 0
    return np.where(mask == 1, ids, 0), mask


def one_loop(model, ids, mask, **kwargs):
    """The one-loop sampler on one device, for ``generate``'s arguments."""
    arguments = inspect.signature(generate).bind(model, ids, mask, **kwargs)
    arguments.apply_defaults()
    fn, args = sampler._one_loop_program(model, sampler.check_sampling_arguments(arguments.arguments))
    return fn(*args)


def stop_token(tokens):
    """A token whose first occurrences end the rows at the most distinct lengths (some rows never)."""
    tokens = np.asarray(tokens)
    best, best_count = None, -1
    for token in np.unique(tokens):
        hit = tokens == token
        lengths = np.where(hit.any(axis=1), hit.argmax(axis=1) + 1, tokens.shape[1])
        if not (lengths == tokens.shape[1]).any():
            continue
        count = len(set(lengths.tolist()))
        if count > best_count:
            best, best_count = int(token), count
    return best


def assert_same_samples(model, ids, mask, *, slots_values, **kwargs):
    """The engine equals the one-loop sampler for each ``slots``, with an EOS that ends the rows at
    varied lengths; returns the engine's last rollout."""
    kwargs = dict(max_new_tokens=T, rng=jax.random.key(3), num_samples=K, **kwargs)
    free_running = one_loop(model, ids, mask, eos_token_id=None, **kwargs)
    eos = stop_token(free_running.tokens)
    reference = one_loop(model, ids, mask, eos_token_id=eos, **kwargs)
    lengths = np.asarray(reference.mask).sum(axis=1)
    assert len(set(lengths.tolist())) >= 3 and lengths.min() < T, f"lengths too uniform to test: {lengths}"
    for slots in slots_values:
        out = generate(model, ids, mask, eos_token_id=eos, slots=slots, **kwargs)
        np.testing.assert_array_equal(out.tokens, reference.tokens, err_msg=f"slots={slots}")
        np.testing.assert_array_equal(out.mask, reference.mask, err_msg=f"slots={slots}")
        np.testing.assert_allclose(out.logprobs, reference.logprobs, rtol=2e-5, atol=2e-5, err_msg=f"slots={slots}")
    return out


@pytest.mark.parametrize("option", list(OPTIONS))
def test_engine_samples_equal_the_one_loop_samplers_for_every_option_and_slots(tmp_root, option):
    model = family_model("llama", tmp_root)
    ids, mask = prompt_batch(160)
    # slots: all 15 rows at once, 4 (refills from the queue; a prompt's samples split over
    # chunks) and K (one prompt at a time).
    assert_same_samples(model, ids, mask, slots_values=(None, 4, K), **OPTIONS[option])


@pytest.mark.parametrize("family", [f for f in FAMILIES if f != "llama"])
def test_engine_samples_equal_the_one_loop_samplers_for_every_family(tmp_root, family):
    """Sliding windows (Gemma 3, Mistral: window 4, shorter than the prompts), Gemma's soft-caps,
    q/k norms, partial rotary and parallel residuals (GPT-NeoX), tied embeddings with biases."""
    model = family_model(family, tmp_root)
    ids, mask = prompt_batch(160)
    out = assert_same_samples(model, ids, mask, slots_values=(None, 4), **OPTIONS["top_k_top_p"])
    # The sampler's log-probabilities are still the training forward's.
    np.testing.assert_allclose(sequence_logprobs(model, out), out.logprobs, atol=5e-5)


def test_row_offset_and_stop_token_sets_in_the_engine(tmp_root):
    """Prompts 2:5 sampled alone with row_offset 2*K give rows 6:15 of the whole batch; any of
    several EOS ids ends a row."""
    model = family_model("llama", tmp_root)
    ids, mask = prompt_batch(160)
    kwargs = dict(max_new_tokens=T, rng=jax.random.key(5), num_samples=K, temperature=1.0, eos_token_id=[3, 17, 40])
    whole = generate(model, ids, mask, slots=5, **kwargs)
    part = generate(model, ids[2:], mask[2:], row_offset=2 * K, slots=4, **kwargs)
    np.testing.assert_array_equal(part.tokens, np.asarray(whole.tokens)[2 * K:])
    reference = one_loop(model, ids, mask, **kwargs)
    np.testing.assert_array_equal(whole.tokens, reference.tokens)


# ----------------------------------------------------------------------------- the schedule


def lognormal_uniforms(lengths, steps, seed=0):
    """[T, N] uniforms under which row r ends (token 0) after exactly lengths[r] tokens: the sampler
    picks the token whose running mass crosses 1 - u, so u just below 1 picks token 0, and u <= 0.9
    never does while token 0's probability is below 0.1."""
    u = np.random.default_rng(seed).random((steps, len(lengths)), dtype=np.float32) * np.float32(0.9)
    ends = lengths < steps
    u[lengths[ends] - 1, np.flatnonzero(ends)] = np.float32(1.0) - np.float32(2.0 ** -24)
    return u


@pytest.mark.parametrize("slots", [None, 8])
def test_the_work_of_each_chunk_follows_the_live_rows(tmp_root, slots, monkeypatch):
    """Long-tailed lengths (lognormal; a few rows ~10x the median): each chunk's slots are at most
    2x its live rows (or the floor) and its completion cache at most 2x the longest live row (or
    the smallest bucket); the samples still equal the one-loop sampler's."""
    monkeypatch.setattr(engine, "_SMALL_CACHE", 64)  # past 64 tokens: down to one slot, finer buckets
    model = family_model("llama", tmp_root, sharpen=False)  # near-uniform: token 0 only when imposed
    steps, n_prompts, k = 160, 6, 4
    ids, mask = prompt_batch(160, batch=n_prompts)
    lengths = np.clip(np.round(np.exp(np.random.default_rng(1).normal(np.log(14), 1.0, n_prompts * k))), 1, steps)
    lengths = lengths.astype(np.int64)
    lengths[5] = steps - 10  # a straggler from the first prompt: the cache grows past 128
    uniforms = lognormal_uniforms(lengths, steps)
    kwargs = dict(max_new_tokens=steps, rng=jax.random.key(0), num_samples=k, temperature=1.0, eos_token_id=0)
    out, schedule = generate_with_schedule(model, ids, mask, uniforms=uniforms, slots=slots, **kwargs)
    np.testing.assert_array_equal(np.asarray(out.mask).sum(axis=1), lengths)
    for chunk in schedule:
        assert chunk.slots <= max(engine.slot_floor(chunk.own_length), 2 * chunk.live_rows), (chunk, schedule)
        assert chunk.own_length <= max(engine._MIN_BUCKET, 2 * chunk.longest_row), (chunk, schedule)
        assert chunk.pool_entries <= 2 * -(-(slots or n_prompts * k) // k)
    assert min(c.slots for c in schedule) == 1 and max(c.own_length for c in schedule) > 128, schedule
    computed = sum(c.slots * c.steps for c in schedule)
    assert computed <= 2.5 * lengths.sum(), (computed, lengths.sum(), schedule)
    # Same samples through all that resizing: the one-loop sampler, the same uniforms.
    arguments = inspect.signature(generate).bind(model, ids, mask, **kwargs)
    arguments.apply_defaults()
    checked = sampler.check_sampling_arguments(arguments.arguments)
    tokens, mask_ref, logprobs = jax.jit(functools.partial(sampler._sample_rows, checked.opts))(
        model, ids, mask, jnp.asarray(uniforms), checked.params)
    np.testing.assert_array_equal(out.tokens, tokens)
    np.testing.assert_allclose(out.logprobs, logprobs, rtol=2e-5, atol=2e-5)


# ----------------------------------------------------------------------------- XLA's cost analysis


def decode_step_cost(model, opts, params, *, slots, own_length, entries, prompt_len, k=4, rows=64, steps=64):
    """(flops, bytes accessed) XLA counts for the compiled decode chunk (its loop body once)."""
    pool = jax.eval_shape(lambda: engine._empty_pool(model, entries, prompt_len, jnp.float32))
    state = jax.eval_shape(lambda: engine._empty_slots(model, slots, own_length, jnp.float32))
    spec = jax.ShapeDtypeStruct
    out = engine.Outputs(spec((rows, steps), jnp.int32), spec((rows, steps), jnp.float32), spec((rows,), jnp.int32))
    per_slot = spec((slots,), jnp.int32)
    lowered = jax.jit(functools.partial(engine._decode_impl, opts)).lower(
        model, pool, state, out, spec((steps, rows), jnp.float32), params, (per_slot,) * 3,
        spec((entries, k), jnp.int32), jnp.int32(0))
    cost = lowered.compile().cost_analysis()
    cost = cost[0] if isinstance(cost, list) else cost
    return cost["flops"], cost["bytes accessed"]


def test_cost_analysis_own_work_follows_slots_times_cache_and_prompt_work_follows_entries(tmp_root):
    model = family_model("llama", tmp_root)
    ids, mask = prompt_batch(160, batch=2)
    arguments = inspect.signature(generate).bind(model, ids, mask, max_new_tokens=64, rng=jax.random.key(0),
                                                 num_samples=4, eos_token_id=None)
    arguments.apply_defaults()
    checked = sampler.check_sampling_arguments(arguments.arguments)
    cost = functools.partial(decode_step_cost, model, checked.opts, checked.params)
    base = dict(slots=8, own_length=64, entries=4, prompt_len=16)
    at = lambda **change: np.array(cost(**{**base, **change}))  # noqa: E731
    c0 = at()
    longer = at(own_length=128) - c0
    longer_twice_the_slots = at(slots=16, own_length=128) - at(slots=16)
    # Doubling the cache adds work in proportion to the slots: slots x cache length.
    np.testing.assert_allclose(longer_twice_the_slots, 2 * longer, rtol=0.02)
    assert (longer > 0).all()
    # The prompt part: longer prompts add the same work whatever the number of slots (the
    # samples of a prompt share one read of its keys), and in proportion to the entries.
    longer_prompt = at(prompt_len=32) - c0
    longer_prompt_twice_the_slots = at(slots=16, prompt_len=32) - at(slots=16)
    np.testing.assert_allclose(longer_prompt_twice_the_slots, longer_prompt, rtol=0.02)
    more_entries_longer_prompt = at(entries=8, prompt_len=32) - at(entries=8)
    np.testing.assert_allclose(more_entries_longer_prompt[0], 2 * longer_prompt[0], rtol=0.05)  # flops
    assert more_entries_longer_prompt[1] > 1.2 * longer_prompt[1]  # bytes: XLA's fusions count reads unevenly


# ----------------------------------------------------------------------------- bad input


def test_slots_below_num_samples_or_not_an_integer_is_a_clear_error(tmp_root):
    model = family_model("llama", tmp_root)
    ids, mask = prompt_batch(160, batch=2)
    kwargs = dict(max_new_tokens=4, rng=jax.random.key(0), num_samples=4, eos_token_id=None)
    for bad in (2, 0, 4.5, True, "8"):
        with pytest.raises(UserError, match=r"slots: got .*expected an integer >= num_samples \(4\)"):
            generate(model, ids, mask, slots=bad, **kwargs)
    with pytest.raises(UserError, match=r"uniforms: got shape \(3, 8\), expected"):
        generate_with_schedule(model, ids, mask, uniforms=np.zeros((3, 8), np.float32), **kwargs)
