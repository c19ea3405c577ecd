"""Reward models against transformers' *ForSequenceClassification, and the PPO critic layouts."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from flax import nnx

from jaxrl_llm import models
from tests._tolerances import float32_tolerance
from tests.models.conftest import build_hf_model, hf_positions, left_padded_batch


@pytest.fixture(scope="module", params=["llama", "gpt_neox_parallel"])
def reward_checkpoint(request, tmp_path_factory):
    hf = build_hf_model(request.param, cls=transformers.AutoModelForSequenceClassification, num_labels=1)
    path = tmp_path_factory.mktemp(f"rm_{request.param}")
    hf.save_pretrained(path)
    return request.param, hf, path


def test_reward_model_matches_transformers_sequence_classification(reward_checkpoint, diff_report):
    name, hf, path = reward_checkpoint
    rm = models.reward_model_from_pretrained(path)
    ids, mask = left_padded_batch(hf.config.vocab_size, seed=4)  # pad id 0 == config.pad_token_id
    with torch.no_grad():
        ref = hf(
            input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask), position_ids=torch.tensor(hf_positions(mask))
        ).logits.numpy()[:, 0]
    got = rm(jnp.asarray(ids), jnp.asarray(mask))
    assert got.shape == (ids.shape[0],) and got.dtype == jnp.float32
    diff = float(np.abs(np.asarray(got) - ref).max())
    diff_report[f"reward model {name}"] = diff
    assert diff < 1e-4, diff
    # Without a mask, pooling falls back to the last token != pad_token_id, as in transformers
    # (here right-padded rows, so the pooled token is not the last position).
    right = np.where(np.arange(ids.shape[1]) < ids.shape[1] - np.arange(ids.shape[0])[:, None] * 2, np.maximum(ids[::-1], 1), 0)
    with torch.no_grad():
        ref_right = hf(input_ids=torch.tensor(right)).logits.numpy()[:, 0]
    np.testing.assert_allclose(rm(jnp.asarray(right)), ref_right, atol=1e-5)


def _tiny_policy():
    return models.from_config(build_hf_model("llama").config, rngs=nnx.Rngs(0))


def test_value_head_only_built_when_asked():
    policy = _tiny_policy()
    paths = {".".join(map(str, p)) for p, _ in nnx.to_flat_state(nnx.state(policy, nnx.Param))}
    assert not any("head" in p and "lm_head" not in p for p in paths)
    shared = models.make_critic(policy, layout="shared", rngs=nnx.Rngs(1))
    shared_params = jax.tree.leaves(nnx.state(shared, nnx.Param))
    assert sum(x.size for x in shared_params) == 64 + 1  # the head only, no backbone copy


def test_critic_layouts_shapes_and_initialisation(reward_checkpoint):
    name, hf, path = reward_checkpoint
    policy = _tiny_policy() if name == "llama" else models.from_config(
        build_hf_model(name).config, rngs=nnx.Rngs(0)
    )
    ids, mask = left_padded_batch(hf.config.vocab_size, seed=5)
    hidden = models.hidden_states(policy, ids, mask)
    assert hidden.shape == (*ids.shape, 64)
    logits = policy(ids, mask)
    np.testing.assert_allclose(policy.unembed(hidden), logits, atol=float32_tolerance(64, scale=np.abs(logits).max()))

    shared = models.make_critic(policy, layout="shared", rngs=nnx.Rngs(1))
    values = shared(hidden=hidden)
    assert values.shape == ids.shape and values.dtype == jnp.float32
    with pytest.raises(ValueError, match="hidden"):
        shared(ids, mask)

    separate = models.make_critic(policy, layout="separate", rngs=nnx.Rngs(1))
    np.testing.assert_allclose(separate(ids, mask), values, atol=1e-5)  # same backbone, same head init
    # The copy is independent of the policy.
    before = np.asarray(policy(ids, mask))
    nnx.update(separate.backbone, jax.tree.map(lambda x: x + 0.5, nnx.state(separate.backbone, nnx.Param)))
    np.testing.assert_array_equal(np.asarray(policy(ids, mask)), before)
    assert np.abs(np.asarray(separate(ids, mask)) - np.asarray(values)).max() > 1e-3

    # Initialised from the reward model: values at the last real token equal the reward scores.
    rm = models.reward_model_from_pretrained(path)
    from_rm = models.make_critic(policy, layout="separate", init_from=path)
    np.testing.assert_allclose(from_rm(ids, mask)[:, -1], rm(ids, mask), atol=1e-5)


def test_make_critic_rejects_bad_arguments():
    policy = _tiny_policy()
    with pytest.raises(ValueError, match="layout.*'tied'"):
        models.make_critic(policy, layout="tied")
    with pytest.raises(ValueError, match="init_from"):
        models.make_critic(policy, layout="shared", init_from="/nonexistent")
    with pytest.raises(ValueError, match="policy_or_path"):
        models.make_critic(42)
