"""API contract: pure jitted functions of the parameter pytree, sharded checkpoints, clear errors."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import transformers
from flax import nnx
from safetensors.flax import load_file, save_file

from jaxrl_llm import models
from jaxrl_llm.models import layers
from tests._tolerances import float32_tolerance
from tests.models.conftest import build_hf_model, forward, forward_cached, hf_logits, left_padded_batch, max_real_diff


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    hf = build_hf_model("qwen3_qknorm")
    path = tmp_path_factory.mktemp("qwen3")
    hf.save_pretrained(path)
    return hf, path


def test_jitted_pure_function_of_split_state(llama_dir):
    hf, path = llama_dir
    model = models.from_pretrained(path)
    graphdef, state = nnx.split(model)

    @jax.jit
    def f(state, ids, mask):
        return nnx.merge(graphdef, state)(ids, mask)

    ids, mask = left_padded_batch(hf.config.vocab_size, seed=6)
    assert max_real_diff(f(state, ids, mask), hf_logits(hf, ids, mask), mask) < 1e-4
    # The state is a plain pytree: a gradient has its structure, and changing it changes the output.
    loss = lambda s: jax.nn.log_softmax(f(s, ids, mask))[..., 3].sum()  # noqa: E731
    grads = jax.grad(loss)(state)
    assert jax.tree.structure(grads) == jax.tree.structure(state)
    norm = jnp.sqrt(sum(jnp.sum(g * g) for g in jax.tree.leaves(grads)))
    stepped = jax.tree.map(lambda p, g: p + 1e-3 * g / norm, state, grads)  # a small ascent step
    assert loss(stepped) > loss(state)


def test_sharded_checkpoint_loads(llama_dir, tmp_path):
    hf, _ = llama_dir
    hf.save_pretrained(tmp_path, max_shard_size="40KB")
    assert (tmp_path / "model.safetensors.index.json").exists()
    ids, mask = left_padded_batch(hf.config.vocab_size, seed=7)
    assert max_real_diff(forward(models.from_pretrained(tmp_path), ids, mask), hf_logits(hf, ids, mask), mask) < 1e-4


def test_from_config_random_init_and_hidden_states():
    config = build_hf_model("gemma3_sliding").config
    model = models.from_config(config, dtype=jnp.bfloat16, rngs=nnx.Rngs(3))
    ids, mask = left_padded_batch(config.vocab_size, seed=8)

    @nnx.jit
    def hidden_and_logits(model, ids, mask):
        hidden = models.hidden_states(model, ids, mask)
        return hidden, model.unembed(hidden), models.unembedding_matrix(model), model(ids, mask)

    hidden, unembedded, w, logits = hidden_and_logits(model, ids, mask)
    assert hidden.shape == (*ids.shape, config.hidden_size) and hidden.dtype == jnp.bfloat16
    assert w.shape == (config.hidden_size, config.vocab_size)
    assert logits.dtype == jnp.float32 and unembedded.dtype == jnp.float32
    # One float32-accumulated product over the hidden size, maybe fused otherwise in the full call.
    np.testing.assert_allclose(unembedded, logits, atol=float32_tolerance(config.hidden_size,
                                                                          scale=np.abs(logits).max()))
    cache = models.init_cache(model, 3, 16)
    assert len(cache.k) == 2 and cache.k[0].shape == (3, 2, 16, 16) and cache.k[0].dtype == jnp.bfloat16
    assert cache.valid.shape == (3, 16) and cache.index.dtype == jnp.int32 and cache.index.shape == ()


def test_chunked_prefill_matches_single_prefill(llama_dir):
    """Prefill in two chunks of several tokens == one forward (the cache path handles S > 1 at any index)."""
    hf, path = llama_dir
    model = models.from_pretrained(path)
    ids, mask = left_padded_batch(hf.config.vocab_size, seed=9)
    cache = models.init_cache(model, ids.shape[0], 12)
    a, cache = forward_cached(model, ids[:, :6], mask[:, :6], cache)
    b, cache = forward_cached(model, ids[:, 6:], mask[:, 6:], cache)
    assert max_real_diff(np.concatenate([a, b], axis=1), forward(model, ids, mask), mask) < 1e-5


def test_errors_name_the_argument(llama_dir, tmp_path):
    hf, path = llama_dir
    with pytest.raises(ValueError, match="path.*not an existing directory"):
        models.from_pretrained(tmp_path / "missing")
    with pytest.raises(ValueError, match="gguf_file"):
        models.from_pretrained(path, gguf_file="nope.gguf")
    with pytest.raises(ValueError, match="dtype"):
        models.from_pretrained(path, dtype=jnp.int32)

    bad = tmp_path / "bad_type"
    bad.mkdir()
    config = json.loads((path / "config.json").read_text())
    (bad / "config.json").write_text(json.dumps({**config, "model_type": "bert"}))
    with pytest.raises(ValueError, match="model_type.*'bert'"):
        models.from_pretrained(bad)

    missing = tmp_path / "missing_weight"
    missing.mkdir()
    (missing / "config.json").write_text((path / "config.json").read_text())
    tensors = load_file(str(path / "model.safetensors"))
    del tensors["model.layers.1.mlp.up_proj.weight"]
    save_file(tensors, str(missing / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(ValueError, match="missing weight 'model.layers.1.mlp.up_proj.weight'"):
        models.from_pretrained(missing)

    with pytest.raises(ValueError, match="model_type"):
        models.from_config(transformers.BertConfig())

    model = models.from_pretrained(path)
    with pytest.raises(ValueError, match="attention_mask"):
        model(jnp.ones((2, 4), jnp.int32), jnp.ones((2, 5)))
    with pytest.raises(ValueError, match="input_ids"):
        model(jnp.ones((4,), jnp.int32))
    with pytest.raises(ValueError, match="cache"):
        model(jnp.ones((3, 4), jnp.int32), cache=models.init_cache(model, 2, 8))


@pytest.mark.parametrize(
    "rope_parameters",
    [
        dict(rope_type="default", rope_theta=10000.0),
        dict(rope_type="yarn", rope_theta=10000.0, factor=4.0, original_max_position_embeddings=32),
        dict(rope_type="default", rope_theta=10000.0, partial_rotary_factor=0.5),
    ],
)
def test_rope_table_equals_direct_cos_sin(rope_parameters):
    """cos/sin gathered from the host table (positions with a static bound) equal the direct computation."""
    spec = layers.rope_spec(rope_parameters, head_dim=32, max_position_embeddings=128)
    positions = jnp.asarray(np.random.RandomState(0).randint(0, 100, (3, 7)), jnp.int32)
    direct = layers.rope_cos_sin(positions, spec, jnp.float32)
    table = layers.rope_cos_sin(positions, spec, jnp.float32, max_position=100)
    for a, b in zip(direct, table):
        assert a.shape == b.shape == (3, 7, 1, spec.rotary_dim)
        np.testing.assert_allclose(a, b, atol=2e-6)
    x = jnp.asarray(np.random.RandomState(1).normal(size=(3, 7, 2, 32)), jnp.float32)
    np.testing.assert_allclose(
        layers.apply_rope(x, positions, spec, max_position=100), layers.apply_rope(x, positions, spec), atol=2e-6
    )
