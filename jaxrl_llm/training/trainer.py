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

import functools
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxrl_llm import models, parallel
from jaxrl_llm.errors import Interrupted, UserError
from jaxrl_llm.parallel import distributed
from jaxrl_llm.rewards import Sample, build_reward, standardize
from jaxrl_llm.rollout.batched import sample_rows
from jaxrl_llm.rollout.decode import decode_completions
from jaxrl_llm.tasks import get_task, task_verifies
from jaxrl_llm.tasks.base import exact_accuracy
from jaxrl_llm.training.algorithms import Algorithm, RolloutBatch, get_spec, minibatch_indices, take
from jaxrl_llm.training.checkpoint import Checkpointer
from jaxrl_llm.training.config import Config
from jaxrl_llm.training.episodes import EpisodeRollouts, SampledEpisodes
from jaxrl_llm.training.logging import MetricsLogger, Progress, describe_eval, plot_curves, to_json
from jaxrl_llm.training.packing import Packer
from jaxrl_llm.training.evaluation import evaluate_held_out, held_out_prompts
from jaxrl_llm.training.prompts import next_prompts, prompt_limit, tokenize_prompts
from jaxrl_llm.training.runtime import (CompileTimer, InvalidRewards, NonFiniteUpdate, StopSignals,
                                        report_invalid_rewards, report_nonfinite)
from jaxrl_llm.training.setup import (compute_dtype, context_length, load_policy, make_optimizer, model_fingerprint,
                                      split_policy, stop_token_ids)
from jaxrl_llm.training.state import TrainState, step_keys, update_step


