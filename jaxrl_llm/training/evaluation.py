"""Held-out evaluation during training: the held-out prompts, tokenized and fitted once, and at
each evaluation their metrics (`eval/reward`, `eval/accuracy`, `eval/pass@k`, `eval/mean@k`)
and the sample rows written to `samples.jsonl`."""

from __future__ import annotations

import jax
import numpy as np

from jaxrl_llm.tasks.evaluate import pass_at_k
from jaxrl_llm.training.prompts import fit_prompts


def held_out_prompts(task, num_eval: int | None, tokenize, limit: int | None, long_prompts: str,
                     bos_id: int | None = None):
    """`(examples, prompt token rows)` of the task's held-out set (its first `num_eval`
    examples when given), fitted to `limit` tokens as `long_prompts` says (`fit_prompts`)."""
    eval_examples = task.eval_examples() if hasattr(task, "eval_examples") else []
    eval_examples = eval_examples[: num_eval] if num_eval else eval_examples
    examples, rows, truncated, skipped = fit_prompts(eval_examples, tokenize(eval_examples), limit, long_prompts,
                                                     bos_id)
    if truncated or skipped:
        print(f"held-out set: {truncated + skipped} of {len(eval_examples)} prompts are longer than "
              f"{limit} tokens (rollout.prompt_length or the context): "
              f"{'truncated' if truncated else 'skipped'} (rollout.long_prompts)")
    return examples, rows


def evaluate_held_out(config, examples, prompt_rows, *, sample, score, describe, task,
                      verifies: bool) -> tuple[dict, list[dict]]:
    """The held-out metrics and the first `train.log_samples` held-out examples as rows of
    prompt, completion, reward, correct (the task's verifier; None without one), reference
    answer and finished (and, for episodes, the transcript's parts by role). `sample`, `score`
    and `describe` are the trainer's (`Trainer._sample`, `_score`, `_samples`).

    `eval/accuracy` is of one completion per prompt (greedy by default), and with
    `train.eval_samples: k`, `eval/pass@k` and `eval/mean@k` of k samples per prompt at the
    training temperature. `eval/reward` is the mean reward of the configured reward function (its
    terms, penalty and clip; not the batch normalisation, not the KL) on the same completions as
    `eval/accuracy`."""
    c = config
    if not examples:
        return {}, []
    key = jax.random.PRNGKey(c.train.seed + 1)  # the same draws at every evaluation
    rollout = sample(examples, prompt_rows, key, num_samples=1, temperature=c.train.eval_temperature)
    samples, rewards, valid = score(examples, rollout, 1)
    texts, finished = [s.text for s in samples], np.array([s.finished for s in samples])
    metrics = {"eval/reward": float(rewards[valid].mean()) if valid.any() else float("nan")}
    correct = [None] * len(texts)
    if verifies:
        correct = np.asarray(task.score_batch(examples, texts, finished)) >= 1.0
        metrics["eval/accuracy"] = float(np.mean(correct))
    k = c.train.eval_samples
    if k and verifies:
        rollout = sample(examples, prompt_rows, jax.random.fold_in(key, 1), num_samples=k,
                         temperature=c.rollout.temperature)
        samples_k = describe(examples, rollout, k)
        texts_k, finished_k = [s.text for s in samples_k], [s.finished for s in samples_k]
        repeated = [e for e in examples for _ in range(k)]
        correct_k = (np.asarray(task.score_batch(repeated, texts_k, finished_k)) >= 1.0).reshape(-1, k)
        metrics[f"eval/pass@{k}"] = float(np.mean(pass_at_k(correct_k.sum(axis=1), k, k)))
        metrics[f"eval/mean@{k}"] = float(correct_k.mean())
    rows = [{"prompt": e.prompt, "completion": text, "reward": float(reward) if ok else None,
             "correct": None if right is None else bool(right), "answer": e.answer, "finished": bool(done)}
            for e, text, reward, ok, right, done in zip(examples, texts, rewards, valid, correct,
                                                        finished)][: c.train.log_samples]
    for row, s in zip(rows, samples):
        if s.transcript is not None:  # an episode: the policy's and the environment's parts apart
            row["transcript"] = [{"role": role, "text": text} for role, text in s.transcript]
    return metrics, rows


__all__ = ["evaluate_held_out", "held_out_prompts"]
