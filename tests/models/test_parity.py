"""Parity with transformers' PyTorch models for every supported family.

Each case: a tiny random transformers model saved to disk, loaded by ``models.from_pretrained``;
logits on a LEFT-padded batch, KV-cache decoding, ``save_pretrained`` round trip, bfloat16.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from flax import nnx

from jaxrl_llm import models
from tests.models.conftest import CASES, build_hf_model, forward, hf_logits, left_padded_batch, max_real_diff

F32_TOL = 1e-4


@pytest.fixture(scope="module", params=sorted(CASES))
def case(request, tmp_path_factory):
    name = request.param
    hf = build_hf_model(name)
    path = tmp_path_factory.mktemp(name)
    hf.save_pretrained(path)
    ours = models.from_pretrained(path)
    return name, hf, path, ours


def test_logits_match_transformers_left_padded(case, diff_report):
    name, hf, _, ours = case
    ids, mask = left_padded_batch(hf.config.vocab_size)
    ref = hf_logits(hf, ids, mask)
    got = forward(ours, ids, mask)
    assert got.dtype == jnp.float32 and got.shape == ref.shape
    diff = max_real_diff(got, ref, mask)
    diff_report[f"{name} float32"] = diff
    assert diff < F32_TOL, diff


def test_kv_cache_decoding_matches_full_forward(case, diff_report):
    """Prefill a left-padded prompt, then feed one token per jitted call; every step's logits
    must equal the full forward (and transformers) at the same position."""
    name, hf, _, ours = case
    prompt_len, new_tokens = 6, 6
    ids, mask = left_padded_batch(hf.config.vocab_size, seq=prompt_len + new_tokens, seed=1)
    mask[:, prompt_len:] = 1  # completion tokens are always real
    ids = np.where(mask == 1, np.maximum(ids, 1), 0)
    full = np.asarray(forward(ours, ids, mask))
    ref = hf_logits(hf, ids, mask)

    graphdef, state = nnx.split(ours)

    @jax.jit
    def step(state, cache, tokens, tok_mask):
        return nnx.merge(graphdef, state)(tokens, tok_mask, cache=cache)

    cache = models.init_cache(ours, ids.shape[0], prompt_len + new_tokens)
    logits, cache = step(state, cache, jnp.asarray(ids[:, :prompt_len]), jnp.asarray(mask[:, :prompt_len]))
    pieces = [np.asarray(logits)]
    for t in range(prompt_len, prompt_len + new_tokens):
        logits, cache = step(state, cache, jnp.asarray(ids[:, t : t + 1]), jnp.ones((ids.shape[0], 1), jnp.int32))
        pieces.append(np.asarray(logits))
    assert step._cache_size() == 2  # one prefill shape + one decode shape, not one per position
    assert int(cache.index) == prompt_len + new_tokens
    np.testing.assert_array_equal(np.asarray(cache.valid), mask == 1)
    decoded = np.concatenate(pieces, axis=1)
    diff_full = max_real_diff(decoded, full, mask)
    diff_hf = max_real_diff(decoded, ref, mask)
    diff_report[f"{name} kv-cache vs transformers"] = diff_hf
    assert diff_full < 1e-4, diff_full
    assert diff_hf < F32_TOL, diff_hf


def test_save_pretrained_round_trips_through_transformers(case, tmp_path, diff_report):
    name, hf, _, ours = case
    models.save_pretrained(ours, tmp_path)
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
    reloaded.config._attn_implementation = "eager"
    assert type(reloaded) is type(hf)
    ids, mask = left_padded_batch(hf.config.vocab_size, seed=2)
    diff = max_real_diff(hf_logits(reloaded, ids, mask), hf_logits(hf, ids, mask), mask)
    diff_report[f"{name} save_pretrained round trip"] = diff
    assert diff == 0.0, diff
    again = models.from_pretrained(tmp_path)
    assert max_real_diff(forward(again, ids, mask), forward(ours, ids, mask), mask) == 0.0


def test_bfloat16_parameters_run_close_to_float32(case, diff_report):
    name, hf, path, ours = case
    bf16 = models.from_pretrained(path, dtype=jnp.bfloat16)
    leaves = jax.tree.leaves(nnx.state(bf16, nnx.Param))
    assert all(x.dtype == jnp.bfloat16 for x in leaves)
    ids, mask = left_padded_batch(hf.config.vocab_size, seed=3)
    got = forward(bf16, ids, mask)
    assert got.dtype == jnp.float32
    ref = np.asarray(forward(ours, ids, mask))
    diff = max_real_diff(got, ref, mask)
    diff_report[f"{name} bfloat16 vs float32"] = diff
    # Random tiny models have logits of order 0.1-1; bfloat16 keeps ~3 significant digits.
    assert diff < 0.05 * max(1.0, np.abs(ref).max()), diff
    log_probs = jax.nn.log_softmax(got, axis=-1)
    assert log_probs.dtype == jnp.float32 and bool(jnp.all(jnp.isfinite(log_probs)))


def test_prompt_prefill_fresh_cache_last_position_matches_full_prefill(case):
    """``fresh_cache`` + ``last_position_only`` (the sampler's prefill) leaves the same cache as a plain
    cached prefill, returns the last column's hidden state, and decodes to the same logits."""
    name, hf, _, ours = case
    prompt_len = 8
    ids, mask = left_padded_batch(hf.config.vocab_size, seq=prompt_len + 1, seed=4)
    mask[:, -1] = 1
    ids = np.where(mask == 1, np.maximum(ids, 1), 0)

    @functools.partial(nnx.jit, static_argnums=4)
    def prefill(model, ids, mask, cache, fast):
        return model.hidden_states(ids, mask, None, cache, fresh_cache=fast, last_position_only=fast)

    @nnx.jit
    def decode(model, ids, cache):
        return model(ids, jnp.ones_like(ids), cache=cache)

    prompt, prompt_mask = jnp.asarray(ids[:, :prompt_len]), jnp.asarray(mask[:, :prompt_len])
    empty = models.init_cache(ours, ids.shape[0], prompt_len + 1)
    full_hidden, full_cache = prefill(ours, prompt, prompt_mask, empty, False)
    last_hidden, fast_cache = prefill(ours, prompt, prompt_mask, empty, True)
    assert last_hidden.shape == (ids.shape[0], 1, full_hidden.shape[-1])
    np.testing.assert_allclose(last_hidden[:, 0], full_hidden[:, -1], atol=1e-5)
    valid = np.asarray(full_cache.valid)
    np.testing.assert_array_equal(np.asarray(fast_cache.valid), valid)
    assert int(fast_cache.index) == int(full_cache.index) == prompt_len
    for a, b in zip(full_cache.k + full_cache.v, fast_cache.k + fast_cache.v):
        slots = valid[:, None, :]  # [B, 1, L]: only real tokens' keys/values are ever read
        np.testing.assert_allclose(np.where(slots[..., None], a, 0), np.where(slots[..., None], b, 0), atol=1e-5)
    step = jnp.asarray(ids[:, prompt_len:])
    logits_full, _ = decode(ours, step, full_cache)
    logits_fast, _ = decode(ours, step, fast_cache)
    np.testing.assert_allclose(logits_fast, logits_full, atol=1e-5)
    assert max_real_diff(logits_fast, hf_logits(hf, ids, mask)[:, -1:], mask[:, -1:]) < F32_TOL
