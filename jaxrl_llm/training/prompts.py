"""Prompts for the rollout: tokenized, read from a task's stream, and fitted to the tokens a
rollout leaves them (`rollout.prompt_length`, or the model's context after the completion
region): a longer one is truncated from the left or skipped
(`rollout.long_prompts`)."""

from __future__ import annotations

from jaxrl_llm.errors import UserError


def prompt_limit(rollout, context: int | None) -> int | None:
    """The most prompt tokens: `rollout.prompt_length`, or what the context leaves after the
    completion region (`rollout.max_new_tokens`; a multi-turn episode's `rollout.max_total_tokens`,
    its policy and observation tokens together); prompt + completion must fit the model's context."""
    r = rollout
    if context is None:
        return r.prompt_length
    completion, key = r.max_new_tokens, "rollout.max_new_tokens"
    if r.multi_turn and r.max_total_tokens is not None:
        completion, key = r.max_total_tokens, "rollout.max_total_tokens"
    if r.prompt_length is not None and r.prompt_length + completion > context:
        raise UserError(f"`rollout.prompt_length`: got {r.prompt_length}, and with {key}={completion} a sequence "
                        f"exceeds the model's context of {context} tokens (max_position_embeddings); lower one of "
                        "them.")
    if completion >= context:
        raise UserError(f"`{key}`: got {completion}, but the model's context is {context} tokens "
                        "(max_position_embeddings), leaving no room for a prompt.")
    return r.prompt_length if r.prompt_length is not None else context - completion


def tokenize_prompts(tokenizer, examples, task_name: str) -> list[list[int]]:
    """Prompt token rows; an empty prompt is an error naming it (nothing to condition on)."""
    rows = [list(ids) for ids in tokenizer([e.prompt for e in examples])["input_ids"]] if examples else []
    empty = [e for e, row in zip(examples, rows) if not row]
    if empty:
        raise UserError(f"`task.name`: task {task_name!r} gave the prompt {empty[0].prompt!r}, which "
                        "has no tokens; every prompt needs at least one (remove empty prompts from the data).")
    return rows


def next_prompts(task, tokenize, position: int, n: int, limit: int | None, long_prompts: str,
                 bos_id: int | None = None):
    """`n` training examples of `task` from data position `position` on, with their prompt token
    rows (`tokenize`): `(examples, rows, prompts read, truncated, skipped)`. A skipped prompt is
    replaced by the next one, so the position moves by the prompts read."""
    examples, rows, read, truncated, skipped = [], [], 0, 0, 0
    while len(examples) < n:
        if read >= 100 * n:  # nearly every prompt is skipped: a setting to change, not a loop
            raise UserError(f"`rollout.prompt_length`: {skipped} of the {read} prompts read from data position "
                            f"{position} are longer than {limit} tokens (rollout.long_prompts: "
                            "skip); raise prompt_length or set long_prompts: truncate.")
        batch = task.train_batch(position + read, n - len(examples))
        read += len(batch)
        fitted = fit_prompts(batch, tokenize(batch), limit, long_prompts, bos_id)
        examples += fitted[0]
        rows += fitted[1]
        truncated, skipped = truncated + fitted[2], skipped + fitted[3]
    return examples, rows, read, truncated, skipped


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


__all__ = ["fit_prompts", "next_prompts", "prompt_limit", "tokenize_prompts", "truncate_left"]
