"""Typed training configuration: dataclasses, YAML files, `key=value` overrides.

A config file is YAML with the sections below; every key is checked against the
schema, so a typo fails loudly with the list of valid keys instead of silently
training with a default. Command-line overrides use dotted paths:
`jaxrl-llm train --config configs/rloo_arithmetic.yaml algo.kl_coef=0.02 train.steps=50`.

Defaults follow the source document and TRL where they agree (kl_coef 0.05,
K=4 for RLOO, gamma 1, lambda 0.95, clip 0.2, lr 1e-6 for real models).
"""

from __future__ import annotations

import dataclasses
import os
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from jaxrl_llm.errors import UserError
from jaxrl_llm.training.algorithms.registry import get_spec


@dataclass
class LoraConfig:
    """LoRA adapters (models/lora.py, on Flax NNX's `nnx.LoRA`): only they are trained; the base
    weights are frozen, stored once in `model.dtype`, and with the adapters off are the reference."""

    rank: int = 8
    alpha: float = 16.0  # the update is scaled by alpha / rank
    dropout: float = 0.0  # on each adapter's input, in the training forward only (PEFT's lora_dropout)
    # Projection roles q k v o gate up down, or module names (q_proj, query_key_value, ...);
    # null adapts every projection the model has.
    targets: list[str] | None = None


@dataclass
class ModelConfig:
    """Which policy to train."""

    path: str = "builtin:tiny_arithmetic"  # a local HF directory, a GGUF file/dir, or "builtin:tiny_arithmetic"
    gguf_file: str | None = None  # GGUF file name inside `path`, when `path` is a directory of GGUF files
    # The dtype every forward and backward pass computes in. bfloat16 is mixed precision: the
    # parameters and optimizer state stay in `param_dtype` (float32), logits, log-softmax, KL and
    # the objectives are float32.
    dtype: Literal["float32", "bfloat16"] = "float32"
    # The dtype of the trained (master) parameters and the optimizer state. bfloat16 halves their
    # memory, but AdamW steps below a bfloat16 ulp (lr 1e-6 on weights of size 0.02) round away.
    param_dtype: Literal["float32", "bfloat16"] = "float32"
    # Activation checkpointing of each decoder layer: "auto" (by the platform the program runs on:
    # none on CPU, "dots_with_no_batch_dims_saveable" on GPU/TPU, which keeps the matmul outputs
    # and was both faster and 36% smaller than none on an H200), "none", "layer" (keep only each
    # layer's input, recompute the rest in the backward pass), or a `jax.checkpoint_policies` name.
    # `jaxrl-llm plan --compare-remat` says which fits a device.
    remat: str = "auto"
    scan_layers: bool = False  # run identical decoder layers under a scan: compile time independent of depth
    # Attention kernel: "auto" (cuDNN flash attention on GPU in bf16, else blockwise for long
    # sequences), "dense", "blockwise" (query blocks, no [S, S] scores for all heads at once), "cudnn".
    attention: Literal["auto", "dense", "blockwise", "cudnn"] = "auto"
    attention_block: int = 512  # query rows per block of the blockwise attention
    lora: LoraConfig | None = None  # train LoRA adapters instead of every weight (see LoraConfig)

    def lora_spec(self):
        """The `models.lora.LoraSpec` of `lora` (validated), or None without adapters."""
        if self.lora is None:
            return None
        from jaxrl_llm.models.lora import LoraSpec

        l = self.lora
        return LoraSpec(rank=l.rank, alpha=l.alpha, dropout=l.dropout,
                        targets=None if l.targets is None else tuple(l.targets))


@dataclass
class TaskConfig:
    """Where prompts come from (and the verifier, when the task has one): the built-in
    `arithmetic`, or `dataset` (your own file; its options are listed in tasks/dataset.py)."""

    name: str = "arithmetic"
    options: dict[str, Any] = field(default_factory=dict)  # passed to the task's constructor
    num_eval: int = 200  # held-out examples evaluated every `train.eval_every` steps (0: all)


