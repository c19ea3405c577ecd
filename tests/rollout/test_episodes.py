"""Multi-turn episodes over one continued KV cache: what the policy sampled is what one forward
pass over the whole transcript computes, observations sit in the context with mask 0, and the
turn / budget / stop rules hold."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxrl_llm.errors import UserError
from jaxrl_llm.rollout import generate
from jaxrl_llm.rollout.episodes import compact_cache, sample_episodes
from jaxrl_llm.rollout.sampler import Rollout, sequence_logprobs


class Echo:
    """Answers each turn with `sizes[turn]` copies of (5 + its row), then ends the episode."""

    def __init__(self, row, sizes=(2, 3)):
        self.row, self.sizes, self.turn, self.seen = row, sizes, 0, []

    def step(self, text):
        self.seen.append(text)
        self.turn += 1
        return None if self.turn > len(self.sizes) else [5 + self.row] * self.sizes[self.turn - 1]


def episodes(model, prompts, *, n_envs=6, make=Echo, **options):
    ids, mask = prompts
    envs = [make(r) for r in range(options.get("row_offset", 0), options.get("row_offset", 0) + n_envs)]
    options = dict(max_turns=4, max_total_tokens=40, max_new_tokens=6, rng=jax.random.key(0), num_samples=2,
                   temperature=1.0, eos_token_id=[3], stop_sequences=[[7], [8, 9]], pad_token_id=0) | options
    return sample_episodes(model, ids, mask, envs, decode=lambda t: " ".join(map(str, t)),
                           encode_observation=lambda o: o, **options), envs


def full_forward_logprobs(model, rollout, temperature=1.0):
    context = np.maximum(rollout.mask, rollout.observation_mask)
    whole = Rollout(tokens=jnp.asarray(rollout.tokens), mask=jnp.asarray(context), logprobs=rollout.logprobs,
                    prompt_ids=jnp.asarray(rollout.prompt_ids), prompt_mask=jnp.asarray(rollout.prompt_mask),
                    temperature=temperature, num_samples=rollout.num_samples)
    return np.asarray(sequence_logprobs(model, whole))


@pytest.mark.parametrize("temperature", [1.0, 0.0])
def test_sampled_logprobs_are_one_forward_over_the_transcript(tiny_llama, prompts, temperature):
    _, model = tiny_llama
    out, envs = episodes(model, prompts, temperature=temperature)
    r = out.rollout
    assert (r.mask * r.observation_mask).sum() == 0 and r.observation_mask.sum() > 0
    np.testing.assert_allclose(full_forward_logprobs(model, r) * r.mask, r.logprobs, atol=2e-5)
    assert np.all(r.logprobs[r.mask == 0] == 0)
    for row, segments in enumerate(out.segments):
        # The transcript is contiguous, policy first and last, and each observation is the environment's.
        assert segments[0][1] == 0 and all(a[2] == b[1] for a, b in zip(segments, segments[1:]))
        for role, start, end in segments:
            assert (r.mask if role == "policy" else r.observation_mask)[row, start:end].all()
            if role == "environment":
                assert r.tokens[row, start:end].tolist() == [5 + row] * (end - start)
        assert not np.maximum(r.mask, r.observation_mask)[row, segments[-1][2]:].any()
        policy_turns = [s for s in segments if s[0] == "policy"]
        assert out.turns[row] == len(policy_turns) == len(envs[row].seen)
        assert envs[row].seen == [" ".join(map(str, r.tokens[row, s:e])) for _, s, e in policy_turns]


def test_turns_end_at_stops_and_budget_and_finished_says_how(tiny_llama, prompts):
    _, model = tiny_llama
    out, envs = episodes(model, prompts)
    r = out.rollout
    for row, segments in enumerate(out.segments):
        for i, (role, start, end) in enumerate(segments):
            turn = r.tokens[row, start:end].tolist()
            ended = turn[-1] in (3, 7) or turn[-2:] == [8, 9]
            if role == "policy" and i < len(segments) - 1:  # an observation follows: the turn ended
                assert ended or len(turn) == 6
            if role == "policy":  # no stop before a turn's end
                assert not any(t in (3, 7) for t in turn[:-1])
        last = r.tokens[row, segments[-1][1]:segments[-1][2]].tolist()
        assert out.finished[row] == (last[-1] in (3, 7) or last[-2:] == [8, 9])


def test_the_budget_truncates_observations_and_counts_them(tiny_llama, prompts):
    _, model = tiny_llama
    out, _ = episodes(model, prompts, make=lambda r: Echo(r, sizes=(30, 30, 30)), max_total_tokens=24)
    r = out.rollout
    assert out.truncated_observations.sum() > 0
    assert np.maximum(r.mask, r.observation_mask).sum(-1).max() <= 24
    np.testing.assert_allclose(full_forward_logprobs(model, r) * r.mask, r.logprobs, atol=2e-5)


def test_max_turns_cuts_the_episode(tiny_llama, prompts):
    _, model = tiny_llama
    out, envs = episodes(model, prompts, make=lambda r: Echo(r, sizes=(1,) * 9), max_turns=2)
    assert (out.turns <= 2).all() and not out.finished.any()  # the environment never said "over"
    assert all(len(e.seen) == t for e, t in zip(envs, out.turns))


def test_an_episode_batch_in_parts_is_the_whole_batch(tiny_llama, prompts):
    _, model = tiny_llama
    whole, _ = episodes(model, prompts)
    ids, mask = prompts
    first, _ = episodes(model, (ids[:1], mask[:1]), n_envs=2)
    rest, _ = episodes(model, (ids[1:], mask[1:]), n_envs=4, row_offset=2)
    for part, rows in ((first, slice(0, 2)), (rest, slice(2, 6))):
        np.testing.assert_array_equal(part.rollout.tokens, whole.rollout.tokens[rows])
        np.testing.assert_array_equal(part.rollout.observation_mask, whole.rollout.observation_mask[rows])


def test_one_turn_samples_what_generate_samples(tiny_llama, prompts):
    """An environment that ends every episode at once: the first turn is `generate`'s completion."""
    _, model = tiny_llama
    ids, mask = prompts
    out, _ = episodes(model, prompts, make=lambda r: Echo(r, sizes=()), stop_sequences=[], max_total_tokens=6)
    single = generate(model, ids, mask, max_new_tokens=6, rng=jax.random.key(0), num_samples=2, temperature=1.0,
                      eos_token_id=[3], pad_token_id=0)
    np.testing.assert_array_equal(out.rollout.tokens, np.asarray(single.tokens))
    np.testing.assert_array_equal(out.rollout.mask, np.asarray(single.mask))
    np.testing.assert_allclose(out.rollout.logprobs, np.asarray(single.logprobs), atol=2e-5)


