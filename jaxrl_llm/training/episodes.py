"""Multi-turn rollouts in the trainer (`rollout.environment` or `rollout.tools`): one environment
per episode, the prompt its `reset` gives, the episodes sampled over a continued KV cache
(`rollout.episodes`), and what the rewards, metrics and logged samples read of them.

The batch the algorithms train on is the usual `RolloutBatch`: the completion region holds the
whole transcript after the prompt, and `mask` is 1 on the policy's tokens only, so the loss,
the KL and the entropy count the policy's tokens and every observation token sits in the
context with mask 0.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import numpy as np

from jaxrl_llm.environments import Renderer, environment_factory, has_method
from jaxrl_llm.errors import UserError
from jaxrl_llm.rewards import Sample
from jaxrl_llm.rollout.batched import sample_episode_rows
from jaxrl_llm.rollout.decode import decode_completions
from jaxrl_llm.rollout.episodes import Episodes


class SampledEpisodes(NamedTuple):
    """What `EpisodeRollouts.sample` returns: the episodes and their environments (prompt-major)."""

    episodes: Episodes
    environments: list

    @property
    def rollout(self):
        return self.episodes.rollout


class EpisodeRollouts:
    """The trainer's multi-turn sampler: environments, prompts, episodes, samples and metrics.

    Args:
      rollout: the `RolloutConfig` (`environment` or `tools`, `max_turns`, `max_total_tokens`, ...).
      tokenizer: the policy's tokenizer (prompts, observations, stop strings, turn texts).
      eos_ids: the token ids that end a turn (and, when the environment says so, the episode).
    """

    def __init__(self, rollout, tokenizer, *, eos_ids):
        if jax.process_count() > 1:
            raise UserError("`rollout.environment`: multi-turn rollouts run their environments in one process; "
                            f"this run has {jax.process_count()} (use one process, with all its devices).")
        self.config = rollout
        self.tokenizer = tokenizer
        self.eos_ids = eos_ids
        self.factory, tools = environment_factory(rollout.environment, rollout.environment_options, rollout.tools,
                                                  rollout.tool_format)
        self.renderer = Renderer(tokenizer, tools if rollout.tool_format == "chat" else None)
        probe = self.factory()
        self.has_metrics = has_method(probe, "metrics")
        # Matched on the turn's text (a stop string may be tokenized otherwise in context), and
        # its ids alone on the device, which stop the common case at once.
        self.stop_strings = list(getattr(probe, "stop_strings", None) or [])
        self.stop_sequences = []
        for text in self.stop_strings:
            ids = list(tokenizer(text, add_special_tokens=False)["input_ids"])
            if not ids:
                raise UserError(f"`rollout.environment`: the stop string {text!r} has no tokens in this tokenizer")
            self.stop_sequences.append(ids)

    def prompt(self, example) -> str:
        """The prompt text of `example`'s episodes: what a fresh environment's `reset` gives."""
        return self.renderer.prompt(self.factory().reset(example), example)

    def sample(self, policy, examples, rows, key, *, num_samples: int, temperature: float, mesh,
               cache_dtype=None, prompt_limit=None) -> SampledEpisodes:
        """`num_samples` episodes of each example (its prompt token `rows`), each with a fresh
        environment, reset with the example; every reset must give the prompt the rows hold."""
        r = self.config
        environments = []
        for example in examples:
            expected = self.prompt(example)
            for _ in range(num_samples):
                environment = self.factory()
                got = self.renderer.prompt(environment.reset(example), example)
                if got != expected:
                    raise UserError(f"`rollout.environment`: reset gave two prompts for one example ({expected!r}, "
                                    f"then {got!r}); the {num_samples} episodes of a prompt (algo.num_samples) "
                                    "must share it, so reset must be a function of the example.")
                environments.append(environment)
        episodes = sample_episode_rows(
            policy, rows, environments, key, mesh=mesh, num_samples=num_samples, temperature=temperature,
            max_new_tokens=r.max_new_tokens, max_turns=r.max_turns, max_total_tokens=r.max_total_tokens,
            micro_batch_size=r.micro_batch_size, top_k=r.top_k, top_p=r.top_p, prompt_limit=prompt_limit,
            pad_token_id=self.tokenizer.pad_token_id, eos_ids=self.eos_ids, stop_sequences=self.stop_sequences,
            stop_strings=self.stop_strings,
            decode=lambda ids: self.tokenizer.decode(ids, skip_special_tokens=True),
            encode_observation=self.renderer.observation_ids, cache_dtype=cache_dtype)
        return SampledEpisodes(episodes, environments)

    def samples(self, examples, sampled: SampledEpisodes, num_samples: int) -> list[Sample]:
        """One `Sample` per episode: the transcript's text, its policy and environment parts, the
        environment, and `finished` when the environment ended the episode."""
        episodes = sampled.episodes
        rollout = episodes.rollout
        context = np.maximum(rollout.mask, rollout.observation_mask)
        texts, _, ids = decode_completions(self.tokenizer, rollout.tokens, context, set())
        out = []
        for i, (text, token_ids) in enumerate(zip(texts, ids)):
            transcript = tuple((role, self.tokenizer.decode(rollout.tokens[i, start:end].tolist(),
                                                            skip_special_tokens=True))
                               for role, start, end in episodes.segments[i])
            turn_lengths = tuple(end - start for role, start, end in episodes.segments[i] if role == "policy")
            out.append(Sample(examples[i // num_samples], text, bool(episodes.finished[i]), token_ids,
                              sampled.environments[i], transcript, turn_lengths))
        return out

    def metrics(self, sampled: SampledEpisodes) -> dict[str, float]:
        """Per episode means: `episode/turns`, `episode/observation_tokens`,
        `episode/truncated_observations`, and the environments' own `metrics()` (the tool
        environment's: `tools/calls_per_episode`; `tools/errors` is the step's count)."""
        episodes = sampled.episodes
        metrics = {"episode/turns": float(np.mean(episodes.turns)),
                   "episode/observation_tokens": float(np.mean(episodes.rollout.observation_mask.sum(-1))),
                   "episode/truncated_observations": float(np.mean(episodes.truncated_observations)),
                   "episode/finished": float(np.mean(episodes.finished))}
        if not self.has_metrics:
            return metrics
        reported: dict[str, list[float]] = {}
        for environment in sampled.environments:
            for key, value in environment.metrics().items():
                reported.setdefault(key, []).append(float(value))
        for key, values in reported.items():
            if key == "tools/errors":
                metrics[key] = float(np.sum(values))
            elif key == "tools/calls":
                metrics["tools/calls_per_episode"] = float(np.mean(values))
            else:
                metrics[key] = float(np.mean(values))
        return metrics


__all__ = ["EpisodeRollouts", "SampledEpisodes"]