@dataclass
class RewardSpec:
    """One reward term; the total reward is the weighted sum of the terms."""

    # task: the task's verifier; exact_match / numeric: a built-in verifier against the answer;
    # regex: 1 when the completion matches `pattern`; python: a function in TRL's convention;
    # reward_model: a sequence-classification checkpoint; environment: each episode's
    # environment's reward() (multi-turn rollouts, `rollout.environment`).
    kind: Literal["task", "exact_match", "numeric", "regex", "python", "reward_model", "environment"] = "task"
    weight: float = 1.0
    # python: "package.module:function" or "path/to/rewards.py:function"; reward_model: a directory.
    target: str | None = None
    pattern: str | None = None  # regex only: searched for in the completion (Python `re` syntax)
    # reward_model only: score prompt + completion + EOS, the text reward models are trained to
    # score at (the EOS is added when the completion did not end with it).
    append_eos: bool = True


@dataclass
class OverlongConfig:
    """DAPO's soft overlong punishment (Yu et al. 2025, https://arxiv.org/abs/2503.14476): a completion
    of |y| tokens loses penalty * (|y| - (L - buffer)) / buffer, clipped to [0, penalty], with
    L = rollout.max_new_tokens: nothing up to L - buffer tokens, the whole penalty at L. In a
    multi-turn episode |y| is each policy turn's length (L is a turn's limit) and the episode loses
    its longest turn's penalty; the environment's observation tokens never count."""

    buffer: int = 4  # the last tokens before rollout.max_new_tokens over which the penalty grows
    penalty: float = 1.0  # what a completion of rollout.max_new_tokens tokens loses


@dataclass
class RewardConfig:
    terms: list[RewardSpec] = field(default_factory=lambda: [RewardSpec()])
    missing_eos_penalty: float = 0.0  # subtracted from completions that never emit EOS
    overlong: OverlongConfig | None = None  # DAPO's length penalty near rollout.max_new_tokens; None: none
    clip: float | None = None  # clip the total reward to [-clip, clip]
    # Whiten the total reward over the sampled batch, for the update only: the logged rewards
    # (reward/mean, reward/std, reward/trained_mean, the progress bar) stay raw.
    normalize: bool = False
    on_error: Literal["raise", "mask"] = "raise"  # a term that raises or returns NaN: fail, or drop the sample
    # With on_error=mask: stop after this many consecutive steps in which no sample got a reward
    # (each such step trains on nothing and is warned about).
    max_invalid_steps: int = 3


@dataclass
class AlgoConfig:
    """The RL algorithm and its hyper-parameters."""

    name: str = "rloo"  # one of ALGORITHMS: a module of training/algorithms/
    num_samples: int = 4  # K completions per prompt
    kl_coef: float = 0.05
    # KL estimator of the objective (in the reward; in the loss for grpo). None: the algorithm's
    # default (k1, and k3 for grpo).
    kl_kind: Literal["k1", "k2", "k3"] | None = None
    baseline: Literal["batch", "ema"] = "batch"  # REINFORCE baseline
    ema_decay: float = 0.9
    update_epochs: int = 1  # passes over each batch; >1 (or num_minibatches > 1) turns on the clipped ratio
    num_minibatches: int = 1
    # What one clipped ratio covers when there are several updates per batch: a whole completion
    # ("sequence", TRL's RLOO) or one token ("token", PPO). None: the algorithm's default (sequence
    # for reinforce, vanilla_pg and rloo, token for ppo and grpo).
    # "sequence-mean": GSPO's (pi/pi_old)^(1/|y|), one per completion.
    ratio_level: Literal["sequence", "token", "sequence-mean"] | None = None
    clip_eps: float = 0.2
    clip_eps_high: float | None = None
    gamma: float = 1.0
    lam: float = 0.95
    vf_coef: float = 0.1
    value_clip: float | None = 0.2
    # PPO's value model: its own backbone ("separate", the source document's four models) or a
    # head on the policy's hidden states ("shared": value-loss gradients then reach the policy's trunk).
    critic: Literal["shared", "separate"] = "separate"
    whiten_advantages: bool = True  # PPO only
    # The std that group-relative advantages are divided by. None: the algorithm's own (group for
    # grpo and gspo, none for dr_grpo).
    grpo_scale: Literal["group", "batch", "none"] | None = None
    raft_min_score: float | None = None  # RAFT trains on a group's best sample only if it scores at least this
    entropy_coef: float = 0.0  # entropy bonus, aggregated like the policy loss (with its gradient)
    aggregation: str | None = None  # None: the algorithm's own default
    # Completions cut at rollout.max_new_tokens (no EOS) are left out of the loss and its
    # denominators, but keep their place in every baseline and advantage (DAPO). With token-mean
    # this is TRL's mask_truncated_completions; in the seq-mean modes TRL still counts the rows
    # and we do not (verl's convention: the loss averages over the completions in it).
    mask_truncated_completions: bool = False
    # Only the completion tokens whose entropy (under the policy that sampled) is in this top
    # fraction of the batch's carry the policy gradient (Wang et al. 2025, "80/20"; TRL's
    # top_entropy_quantile). 1: every token.
    entropy_quantile: float = 1.0