def test_compact_cache_keeps_each_rows_tokens_in_order():
    from jaxrl_llm.models.layers import KVCache

    valid = jnp.array([[0, 1, 0, 1, 1, 0], [1, 0, 0, 0, 1, 0]], bool)
    k = jnp.arange(12, dtype=jnp.float32).reshape(2, 1, 6, 1) * valid[:, None, :, None]
    positions = jnp.cumsum(valid, axis=1, dtype=jnp.int32) - 1
    out = compact_cache(KVCache((k,), (k,), valid, jnp.int32(6), positions))
    assert int(out.index) == 3
    np.testing.assert_array_equal(out.valid, [[1, 1, 1, 0, 0, 0], [1, 1, 0, 0, 0, 0]])
    np.testing.assert_array_equal(out.k[0][:, 0, :3, 0], [[1, 3, 4], [6, 10, 0]])
    np.testing.assert_array_equal(out.positions[:, :2], [[0, 1], [0, 1]])


class Varied:
    """Observations of a length that varies with the row and the turn (1 to 5 tokens), 4 turns."""

    def __init__(self, row):
        self.row, self.turn = row, 0

    def step(self, text):
        self.turn += 1
        return None if self.turn > 3 else [10 + self.row] * (1 + (3 * self.row + self.turn) % 5)


@pytest.mark.parametrize("family", ["gemma3_sliding", "mistral_window_linear_rope", "qwen2_window"])
def test_windowed_layers_sample_what_the_training_forward_computes(tmp_path, family):
    """A window of 4 slots, rows of different prompt and observation lengths: the compacted cache
    leaves empty slots in the shorter rows, which a window measured in slots would count."""
    from jaxrl_llm import models
    from tests.models.conftest import build_hf_model

    overrides = {}
    if family == "qwen2_window":  # Qwen2 with layer_types: one sliding layer, one global
        family, overrides = "qwen2_bias", dict(use_sliding_window=True, sliding_window=4, max_window_layers=1,
                                               layer_types=["sliding_attention", "full_attention"])
    hf = build_hf_model(family, **overrides)
    hf.save_pretrained(tmp_path)
    model = models.from_pretrained(tmp_path)
    assert any(layer.self_attn.sliding_window == 4 for layer in model.model.layers)
    rng = np.random.RandomState(1)
    ids = rng.randint(11, 150, (3, 9)).astype(np.int32)
    mask = np.ones_like(ids)
    mask[1, :4], mask[2, :7] = 0, 0
    out, _ = episodes(model, (ids * mask, mask), make=Varied, max_total_tokens=40, max_new_tokens=5,
                      eos_token_id=None, stop_sequences=[])
    r = out.rollout
    assert (out.turns >= 3).all() and len({len(s) for s in out.segments}) == 1
    assert len({tuple(e - s for _, s, e in segs) for segs in out.segments}) > 1  # rows at their own lengths
    np.testing.assert_allclose(full_forward_logprobs(model, r) * r.mask, r.logprobs, atol=2e-5)


