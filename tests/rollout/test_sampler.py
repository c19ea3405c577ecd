"""The KV-cache sampler: greedy parity with the full forward and with transformers, sampling
distribution (chi-square), top-k/top-p, EOS and masks, logprobs, determinism, K-sample layout."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P

from jaxrl_llm.rollout import Rollout, filter_logits, generate, lower_generate, sequence_logprobs
from jaxrl_llm.rollout import engine, sampler

T = 8


def full_logits(model, ids, mask):
    """Float32 logits of the full forward (no cache), numpy."""
    return np.asarray(jax.jit(lambda m, i, a: m(i, a))(model, jnp.asarray(ids), jnp.asarray(mask)))


def concat(rollout: Rollout):
    ids = np.concatenate([np.asarray(rollout.prompt_ids), np.asarray(rollout.tokens)], axis=1)
    mask = np.concatenate([np.asarray(rollout.prompt_mask), np.asarray(rollout.mask)], axis=1)
    return ids, mask


def log_softmax(x):
    x = np.asarray(x, np.float64)
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


# ----------------------------------------------------------------------------- greedy


def test_greedy_equals_stepwise_argmax_of_full_forward(tiny_llama, prompts):
    _, model = tiny_llama
    ids, mask = prompts
    out = generate(model, ids, mask, max_new_tokens=T, rng=jax.random.key(0), temperature=0.0, eos_token_id=None)
    assert out.tokens.shape == (3, T) and out.tokens.dtype == jnp.int32
    np.testing.assert_array_equal(out.mask, 1)
    full_ids, full_mask = concat(out)
    logits = full_logits(model, full_ids, full_mask)[:, ids.shape[1] - 1 : -1]  # predicts completion token t
    np.testing.assert_array_equal(logits.argmax(-1), out.tokens)
    # Greedy logprobs are the log-softmax of the raw logits (temperature 1).
    expected = np.take_along_axis(log_softmax(logits), np.asarray(out.tokens)[..., None], -1)[..., 0]
    np.testing.assert_allclose(out.logprobs, expected, atol=2e-5)
    assert out.temperature == 0.0 and out.logprob_temperature == 1.0


def test_greedy_matches_transformers_generate(tiny_llama, prompts):
    hf, model = tiny_llama
    ids, mask = prompts
    ours = generate(model, ids, mask, max_new_tokens=T, rng=jax.random.key(0), temperature=0.0, eos_token_id=None)
    # Pick EOS ids that the greedy continuations hit at different steps, so rows stop at different times.
    tokens = np.asarray(ours.tokens)
    eos = [int(tokens[0, 2]), int(tokens[1, 5])]
    for eos_token_id in (None, eos):
        ours = generate(model, ids, mask, max_new_tokens=T, rng=jax.random.key(0), temperature=0.0,
                        eos_token_id=eos_token_id, pad_token_id=0)
        with torch.no_grad():
            ref = hf.generate(
                input_ids=torch.tensor(ids, dtype=torch.long), attention_mask=torch.tensor(mask, dtype=torch.long),
                do_sample=False, num_beams=1, max_new_tokens=T, min_new_tokens=0, pad_token_id=0,
                eos_token_id=eos_token_id,
            )[:, ids.shape[1]:].numpy()
        steps = ref.shape[1]  # transformers stops early once every row is done
        np.testing.assert_array_equal(np.asarray(ours.tokens)[:, :steps], ref)
        np.testing.assert_array_equal(np.asarray(ours.tokens)[:, steps:], 0)
    assert np.asarray(ours.mask).sum(1).min() < T  # at least one row stopped early


# ----------------------------------------------------------------------------- sampling distribution


def wilson_hilferty_critical(df: int, z: float) -> float:
    """Upper chi-square quantile for ``df`` degrees of freedom at normal quantile z (Wilson-Hilferty 1931)."""
    return df * (1 - 2 / (9 * df) + z * math.sqrt(2 / (9 * df))) ** 3


def chi_square(counts, probs, min_expected=5.0):
    """Pearson's statistic and degrees of freedom; cells with expected count < min_expected are pooled."""
    expected = probs * counts.sum()
    big = expected >= min_expected
    obs_cells, exp_cells = list(counts[big]), list(expected[big])
    if (~big).any():
        obs_cells.append(counts[~big].sum())
        exp_cells.append(expected[~big].sum())
    obs_cells, exp_cells = np.array(obs_cells, float), np.array(exp_cells)
    return float(((obs_cells - exp_cells) ** 2 / exp_cells).sum()), len(obs_cells) - 1


