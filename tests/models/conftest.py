"""Shared helpers: tiny random transformers models built in PyTorch, left-padded batches."""

import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from flax import nnx

# name -> (config class, kwargs). Tiny: hidden 32-64, 2 layers, vocab ~100-300.
_COMMON = dict(vocab_size=160, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
               num_attention_heads=4, max_position_embeddings=128, pad_token_id=0)
CASES = {
    "llama": (transformers.LlamaConfig, dict(_COMMON, num_key_value_heads=2, tie_word_embeddings=False)),
    "llama_tied_bias_llama3rope": (
        transformers.LlamaConfig,
        dict(_COMMON, num_key_value_heads=1, tie_word_embeddings=True, attention_bias=True, mlp_bias=True,
             rope_parameters=dict(rope_type="llama3", rope_theta=500000.0, factor=8.0, low_freq_factor=1.0,
                                  high_freq_factor=4.0, original_max_position_embeddings=16)),
    ),
    "llama_yarn": (
        transformers.LlamaConfig,
        dict(_COMMON, num_key_value_heads=4, rope_parameters=dict(rope_type="yarn", rope_theta=10000.0, factor=4.0,
                                                                 original_max_position_embeddings=32)),
    ),
    "mistral_window_linear_rope": (
        transformers.MistralConfig,
        dict(_COMMON, num_key_value_heads=2, sliding_window=4,
             rope_parameters=dict(rope_type="linear", rope_theta=10000.0, factor=2.0)),
    ),
    "qwen2_bias": (transformers.Qwen2Config, dict(_COMMON, num_key_value_heads=2, tie_word_embeddings=True)),
    "qwen3_qknorm": (transformers.Qwen3Config, dict(_COMMON, num_key_value_heads=2, head_dim=24, tie_word_embeddings=False)),
    "gpt_neox_parallel": (
        transformers.GPTNeoXConfig,
        dict(vocab_size=160, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
             rotary_pct=0.5, use_parallel_residual=True, max_position_embeddings=128, pad_token_id=0),
    ),
    "gpt_neox_sequential": (
        transformers.GPTNeoXConfig,
        dict(vocab_size=160, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
             rotary_pct=1.0, use_parallel_residual=False, max_position_embeddings=128, pad_token_id=0),
    ),
    "gemma3_sliding": (
        transformers.Gemma3TextConfig,
        dict(vocab_size=160, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, head_dim=16, query_pre_attn_scalar=16, sliding_window=4,
             layer_types=["sliding_attention", "full_attention"], max_position_embeddings=128, pad_token_id=0,
             rope_parameters={"sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
                              "full_attention": {"rope_type": "linear", "rope_theta": 1000000.0, "factor": 2.0}},
             final_logit_softcapping=30.0, attn_logit_softcapping=50.0),
    ),
}


def build_hf_model(name, *, seed=0, cls=transformers.AutoModelForCausalLM, **overrides):
    """A float32 random transformers model for case ``name`` (eager attention, eval mode)."""
    config_cls, kwargs = CASES[name]
    config = config_cls(**{**kwargs, **overrides})
    config._attn_implementation = "eager"
    torch.manual_seed(seed)
    model = cls.from_config(config).eval()
    _randomize_norms(model, seed)
    return model


def _randomize_norms(model, seed):
    """Random init leaves norm weights at 1 (0 for Gemma) and biases at 0; perturb them so a swapped
    or ignored norm/bias parameter cannot pass the parity tests."""
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name or name.endswith("bias"):
                p.add_(0.1 * torch.randn(p.shape, generator=g))


def left_padded_batch(vocab_size, *, batch=3, seq=12, seed=0):
    """ids [B, S] (pad id 0 in the padding), mask [B, S] with rows left-padded by 0, 3, 6 tokens."""
    rng = np.random.RandomState(seed)
    ids = rng.randint(1, vocab_size, (batch, seq))
    mask = np.ones((batch, seq), np.int64)
    for b in range(batch):
        mask[b, : 3 * b % seq] = 0
    ids = np.where(mask == 1, ids, 0)
    return ids, mask


def hf_positions(mask):
    return np.maximum(np.cumsum(mask, axis=1) - 1, 0)


def hf_logits(model, ids, mask):
    """transformers' float32 logits with the positions transformers' generate uses for left padding."""
    with torch.no_grad():
        out = model(
            input_ids=torch.tensor(ids),
            attention_mask=torch.tensor(mask),
            position_ids=torch.tensor(hf_positions(mask)),
        )
    return out.logits.float().numpy()


def max_real_diff(a, b, mask):
    """max |a - b| over positions with mask == 1."""
    return float(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64))[np.asarray(mask) == 1].max())


@pytest.fixture(scope="session")
def diff_report():
    """Collects measured max |logit diff| per case and prints them at the end of the session."""
    report = {}
    yield report
    if report:
        print("\nmax |logit diff| vs transformers:")
        for key, value in sorted(report.items()):
            print(f"  {key:45s} {value:.3e}")


@nnx.jit
def forward(model, ids, mask):
    """Jitted ``model(ids, mask)``: one XLA compile per model and shape instead of one per op."""
    return model(jnp.asarray(ids), jnp.asarray(mask))


@nnx.jit
def forward_cached(model, ids, mask, cache):
    return model(jnp.asarray(ids), jnp.asarray(mask), cache=cache)
