"""The shared machinery that runs any `AlgorithmSpec`: forward passes, `prepare`, the loss,
micro-batch accumulation, denominators and minibatches. It knows no algorithm by name.

`prepare(state, rollout) -> (state, batch, metrics)` computes what stays fixed during the
updates of one RL step: the reference log-probabilities and, when there are several updates
per batch, the rollout-time ("old") log-probabilities, the critic's old values and the
advantages. `loss(params, batch) -> (loss, (aux, baseline_state))` is what the optimizer
differentiates, once or for several epochs x minibatches.

One update per batch (the default): the policy being differentiated is the one that
sampled, so no "old" forward pass runs: its own log-probabilities under stop_gradient are the
"old" ones (ratio exactly 1), as TRL does. With LoRA dropout the loss's forward is not the
sampling policy's (the sampler drops nothing out): `prepare` then runs a dropout-free forward,
whose log-probabilities give the reward's KL, the advantages and the logged KL, whatever the
micro-batching or the dropout key.

Several updates per batch (`update_epochs > 1` or `num_minibatches > 1`): advantages are
fixed in `prepare` from an old forward pass, and the objective clips a ratio at
`algo.ratio_level`: `sequence` clips one ratio per completion, exp(sum_t log pi - log pi_old),
as TRL's RLOO does, so the whole completion stays one action; `token` clips each token's.

Micro-batches (`train.micro_batch_size`): every forward pass of `prepare` and every
forward/backward of an update runs on micro-batches of whole prompt groups, and the
update's gradient is their sum. What spans the whole batch is fixed first, on the whole
batch: the loss denominators (`loss_denominator`), a batch-wide baseline, batch-wide
advantages. So the update equals the one-pass update and the algorithm never changes with
the micro-batch size; only memory and time do.

Mixed precision (`model.dtype` bfloat16, `model.param_dtype` float32): the parameters and
the optimizer state stay float32; each forward pass runs on a bfloat16 cast of them (the
cast is differentiable, so gradients arrive in float32). Logits, log-softmax, KL,
advantages and every objective are float32. The frozen reference is stored in the compute
dtype: it is only ever read by forward passes.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

import jaxrl_llm.objectives as obj
from jaxrl_llm import models
from jaxrl_llm.errors import UserError
from jaxrl_llm.models import lora
from jaxrl_llm.objectives import Stat
from jaxrl_llm.training.algorithms.base import (AdvantageInputs, Forward, ObjectiveInputs, RolloutBatch,
                                                TrainBatch)
from jaxrl_llm.training import packing as packed
from jaxrl_llm.training.algorithms.registry import get_spec


def sequence_inputs(rollout: RolloutBatch):
    """Prompt + completion ids and attention mask. Tokens after EOS are attended by nothing
    that matters: attention is causal and their own outputs are masked out of every loss."""
    ids = jnp.concatenate([rollout.prompt_ids, rollout.tokens], axis=1)
    attention = jnp.concatenate([rollout.prompt_mask, jnp.ones_like(rollout.tokens)], axis=1)
    return ids, attention


def completion_slice(x, rollout: RolloutBatch):
    """Positions P-1 .. P+T-2 of a [N, P+T, ...] array: the ones that predict completion tokens."""
    p, t = rollout.prompt_ids.shape[1], rollout.tokens.shape[1]
    return x[:, p - 1 : p - 1 + t]


def policy_forward(graphdef, params, rollout: RolloutBatch, *, temperature, chunk_size, vocab_chunk_size=None,
                   top_k=0, top_p=1.0, compute_dtype=None, dropout_key=None,
                   packing: packed.PackedLayout | None = None) -> Forward:
    """Log-probabilities and entropies of the completion tokens under the sampling distribution
    (its temperature and top-k / top-p set; pass the defaults for a reference policy), with the
    forward pass in `compute_dtype` (None: the parameters' own).

    `params`: the model's state, or a tuple of states (LoRA: the adapters and the frozen base).
    `dropout_key`: LoRA dropout for this forward (a training pass); None: none.
    `packing`: the rollout's sequences packed in rows (`training.packing`; one micro-batch's
    layout): the same log-probabilities at every completion token, 0 after the stop token."""
    states = params if isinstance(params, tuple) else (params,)
    model = nnx.merge(graphdef, *models.cast_floating(states, compute_dtype))
    if dropout_key is not None:
        lora.set_dropout_key(model, dropout_key)
    options = dict(temperature=temperature, chunk_size=chunk_size, vocab_chunk_size=vocab_chunk_size,
                   softcap=model.final_logit_softcapping, top_k=top_k, top_p=top_p)
    if packing is not None:
        hidden = models.hidden_states(model, packing.ids, segment_ids=packing.segment_ids)
        logprobs, entropy = obj.linear_token_logprobs(
            packed.gather_tokens(hidden, packing)[None], model.unembedding_matrix(),
            packed.completion_targets(rollout.tokens, packing)[None], **options)
        shape = rollout.tokens.shape
        return Forward(packed.scatter_tokens(logprobs[0], packing, shape),
                       packed.scatter_tokens(entropy[0], packing, shape), hidden)
    ids, attention = sequence_inputs(rollout)
    hidden = models.hidden_states(model, ids, attention)
    # Straight from hidden states: the [N, T, V] logits exist only [chunk_size, vocab_chunk_size] at a time.
    logprobs, entropy = obj.linear_token_logprobs(
        completion_slice(hidden, rollout), model.unembedding_matrix(), rollout.tokens, **options)
    return Forward(logprobs, entropy, hidden)


def critic_values(critic_graphdef, critic_params, rollout: RolloutBatch, policy_hidden, compute_dtype=None,
                  packing: packed.PackedLayout | None = None):
    """V(s_t) for each completion token t: the critic's value at the position before it
    (`packing`: with `policy_hidden` and the separate critic's pass in the packed layout)."""
    critic = nnx.merge(critic_graphdef, models.cast_floating(critic_params, compute_dtype))
    if critic.layout == "shared":
        values = critic(hidden=policy_hidden)
    elif packing is not None:
        values = critic(packing.ids, segment_ids=packing.segment_ids)
    else:
        values = critic(*sequence_inputs(rollout))
    if packing is not None:
        return packed.scatter_tokens(packed.gather_tokens(values, packing), packing, rollout.tokens.shape)
    return completion_slice(values, rollout)


class Algorithm:
    """The prepare/loss pair of one algorithm (`algo.name`'s spec), closed over the model graph
    and the config.

    `compute_dtype`: the dtype of every forward pass (None: the parameters' own);
    `micro_batch_size`: sequences per forward/backward pass (None: the whole batch at once);
    `dropout`: the training forward applies (LoRA) dropout when `loss` is given a key. The
    sampler applies none, so the sampling log-probabilities (the KL in the reward, the
    advantages, the logged KL) then come from a dropout-free forward in `prepare`.

    LoRA: `graphdef` is the adapted policy's graph, `reference_graphdef` the same model without
    adapters. The policy's trained parameters are then the adapters only, and the frozen base
    (`TrainState.base_params`) is passed beside them (`base`): the adapted forward merges both,
    the reference forward is the base alone. No reference copy exists.
    """

    def __init__(self, algo, *, graphdef, critic_graphdef=None, temperature: float,
                 chunk_size: int | None, vocab_chunk_size: int | None = None, top_k: int = 0, top_p: float = 1.0,
                 compute_dtype=None, micro_batch_size: int | None = None, reference_graphdef=None,
                 dropout: bool = False):
        self.cfg = algo
        self.spec = spec = get_spec(algo.name)
        self.dropout = dropout
        self.graphdef = graphdef
        self.reference_graphdef = reference_graphdef
        self.lora = reference_graphdef is not None
        self.critic_graphdef = critic_graphdef
        self.temperature = temperature
        self.top_k, self.top_p = top_k, top_p
        self.chunk_size, self.vocab_chunk_size = chunk_size, vocab_chunk_size
        self.compute_dtype = compute_dtype
        self.micro_batch_size = micro_batch_size
        self.aggregation = algo.aggregation or spec.aggregation
        # The regularisers' own aggregation applies among the seq-mean modes (which share a denominator).
        self.regularizer_aggregation = self.aggregation
        if spec.regularizer_aggregation is not None and self.aggregation != "token-mean":
            self.regularizer_aggregation = spec.regularizer_aggregation
        self.kl_kind = algo.kl_kind or spec.kl_kind
        self.ratio_level = algo.ratio_level or spec.default_ratio_level
        self.single_update = algo.update_epochs == 1 and algo.num_minibatches == 1
        self.uses_reference = spec.uses_reference
        self.entropy_quantile = algo.entropy_quantile
        if spec.critic != (critic_graphdef is not None):
            raise UserError(f"`algo.name`: {algo.name} {'needs' if spec.critic else 'has no'} critic, but one was "
                            f"{'not ' if spec.critic else ''}given (build one exactly when the spec says `critic`).")
        if micro_batch_size is not None and micro_batch_size % algo.num_samples:
            raise UserError(f"`train.micro_batch_size`: got {micro_batch_size}, expected a multiple of "
                             f"algo.num_samples={algo.num_samples} (micro-batches hold whole prompt groups).")

    def num_micro_batches(self, num_sequences: int) -> int:
        """How many micro-batches a batch of `num_sequences` runs in (1: the whole batch)."""
        size = self.micro_batch_size
        if size is None or size >= num_sequences:
            return 1
        if num_sequences % size:
            raise UserError(f"`train.micro_batch_size`: got {size}, expected a divisor of the {num_sequences} "
                             "sequences of each update (rollout.prompts_per_step * algo.num_samples / "
                             "algo.num_minibatches).")
        return num_sequences // size

    def needs_old_forward(self, num_sequences: int) -> bool:
        """Whether `prepare` runs the policy before the updates: for the "old" log-probabilities of
        several updates; with LoRA dropout, for the sampling policy's log-probabilities (the
        sampler applies none, the loss's forward does); or, with one update in micro-batches, for
        what spans the batch and reads them (a batch-wide baseline, whitened GAE advantages, the
        entropy quantile of `algo.entropy_quantile`)."""
        if self.entropy_quantile < 1 and self.num_micro_batches(num_sequences) > 1:
            return True
        if not self.spec.reads_sampling_policy:
            return False
        if not self.single_update or self.dropout:
            return True
        return self.num_micro_batches(num_sequences) > 1 and self.spec.spans_batch_reads_policy

    def _forward(self, params, rollout, base=None, dropout_key=None, packing=None):
        """The policy's forward; `base`: the frozen base a LoRA policy's adapters sit on."""
        return policy_forward(self.graphdef, params if base is None else (params, base), rollout,
                              temperature=self.temperature, chunk_size=self.chunk_size,
                              vocab_chunk_size=self.vocab_chunk_size, top_k=self.top_k, top_p=self.top_p,
                              compute_dtype=self.compute_dtype, dropout_key=dropout_key, packing=packing)

    def _values(self, critic_params, rollout, policy_hidden, packing=None):
        return critic_values(self.critic_graphdef, critic_params, rollout, policy_hidden, self.compute_dtype,
                             packing)

    def _reference_logprobs(self, ref_params, rollout, packing=None):
        # The reference is the frozen base policy's full softmax (at the sampling temperature):
        # a top-k / top-p set of its own would give sampled tokens log-probability -inf.
        # With LoRA it is the base with the adapters off: the same weights, another graph.
        ref = policy_forward(self.reference_graphdef or self.graphdef, ref_params, rollout,
                             temperature=self.temperature, chunk_size=self.chunk_size,
                             vocab_chunk_size=self.vocab_chunk_size, compute_dtype=self.compute_dtype,
                             packing=packing)
        return jax.lax.stop_gradient(ref.logprobs)

    def _advantages(self, inputs: AdvantageInputs):
        """`(advantages, returns or None, baseline_state)`, constants for the gradient."""
        if self.spec.advantages is None:
            return None, None, inputs.baseline_state
        advantages, returns, baseline_state = self.spec.advantages(self.cfg, inputs)
        return jax.lax.stop_gradient((advantages, returns)) + (baseline_state,)

    # -- before the updates: ref logprobs; with several updates also old logprobs, values, advantages --
    def _prepare_forwards(self, state, rollout: RolloutBatch, with_policy: bool, packing=None) -> dict:
        """The forward passes of `prepare`, micro-batch by micro-batch: reference log-probabilities
        and, `with_policy`, the policy's log-probabilities, entropies and (a critic) values."""

        def forwards(rows: RolloutBatch, layout) -> dict:
            out = {}
            if self.uses_reference:
                reference = state.base_params if self.lora else state.ref_params
                out["ref_logprobs"] = self._reference_logprobs(reference, rows, layout)
            if with_policy:
                old = self._forward(state.params["policy"], rows, state.base_params, packing=layout)
                out.update(old_logprobs=old.logprobs, entropy=old.entropy)
                if self.spec.critic:
                    out["old_values"] = self._values(state.params["critic"], rows, old.hidden, layout)
            return jax.lax.stop_gradient(out)

        num_micro = self.num_micro_batches(rollout.tokens.shape[0])
        if num_micro == 1:
            return forwards(rollout, None if packing is None else packing.micro_batch(0))
        k = self.cfg.num_samples
        out = jax.lax.map(lambda args: forwards(*args), (split_micro_batches(rollout, num_micro, k), packing))
        return jax.tree.map(lambda x: merge_micro_batches(x, k), out)

    def prepare(self, state, rollout: RolloutBatch, packing: packed.PackedLayout | None = None):
        """See the module docstring. `packing`: the batch's sequences packed in rows, micro-batch by
        micro-batch (`training.packing.plan`); every forward pass then runs on the packed rows."""
        spec = self.spec
        num_sequences = rollout.tokens.shape[0]
        with_policy = self.needs_old_forward(num_sequences)
        self._check_packing(packing, num_sequences)
        out = self._prepare_forwards(state, rollout, with_policy, packing)
        ref_logprobs = out.get("ref_logprobs")
        inputs = AdvantageInputs(rollout, out.get("old_logprobs"), ref_logprobs, out.get("old_values"),
                                 state.baseline, self.kl_kind)
        if self.single_update:
            # The loss differentiates the policy that sampled; the sampling log-probabilities
            # measured here (None: not measured) are what its reward's KL and advantages read.
            batch = TrainBatch(rollout, out.get("old_logprobs"), ref_logprobs, None, state.baseline, None, None)
            if with_policy:
                # What spans the batch is fixed here, on the whole batch (a micro-batch's mean is
                # not the batch's), from the dropout-free forward.
                if spec.batch_baseline is not None:
                    baseline_state, baseline = spec.batch_baseline(self.cfg, inputs)
                    state = state.replace(baseline=baseline_state)
                    batch = batch._replace(baseline_state=baseline_state, baseline=baseline)
                elif spec.batch_wide_advantages:
                    advantages, returns, _ = self._advantages(inputs)
                    batch = batch._replace(advantages=advantages, returns=returns)
            elif spec.batch_wide_advantages and self.num_micro_batches(num_sequences) > 1:
                # Batch-wide advantages that read no policy (GRPO's scores, with a batch std):
                # fixed here on the whole batch, where a micro-batch's loss would see its own std.
                advantages, returns, _ = self._advantages(inputs)
                batch = batch._replace(advantages=advantages, returns=returns)
        elif with_policy:
            advantages, returns, baseline_state = self._advantages(inputs)
            state = state.replace(baseline=baseline_state)
            batch = TrainBatch(rollout, out["old_logprobs"], ref_logprobs, advantages, baseline_state,
                               out.get("old_values"), returns)
        else:  # several updates of an objective that reads no sampling policy (RAFT): nothing to fix
            batch = TrainBatch(rollout, None, ref_logprobs, None, state.baseline, None, None)
        if not with_policy:
            # The loss differentiates the policy that sampled: it measures the rest itself.
            return state, batch, {}
        batch = batch._replace(gradient_tokens=self._gradient_tokens(
            out["entropy"], rollout.mask * self.loss_rows(rollout)[:, None]))
        token_mask = rollout.mask * rollout.valid[:, None]
        # Measured once on the whole batch, on the policy that sampled (the minibatches' own
        # means would not average to it).
        metrics = {"entropy": obj.masked_mean(out["entropy"], token_mask)}
        kl = self._kl_metrics(out["old_logprobs"], ref_logprobs, token_mask)
        metrics.update({key: stat.mean for key, stat in kl.items()})
        return state, batch, metrics

    # -- the differentiated loss ---------------------------------------------------------------
    def loss_rows(self, rollout: RolloutBatch) -> jax.Array:
        """[N] 0/1 the completions in the loss: those whose reward is usable and, with
        `algo.mask_truncated_completions`, that ended with a stop token (a truncated one keeps its
        place in the baselines and advantages, which read `valid`)."""
        rows = rollout.valid.astype(jnp.float32)
        if self.cfg.mask_truncated_completions:
            if rollout.finished is None:
                raise UserError("`algo.mask_truncated_completions`: the rollout batch records no `finished` flags "
                                "(RolloutBatch.finished: [N] bool, True where a completion ended with a stop token).")
            rows = rows * rollout.finished.astype(jnp.float32)
        return rows

    def _gradient_tokens(self, entropy, token_mask):
        """[N, T] 0/1 the tokens that carry the policy gradient: those whose entropy is in the top
        `algo.entropy_quantile` of the batch's; None when every token does."""
        if self.entropy_quantile >= 1:
            return None
        return obj.top_quantile_mask(entropy, token_mask, self.entropy_quantile)

    def loss_denominators(self, batch: TrainBatch) -> dict:
        """The loss denominators of `batch` (see `loss_denominator`), failed-reward rows out of every
        one: `policy` for the objective (over the spec's `policy_rows`, e.g. RAFT's selected ones),
        `bonus` for the entropy bonus (a value loss and a bonus inside the objective share `policy`,
        which is the same). `loss` uses those of the batch it is given; passed to `loss` on each
        micro-batch of it, they make the micro-batch losses add up to the batch's."""
        rollout = batch.rollout
        rows = self.loss_rows(rollout)
        policy_rows = rows if self.spec.policy_rows is None else self.spec.policy_rows(self.cfg, rollout, rows)
        return {"policy": obj.loss_denominator(rollout.mask, self.aggregation, seq_mask=policy_rows),
                "bonus": obj.loss_denominator(rollout.mask, self.regularizer_aggregation, seq_mask=rows)}

    def loss(self, params, batch: TrainBatch, denominators: dict | None = None, base=None, dropout_key=None,
             packing: packed.PackedLayout | None = None):
        """`(loss, (aux, baseline_state))`: `aux` a dict of `Stat`s; `baseline_state` the EMA
        baseline after this batch (None unless the algorithm keeps one). `denominators` (from
        `loss_denominators` on the whole batch) when `batch` is one micro-batch of it; None:
        `batch`'s own. LoRA: `base` is the frozen base (not differentiated), `dropout_key` the
        adapters' dropout. `packing`: `batch`'s sequences packed in rows (one micro-batch's layout)."""
        cfg, spec, rollout = self.cfg, self.spec, batch.rollout
        denominators = denominators or self.loss_denominators(batch)
        mask = rollout.mask * rollout.valid[:, None]  # the metrics: every completion with a reward
        rows = self.loss_rows(rollout)
        loss_mask = rollout.mask * rows[:, None]
        fwd = self._forward(params["policy"], rollout, base, dropout_key, packing)
        values = self._values(params["critic"], rollout, fwd.hidden, packing) if spec.critic else None
        # The sampling policy's log-probabilities (the KL in the reward, the advantages, the logged
        # KL): measured by `prepare` when it ran the policy (without dropout), else this forward's.
        sampling_logprobs = batch.old_logprobs
        if sampling_logprobs is None:
            sampling_logprobs = jax.lax.stop_gradient(fwd.logprobs)
        if self.single_update:
            # One update differentiates the policy that sampled: the ratio's "old" side is this
            # forward itself (ratio exactly 1, with dropout too), and so are the old values.
            old_logprobs = jax.lax.stop_gradient(fwd.logprobs)
            old_values = None if values is None else jax.lax.stop_gradient(values)
        else:
            old_logprobs, old_values = batch.old_logprobs, batch.old_values
        selected = None
        if self.entropy_quantile < 1:
            # Only the selected tokens carry the policy gradient (the objective's policy term);
            # every value and the regularisers' gradients stay those of all tokens. Chosen on the
            # whole batch by `prepare` when it ran the policy, else here from this forward.
            selected = batch.gradient_tokens
            if selected is None:
                selected = self._gradient_tokens(fwd.entropy, loss_mask)
        inputs = ObjectiveInputs(cfg, spec, batch, fwd.logprobs, fwd.entropy, old_logprobs, sampling_logprobs, values,
                                 old_values, self.single_update, self.aggregation, denominators["policy"],
                                 self.kl_kind, self.ratio_level, rows, selected, self.regularizer_aggregation)
        loss, aux, baseline_state = spec.objective(cfg, inputs)
        if cfg.entropy_coef and not spec.entropy_bonus_in_objective:
            entropy_term, _ = obj.aggregate_loss(fwd.entropy, loss_mask, self.regularizer_aggregation,
                                                 denominator=denominators["bonus"])
            loss = loss - cfg.entropy_coef * entropy_term
        aux["entropy"] = obj.aggregate_loss(fwd.entropy, mask, "token-mean")[1]
        aux.update(self._kl_metrics(sampling_logprobs, batch.ref_logprobs, mask))
        return loss, (aux, baseline_state)

    def value_and_grad(self, params, batch: TrainBatch, base=None, dropout_key=None,
                       packing: packed.PackedLayout | None = None):
        """`((loss, (aux, baseline_state)), grads)` of `loss` on `batch`, micro-batch by micro-batch.

        The micro-batches' losses use the whole batch's denominators, so their sum is the whole
        batch's loss and the sum of their gradients (accumulated in float32) its gradient; the
        `Stat`s of `aux` add up exactly. Only `params` are differentiated: a LoRA policy's frozen
        `base` gets no gradient. Micro-batch m's dropout key is `fold_in(dropout_key, m)`.
        `packing`: `batch`'s sequences packed, micro-batch by micro-batch (`training.packing.plan`).
        """
        grad_fn = jax.value_and_grad(self.loss, has_aux=True)
        num_micro = self.num_micro_batches(batch.rollout.tokens.shape[0])
        self._check_packing(packing, batch.rollout.tokens.shape[0])
        if num_micro == 1:
            return grad_fn(params, batch, None, base, dropout_key, None if packing is None else packing.micro_batch(0))
        denominators = self.loss_denominators(batch)
        # Scalars (the baseline and its state) are shared by every micro-batch; rows are split.
        shared = dict(baseline_state=batch.baseline_state, baseline=batch.baseline)
        rows = split_micro_batches(batch._replace(baseline_state=None, baseline=None), num_micro,
                                   self.cfg.num_samples)

        def micro_step(micro, index, layout):
            key = None if dropout_key is None else jax.random.fold_in(dropout_key, index)
            (loss, (aux, _)), grads = grad_fn(params, micro._replace(**shared), denominators, base, key, layout)
            return loss, aux, jax.tree.map(lambda g: g.astype(jnp.float32), grads)

        def accumulate(total, micro_index_layout):
            return jax.tree.map(jnp.add, total, micro_step(*micro_index_layout)), None

        first = jax.tree.map(lambda x: x[0], (rows, packing))
        zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), jax.eval_shape(micro_step, first[0], 0, first[1]))
        (loss, aux, grads), _ = jax.lax.scan(accumulate, zeros, (rows, jnp.arange(num_micro), packing))
        grads = jax.tree.map(lambda g, p: g.astype(p.dtype), grads, params)
        return (loss, (aux, batch.baseline_state)), grads

    def _check_packing(self, packing, num_sequences: int) -> None:
        if packing is not None and packing.ids.shape[0] != self.num_micro_batches(num_sequences):
            raise UserError(f"packing: got a layout for {packing.ids.shape[0]} micro-batches, expected "
                            f"{self.num_micro_batches(num_sequences)} (plan it with the rows of "
                            "`training.packing.micro_batch_rows`).")

    def _kl_metrics(self, sampling_logprobs, ref_logprobs, mask):
        """One definition of `kl` for every algorithm: the k1 estimate of KL(pi || pi_ref) per valid
        completion token, under the policy that sampled. `kl/objective` is the estimator the
        objective puts in the reward (an objective with the KL in the loss reports its own); an
        algorithm without a reference has neither."""
        if not self.uses_reference:
            return {}
        metrics = {"kl": Stat.of(obj.kl_penalty(sampling_logprobs, ref_logprobs, kind="k1"), mask)}
        if not self.spec.kl_in_objective:
            metrics["kl/objective"] = Stat.of(obj.kl_penalty(sampling_logprobs, ref_logprobs, kind=self.kl_kind), mask)
        return metrics


