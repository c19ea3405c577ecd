"""What an algorithm is made of: the batches it reads, its spec, and the formula pieces specs share.

An `AlgorithmSpec` says, as data and two small functions, everything that distinguishes one
algorithm from another: what `prepare` must compute before the updates (a reference, old
log-probabilities, critic values), how scores become advantages, which objective of
`jaxrl_llm.objectives` the loss calls, and its defaults (aggregation, ratio level, KL kind).
`core.Algorithm` runs any spec: the forward passes, micro-batches, denominators and metrics
are the same for all of them, and none of it knows an algorithm by name.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp

import jaxrl_llm.objectives as obj


class RolloutBatch(NamedTuple):
    """What the sampler and the reward produced; N = prompts * K, prompt-major."""

    prompt_ids: jax.Array  # [N, P] left-padded
    prompt_mask: jax.Array  # [N, P]
    tokens: jax.Array  # [N, T] completion tokens
    mask: jax.Array  # [N, T] 1 up to and including EOS
    scores: jax.Array  # [N] total reward (0 where invalid)
    valid: jax.Array  # [N] bool: the reward is usable
    finished: jax.Array | None = None  # [N] bool: ended with a stop token (None: not recorded)


class TrainBatch(NamedTuple):
    """What the updates of one RL step read; the optional fields are fixed by `prepare`."""

    rollout: RolloutBatch
    # [N, T] the sampling policy at its temperature, from `prepare` (several updates, micro-batches
    # or dropout); None: one update whose loss forward is the sampling policy and measures them.
    old_logprobs: jax.Array | None
    ref_logprobs: jax.Array | None  # [N, T] (None: an algorithm without a reference term)
    advantages: jax.Array | None  # [N] or [N, T]; None: computed in the loss
    baseline_state: obj.EMABaselineState | None  # REINFORCE's EMA baseline (before this batch if the loss advances it)
    old_values: jax.Array | None  # [N, T] a critic's values, with several updates only
    returns: jax.Array | None  # [N, T] a critic's targets, with several updates only
    # A batch-wide baseline for this batch, fixed in `prepare` when the update is split into
    # micro-batches (a micro-batch's own mean is not the batch's); None: the loss computes it.
    baseline: jax.Array | None = None
    # [N, T] 0/1 the tokens that carry the policy gradient (`algo.entropy_quantile` < 1), chosen on
    # the whole batch in `prepare` when it runs the policy; None: all, or chosen in the loss.
    gradient_tokens: jax.Array | None = None


class Forward(NamedTuple):
    logprobs: jax.Array  # [N, T]
    entropy: jax.Array  # [N, T]
    hidden: jax.Array  # [N, P + T, D] final hidden states of the whole sequence


class AdvantageInputs(NamedTuple):
    """What an algorithm's advantages read: the rollout and the sampling policy's measurements."""

    rollout: RolloutBatch
    sampling_logprobs: jax.Array | None  # [N, T] (None: an algorithm whose advantages read no policy)
    ref_logprobs: jax.Array | None  # [N, T]
    old_values: jax.Array | None  # [N, T] the critic's, for algorithms with one
    baseline_state: obj.EMABaselineState | None
    kl_kind: str


@dataclasses.dataclass(frozen=True)
class ObjectiveInputs:
    """What an objective reads inside the differentiated loss, for one (micro-)batch."""

    cfg: Any  # AlgoConfig
    spec: AlgorithmSpec
    batch: TrainBatch
    logprobs: jax.Array  # [N, T] the differentiated policy's (with gradient at every token)
    entropy: jax.Array  # [N, T] the differentiated policy's
    old_logprobs: jax.Array  # [N, T] the ratio's old side (one update: `logprobs` under stop_gradient)
    sampling_logprobs: jax.Array  # [N, T] the policy that sampled (the reward's KL, the advantages)
    values: jax.Array | None  # [N, T] the critic's current values (algorithms with a critic)
    old_values: jax.Array | None  # [N, T]
    single_update: bool  # one update per batch: the policy differentiated is the one that sampled
    aggregation: str
    denominator: jax.Array  # the whole batch's policy-loss denominator (see `loss_denominator`)
    kl_kind: str
    ratio_level: str | None
    loss_rows: jax.Array  # [N] 0/1 the rows in the loss: a usable reward (and, if asked, not truncated)
    # [N, T] 0/1 the tokens whose policy-gradient term carries gradient (`algo.entropy_quantile` < 1);
    # None: every token. Regularisers (an in-loss KL, the entropy bonus) act on every token.
    gradient_tokens: jax.Array | None = None
    # How the regularisers in the objective (GRPO's in-loss KL) are aggregated (see `AlgorithmSpec`).
    regularizer_aggregation: str | None = None

    @property
    def policy_logprobs(self) -> jax.Array:
        """[N, T] `logprobs` for the policy-gradient term: the same values, the gradient only
        through `gradient_tokens` (Wang et al. 2025's high-entropy tokens; every token when None)."""
        if self.gradient_tokens is None:
            return self.logprobs
        return jnp.where(self.gradient_tokens > 0, self.logprobs, jax.lax.stop_gradient(self.logprobs))

    @property
    def rollout(self) -> RolloutBatch:
        return self.batch.rollout

    @property
    def token_mask(self) -> jax.Array:
        """[N, T] completion tokens of the rows in the loss (`loss_rows`)."""
        return self.rollout.mask * self.loss_rows[:, None]

    @property
    def scores_or_nan(self) -> jax.Array:
        """[N] scores, NaN where the reward failed: the public losses drop those rows themselves."""
        return jnp.where(self.rollout.valid, self.rollout.scores, jnp.nan)

    def advantages(self):
        """`(advantages, returns, baseline_state)`: fixed by `prepare`, else computed here from the
        sampling policy's log-probabilities (one update on the whole batch)."""
        b = self.batch
        if b.advantages is not None:
            return b.advantages, b.returns, b.baseline_state
        advantages, returns, baseline_state = self.spec.advantages(self.cfg, self.advantage_inputs())
        return jax.lax.stop_gradient((advantages, returns)) + (baseline_state,)

    def advantage_inputs(self) -> AdvantageInputs:
        """The advantages' inputs, from the sampling policy's log-probabilities."""
        b = self.batch
        return AdvantageInputs(b.rollout, self.sampling_logprobs, b.ref_logprobs, self.old_values, b.baseline_state,
                               self.kl_kind)

    def clip_options(self) -> dict:
        c = self.cfg
        return dict(clip_eps=c.clip_eps, clip_eps_high=c.clip_eps_high, ratio_level=self.ratio_level)

    def aggregation_options(self) -> dict:
        return dict(aggregation=self.aggregation, denominator=self.denominator)


Objective = Callable[[Any, ObjectiveInputs], tuple]  # (cfg, inputs) -> (loss, aux Stats, baseline_state)
Advantages = Callable[[Any, AdvantageInputs], tuple]  # (cfg, inputs) -> (advantages, returns, baseline_state)


@dataclasses.dataclass(frozen=True)
class AlgorithmSpec:
    """One algorithm, as `core.Algorithm` runs it.

    `objective` and `advantages` are the formula; the flags say what the shared machinery must
    prepare for them. Defaults are those of an algorithm with a reference, a token-level ratio
    and advantages that read only its own micro-batch.
    """

    name: str
    summary: str  # "advantage | loss", one line of the table in `jaxrl_llm.training.algorithms`
    objective: Objective
    advantages: Advantages | None  # None: the objective needs none (RAFT)
    aggregation: str  # the default `algo.aggregation`
    kl_kind: str = "k1"  # the default `algo.kl_kind`
    ratio_levels: tuple[str, ...] = ("token",)  # the `algo.ratio_level`s allowed, the default first; (): no ratio
    ratio_note: str = ""  # why only those, for the error message
    uses_reference: bool = True  # a frozen reference policy's log-probabilities
    critic: bool = False  # a value model is built and trained beside the policy
    min_samples: int = 1  # the smallest `algo.num_samples` it is defined for
    # Several updates (or dropout) need the sampling policy's log-probabilities from a forward
    # before the updates; False: the objective never reads them (RAFT).
    reads_sampling_policy: bool = True
    # The advantages span the whole batch (whitening, a batch std): with one update, `prepare`
    # fixes them on the whole batch whenever it runs the policy.
    batch_wide_advantages: bool = False
    # With one update in micro-batches, what spans the batch reads the policy: `prepare` runs it.
    spans_batch_reads_policy: bool = False
    # `(cfg, AdvantageInputs) -> (baseline_state, baseline)`: a batch-wide baseline that `prepare`
    # fixes on the whole batch, for an objective that takes a baseline (REINFORCE); None: none.
    batch_baseline: Callable | None = None
    # `(cfg, rollout, loss_rows) -> [N] 0/1`: the rows the policy loss is averaged over, a subset of
    # `loss_rows` (a usable reward, and finished if truncated ones are masked); None: `loss_rows`.
    policy_rows: Callable | None = None
    kl_in_objective: bool = False  # the objective reports its own in-loss KL (no `kl/objective`)
    # How the per-token regularisers (an in-loss KL, the entropy bonus) are aggregated when
    # `algo.aggregation` is a seq-mean mode; None: like the policy term. GSPO's surrogate is one
    # term per completion (seq-mean-token-sum), its KL and bonus each completion's token mean.
    regularizer_aggregation: str | None = None
    entropy_bonus_in_objective: bool = False  # the objective adds `algo.entropy_coef`'s bonus itself
    uses_ema_baseline: Callable[[Any], bool] = lambda cfg: False  # the train state keeps an EMA baseline

    @property
    def default_ratio_level(self) -> str | None:
        return self.ratio_levels[0] if self.ratio_levels else None


# -- formula pieces several specs share ------------------------------------------------------------


def sequence_rewards(cfg, x: AdvantageInputs):
    """[N] the bandit reward of each completion: score - kl_coef * sum_t kl_t (the source document)."""
    r = x.rollout
    return obj.sequence_rewards(r.scores, x.sampling_logprobs, x.ref_logprobs, r.mask, kl_coef=cfg.kl_coef,
                                kind=x.kl_kind)


def bandit_loss_options(cfg, x: ObjectiveInputs) -> dict:
    """The keyword arguments of `reinforce_loss` / `rloo_loss` for one update: the seed's estimator."""
    return dict(kl_coef=cfg.kl_coef, kl_kind=x.kl_kind, nonfinite_scores="mask",
                sampling_logprobs=x.sampling_logprobs,
                loss_rows=x.loss_rows if cfg.mask_truncated_completions else None, **x.aggregation_options())


def clipped_objective(cfg, x: ObjectiveInputs):
    """`(loss, aux, baseline_state)` of the clipped surrogate (`ppo_loss` without a critic) on the
    advantages `prepare` fixed: what a bandit algorithm optimises with several updates per batch."""
    advantages, _, baseline_state = x.advantages()
    loss, aux = obj.ppo_loss(x.policy_logprobs, x.old_logprobs, advantages, x.token_mask, **x.clip_options(),
                             **x.aggregation_options())
    return loss, aux, baseline_state