@dataclass
class RolloutConfig:
    prompts_per_step: int = 64
    # The longest prompt, in tokens. Prompts are padded to a few fixed widths (powers of two from
    # 16, capped at this), so compiled steps repeat. None: no limit.
    prompt_length: int | None = None
    # A prompt longer than prompt_length: "truncate" keeps its last prompt_length tokens (the
    # question, near the end, survives), "skip" trains on the next prompt instead. Counted in
    # the metrics data/truncated and data/skipped.
    long_prompts: Literal["truncate", "skip"] = "truncate"
    oversample: float = 1.0  # sample this many times more prompts; train on the groups whose rewards differ
    max_new_tokens: int = 8
    temperature: float = 1.0
    top_k: int = 0  # the training log-probabilities use the same top-k / top-p set as the sampler
    top_p: float = 1.0
    # Token ids that end a completion besides the tokenizer's and the model's generation config's EOS.
    stop_token_ids: list[int] = field(default_factory=list)
    # Sequences the sampler generates at once (a multiple of algo.num_samples); None: all of a step's.
    # A memory knob: each completion draws from a key of its row, so any size samples the same.
    micro_batch_size: int | None = None
    # Rows (prompt, sample) each device decodes at once in the rollout engine (rollout/engine.py):
    # the others wait in a queue and take a slot as soon as a row ends. At least algo.num_samples
    # (a multiple of it keeps whole prompt groups in flight); None: every row of a call at once.
    # A memory knob like micro_batch_size: the completions are the same for every value.
    slots: int | None = None
    # Multi-turn episodes (rollout/episodes.py): the policy's turns interleaved with an
    # environment's observations, trained on the policy's tokens only. 1 with no environment and
    # no tools: one completion per prompt (max_new_tokens), exactly as without these keys.
    max_turns: int = 1
    # An environment class ("package.module:Class" or "path/to/env.py:Class"), one instance per
    # episode, built with environment_options; or tools ("module:function", ...) for the
    # built-in tool environment, calls written in tool_format ("tagged": <call>f(x)</call>;
    # "chat": the chat template's <tool_call>{json}</tool_call>).
    environment: str | None = None
    environment_options: dict[str, Any] = field(default_factory=dict)
    tools: list[str] = field(default_factory=list)
    tool_format: Literal["tagged", "chat"] = "tagged"
    # The episode's tokens after the prompt, policy and observation (max_new_tokens bounds each
    # policy turn); needed with an environment or tools.
    max_total_tokens: int | None = None

    @property
    def multi_turn(self) -> bool:
        """Whether rollouts are episodes with an environment (else one completion per prompt)."""
        return self.environment is not None or bool(self.tools)


@dataclass
class OptimConfig:
    """AdamW and its learning-rate schedule (`setup.learning_rate_schedule`). The schedule counts
    optimizer updates, train.steps x algo.update_epochs x algo.num_minibatches of them: the warmup
    is `warmup_steps` updates (not RL steps) from 0 to `learning_rate`, and a linear or cosine
    decay then runs over the remaining updates, ending at the last one."""

    learning_rate: float = 1e-6
    schedule: Literal["constant", "cosine", "linear"] = "constant"
    warmup_steps: int = 0  # optimizer updates of linear warmup
    weight_decay: float = 0.0
    max_grad_norm: float | None = 1.0
    b1: float = 0.9
    b2: float = 0.999


@dataclass
class MeshConfig:
    data: int = -1  # devices on the data axis; -1: all devices not used by fsdp
    fsdp: int = 1  # devices that shard parameters and optimizer state