NUM_DRAWS = 20_000
# z = 3.719 is the standard normal 1 - 1e-4 quantile: a correct sampler fails with probability 1e-4
# for a random seed (the seed is fixed, so the test is deterministic anyway).
Z_ALPHA = 3.719


@pytest.mark.parametrize(
    "temperature,top_k,top_p",
    [(1.0, 0, 1.0), (0.7, 0, 1.0), (1.3, 20, 0.8)],
)
def test_first_token_frequencies_match_the_model(tiny_llama, prompts, temperature, top_k, top_p):
    _, model = tiny_llama
    ids, mask = prompts[0][:1], prompts[1][:1]
    out = generate(model, ids, mask, max_new_tokens=1, rng=jax.random.key(1), num_samples=NUM_DRAWS,
                   temperature=temperature, top_k=top_k, top_p=top_p, eos_token_id=None)
    last = full_logits(model, ids, mask)[0, -1]
    z = np.asarray(filter_logits(last / np.float32(temperature), top_k=top_k, top_p=top_p), np.float64)
    probs = np.exp(log_softmax(z))
    counts = np.bincount(np.asarray(out.tokens[:, 0]), minlength=last.shape[-1])
    kept = np.isfinite(z)
    assert counts[~kept].sum() == 0, "sampled a token outside the top-k/top-p set"
    if top_k:
        assert kept.sum() <= top_k
    stat, df = chi_square(counts[kept], probs[kept])
    critical = wilson_hilferty_critical(df, Z_ALPHA)
    assert df >= 5 and stat < critical, (stat, df, critical)
    # Power: the same draws are clearly rejected against a slightly different temperature.
    wrong = np.exp(log_softmax(z * 1.15))
    wrong_stat, wrong_df = chi_square(counts[kept], wrong[kept])
    assert wrong_stat > 3 * wilson_hilferty_critical(wrong_df, Z_ALPHA), (wrong_stat, wrong_df)
    # The returned logprobs are those of the filtered, tempered distribution.
    np.testing.assert_allclose(out.logprobs[:, 0], np.log(probs[np.asarray(out.tokens[:, 0])]), atol=2e-5)


# ----------------------------------------------------------------------------- filtering


def test_filter_logits_keeps_exactly_the_right_tokens():
    logits = jnp.log(jnp.array([[0.05, 0.4, 0.1, 0.3, 0.15], [0.2, 0.2, 0.2, 0.2, 0.2]]))
    kept = lambda **kw: np.isfinite(np.asarray(filter_logits(logits, **kw)))  # noqa: E731
    np.testing.assert_array_equal(kept(top_k=2)[0], [0, 1, 0, 1, 0])
    np.testing.assert_array_equal(kept(top_k=1)[0], [0, 1, 0, 0, 0])
    np.testing.assert_array_equal(kept(top_k=5)[0], 1)
    np.testing.assert_array_equal(kept(top_k=2)[1], 1)  # ties with the k-th logit are kept
    # Nucleus: sorted masses .4 .3 .15 .1 .05 -> cumulative .4 .7 .85 .95 1.
    np.testing.assert_array_equal(kept(top_p=0.4)[0], [0, 1, 0, 0, 0])
    np.testing.assert_array_equal(kept(top_p=0.41)[0], [0, 1, 0, 1, 0])
    np.testing.assert_array_equal(kept(top_p=0.8)[0], [0, 1, 0, 1, 1])
    np.testing.assert_array_equal(kept(top_p=0.9)[0], [0, 1, 1, 1, 1])
    np.testing.assert_array_equal(kept(top_p=0.01)[0], [0, 1, 0, 0, 0])  # the top token always stays
    np.testing.assert_array_equal(kept(top_p=1.0)[0], 1)
    # top-p after top-k renormalises over the top-k set: {.4, .3, .15} -> .47 .35 .18.
    np.testing.assert_array_equal(kept(top_k=3, top_p=0.8)[0], [0, 1, 0, 1, 0])
    np.testing.assert_array_equal(kept(top_k=3, top_p=0.85)[0], [0, 1, 0, 1, 1])
    # Kept logits are unchanged.
    np.testing.assert_array_equal(filter_logits(logits, top_k=2)[0, 1], logits[0, 1])


