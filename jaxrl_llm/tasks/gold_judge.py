"""A miniature of RLHF's setting: a hidden "gold" judge, preference pairs it labels, win-rates.

Ahmadian et al. 2024 (the source document's paper) train a reward model on human preference
pairs, optimise a policy against it, and judge the result by win-rate against the starting
policy. Here the humans are a deterministic function of prompt and completion on the built-in
arithmetic task, which the reward model never sees, only the pairs it labels:

    gold(a+b=, c) = [c is a+b] + 0.25 * min(#'7' in c, 2) - 0.5 * [c did not end]

It prefers right answers (hard to learn from a few thousand pairs for a small reward model)
and, a little, sevens (easy): the learned reward is an imperfect proxy of the gold one, as a
real reward model is of human judgement, so optimising it too hard can lower the gold score.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from jaxrl_llm.errors import UserError


def parse_prompt(prompt: str) -> tuple[int, int]:
    """(a, b) of an arithmetic prompt "a+b=" (a BOS or spaces around it are ignored)."""
    body = prompt.strip().removesuffix("=")
    left, plus, right = body.rpartition("+")
    digits_left = "".join(ch for ch in left if ch.isdigit())
    if not plus or not digits_left or not right.isdigit():
        raise UserError(f"prompt: got {prompt!r}, expected an arithmetic prompt 'a+b='")
    return int(digits_left), int(right)


def gold_score(prompt: str, completion: str, finished: bool) -> float:
    """The hidden judge's score of one completion of an arithmetic prompt "a+b="."""
    a, b = parse_prompt(prompt)
    right = completion.strip() == str(a + b)
    return float(right) + 0.25 * min(completion.count("7"), 2) - 0.5 * (not finished)


def gold_scores(prompts, completions, finished) -> np.ndarray:
    return np.array([gold_score(p, c, f) for p, c, f in zip(prompts, completions, finished)])


def win_rate(ours: np.ndarray, theirs: np.ndarray) -> float:
    """P(gold(ours) > gold(theirs)) + P(tie) / 2 over paired completions (the paper's metric)."""
    ours, theirs = np.asarray(ours), np.asarray(theirs)
    return float(np.mean((ours > theirs) + 0.5 * (ours == theirs)))


def preference_pairs(prompts, completions, finished, *, num_samples: int, noise: float, seed: int = 0) -> list[dict]:
    """Pairs from K completions per prompt (prompt-major): for each prompt whose completions the
    judge does not score all alike, its best against its worst, the label flipped with
    probability `noise` (annotators who disagree). Rows: prompt, chosen, rejected."""
    if not 0 <= noise < 0.5:
        raise ValueError(f"noise: got {noise}, expected a flip probability in [0, 0.5)")
    rng = np.random.default_rng(seed)
    scores = gold_scores(prompts, completions, finished).reshape(-1, num_samples)
    pairs = []
    for group, row in enumerate(scores):
        if row.max() == row.min():
            continue
        best, worst = group * num_samples + int(np.argmax(row)), group * num_samples + int(np.argmin(row))
        if rng.random() < noise:
            best, worst = worst, best
        pairs.append({"prompt": prompts[best], "chosen": completions[best], "rejected": completions[worst]})
    return pairs


def sample_pairs(trainer, num_prompts: int, *, num_samples: int = 4, noise: float = 0.1, seed: int = 0) -> list[dict]:
    """Preference pairs of the trainer's (starting) policy: K completions of each of the first
    `num_prompts` training prompts at temperature 1, labelled by the gold judge (`preference_pairs`)."""
    import jax

    from jaxrl_llm.rollout.decode import decode_completions

    examples = trainer.task.train_batch(0, num_prompts)
    rollout = trainer._sample(examples, trainer._tokenize(examples), jax.random.PRNGKey(seed),
                              num_samples=num_samples, temperature=1.0)
    texts, finished, _ = decode_completions(trainer.tokenizer, rollout.tokens, rollout.mask, trainer.eos_ids)
    prompts = [e.prompt for e in examples for _ in range(num_samples)]
    return preference_pairs(prompts, texts, finished, num_samples=num_samples, noise=noise, seed=seed)


def write_pairs(pairs: list[dict], path: str | Path) -> Path:
    path = Path(path)
    with open(path, "w") as f:
        f.writelines(json.dumps(p) + "\n" for p in pairs)
    return path


__all__ = ["gold_score", "gold_scores", "preference_pairs", "sample_pairs", "win_rate", "write_pairs"]