@pytest.mark.parametrize("change, match", [
    (dict(n_envs=5), "environments: got 5"),
    (dict(max_turns=0), "max_turns: got 0"),
    (dict(max_total_tokens=0), "max_total_tokens: got 0"),
    (dict(stop_sequences=[[]]), "stop_sequences: got \\[\\]"),
    (dict(stop_sequences=[[-4]]), "stop_sequences"),
    (dict(temperature=-1.0), "temperature"),
])
def test_bad_arguments_name_themselves(tiny_llama, prompts, change, match):
    _, model = tiny_llama
    with pytest.raises(UserError, match=match):
        episodes(model, prompts, **change)


def call_tokenizer():
    """A BPE built offline whose merges tokenize `</call>` alone as one token and after an `x` as
    three: `x<` merges before `</` does, so the id sequence of the stop string alone never occurs."""
    from tokenizers import Tokenizer, decoders, models as bpe_models

    pieces = ["x", "<", "/", "c", "a", "l", ">", "y", "x<", "</", "ca", "cal", "call", "call>", "</call>"]
    merges = [("x", "<"), ("<", "/"), ("c", "a"), ("ca", "l"), ("cal", "l"), ("call", ">"), ("</", "call>")]
    tokenizer = Tokenizer(bpe_models.BPE(vocab={p: i for i, p in enumerate(pieces)}, merges=merges))
    tokenizer.decoder = decoders.Fuse()
    return tokenizer


def test_a_stop_string_is_found_in_the_text_whatever_its_tokens_in_context():
    from jaxrl_llm.rollout.episodes import _stop_string_end, _stop_table

    tokenizer = call_tokenizer()
    alone = tokenizer.encode("</call>").ids
    in_context = tokenizer.encode("x</call>yy").ids
    assert len(alone) == 1 and alone[0] not in in_context  # the risk: its ids alone never come
    decode = tokenizer.decode
    assert decode(in_context) == "x</call>yy"
    assert _stop_string_end(in_context, decode, ["</call>"]) == 3  # x<, /, call>
    assert _stop_string_end(in_context, decode, ["</nope>"]) is None
    table = _stop_table([alone])  # what a match on token ids looks for
    assert not any(in_context[i:i + table.shape[1]] == table[0].tolist() for i in range(len(in_context)))


class Calls:
    """Answers every turn with 2 tokens, for 3 turns."""

    def __init__(self, row):
        self.turns = []

    def step(self, text):
        self.turns.append(text)
        return None if len(self.turns) > 3 else [10, 11]


def test_turns_end_where_their_text_first_holds_a_stop_string(tiny_llama, prompts):
    """Token ids 20-57 write `</` and 58-95 `call>`: random turns write `</call>` across tokens
    often, never as one token. Each turn is cut after the token that completes it (on the host,
    the loop ran on): what follows it leaves the transcript and the cache, so the sampled
    log-probabilities are still those of one forward pass over the whole transcript."""
    _, model = tiny_llama

    def decode(ids):
        return "".join("</" if 20 <= i < 58 else "call>" if i >= 58 else f"[{i}]" for i in ids)

    ids, mask = prompts
    out = sample_episodes(model, ids, mask, [Calls(r) for r in range(6)], decode=decode,
                          encode_observation=lambda o: o, max_turns=4, max_total_tokens=40, max_new_tokens=8,
                          rng=jax.random.key(2), num_samples=2, temperature=1.0, eos_token_id=None,
                          stop_strings=["</call>"], pad_token_id=0)
    r = out.rollout
    cut_turns = 0
    for row, segments in enumerate(out.segments):
        for role, start, end in segments:
            if role == "policy":
                text = decode(r.tokens[row, start:end].tolist())
                assert text.count("</call>") <= 1 and ("</call>" not in text or text.endswith("</call>"))
                cut_turns += text.endswith("</call>") and end - start < 8
    assert cut_turns >= 3  # the test has power: several turns were cut short by the text
    assert np.all(r.tokens[r.mask + r.observation_mask == 0] == 0)
    np.testing.assert_allclose(full_forward_logprobs(model, r) * r.mask, r.logprobs, atol=2e-5)
