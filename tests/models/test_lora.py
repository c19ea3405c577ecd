"""LoRA adapters (models/lora.py, on nnx.LoRA): the base is untouched until B moves, the reference
is the base graph on the same weights, merging is exact, and PEFT loads what we write."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

from jaxrl_llm import models
from jaxrl_llm.errors import UserError
from jaxrl_llm.models import lora
from jaxrl_llm.models.lora import LoraSpec

from tests._tolerances import float32_tolerance, model_reductions
from tests.models.conftest import build_hf_model, left_padded_batch

FAMILIES = ["llama", "qwen2_bias", "gemma3_sliding", "gpt_neox_parallel"]


def _loaded(name, tmp_path, seed=0):
    """(our model loaded from a saved transformers checkpoint, the checkpoint directory, the torch model)."""
    hf = build_hf_model(name, seed=seed)
    directory = tmp_path / name
    hf.save_pretrained(directory)
    return models.from_pretrained(directory), directory, hf


def _randomize_adapters(model, seed=0, scale=0.2):
    """Move every B (and A) off its initialisation, so the adapters change the function."""
    graphdef, adapters, base = lora.split(model)
    leaves, treedef = jax.tree.flatten(adapters)
    keys = jax.random.split(jax.random.PRNGKey(seed), len(leaves))
    leaves = [x + scale * jax.random.normal(k, x.shape, x.dtype) for x, k in zip(leaves, keys)]
    return nnx.merge(graphdef, jax.tree.unflatten(treedef, leaves), base)


@pytest.mark.parametrize("name", FAMILIES)
def test_adapters_start_as_the_base_and_the_base_graph_is_the_reference(name, tmp_path):
    model, _, _ = _loaded(name, tmp_path)
    ids, mask = left_padded_batch(160)
    ids, mask = jnp.asarray(ids), jnp.asarray(mask)
    base_graphdef = nnx.graphdef(model)
    before = model(ids, mask)
    lora.add_lora(model, LoraSpec(rank=4, alpha=8.0), rngs=nnx.Rngs(0))
    np.testing.assert_array_equal(np.asarray(model(ids, mask)), np.asarray(before))  # B = 0

    adapted = _randomize_adapters(model)
    changed = adapted(ids, mask)
    assert np.abs(np.asarray(changed - before)).max() > 1e-2
    # Adapters off: the base graph on the adapted model's own base weights is the original model.
    _, _, base = lora.split(adapted)
    np.testing.assert_array_equal(np.asarray(nnx.merge(base_graphdef, base)(ids, mask)), np.asarray(before))
    # Merged: W + (alpha / r) A B gives the adapted function, with the base model's graph.
    merged = lora.merge_lora(adapted)
    assert nnx.graphdef(merged) == base_graphdef
    np.testing.assert_allclose(np.asarray(merged(ids, mask)), np.asarray(changed), atol=2e-5)


def test_targets_are_roles_or_module_names_per_family(tmp_path):
    llama, _, _ = _loaded("llama", tmp_path)
    neox, _, _ = _loaded("gpt_neox_parallel", tmp_path)
    assert lora.target_names(llama, None) == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                                              "down_proj"}
    assert lora.target_names(llama, ("q", "v")) == {"q_proj", "v_proj"}
    assert lora.target_names(llama, ("q_proj", "down")) == {"q_proj", "down_proj"}
    # GPT-NeoX fuses q, k and v: each role adapts the fused projection; it has no gate.
    assert lora.target_names(neox, ("q",)) == {"query_key_value"}
    assert lora.target_names(neox, None) == {"query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h"}
    with pytest.raises(UserError, match=r"`model.lora.targets`: 'gate' matches no projection of this gpt_neox"):
        lora.target_names(neox, ("gate",))
    lora.add_lora(llama, LoraSpec(rank=2, targets=("q", "v")), rngs=nnx.Rngs(0))
    adapted = {path.rsplit(".", 1)[-1] for path, _ in lora.adapted_modules(llama)}
    assert adapted == {"q_proj", "v_proj"}
    assert len(lora.adapted_modules(llama)) == 2 * 2  # two layers
    with pytest.raises(UserError, match="already has LoRA adapters"):
        lora.add_lora(llama, LoraSpec(rank=2), rngs=nnx.Rngs(0))


@pytest.mark.parametrize("kwargs, message", [
    (dict(rank=0), r"`model.lora.rank`: got 0, expected a positive integer"),
    (dict(alpha=0.0), r"`model.lora.alpha`: got 0.0, expected a positive number"),
    (dict(dropout=1.0), r"`model.lora.dropout`: got 1.0, expected a rate in \[0, 1\)"),
    (dict(targets=("qkv",)), r"`model.lora.targets`: got \['qkv'\], expected some of the roles"),
])
def test_bad_specs_are_named(kwargs, message):
    with pytest.raises(UserError, match=message):
        LoraSpec(**kwargs)


def test_only_adapters_are_trainable_and_gradients_follow_the_chain_rule(tmp_path):
    """dL/dB = s A^T dL/dW and dL/dA = s dL/dW B^T at W_eff = W + s A B: the adapters' gradient
    is the full-weight gradient of the merged model projected through the other factor."""
    model, _, _ = _loaded("llama", tmp_path)
    lora.add_lora(model, LoraSpec(rank=3, alpha=6.0, targets=("q",)), rngs=nnx.Rngs(1))
    model = _randomize_adapters(model, seed=3)
    ids, mask = (jnp.asarray(x) for x in left_padded_batch(160))
    graphdef, adapters, base = lora.split(model)

    def loss_of_adapters(adapters):
        return jnp.mean(jax.nn.log_softmax(nnx.merge(graphdef, adapters, base)(ids, mask))[..., 7])

    grads = jax.grad(loss_of_adapters)(adapters)
    merged = lora.merge_lora(model)
    merged_graphdef, merged_params = nnx.split(merged)

    def loss_of_weights(params):
        return jnp.mean(jax.nn.log_softmax(nnx.merge(merged_graphdef, params)(ids, mask))[..., 7])

    full = jax.grad(loss_of_weights)(merged_params)
    s = 6.0 / 3
    config = model.hf_config  # two float32 gradients through the whole model, summed in other orders
    tolerance = float32_tolerance(*model_reductions(
        num_layers=config.num_hidden_layers, hidden=config.hidden_size, intermediate=config.intermediate_size,
        seq=ids.shape[1], vocab=config.vocab_size))
    for layer in range(2):
        q = model.model.layers[layer].self_attn.q_proj.lora
        a, b = np.asarray(q.lora_a[...]), np.asarray(q.lora_b[...])
        dw = np.asarray(full["model"]["layers"][layer]["self_attn"]["q_proj"]["kernel"][...])
        g = grads["model"]["layers"][layer]["self_attn"]["q_proj"]["lora"]
        for got, expected in ((g["lora_b"][...], s * a.T @ dw), (g["lora_a"][...], s * dw @ b.T)):
            np.testing.assert_allclose(np.asarray(got), expected, rtol=1e-4, atol=tolerance * np.abs(expected).max())
    # Nothing but adapters is in the trainable state.
    assert all(isinstance(v, nnx.LoRAParam) for _, v in nnx.to_flat_state(adapters))
    assert not any(isinstance(v, nnx.LoRAParam) for _, v in nnx.to_flat_state(base))


def test_dropout_acts_only_with_a_key_and_changes_the_gradient(tmp_path):
    model, _, _ = _loaded("llama", tmp_path)
    lora.add_lora(model, LoraSpec(rank=4, dropout=0.5), rngs=nnx.Rngs(0))
    model = _randomize_adapters(model)
    ids, mask = (jnp.asarray(x) for x in left_padded_batch(160))
    graphdef, adapters, base = lora.split(model)

    def forward(adapters, key):
        m = nnx.merge(graphdef, adapters, base)
        if key is not None:
            lora.set_dropout_key(m, key)
        return m(ids, mask)

    plain = forward(adapters, None)
    np.testing.assert_array_equal(np.asarray(forward(adapters, None)), np.asarray(plain))  # no key: no dropout
    dropped = forward(adapters, jax.random.PRNGKey(0))
    assert np.abs(np.asarray(dropped - plain)).max() > 1e-3
    np.testing.assert_array_equal(np.asarray(forward(adapters, jax.random.PRNGKey(0))), np.asarray(dropped))

    def loss(adapters, key):
        return jnp.mean(forward(adapters, key)[..., 5])

    g_plain = jax.tree.leaves(jax.grad(loss)(adapters, None))
    g_dropped = jax.tree.leaves(jax.grad(loss)(adapters, jax.random.PRNGKey(0)))
    assert max(float(np.abs(np.asarray(x - y)).max()) for x, y in zip(g_plain, g_dropped)) > 1e-4


def test_execution_options_and_the_kv_cache_see_the_adapters(tmp_path):
    model, _, _ = _loaded("llama", tmp_path)
    lora.add_lora(model, LoraSpec(rank=4), rngs=nnx.Rngs(0))
    model = _randomize_adapters(model)
    ids, mask = (jnp.asarray(x) for x in left_padded_batch(160))
    reference = np.asarray(model(ids, mask))
    model.set_execution(scan_layers=True, remat="layer", attention="blockwise", attention_block=4)
    np.testing.assert_allclose(np.asarray(model(ids, mask)), reference, atol=2e-5)
    cache = model.init_cache(ids.shape[0], ids.shape[1])
    logits, _ = model(ids, mask, cache=cache)
    np.testing.assert_allclose(np.asarray(logits), reference, atol=2e-5)


@pytest.mark.parametrize("name", FAMILIES)
def test_peft_loads_our_adapter_with_our_logits(name, tmp_path):
    """save_peft_adapter -> peft.PeftModel.from_pretrained on the transformers base: logits equal."""
    import peft
    model, directory, hf = _loaded(name, tmp_path)
    lora.add_lora(model, LoraSpec(rank=4, alpha=12.0, dropout=0.1), rngs=nnx.Rngs(0))
    model = _randomize_adapters(model)
    adapter_dir = lora.save_peft_adapter(model, tmp_path / "adapter", base_model_name_or_path=str(directory))
    assert sorted(p.name for p in adapter_dir.iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]

    peft_model = peft.PeftModel.from_pretrained(hf, str(adapter_dir)).eval()
    ids, mask = left_padded_batch(160)
    with torch.no_grad():
        theirs = peft_model(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask)).logits.numpy()
    ours = np.asarray(model(jnp.asarray(ids), jnp.asarray(mask)))
    real = mask.astype(bool)
    np.testing.assert_allclose(ours[real], theirs[real], atol=1e-4)
    # And PEFT's own merge agrees with ours.
    merged_theirs = peft_model.merge_and_unload()
    with torch.no_grad():
        merged_logits = merged_theirs(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask)).logits.numpy()
    np.testing.assert_allclose(np.asarray(lora.merge_lora(model)(jnp.asarray(ids), jnp.asarray(mask)))[real],
                               merged_logits[real], atol=1e-4)


def test_save_pretrained_refuses_unmerged_adapters(tmp_path):
    model, _, _ = _loaded("llama", tmp_path)
    lora.add_lora(model, LoraSpec(rank=2), rngs=nnx.Rngs(0))
    with pytest.raises(UserError, match="has LoRA adapters; merge them first"):
        models.save_pretrained(model, tmp_path / "out")
    models.save_pretrained(lora.merge_lora(model), tmp_path / "out")