def informative_rows(scores, valid, num_samples: int, num_groups: int) -> np.ndarray:
    """Rows of `num_groups` whole groups, those whose valid rewards are not all equal first
    (a group of identical rewards has zero advantage: it teaches nothing), in sampling order."""
    grouped = np.where(valid, scores, np.nan).reshape(-1, num_samples)
    spread = np.nan_to_num(np.nanmax(grouped, axis=1) - np.nanmin(grouped, axis=1)) > 0
    order = np.concatenate([np.flatnonzero(spread), np.flatnonzero(~spread)])[:num_groups]
    groups = np.sort(order)
    return (groups[:, None] * num_samples + np.arange(num_samples)).reshape(-1)


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
        if c.rollout.slots is not None and self.mesh.size > 1:
            raise UserError(f"`rollout.slots`: got {c.rollout.slots}, expected null on a mesh of {self.mesh.size} "
                            "devices: the rollout engine (and its slots) runs on one device; on a mesh each device "
                            "samples its rows with the one-loop sampler (rollout.micro_batch_size bounds its memory).")

        # Model, tokenizer, task, reward.
        policy, self.tokenizer = load_policy(c)
        self.prompt_limit = prompt_limit(c.rollout, context_length(policy))
        self.eos_ids = stop_token_ids(c, self.tokenizer)
        self.task = get_task(c.task.name, tokenizer=self.tokenizer, **c.task.options)
        self.verifies = task_verifies(self.task)
        self.reward_fn = build_reward(c.reward, self.task, max_new_tokens=c.rollout.max_new_tokens)
        # Multi-turn episodes: one environment per episode, its reset giving the prompt.
        self.episodes = EpisodeRollouts(c.rollout, self.tokenizer, eos_ids=self.eos_ids) if c.rollout.multi_turn else None
        # Held-out prompts are tokenized (and fitted to rollout.prompt_length) once.
        self.eval_examples, self.eval_rows = held_out_prompts(self.task, c.task.num_eval, self._tokenize,
                                                              self.prompt_limit, c.rollout.long_prompts,
                                                              self.tokenizer.bos_token_id)
        self._told_long_prompts = False
        self._invalid_steps = 0  # consecutive steps in which every reward failed

        # The critic exists only for an algorithm that has one, PPO (trained in full, in param_dtype,
        # also beside LoRA).
        spec = get_spec(c.algo.name)
        critic_graphdef = critic_params = None
        if spec.critic:
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
                                   vocab_chunk_size=c.train.logprob_vocab_chunk_size, top_k=c.rollout.top_k,
                                   top_p=c.rollout.top_p, compute_dtype=self.compute_dtype,
                                   micro_batch_size=c.train.micro_batch_size,
                                   reference_graphdef=self.reference_graphdef,
                                   dropout=bool(self.lora_spec is not None and self.lora_spec.dropout))
        self.optimizer = make_optimizer(c)
        state = TrainState.create(policy_params=policy_params, critic_params=critic_params,
                                  optimizer=self.optimizer, seed=c.train.seed,
                                  ema_baseline=spec.uses_ema_baseline(c.algo),
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

    # -- generation and scoring ---------------------------------------------------------------
    def _tokenize(self, examples) -> list[list[int]]:
        """Prompt token rows (of the environment's prompts, in episodes); an empty prompt is an
        error naming it (nothing to condition on)."""
        if self.episodes is not None:
            examples = [e._replace(prompt=self.episodes.prompt(e)) for e in examples]
        return tokenize_prompts(self.tokenizer, examples, self.config.task.name)

    def _next_prompts(self, n: int):
        """`n` training examples from the data position on, with their prompt token rows:
        `(examples, rows, prompts read, truncated, skipped)`. A skipped prompt is replaced by
        the next one, so the position moves by the prompts read."""
        r = self.config.rollout
        examples, rows, read, truncated, skipped = next_prompts(self.task, self._tokenize, self.data_position, n,
                                                                self.prompt_limit, r.long_prompts,
                                                                self.tokenizer.bos_token_id)
        if (truncated or skipped) and not self._told_long_prompts:
            self._told_long_prompts = True
            print(f"note: training prompts longer than {self.prompt_limit} tokens (rollout.prompt_length or the "
                  f"context) are "
                  f"{'truncated from the left' if r.long_prompts == 'truncate' else 'skipped'} "
                  "(rollout.long_prompts); the metrics data/truncated and data/skipped count them", flush=True)
        return examples, rows, read, truncated, skipped

    def _sample(self, examples, rows, key, *, num_samples, temperature):
        """K completions of each example's prompt (token rows) by the current policy,
        `rollout.micro_batch_size` sequences at a time (`sample_rows`), on the host; with an
        environment, K episodes (`SampledEpisodes`)."""
        r = self.config.rollout
        if self.episodes is not None:
            return self.episodes.sample(self.policy_model(self._sampling_params), examples, rows, key,
                                        num_samples=num_samples, temperature=temperature, mesh=self.mesh,
                                        cache_dtype=self.compute_dtype, prompt_limit=self.prompt_limit)
        return sample_rows(self.policy_model(self._sampling_params), rows, key, mesh=self.mesh,
                           num_samples=num_samples, temperature=temperature, max_new_tokens=r.max_new_tokens,
                           micro_batch_size=r.micro_batch_size, top_k=r.top_k, top_p=r.top_p,
                           prompt_limit=self.prompt_limit, pad_token_id=self.tokenizer.pad_token_id,
                           eos_ids=self.eos_ids, cache_dtype=self.compute_dtype, slots=r.slots)

    def _samples(self, examples, sampled, num_samples) -> list[Sample]:
        """The sampled completions (or episodes) as the reward terms see them, decoded."""
        if isinstance(sampled, SampledEpisodes):
            return self.episodes.samples(examples, sampled, num_samples)
        texts, finished, ids = decode_completions(self.tokenizer, sampled.tokens, sampled.mask, self.eos_ids)
        repeated = [e for e in examples for _ in range(num_samples)]
        return [Sample(e, t, f, i) for e, t, f, i in zip(repeated, texts, finished, ids)]

    def _score(self, examples, sampled, num_samples):
        """Decoded `Sample`s and their raw `(scores, valid)` (the configured terms, penalty and clip;
        `reward.normalize` is applied by `collect`, for the update only). With several processes
        each process scores the rows its devices sampled, and the scores are gathered."""
        samples = self._samples(examples, sampled, num_samples)
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
        prompt, completion, reward, correct, reference answer and finished (`evaluate_held_out`)."""
        return evaluate_held_out(self.config, self.eval_examples, self.eval_rows, sample=self._sample,
                                 score=self._score, describe=self._samples, task=self.task, verifies=self.verifies)

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
        sampled = self._sample(examples, prompt_rows, generation_key, num_samples=c.algo.num_samples,
                               temperature=c.rollout.temperature)
        rollout = sampled.rollout if isinstance(sampled, SampledEpisodes) else sampled
        if self.episodes is not None:  # measured on every episode sampled, before any selection
            data_metrics.update(self.episodes.metrics(sampled))

        # 2. Rewards, on the host (verifiers and environments are Python).
        samples, raw, valid = self._score(examples, sampled, c.algo.num_samples)
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
        finished = np.array([s.finished for s in samples])
        batch = RolloutBatch(*arrays, scores, valid, finished)
        batch = jax.device_put(batch, parallel.batch_sharding(self.mesh))
        return batch, samples, sampled_scores, sampled_valid, raw, data_metrics

    def step(self) -> dict:
        c = self.config
        start = time.perf_counter()
        _, shuffle_key = step_keys(self.state, int(self.state.step))
        batch, samples, sampled_scores, sampled_valid, trained_scores, data_metrics = self.collect()

        # 3. Reference log-probabilities; with several updates also old log-probs, values, advantages.
        # With train.packing the sequences share rows (planned here, on the host, from their lengths).
        packer = None
        if c.train.packing:
            packer = Packer(batch, algorithm=self.algorithm, num_samples=c.algo.num_samples,
                            pack_length=c.train.pack_length, mesh=self.mesh)
        layout = packer and packer()
        self.state, train_batch, metrics = self._prepare(self.state, batch, layout)
        if packer:
            metrics["train/packed_fill"] = packer.fill(layout)

        # 4. Updates: epochs x minibatches of whole prompt groups.
        update_stats, update_scalars = [], []
        for epoch in range(c.algo.update_epochs):
            order = minibatch_indices(jax.random.fold_in(shuffle_key, epoch), c.rollout.prompts_per_step,
                                      c.algo.num_samples, c.algo.num_minibatches)
            for indices in order:
                minibatch = train_batch if self.algorithm.single_update else take(train_batch, indices)
                if packer and not self.algorithm.single_update:
                    layout = packer(indices)
                self.state, (stats, scalars) = self._update(self.state, minibatch,
                                                            self._dropout_key(shuffle_key, len(update_scalars)),
                                                            layout)
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
            report_nonfinite(metrics, update_scalars, step=int(self.state.step), on_nonfinite=c.train.on_nonfinite,
                             checkpointer=self.checkpointer)
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
        # A step in which every reward failed is warned about; reward.max_invalid_steps in a row stop the run.
        self._invalid_steps = self._invalid_steps + 1 if metrics["reward/valid_fraction"] == 0 else 0
        if self._invalid_steps:
            report_invalid_rewards(self._invalid_steps, step=int(self.state.step), limit=c.reward.max_invalid_steps)
        metrics["loss/policy"] = metrics.get("loss/policy", metrics["loss/total"])
        return metrics

    def _dropout_key(self, shuffle_key, update: int):
        """LoRA dropout's key for the `update`-th update of a step (None without dropout); the epochs'
        permutation keys are fold_in(shuffle_key, epoch < update_epochs), so these never collide."""
        if self.lora_spec is None or not self.lora_spec.dropout:
            return None
        return jax.random.fold_in(shuffle_key, self.config.algo.update_epochs + update)

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
            say(f"held-out {describe_eval(before)} before ({len(self.eval_examples)} examples)")
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
            say(f"held-out {describe_eval(after)} after")
        summary.update(last)
        if primary:
            if c.train.plot and self.logger.history:
                plot_curves(self.logger.history, self.run_dir / "curves.png", f"{c.algo.name} on {c.task.name}")
            (self.run_dir / "summary.json").write_text(to_json(summary, indent=2))
        self.logger.close()
        say(f"run directory: {self.run_dir}")
        return summary


def train(config: Config, *, resume: bool = False) -> dict:
    """Train with `config` (resuming from the latest checkpoint when asked); returns a summary."""
    return Trainer(config, resume=resume).run()


__all__ = ["InvalidRewards", "NonFiniteUpdate", "Trainer", "train"]