# ----------------------------------------------------------------------------- EOS and masks


def test_eos_stops_rows_and_pads_after(tiny_llama, prompts):
    _, model = tiny_llama
    ids, mask = prompts
    key = jax.random.key(3)
    free = generate(model, ids, mask, max_new_tokens=T, rng=key, temperature=0.0, eos_token_id=None)
    free_tokens = np.asarray(free.tokens)
    eos = [int(free_tokens[0, 3]), int(free_tokens[2, 1])]
    out = generate(model, ids, mask, max_new_tokens=T, rng=key, temperature=0.0, eos_token_id=eos, pad_token_id=7)
    hit = np.isin(free_tokens, eos)
    first = np.where(hit.any(1), hit.argmax(1), T - 1)  # index of the first EOS (or the last step)
    expected_mask = (np.arange(T)[None] <= first[:, None]).astype(np.int32)
    assert first[0] <= 3 and first[2] <= 1
    np.testing.assert_array_equal(out.mask, expected_mask)
    np.testing.assert_array_equal(out.tokens, np.where(expected_mask == 1, free_tokens, 7))
    np.testing.assert_array_equal(out.logprobs, np.where(expected_mask == 1, free.logprobs, 0.0))


def test_eos_forced_at_the_first_step_ends_every_row(tiny_llama, prompts):
    _, model = tiny_llama
    ids, mask = prompts
    # A logit bias in the unembedding that makes token 5 overwhelmingly likely at every step.
    biased = jax.tree.map(lambda x: x, model)
    biased.lm_head.kernel[...] = biased.lm_head.kernel[...].at[:, 5].add(1e3)
    out = generate(biased, ids, mask, max_new_tokens=T, rng=jax.random.key(0), num_samples=2, eos_token_id=5)
    np.testing.assert_array_equal(out.tokens[:, 0], 5)
    np.testing.assert_array_equal(out.tokens[:, 1:], 0)
    np.testing.assert_array_equal(out.mask, np.eye(1, T, dtype=np.int32).repeat(6, 0))
    np.testing.assert_allclose(out.logprobs[:, 0], 0.0, atol=1e-5)


# ----------------------------------------------------------------------------- logprobs


@pytest.mark.parametrize("temperature", [1.0, 0.6])
def test_logprobs_equal_full_forward_recomputation(tiny_llama, prompts, temperature):
    _, model = tiny_llama
    ids, mask = prompts
    free = generate(model, ids, mask, max_new_tokens=T, rng=jax.random.key(4), num_samples=2,
                    temperature=temperature, eos_token_id=None)
    eos = int(np.asarray(free.tokens)[1, 2])  # same rng: same draws, so this row now stops at step <= 2
    out = generate(model, ids, mask, max_new_tokens=T, rng=jax.random.key(4), num_samples=2,
                   temperature=temperature, eos_token_id=eos)
    assert out.temperature == temperature and np.asarray(out.mask)[1].sum() <= 3
    full_ids, full_mask = concat(out)
    logits = full_logits(model, full_ids, full_mask)[:, ids.shape[1] - 1 : -1] / temperature
    expected = np.take_along_axis(log_softmax(logits), np.asarray(out.tokens)[..., None], -1)[..., 0]
    expected = np.where(np.asarray(out.mask) == 1, expected, 0.0)
    np.testing.assert_allclose(out.logprobs, expected, atol=2e-5)
    np.testing.assert_allclose(sequence_logprobs(model, out), out.logprobs, atol=2e-5)
    np.testing.assert_allclose(sequence_logprobs(model, out, chunk_size=5), out.logprobs, atol=2e-5)
    # An explicit different temperature gives a different (and correct) answer.
    other = np.take_along_axis(log_softmax(logits * temperature), np.asarray(out.tokens)[..., None], -1)[..., 0]
    np.testing.assert_allclose(
        sequence_logprobs(model, out, temperature=1.0), np.where(np.asarray(out.mask) == 1, other, 0.0), atol=2e-5
    )