def split_micro_batches(tree, num_micro: int, num_samples: int):
    """Every `[N, ...]` leaf as `[num_micro, N / num_micro, ...]`, whole prompt groups per
    micro-batch. Micro-batch m takes groups m, m + M, m + 2M, ...: the contiguous rows each
    device holds then feed every micro-batch equally, so no micro-batch waits on one device."""

    def split(x):
        groups = x.shape[0] // num_samples
        x = x.reshape(groups // num_micro, num_micro, num_samples, *x.shape[1:])
        return jnp.swapaxes(x, 0, 1).reshape(num_micro, -1, *x.shape[3:])

    return jax.tree.map(split, tree)


def merge_micro_batches(x, num_samples: int):
    """The inverse of `split_micro_batches` for one `[M, N / M, ...]` array."""
    num_micro, rows = x.shape[:2]
    x = x.reshape(num_micro, rows // num_samples, num_samples, *x.shape[2:])
    return jnp.swapaxes(x, 0, 1).reshape(num_micro * rows, *x.shape[3:])


def minibatch_indices(key, num_prompts: int, num_samples: int, num_minibatches: int):
    """Shuffled sequence indices [num_minibatches, N / num_minibatches], whole groups together."""
    groups = jax.random.permutation(key, num_prompts).reshape(num_minibatches, -1)
    return (groups[..., None] * num_samples + jnp.arange(num_samples)).reshape(num_minibatches, -1)


def take(batch: Any, indices):
    """Rows `indices` of every [N, ...] array of a batch (scalars stay as they are)."""
    return jax.tree.map(lambda x: x[indices] if jnp.ndim(x) >= 1 else x, batch)
