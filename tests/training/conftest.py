"""A tiny random Llama policy with the arithmetic char tokenizer, saved once per session."""

import jax.numpy as jnp
import pytest
import transformers
from flax import nnx

from jaxrl_llm import models
from jaxrl_llm.tasks.tokenizer import VOCAB, save_char_tokenizer
from jaxrl_llm.training import load_config
from tests._tolerances import model_reductions

# The tiny policy's reductions (prompts of up to 16 tokens + 4 new ones), for `float32_tolerance`.
TINY_POLICY_REDUCTIONS = model_reductions(num_layers=2, hidden=32, intermediate=64, seq=20, vocab=len(VOCAB))


@pytest.fixture(scope="session")
def tiny_policy_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny_policy")
    cfg = transformers.LlamaConfig(  # the sizes of TINY_POLICY_REDUCTIONS
        vocab_size=len(VOCAB), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32,
        tie_word_embeddings=True, pad_token_id=0, bos_token_id=1, eos_token_id=2,
    )
    models.save_pretrained(models.from_config(cfg, dtype=jnp.float32, rngs=nnx.Rngs(0)), path)
    save_char_tokenizer(path)
    return path


@pytest.fixture
def toy_config(tiny_policy_dir, tmp_path):
    """Overrides -> a fast config on the tiny policy learning the '7' reward."""

    def make(*overrides, algo="rloo"):
        return load_config(None, [
            f"model.path={tiny_policy_dir}",
            f"train.run_dir={tmp_path / 'run'}",
            f"algo.name={algo}",
            "reward.terms=[{kind: python, target: 'toy_rewards:fraction_of_sevens'}]",
            "rollout.prompts_per_step=8", "rollout.max_new_tokens=4", "algo.num_samples=4",
            "optim.learning_rate=0.01", "algo.kl_coef=0.01", "task.num_eval=8",
            "train.steps=4", "train.eval_every=100", "train.checkpoint_every=100",
            "train.progress=false", "train.plot=false", "train.tensorboard=false",
            *overrides,
        ])

    return make


@pytest.fixture
def plain_sgd(monkeypatch):
    """Trainers built after this take SGD steps (after the same gradient clipping) instead of
    AdamW's: for tests that compare the parameters of two runs after several updates. Adam
    divides each step by the gradient's own scale, so where a gradient is near 0 a float32
    rounding difference becomes a step of up to the learning rate; an SGD step differs from
    another by the learning rate times their gradients' difference, nothing more."""
    import optax

    from jaxrl_llm.training import trainer

    def make_sgd(config):
        o = config.optim
        return optax.chain(optax.clip_by_global_norm(o.max_grad_norm), optax.sgd(o.learning_rate))

    monkeypatch.setattr(trainer, "make_optimizer", make_sgd)