# ----------------------------------------------------------------------------- determinism, layout, compile


def traces() -> int:
    """Traces of the sampler's programs: the one loop's and the engine's decode chunks."""
    return sampler._TRACE_COUNT + engine._TRACE_COUNT


def test_deterministic_for_a_fixed_rng_and_compiled_once(tiny_llama, prompts):
    _, model = tiny_llama
    ids, mask = prompts
    kwargs = dict(max_new_tokens=T, num_samples=2, temperature=0.8, eos_token_id=[1, 2])
    a = generate(model, ids, mask, rng=jax.random.key(7), **kwargs)
    traced = traces()
    b = generate(model, ids, mask, rng=jax.random.key(7), **kwargs)
    c = generate(model, ids, mask, rng=jax.random.key(8), **kwargs)
    d = generate(model, ids, mask, rng=jax.random.PRNGKey(7), **kwargs)  # legacy raw key
    assert traces() == traced, "same shapes and options must reuse the compiled function"
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_array_equal(x, y)
    np.testing.assert_array_equal(a.tokens, d.tokens)
    assert not np.array_equal(a.tokens, c.tokens)


def test_lower_generate_is_the_one_loop_program_generate_runs_inside_jit(tiny_llama, prompts):
    """lower_generate lowers the one-loop program: generate's inside a caller's jit (and under a
    mesh); its samples are the engine's."""
    _, model = tiny_llama
    ids, mask = prompts
    kwargs = dict(max_new_tokens=T, num_samples=2, temperature=0.8, eos_token_id=[1, 2], rng=jax.random.key(3))
    lowered = lower_generate(model, ids, mask, **kwargs)
    compiled = lowered.compile()
    assert " while(" in compiled.as_text(), "prefill + decode loop in one program"
    traced = traces()
    inside_jit = jax.jit(lambda ids, mask: generate(model, ids, mask, **kwargs).tokens)(ids, mask)
    assert traces() == traced, "generate inside jit must reuse the trace lower_generate made"
    rollout = generate(model, ids, mask, **kwargs)
    np.testing.assert_array_equal(inside_jit, rollout.tokens)
    with pytest.raises(ValueError, match="max_new_tokens: got 0"):
        lower_generate(model, ids, mask, **{**kwargs, "max_new_tokens": 0})
    with pytest.raises(TypeError, match="top_q"):
        lower_generate(model, ids, mask, top_q=0.5, **kwargs)
    assert rollout.tokens.shape == (6, T)


def test_samples_are_laid_out_prompt_major(tiny_llama, prompts):
    _, model = tiny_llama
    ids, mask = prompts
    k = 2
    out = generate(model, ids, mask, max_new_tokens=T, rng=jax.random.key(0), num_samples=k, eos_token_id=None)
    assert out.tokens.shape == out.mask.shape == out.logprobs.shape == (6, T) and out.num_samples == k
    np.testing.assert_array_equal(out.prompt_ids, np.repeat(ids, k, axis=0))
    np.testing.assert_array_equal(out.prompt_mask, np.repeat(mask, k, axis=0))
    tokens = np.asarray(out.tokens).reshape(3, k, T)
    assert all(len({tuple(s) for s in group}) == k for group in tokens), "K samples of a prompt should differ"
    # Each sample continues its own prompt: its logprobs are right only under that prompt.
    np.testing.assert_allclose(sequence_logprobs(model, out), out.logprobs, atol=2e-5)
    # Greedy: each group of K repeats its own prompt's single greedy continuation.
    greedy = generate(model, ids, mask, max_new_tokens=T, rng=jax.random.key(0), num_samples=k,
                      temperature=0.0, eos_token_id=None)
    single = generate(model, ids, mask, max_new_tokens=T, rng=jax.random.key(0), temperature=0.0, eos_token_id=None)
    np.testing.assert_array_equal(greedy.tokens, np.repeat(np.asarray(single.tokens), k, axis=0))


