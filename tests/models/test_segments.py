"""Packed sequences: several sequences in one row, told apart by segment ids.

Each family, with dense and blockwise attention (sliding windows and soft-capping included), gives
every packed sequence the logits it has in a row of its own; a token never sees another segment.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxrl_llm import models
from jaxrl_llm.errors import UserError
from jaxrl_llm.models import layers
from tests.models.conftest import build_hf_model

FAMILIES = ["llama", "mistral_window_linear_rope", "gpt_neox_parallel", "gemma3_sliding"]
LENGTHS = [5, 4, 6, 3]  # rows of 10: [5 + 4 + pad], [6 + 3 + pad]


@pytest.fixture(scope="module", params=FAMILIES)
def family_model(request, tmp_path_factory):
    hf = build_hf_model(request.param)
    path = tmp_path_factory.mktemp(f"pack_{request.param}")
    hf.save_pretrained(path)
    return models.from_pretrained(path)


def _sequences(vocab, seed=0):
    rng = np.random.RandomState(seed)
    return [rng.randint(1, vocab, n) for n in LENGTHS]


def _pack(sequences, row_length=10):
    ids = np.zeros((2, row_length), np.int32)
    segments = np.zeros((2, row_length), np.int32)
    placement = [(0, 0), (0, 5), (1, 0), (1, 6)]  # (row, start) of each sequence
    for i, (seq, (row, start)) in enumerate(zip(sequences, placement)):
        ids[row, start : start + len(seq)] = seq
        segments[row, start : start + len(seq)] = i + 1
    return ids, segments, placement


@pytest.mark.parametrize("attention", ["dense", "blockwise"])
def test_packed_rows_give_each_sequence_its_own_logits(family_model, attention):
    model = family_model.set_execution(attention=attention, attention_block=3)
    sequences = _sequences(model.hf_config.vocab_size)
    ids, segments, placement = _pack(sequences)
    packed = jax.jit(lambda i, s: model.unembed(models.hidden_states(model, i, segment_ids=s)))(ids, segments)
    for seq, (row, start) in zip(sequences, placement):
        alone = model(jnp.asarray(seq)[None])[0]
        got = packed[row, start : start + len(seq)]
        np.testing.assert_allclose(got, alone, atol=2e-5 * max(1.0, float(jnp.abs(alone).max())))


def test_segment_positions_restart_with_each_segment():
    segments = jnp.array([[1, 1, 1, 2, 2, 0], [3, 3, 3, 3, 0, 0]])
    np.testing.assert_array_equal(layers.segment_positions(segments), [[0, 1, 2, 0, 1, 0], [0, 1, 2, 3, 0, 1]])


def test_a_token_sees_only_its_own_segment():
    """Perturbing one segment's tokens leaves every other segment's logits bit-identical."""
    path_model = _from_hf(build_hf_model("llama"))
    sequences = _sequences(160)
    ids, segments, placement = _pack(sequences)
    logits = jax.jit(lambda i: path_model.unembed(models.hidden_states(path_model, i, segment_ids=segments)))
    base = logits(ids)
    changed = ids.copy()
    changed[0, :5] = (changed[0, :5] + 7) % 150 + 1  # the first sequence only
    after = logits(changed)
    assert not np.allclose(after[0, :5], base[0, :5])
    np.testing.assert_array_equal(after[0, 5:9], base[0, 5:9])  # (slot 9 is padding: it sees nothing real)
    np.testing.assert_array_equal(after[1], base[1])


def _from_hf(hf, tmp=[]):  # noqa: B006 - one directory per call is enough
    import tempfile

    directory = tempfile.mkdtemp()
    tmp.append(directory)
    hf.save_pretrained(directory)
    return models.from_pretrained(directory)


def test_packing_errors_name_the_argument():
    model = _from_hf(build_hf_model("llama"))
    ids = jnp.ones((1, 4), jnp.int32)
    with pytest.raises(UserError, match="segment_ids: got shape"):
        models.hidden_states(model, ids, segment_ids=jnp.ones((1, 3), jnp.int32))
    with pytest.raises(UserError, match="segment_ids: packed sequences are for a forward pass without a KV cache"):
        model.hidden_states(ids, cache=model.init_cache(1, 8), segment_ids=jnp.ones((1, 4), jnp.int32))
    with pytest.raises(UserError, match="attention: got 'cudnn' for packed sequences"):
        layers.attention_implementation("cudnn", seq=8, kv_len=8, self_attention=True, dtype=jnp.bfloat16,
                                        head_dim=16, softcap=None, on_gpu=True, segments=True)
    assert layers.attention_implementation("auto", seq=512, kv_len=512, self_attention=True, dtype=jnp.bfloat16,
                                           head_dim=16, softcap=None, on_gpu=True, segments=True) == "blockwise"