@dataclass
class WandbConfig:
    """Weights & Biases logging (`pip install 'jaxrl_llm[wandb]'`): the same scalars and eval
    samples TensorBoard gets, under `train.run_dir/wandb/`."""

    project: str = "jaxrl_llm"
    name: str | None = None  # the run's name in W&B; None: W&B picks one
    mode: Literal["online", "offline", "disabled"] = "online"  # offline: no network, `wandb sync` later


@dataclass
class RunConfig:
    steps: int = 100
    seed: int = 0
    run_dir: str = "runs/default"
    eval_every: int = 25
    eval_temperature: float = 0.0  # 0: greedy
    # k > 0: also sample k completions per held-out prompt at rollout.temperature and report
    # eval/pass@k (a prompt counts if any of its k is right) and eval/mean@k (the share right).
    eval_samples: int = 0
    log_samples: int = 4  # held-out prompts whose completions each evaluation writes to samples.jsonl
    checkpoint_every: int = 50
    keep_checkpoints: int = 2
    logprob_chunk_size: int | None = 4096  # rows per chunk of the vocabulary log-softmax
    # Vocabulary entries per block inside a chunk (the unembedding matmul and an online
    # log-sum-exp run block by block): the logits are at most [chunk rows, this] in float32.
    logprob_vocab_chunk_size: int | None = 32768
    # Sequences per forward/backward pass (a multiple of algo.num_samples dividing each update's
    # batch); gradients are accumulated with the whole batch's loss denominators, so the update
    # is the same as in one pass. None: the whole batch at once.
    micro_batch_size: int | None = None
    # Packed sequences (training/packing.py): prompt + completion sequences share rows of
    # `pack_length` tokens (segment ids keep them apart), so the forward and backward passes of
    # prepare and the updates skip the padding; the update is the same to float32 rounding. Off by
    # default: it wins when completions end early (benchmarks/results/packing.md).
    packing: bool = False
    pack_length: int | None = None  # tokens per packed row; None: the longest sequence, to a power of two
    progress: bool = True
    # A non-finite loss or gradient: "stop" (the update is not applied; the run stops without
    # saving, the last checkpoint intact) or "skip" (that update is dropped, a warning, training goes on).
    on_nonfinite: Literal["stop", "skip"] = "stop"
    plot: bool = True
    tensorboard: bool = True
    wandb: WandbConfig | None = None  # e.g. {project: my-project, mode: offline}


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    task: TaskConfig = field(default_factory=TaskConfig)
    reward: RewardConfig = field(default_factory=RewardConfig)
    algo: AlgoConfig = field(default_factory=AlgoConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    mesh: MeshConfig = field(default_factory=MeshConfig)
    train: RunConfig = field(default_factory=RunConfig)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


# -- building a config from plain data --------------------------------------------------------


def _type_name(tp) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _coerce(value, tp, where: str):
    """Check `value` against the annotation `tp` (converting int -> float), or raise."""
    origin = typing.get_origin(tp)
    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(tp)
        if value is None and type(None) in options:
            return None
        errors = []
        for option in options:
            if option is type(None):
                continue
            try:
                return _coerce(value, option, where)
            except ValueError as e:
                errors.append(str(e))
        raise UserError(f"`{where}`: got {value!r}, expected {_type_name(tp)}.")
    if origin is Literal:
        choices = typing.get_args(tp)
        if value not in choices:
            raise UserError(f"`{where}`: got {value!r}, expected one of {list(choices)}.")
        return value
    if origin is list:
        (item_tp,) = typing.get_args(tp)
        if not isinstance(value, list):
            raise UserError(f"`{where}`: got {value!r}, expected a list.")
        return [_coerce(v, item_tp, f"{where}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise UserError(f"`{where}`: got {value!r}, expected a mapping.")
        return dict(value)
    if dataclasses.is_dataclass(tp):
        return from_dict(tp, value, where)
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if tp in (int, float, str, bool) and (type(value) is not tp):
        raise UserError(f"`{where}`: got {value!r} ({type(value).__name__}), expected {tp.__name__}.")
    return value


def from_dict(cls, data, where: str = "config"):
    """Build dataclass `cls` from a mapping, rejecting unknown keys and ill-typed values."""
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise UserError(f"`{where}`: got {data!r}, expected a mapping with keys {[f.name for f in dataclasses.fields(cls)]}.")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise UserError(f"`{where}`: unknown key(s) {unknown}; valid keys are {sorted(fields)}.")
    hints = typing.get_type_hints(cls)
    kwargs = {name: _coerce(value, hints[name], f"{where}.{name}" if where != "config" else name)
              for name, value in data.items()}
    return cls(**kwargs)


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    """Apply `section.key=value` strings (values parsed as YAML) to nested `data`."""
    for item in overrides:
        if "=" not in item:
            raise UserError(f"override {item!r}: expected the form section.key=value, e.g. algo.kl_coef=0.02.")
        path, raw = item.split("=", 1)
        keys = path.strip().split(".")
        node = data
        for key in keys[:-1]:
            node = node.setdefault(key, {})
            if not isinstance(node, dict):
                raise UserError(f"override {item!r}: `{key}` is not a section.")
        try:
            node[keys[-1]] = _parse_value(raw)
        except yaml.YAMLError:
            raise UserError(f"override {item!r}: {raw!r} is not a YAML value (quote strings with special "
                            "characters).") from None
    return data


def _parse_value(raw: str):
    """YAML, but with numbers YAML 1.1 leaves as strings (`5e-4`) read as numbers."""
    value = yaml.safe_load(raw)
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            pass
    return value


def validate(config: Config) -> Config:
    """Cross-field checks that a type alone cannot express."""
    a, r, t = config.algo, config.rollout, config.train
    spec = get_spec(a.name)
    overlong = config.reward.overlong
    checks = [
        (a.num_samples >= 1, "algo.num_samples", a.num_samples, "an integer >= 1"),
        (a.num_samples >= spec.min_samples, "algo.num_samples", a.num_samples,
         f">= {spec.min_samples} for {a.name} (it compares the K samples of a prompt)"),
        (a.kl_coef >= 0, "algo.kl_coef", a.kl_coef, ">= 0"),
        (a.update_epochs >= 1, "algo.update_epochs", a.update_epochs, ">= 1"),
        (a.num_minibatches >= 1 and r.prompts_per_step % a.num_minibatches == 0, "algo.num_minibatches",
         a.num_minibatches, f"a divisor of rollout.prompts_per_step={r.prompts_per_step} (minibatches hold whole groups)"),
        (0 <= a.ema_decay < 1, "algo.ema_decay", a.ema_decay, "in [0, 1)"),
        (0 < a.entropy_quantile <= 1, "algo.entropy_quantile", a.entropy_quantile,
         "in (0, 1]: the top fraction of tokens by entropy that carry the gradient (1: all)"),
        (r.prompts_per_step >= 1, "rollout.prompts_per_step", r.prompts_per_step, ">= 1"),
        (r.oversample >= 1.0, "rollout.oversample", r.oversample, ">= 1 (1: train on every sampled prompt)"),
        (r.oversample == 1.0 or a.num_samples >= 2, "rollout.oversample", r.oversample,
         "1 when algo.num_samples is 1 (selection compares the samples of a prompt)"),
        (r.max_new_tokens >= 1, "rollout.max_new_tokens", r.max_new_tokens, ">= 1"),
        (r.prompt_length is None or r.prompt_length >= 1, "rollout.prompt_length", r.prompt_length, "None or >= 1"),
        (r.temperature > 0, "rollout.temperature", r.temperature, "> 0 for RL sampling"),
        (0 < r.top_p <= 1, "rollout.top_p", r.top_p, "in (0, 1]"),
        (r.top_k >= 0, "rollout.top_k", r.top_k, ">= 0"),
        (config.optim.learning_rate > 0, "optim.learning_rate", config.optim.learning_rate, "> 0"),
        (config.optim.warmup_steps >= 0, "optim.warmup_steps", config.optim.warmup_steps, ">= 0 optimizer updates"),
        (t.steps >= 0, "train.steps", t.steps, ">= 0"),
        (t.checkpoint_every >= 1, "train.checkpoint_every", t.checkpoint_every, ">= 1"),
        (t.keep_checkpoints >= 1, "train.keep_checkpoints", t.keep_checkpoints, ">= 1"),
        (t.eval_samples >= 0, "train.eval_samples", t.eval_samples, ">= 0 (0: greedy accuracy only)"),
        (t.log_samples >= 0, "train.log_samples", t.log_samples, ">= 0"),
        (config.reward.max_invalid_steps >= 1, "reward.max_invalid_steps", config.reward.max_invalid_steps, ">= 1"),
        (overlong is None or 1 <= overlong.buffer <= r.max_new_tokens, "reward.overlong.buffer",
         overlong and overlong.buffer, f"an integer in [1, rollout.max_new_tokens={r.max_new_tokens}]"),
        (overlong is None or overlong.penalty >= 0, "reward.overlong.penalty", overlong and overlong.penalty,
         ">= 0 (what a completion of rollout.max_new_tokens tokens loses)"),
        (config.mesh.fsdp >= 1, "mesh.fsdp", config.mesh.fsdp, ">= 1"),
        (config.model.attention_block >= 1, "model.attention_block", config.model.attention_block, ">= 1"),
        (t.pack_length is None or t.pack_length >= 2, "train.pack_length", t.pack_length,
         "an integer >= 2 (tokens per packed row) or null"),
        (not t.packing or config.model.attention != "cudnn", "model.attention", config.model.attention,
         "'auto', 'dense' or 'blockwise' with train.packing (cuDNN's attention in jax.nn cannot mask segments)"),
        (len(config.reward.terms) >= 1, "reward.terms", config.reward.terms, "at least one reward term"),
        (r.max_turns >= 1, "rollout.max_turns", r.max_turns, ">= 1"),
        (r.max_turns == 1 or r.multi_turn, "rollout.max_turns", r.max_turns,
         "1 without rollout.environment or rollout.tools (who would answer the policy's turns?)"),
        (r.environment is None or not r.tools, "rollout.tools", r.tools,
         "[] with rollout.environment (tools are for the built-in tool environment; a class builds its own)"),
        (not r.environment_options or r.environment is not None, "rollout.environment_options",
         r.environment_options, "{} without rollout.environment"),
        (not r.multi_turn or r.max_total_tokens is not None, "rollout.max_total_tokens", r.max_total_tokens,
         "an integer >= rollout.max_new_tokens with an environment or tools (the episode's token budget)"),
        (r.max_total_tokens is None or (r.multi_turn and r.max_total_tokens >= r.max_new_tokens),
         "rollout.max_total_tokens", r.max_total_tokens,
         f"null without an environment, else an integer >= rollout.max_new_tokens={r.max_new_tokens}"),
        (r.multi_turn or all(term.kind != "environment" for term in config.reward.terms), "reward.terms",
         [term.kind for term in config.reward.terms], "no 'environment' term without rollout.environment"),
    ]
    for ok, name, value, expected in checks:
        if not ok:
            raise UserError(f"`{name}`: got {value!r}, expected {expected}.")
    if a.ratio_level is not None and a.ratio_level not in spec.ratio_levels:
        allowed = " or ".join(repr(level) for level in (*spec.ratio_levels, None))
        raise UserError(f"`algo.ratio_level`: got {a.ratio_level!r}, expected {allowed} for {a.name} "
                        f"({spec.ratio_note}).")
    sequences = r.prompts_per_step * a.num_samples
    update_sequences = sequences // a.num_minibatches
    if t.micro_batch_size is not None and (t.micro_batch_size < 1 or t.micro_batch_size % a.num_samples
                                           or update_sequences % t.micro_batch_size):
        raise UserError(f"`train.micro_batch_size`: got {t.micro_batch_size}, expected a multiple of "
                         f"algo.num_samples={a.num_samples} that divides the {update_sequences} sequences of "
                         "each update (micro-batches hold whole prompt groups).")
    if r.micro_batch_size is not None and (r.micro_batch_size < 1 or r.micro_batch_size % a.num_samples):
        raise UserError(f"`rollout.micro_batch_size`: got {r.micro_batch_size}, expected a multiple of "
                         f"algo.num_samples={a.num_samples} (the sampler generates whole prompt groups).")
    if r.slots is not None and (isinstance(r.slots, bool) or not isinstance(r.slots, int) or r.slots < a.num_samples):
        raise UserError(f"`rollout.slots`: got {r.slots!r}, expected an integer >= algo.num_samples={a.num_samples} "
                        "(the rows decoding at once hold at least one prompt's samples), or null for all of them.")
    _check_remat(config.model.remat)
    if config.model.lora is not None:
        config.model.lora_spec()  # rank, alpha, dropout and target names
    if any(i < 0 for i in r.stop_token_ids):
        raise UserError(f"`rollout.stop_token_ids`: got {r.stop_token_ids!r}, expected non-negative token ids.")
    if a.aggregation is not None:
        from jaxrl_llm.objectives import LOSS_AGGREGATIONS

        if a.aggregation not in LOSS_AGGREGATIONS:
            raise UserError(f"`algo.aggregation`: got {a.aggregation!r}, expected None or one of {list(LOSS_AGGREGATIONS)}.")
    for i, term in enumerate(config.reward.terms):
        if term.kind in ("python", "reward_model") and not term.target:
            raise UserError(f"`reward.terms[{i}].target`: got None, expected a target for a {term.kind!r} reward.")
        if term.kind == "regex":
            try:
                re.compile(term.pattern or "")
            except re.error as e:
                raise UserError(f"`reward.terms[{i}].pattern`: {term.pattern!r} is not a regular expression ({e}).") from None
            if not term.pattern:
                raise UserError(f"`reward.terms[{i}].pattern`: got {term.pattern!r}, expected a regular expression "
                                "for a 'regex' reward.")
        elif term.pattern is not None:
            raise UserError(f"`reward.terms[{i}].pattern`: got {term.pattern!r}, but only kind 'regex' takes a pattern "
                            f"(this term is {term.kind!r}).")
    return config


def _check_remat(remat: str) -> None:
    from jaxrl_llm.models.layers import REMAT_CHOICES

    if remat not in REMAT_CHOICES:
        raise UserError(f"`model.remat`: got {remat!r}, expected 'auto', 'none', 'layer' or one of the "
                         f"jax.checkpoint_policies {list(REMAT_CHOICES[3:])}.")


def load_config(path: str | Path | None = None, overrides: list[str] = ()) -> Config:
    """Read a YAML config (or start from defaults), apply overrides, validate."""
    data = {}
    if path is not None:
        data = resolve_relative_paths(read_yaml(path), Path(path).parent)
    data = apply_overrides(data, list(overrides))
    return validate(from_dict(Config, data))


def resolve_relative_paths(data: dict, base: Path) -> dict:
    """Paths a config file names for its own data (`task.options.path` and `eval_path`, reward,
    environment and tool files `path/to/file.py:name`) are relative to the file, so that a recipe runs from
    any directory. Paths given as overrides stay relative to the working directory."""

    def resolve(path: str) -> str:
        return path if os.path.isabs(path) else os.path.normpath(base / path)

    options = (data.get("task") or {}).get("options") if isinstance(data.get("task"), dict) else None
    if isinstance(options, dict):
        for key in ("path", "eval_path"):
            if isinstance(options.get(key), str):
                options[key] = resolve(options[key])
    rollout = data.get("rollout") if isinstance(data.get("rollout"), dict) else {}
    targets = [("environment", rollout.get("environment"))]
    targets += [(i, t) for i, t in enumerate(rollout.get("tools") or []) if isinstance(rollout.get("tools"), list)]
    for key, target in targets:
        if isinstance(target, str) and ".py:" in target:
            file, name = target.rsplit(":", 1)
            (rollout if key == "environment" else rollout["tools"])[key] = f"{resolve(file)}:{name}"
    terms = (data.get("reward") or {}).get("terms") if isinstance(data.get("reward"), dict) else None
    for term in terms if isinstance(terms, list) else []:
        target = term.get("target") if isinstance(term, dict) else None
        if isinstance(target, str) and term.get("kind") == "python" and ".py:" in target:
            file, function = target.rsplit(":", 1)
            term["target"] = f"{resolve(file)}:{function}"
    return data


def read_yaml(path: str | Path) -> dict:
    """The mapping in a YAML config file; an empty, malformed or non-mapping file is an error
    naming the file (and the line and column YAML stopped at)."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"`--config`: no file at {str(path)!r}.")
    text = path.read_text()
    if not text.strip():
        raise UserError(f"`--config`: {str(path)!r} is empty; expected YAML sections such as `algo:` and "
                        "`train:` (configs/rloo_arithmetic.yaml is the main job's recipe).")
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise UserError(f"`--config`: {str(path)!r} is not valid YAML{where}: {problem}.") from None
    if not isinstance(data, dict):
        raise UserError(f"`--config`: {str(path)!r} holds a {type(data).__name__}, expected a mapping of "
                        "sections (model, task, reward, algo, rollout, optim, mesh, train).")
    return data
