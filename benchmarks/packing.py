"""Packed sequences (`train.packing`) against one sequence per row, on a length-skewed workload.

The update a step runs (RLOO, one update: `prepare`'s reference forward, then the policy's
forward and backward) is timed on the same batch twice, in one process: unpacked (rows of
`prompt_width + max_new_tokens`) and packed (`training.packing.plan`). The batch is synthetic, so
the sampler's cost does not enter: `--prompts` x `--samples` completions of up to `--new-tokens`
slots, half of them ending within `--short` tokens and the rest anywhere up to the limit, after
prompts of 6-16 tokens. The model is a random Llama (`--hidden`, `--layers`) with the arithmetic
task's character tokenizer. Both sides are checked to give the same loss first.

Method: each side is compiled and warmed up, then `--blocks` blocks of `--runs` calls each, the
sides in turn block by block (never interleaved call by call); the median call is reported, and
tokens/s counts the real tokens (prompt + completion) of the batch over that median. The number of
programs a run compiles is the number of distinct packed shapes over `--steps` simulated steps of
the same length distribution (each new shape compiles `prepare` and the update once).

    python benchmarks/packing.py [--out benchmarks/results/packing.md]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import transformers
from flax import nnx

from jaxrl_llm import models
from jaxrl_llm.tasks.tokenizer import VOCAB, save_char_tokenizer
from jaxrl_llm.training import Trainer, load_config, packing
from jaxrl_llm.training.algorithms import RolloutBatch

from algorithms import machine  # noqa: E402 - benchmarks/algorithms.py, beside this script

ROOT = Path(__file__).resolve().parents[1]


def skewed_batch(rng, *, n: int, width: int, slots: int, short: int) -> RolloutBatch:
    """Left-padded prompts of 6-16 tokens; completions: half end within `short`, half anywhere."""
    prompt_lengths = rng.integers(6, min(width, 16) + 1, n)
    prompt_mask = (np.arange(width)[None] >= width - prompt_lengths[:, None]).astype(np.int32)
    prompt_ids = np.where(prompt_mask > 0, rng.integers(3, len(VOCAB), (n, width)), 0).astype(np.int32)
    lengths = np.where(np.arange(n) % 2 == 0, rng.integers(1, short + 1, n), rng.integers(short + 1, slots + 1, n))
    mask = (np.arange(slots)[None] < lengths[:, None]).astype(np.float32)
    tokens = rng.integers(3, len(VOCAB), (n, slots)).astype(np.int32)
    scores = rng.random(n).astype(np.float32)
    return RolloutBatch(*(jnp.asarray(x) for x in (prompt_ids, prompt_mask, tokens, mask, scores)),
                        jnp.ones(n, bool), jnp.asarray(lengths < slots))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--samples", type=int, default=4)
    parser.add_argument("--new-tokens", type=int, default=256)
    parser.add_argument("--short", type=int, default=32)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--blocks", type=int, default=3)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "packing.md"))
    args = parser.parse_args()

    tmp = Path(tempfile.mkdtemp())
    cfg = transformers.LlamaConfig(vocab_size=len(VOCAB), hidden_size=args.hidden, intermediate_size=3 * args.hidden,
                                   num_hidden_layers=args.layers, num_attention_heads=4, num_key_value_heads=2,
                                   max_position_embeddings=1024, tie_word_embeddings=True, pad_token_id=0,
                                   bos_token_id=1, eos_token_id=2)
    models.save_pretrained(models.from_config(cfg, dtype=jnp.float32, rngs=nnx.Rngs(0)), tmp / "policy")
    save_char_tokenizer(tmp / "policy")
    config = load_config(ROOT / "configs" / "rloo_arithmetic.yaml", [
        f"model.path={tmp / 'policy'}", f"train.run_dir={tmp / 'run'}", "train.progress=false",
        f"rollout.prompts_per_step={args.prompts}", f"algo.num_samples={args.samples}",
        f"rollout.max_new_tokens={args.new_tokens}", "rollout.oversample=1",
    ])
    trainer = Trainer(config)
    rng = np.random.default_rng(0)
    n = args.prompts * args.samples
    batch = skewed_batch(rng, n=n, width=16, slots=args.new_tokens, short=args.short)
    packer = packing.Packer(batch, algorithm=trainer.algorithm, num_samples=args.samples, pack_length=None)
    layout = packer()
    real_tokens = int(np.asarray(batch.prompt_mask).sum() + np.asarray(batch.mask).sum())

    def step(layout):
        trainer.state, train_batch, _ = trainer._prepare(trainer.state, batch, layout)
        trainer.state, (_, scalars) = trainer._update(trainer.state, train_batch, None, layout)
        return jax.block_until_ready(scalars)["loss/total"]

    # Checked equal first, from the same state (the update is applied: compare before it moves).
    state = trainer.state
    losses = {}
    for name, lay in (("unpacked", None), ("packed", layout)):
        trainer.state = jax.tree.map(jnp.copy, state)
        losses[name] = float(step(lay))
    assert abs(losses["packed"] - losses["unpacked"]) <= 1e-5 * max(1.0, abs(losses["unpacked"])), losses

    times = {"unpacked": [], "packed": []}
    for name, lay in (("unpacked", None), ("packed", layout)):
        step(lay)  # warm
    for _ in range(args.blocks):
        for name, lay in (("unpacked", None), ("packed", layout)):
            for _ in range(args.runs):
                start = time.perf_counter()
                step(lay)
                times[name].append(time.perf_counter() - start)
    median = {k: statistics.median(v) for k, v in times.items()}

    shapes = set()
    for _ in range(args.steps):
        b = skewed_batch(rng, n=n, width=16, slots=args.new_tokens, short=args.short)
        lay = packing.Packer(b, algorithm=trainer.algorithm, num_samples=args.samples, pack_length=None)()
        shapes.add((lay.ids.shape, lay.token_index.shape))

    slots = n * (16 + args.new_tokens)
    lines = [
        "# Packed sequences vs one sequence per row (the update's time)",
        "",
        f"Machine: {machine()}. Command: `python benchmarks/packing.py` (defaults below).",
        f"Workload: {n} completions ({args.prompts} prompts x {args.samples}) of up to {args.new_tokens} tokens, "
        f"half ending within {args.short}, after prompts of 6-16 tokens (width 16): {real_tokens} real tokens in "
        f"{slots} unpacked slots. Model: random Llama, hidden {args.hidden}, {args.layers} layers, "
        f"vocabulary {len(VOCAB)}, float32. RLOO, one update: prepare's reference forward + the policy's "
        "forward and backward. Median of "
        f"{args.blocks} blocks x {args.runs} calls per side, sides in turn block by block, after a warm-up; "
        f"the two sides' losses were checked equal first ({losses['unpacked']:.6g} / {losses['packed']:.6g}).",
        "",
        "| layout | rows x length | token slots | prepare+update (s) | real tokens/s | speed-up |",
        "|---|---|---|---|---|---|",
        f"| unpacked | {n} x {16 + args.new_tokens} | {slots} | {median['unpacked']:.3f} | "
        f"{real_tokens / median['unpacked']:,.0f} | 1.00x |",
        f"| packed | {layout.ids.shape[1]} x {layout.ids.shape[2]} | {layout.ids[0].size} | {median['packed']:.3f} | "
        f"{real_tokens / median['packed']:,.0f} | {median['unpacked'] / median['packed']:.2f}x |",
        "",
        f"Programs compiled: {len(shapes)} distinct packed shapes over {args.steps} simulated steps of the same "
        "length distribution (each compiles prepare and the update once); unpacked: 1.",
        "",
    ]
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