def test_a_batch_sampled_in_parts_with_row_offsets_is_the_whole_batch(tiny_llama, prompts):
    """Row r draws from fold_in(rng, row_offset + r) alone: prompts i:j sampled by themselves with
    row_offset = i * K are exactly rows i*K:j*K of the whole batch's rollout, so micro-batches
    change no completion; the offset is traced (one compilation for every part)."""
    _, model = tiny_llama
    ids, mask = (np.tile(x, (2, 1)) for x in prompts)  # 6 prompts, the 3 padding widths twice
    kwargs = dict(max_new_tokens=T, rng=jax.random.key(4), num_samples=2, temperature=1.0, eos_token_id=[3, 17])
    whole = generate(model, ids, mask, **kwargs)
    parts = [generate(model, ids[:2], mask[:2], row_offset=0, **kwargs)]
    traced = traces()
    parts += [generate(model, ids[i:i + 2], mask[i:i + 2], row_offset=2 * i, **kwargs) for i in (2, 4)]
    assert traces() == traced
    for name in ("tokens", "mask"):
        np.testing.assert_array_equal(np.concatenate([getattr(p, name) for p in parts]), getattr(whole, name))
    # XLA promises no batch-invariant rounding: a batch of 4 rows and one of 12 may reduce in
    # another order (jax 0.12 does, by one float32 ulp), so the numbers agree to float32 rounding.
    np.testing.assert_allclose(np.concatenate([p.logprobs for p in parts]), whole.logprobs, rtol=1e-6, atol=1e-6)
    # The same prompts at another offset draw other numbers (rows 6-9 repeat rows 0-3's prompts).
    assert not np.array_equal(parts[0].tokens, parts[2].tokens[:4])


def test_rollout_is_a_pytree_that_jit_passes_through(tiny_llama, prompts):
    _, model = tiny_llama
    out = generate(model, *prompts, max_new_tokens=T, rng=jax.random.key(0), temperature=0.0, eos_token_id=None)
    again = jax.jit(lambda r: r)(out)
    assert isinstance(again, Rollout) and again.temperature == 0.0 and len(jax.tree.leaves(again)) == 5


# ----------------------------------------------------------------------------- devices


def mesh_of(num_devices, axis_type=AxisType.Auto):
    if jax.device_count() < num_devices:  # e.g. one GPU: the fake CPU devices are not the default backend
        pytest.skip(f"needs {num_devices} devices of the default backend, has {jax.device_count()}")
    return jax.make_mesh((num_devices,), ("batch",), axis_types=(axis_type,), devices=jax.devices()[:num_devices])


@pytest.mark.parametrize("num_devices,axis_type", [(2, AxisType.Auto), (4, AxisType.Auto), (4, AxisType.Explicit)])
def test_split_over_a_mesh_equals_one_device(tiny_llama, prompts, num_devices, axis_type):
    """Each device samples its own prompts' rows; the random draws belong to rows, so the rollout
    is the one a single device gives, and comes back split over the mesh by rows. Explicit axes
    are `jax.make_mesh`'s default."""
    _, model = tiny_llama
    ids, mask = (np.tile(x, (4, 1)) for x in prompts)  # 12 prompts: 3 different padding widths, 4 times
    kwargs = dict(max_new_tokens=T, rng=jax.random.key(5), num_samples=2, temperature=0.9, eos_token_id=[3, 17])
    one = generate(model, ids, mask, **kwargs)
    mesh = mesh_of(num_devices, axis_type)
    split = generate(model, ids, mask, mesh=mesh, **kwargs)
    assert 0 < int(np.asarray(one.mask).sum()) < one.mask.size, "some rows should stop at EOS"
    np.testing.assert_array_equal(split.tokens, one.tokens)
    np.testing.assert_array_equal(split.mask, one.mask)
    np.testing.assert_allclose(split.logprobs, one.logprobs, atol=1e-5)
    np.testing.assert_array_equal(split.prompt_ids, one.prompt_ids)
    assert split.tokens.sharding.mesh == mesh and not split.tokens.sharding.is_fully_replicated
    # Prompts already split over a mesh: the sampler follows their sharding.
    sharded = jax.device_put((ids, mask), NamedSharding(mesh, P("batch")))
    follow = generate(model, *sharded, **kwargs)
    np.testing.assert_array_equal(follow.tokens, one.tokens)
    assert follow.tokens.sharding.mesh == mesh


