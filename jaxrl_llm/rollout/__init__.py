"""Rollout: the jitted KV-cache sampler that produces completions for online RL.

``generate`` -> ``Rollout`` (tokens, mask, sampling logprobs, repeated prompts, temperature);
``lower_generate`` gives the one-loop XLA program (``generate``'s under a mesh), for inspection;
``sequence_logprobs`` recomputes completion logprobs under any params (training / reference);
``filter_logits`` is the top-k / top-p filter the sampler uses.
"""

from jaxrl_llm.rollout.sampler import Rollout, filter_logits, generate, lower_generate, sequence_logprobs

__all__ = ["Rollout", "filter_logits", "generate", "lower_generate", "sequence_logprobs"]