def test_mesh_errors_name_the_argument(tiny_llama, prompts):
    _, model = tiny_llama
    ids, mask = prompts  # 3 prompts
    kwargs = dict(max_new_tokens=2, rng=jax.random.key(0), eos_token_id=None)
    with pytest.raises(ValueError, match="prompt_ids: got 3 prompts, expected a multiple of the 2 devices"):
        generate(model, ids, mask, mesh=mesh_of(2), **kwargs)
    with pytest.raises(ValueError, match="mesh: got list"):
        generate(model, ids, mask, mesh=jax.devices()[:2], **kwargs)


# ----------------------------------------------------------------------------- errors


@pytest.mark.parametrize(
    "change,match",
    [
        (dict(max_new_tokens=0), "max_new_tokens: got 0"),
        (dict(max_new_tokens=2.5), "max_new_tokens: got 2.5"),
        (dict(temperature=-0.1), "temperature: got -0.1"),
        (dict(top_p=0.0), "top_p: got 0.0"),
        (dict(top_p=1.5), "top_p: got 1.5"),
        (dict(top_k=-1), "top_k: got -1"),
        (dict(num_samples=0), "num_samples: got 0"),
        (dict(eos_token_id="x"), "eos_token_id: got 'x'"),
        (dict(eos_token_id=1000), "eos_token_id: got 1000, expected a token id in"),
        (dict(prompt_mask=np.ones((3, 6), np.int32)), r"prompt_mask: got shape \(3, 6\)"),
        (dict(prompt_ids=np.ones((3, 7), np.float32)), "prompt_ids: got dtype float32"),
        (dict(prompt_ids=np.ones((7,), np.int32), prompt_mask=np.ones((7,), np.int32)), r"prompt_ids: got shape \(7,\)"),
        (dict(prompt_mask=np.tile([1, 1, 1, 1, 1, 1, 0], (3, 1))), "LEFT-padded"),
        (dict(rng=np.zeros(3, np.uint32)), "rng: got shape"),
    ],
)
def test_bad_arguments_raise_value_error(tiny_llama, prompts, change, match):
    _, model = tiny_llama
    ids, mask = prompts
    kwargs = dict(prompt_ids=ids, prompt_mask=mask, max_new_tokens=2, rng=jax.random.key(0), eos_token_id=None)
    kwargs.update(change)
    with pytest.raises(ValueError, match=match):
        generate(model, **kwargs)


def test_sequence_logprobs_rejects_bad_temperature(tiny_llama, prompts):
    _, model = tiny_llama
    out = generate(model, *prompts, max_new_tokens=T, rng=jax.random.key(0), temperature=0.0, eos_token_id=None)
    with pytest.raises(ValueError, match="temperature: got 0"):
        sequence_logprobs(model, out, temperature=0)


def test_inverse_cdf_sample_never_picks_a_zero_weight_index():
    rng = np.random.RandomState(0)
    weights = rng.rand(512, 300).astype(np.float32) * (rng.rand(512, 300) < 0.1)  # ~90% zeros
    weights[:, 299] = 0.0  # a zero tail and zero block padding
    weights[:, rng.randint(0, 299, 512)] += 1e-3  # every row has mass
    uniform = np.concatenate([[0.0, np.nextafter(np.float32(1), np.float32(0))], rng.rand(510)]).astype(np.float32)
    index, total = jax.jit(sampler.inverse_cdf_sample)(jnp.asarray(weights), jnp.asarray(uniform))
    index = np.asarray(index)
    assert (weights[np.arange(512), index] > 0).all()
    np.testing.assert_allclose(total, weights.sum(1), rtol=1e-5)
    # u -> 0 takes the last positive index, u -> 1 the first: the map from u to the index is monotone.
    cdf = np.cumsum(weights.astype(np.float64), axis=1)
    expected = (cdf < (cdf[:, -1] * (1 - uniform.astype(np.float64)))[:, None]).sum(1)
    assert (index == expected).mean() > 0.99
