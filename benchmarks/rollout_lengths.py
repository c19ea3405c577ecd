"""Sampling at RL lengths: the rollout engine against transformers ``generate`` and against the one-loop sampler.

    python benchmarks/rollout_lengths.py [--out benchmarks/results/rollout_lengths.md] [--quick]

The model is the one issue 43 was measured on: a 4-layer Llama (width 256, 4 heads, 4 KV heads,
MLP 1024, vocabulary 512), random float32 weights built in PyTorch and loaded by our
``from_pretrained`` (the same weights on both sides), 8 prompts x 4 samples, prompts of 32 tokens,
temperature 1 (no top-k / top-p). Three parts, all in this one process:

1. **Full length** (EOS disabled, every row produces ``max_new_tokens``) at 128, 512 and 2048:
   ``jaxrl_llm.generate`` (the engine) against transformers ``generate`` (``do_sample``,
   ``top_k=0``, ``num_return_sequences=4``, EOS disabled), and the one-loop sampler that
   ``generate`` ran before the engine ("one loop": one ``while_loop`` over every row, the cache
   preallocated at P + T - 1).
2. **Long-tailed lengths** at ``max_new_tokens`` 128, 2048 and 8192: row r's length L_r is drawn
   lognormal (median T / 6.4, sigma 1, capped at T; seeded) and imposed through its uniforms: the
   sampler turns uniform u into the token whose running probability mass crosses 1 - u, so u
   just below 1 gives token 0, the EOS here, and every other u is scaled into [0, 0.98] (token 0's
   probability under this near-uniform model is far below 0.02: the script checks that every row
   ended at exactly L_r). Reported: time per produced token (sum of L_r), engine and one loop.
3. **KV-cache bytes** for prompts of 1024 tokens and K = 16 (Qwen2.5-0.5B's cache shape, bfloat16):
   what the one loop holds and reads per step (N x (P + T - 1) tokens) against what the engine
   holds and reads, from the engine's own schedule of a long-tailed run (per chunk: its slots S,
   its completion cache Lc and prompt pool M: M x P + S x Lc tokens per step).

Timing: each side is warmed up (compile) and then timed in one block of ``--repeats`` runs back to
back (sides never interleaved), each run to completion (``block_until_ready``); medians reported.
At 2048 new tokens transformers (minutes a run) runs 3 times after a 16-token warm-up call, and the
one loop once after its compiling call.
"""

from __future__ import annotations

import argparse
import datetime
import os
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

MODEL = dict(hidden_size=256, num_hidden_layers=4, intermediate_size=1024, num_attention_heads=4,
             num_key_value_heads=4, vocab_size=512)
PROMPTS, SAMPLES, PROMPT_LEN = 8, 4, 32
FULL_LENGTHS = (128, 512, 2048)
TAIL_LENGTHS = (128, 2048, 8192)
EOS = 0  # the long-tail runs' stop token (the first in vocabulary order: see the docstring)
# The Qwen2.5-0.5B cache: 24 layers x 2 KV heads x 64 dims x (K and V) x 2 bytes (bfloat16) per token.
QWEN_KV_BYTES_PER_TOKEN = 24 * 2 * 64 * 2 * 2


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default=None, help="write the Markdown report here")
    p.add_argument("--repeats", type=int, default=None, help="timed runs per side (default 5; 2 with --quick)")
    p.add_argument("--quick", action="store_true", help="a smoke run: short lengths, two runs per side")
    p.add_argument("--one-loop-max", type=int, default=2048,
                   help="time the one-loop sampler up to this max_new_tokens (it costs O(T^2) a row)")
    return p.parse_args()


def median_time(fn, repeats, warmup=None):
    (warmup or fn)()  # warm-up: compiles, fills caches
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times), times


def build(max_positions):
    from benchmarks.rollout import build_models

    return build_models({**MODEL, "max_position_embeddings": max_positions}, "cpu")


def lognormal_lengths(steps, n, seed):
    import numpy as np

    rng = np.random.default_rng(seed)
    lengths = np.exp(rng.normal(np.log(steps / 6.4), 1.0, n))
    return np.clip(np.round(lengths), 1, steps).astype(np.int64)


def imposed_uniforms(lengths, steps, seed):
    """[T, N] uniforms under which row r stops (token EOS) at exactly lengths[r] tokens."""
    import numpy as np

    u = np.random.default_rng(seed + 1).random((steps, len(lengths)), dtype=np.float32) * np.float32(0.98)
    ends = lengths < steps
    u[lengths[ends] - 1, np.flatnonzero(ends)] = np.float32(1.0) - np.float32(2.0 ** -24)
    return u


def one_loop_runner(model, ids, mask, steps, uniforms, eos):
    """The sampler ``generate`` ran before the engine, with these uniforms (``sampler._sample_rows``)."""
    import functools

    import jax
    import numpy as np

    from jaxrl_llm.rollout import sampler

    checked = sampler.check_sampling_arguments(dict(
        model=model, prompt_ids=ids, prompt_mask=mask, max_new_tokens=steps, rng=jax.random.key(0),
        num_samples=SAMPLES, temperature=1.0, top_k=0, top_p=1.0, eos_token_id=eos, pad_token_id=0,
        cache_dtype=None, mesh=None, row_offset=0, slots=None))
    program = jax.jit(functools.partial(sampler._sample_rows, checked.opts))
    uniforms = jax.numpy.asarray(uniforms)
    args = (model, np.asarray(ids), np.asarray(mask), uniforms, checked.params)
    return lambda: jax.block_until_ready(program(*args))


def row_uniforms(steps, seed):
    import jax
    import numpy as np

    from jaxrl_llm.rollout import sampler

    return np.asarray(sampler.row_uniforms(jax.random.key(seed), np.arange(PROMPTS * SAMPLES), steps))


def full_length(args, hf, ours, ids, mask, lengths, repeats):
    import jax
    import torch

    from jaxrl_llm.rollout import generate

    rows = []
    t_ids, t_mask = torch.tensor(ids, dtype=torch.long), torch.tensor(mask, dtype=torch.long)
    for steps in lengths:
        def engine():
            return jax.block_until_ready(generate(ours, ids, mask, max_new_tokens=steps, rng=jax.random.key(0),
                                                  num_samples=SAMPLES, temperature=1.0, eos_token_id=None))

        def transformers_generate(new=steps):
            torch.manual_seed(0)
            with torch.no_grad():
                out = hf.generate(input_ids=t_ids, attention_mask=t_mask, do_sample=True, temperature=1.0, top_k=0,
                                  top_p=1.0, max_new_tokens=new, pad_token_id=0,
                                  num_return_sequences=SAMPLES)
            assert out.shape == (PROMPTS * SAMPLES, PROMPT_LEN + new), out.shape
            return out

        ours_s, _ = median_time(engine, repeats)
        # transformers compiles nothing: a short call warms it up; at 2048 its runs take minutes each.
        hf_s, _ = median_time(transformers_generate, repeats if steps < 2048 else min(repeats, 3),
                              warmup=lambda: transformers_generate(16))
        loop_s = None
        if steps <= args.one_loop_max:
            loop = one_loop_runner(ours, ids, mask, steps, row_uniforms(steps, 0), None)
            loop_s, _ = median_time(loop, max(1, repeats if steps <= 512 else 1))
        rows.append((steps, ours_s, hf_s, loop_s))
        print(f"full length {steps}: engine {ours_s:.3f} s, transformers {hf_s:.3f} s, one loop {loop_s}", flush=True)
    return rows


def long_tail(args, ours, ids, mask, lengths, repeats):
    import jax
    import numpy as np

    from jaxrl_llm.rollout.sampler import generate_with_schedule

    rows = []
    for steps in lengths:
        target = lognormal_lengths(steps, PROMPTS * SAMPLES, seed=steps)
        uniforms = imposed_uniforms(target, steps, seed=steps)
        produced = int(target.sum())
        result = {}

        def engine():
            out, schedule = generate_with_schedule(ours, ids, mask, max_new_tokens=steps, rng=jax.random.key(0),
                                                   num_samples=SAMPLES, temperature=1.0, eos_token_id=EOS,
                                                   uniforms=uniforms)
            jax.block_until_ready(out)
            result["mask"], result["schedule"] = np.asarray(out.mask), schedule

        ours_s, _ = median_time(engine, repeats)
        got = result["mask"].sum(axis=1)
        assert np.array_equal(got, target), "a row did not end at its imposed length"
        loop_s = None
        if steps <= args.one_loop_max:
            loop = one_loop_runner(ours, ids, mask, steps, uniforms, EOS)
            loop_s, _ = median_time(loop, max(1, repeats if steps <= 512 else 1))
        computed = sum(c.slots * c.steps for c in result["schedule"])
        rows.append(dict(steps=steps, median=int(np.median(target)), p90=int(np.percentile(target, 90)),
                         longest=int(target.max()), produced=produced, engine=ours_s, loop=loop_s,
                         computed=computed, chunks=len(result["schedule"])))
        print(f"long tail {steps}: {rows[-1]}", flush=True)
    return rows


def kv_bytes(ours, steps):
    """The cache one loop and the engine hold and read per step, P = 1024, K = 16, from a schedule."""
    import jax
    import numpy as np

    from jaxrl_llm.rollout.sampler import generate_with_schedule

    prompt_len, k, prompts = 1024, 16, 2
    n = prompts * k
    ids = np.random.RandomState(1).randint(1, MODEL["vocab_size"], (prompts, prompt_len)).astype(np.int32)
    target = lognormal_lengths(steps, n, seed=7)
    uniforms = imposed_uniforms(target, steps, seed=7)
    out, schedule = generate_with_schedule(ours, ids, np.ones_like(ids), max_new_tokens=steps, rng=jax.random.key(0),
                                           num_samples=k, temperature=1.0, eos_token_id=EOS, uniforms=uniforms)
    assert np.array_equal(np.asarray(out.mask).sum(axis=1), target)
    loop_tokens = n * (prompt_len + steps - 1)
    loop_steps = int(target.max())
    held = max(c.pool_entries * prompt_len + c.slots * c.own_length for c in schedule)
    read = sum((c.pool_entries * prompt_len + c.slots * c.own_length) * c.steps for c in schedule)
    engine_steps = sum(c.steps for c in schedule)
    return dict(prompt_len=prompt_len, k=k, prompts=prompts, steps=steps, median=int(np.median(target)),
                longest=loop_steps, loop_held=loop_tokens, engine_held=held, loop_read=loop_tokens,
                engine_read=read / engine_steps, loop_steps=loop_steps, engine_steps=engine_steps,
                produced=int(target.sum()))


def report(args, full, tail, kv, repeats) -> str:
    import jax
    import torch
    import transformers

    from benchmarks.rollout import cores, cpu_model, load_average

    lines = [
        "# Sampling at RL lengths: the rollout engine",
        "",
        f"`python benchmarks/rollout_lengths.py{' --quick' if args.quick else ''}` on {cpu_model()}, {cores()} cores "
        f"({datetime.date.today()}; load average {load_average()} at the end); jax {jax.__version__}, torch "
        f"{torch.__version__}, transformers {transformers.__version__}. Method: see the script's docstring "
        f"(same weights, same process, warm-up, then a block of {repeats} runs per side, medians; at 2048 "
        "transformers runs 3 times after a 16-token warm-up and the one loop once).",
        "",
        "Model: 4-layer Llama, width 256, 4 heads / 4 KV heads, MLP 1024, vocabulary 512, float32; "
        f"{PROMPTS} prompts x {SAMPLES} samples, prompts of {PROMPT_LEN} tokens, temperature 1.",
        "",
        "## 1. Every row at full length (EOS disabled)",
        "",
        "| max_new_tokens | engine (s) | transformers `generate` (s) | one loop (s) | engine vs generate | "
        "one loop vs generate | ms / step, engine | ms / step, generate |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for steps, ours_s, hf_s, loop_s in full:
        loop = "not run" if loop_s is None else f"{loop_s:.3f}"
        loop_ratio = "" if loop_s is None else f"{hf_s / loop_s:.2f}x"
        lines.append(f"| {steps} | {ours_s:.3f} | {hf_s:.3f} | {loop} | **{hf_s / ours_s:.2f}x** | {loop_ratio} | "
                     f"{1e3 * ours_s / steps:.2f} | {1e3 * hf_s / steps:.2f} |")
    lines += [
        "",
        "## 2. Long-tailed lengths (lognormal, median T / 6.4, sigma 1, capped at T)",
        "",
        "| max_new_tokens | median | p90 | longest | tokens produced | engine (s) | engine, us / produced token | "
        "one loop, us / produced token | slot-steps computed / produced (engine) |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    base = tail[0]["engine"] / tail[0]["produced"]
    for r in tail:
        per = r["engine"] / r["produced"]
        loop = "not run" if r["loop"] is None else f"{1e6 * r['loop'] / r['produced']:.0f}"
        lines.append(f"| {r['steps']} | {r['median']} | {r['p90']} | {r['longest']} | {r['produced']} | "
                     f"{r['engine']:.3f} | {1e6 * per:.0f} (**{per / base:.2f}x** the cost at {tail[0]['steps']}) | "
                     f"{loop} | {r['computed'] / r['produced']:.2f} |")
    q = kv
    mib = lambda tokens: tokens * QWEN_KV_BYTES_PER_TOKEN / 2**20  # noqa: E731
    lines += [
        "",
        f"## 3. KV cache, prompts of {q['prompt_len']} tokens, K = {q['k']} "
        f"({q['prompts']} prompts, max_new_tokens {q['steps']}, lognormal lengths: median {q['median']}, "
        f"longest {q['longest']})",
        "",
        "Tokens of cache, and MiB at Qwen2.5-0.5B's cache shape (24 layers, 2 KV heads of 64, bfloat16: "
        f"{QWEN_KV_BYTES_PER_TOKEN // 1024} KiB a token). The engine's figures come from its schedule of this run.",
        "",
        "| | one loop | engine | engine / one loop |",
        "|---|---:|---:|---:|",
        f"| cache held (largest) | {q['loop_held']:,} tokens ({mib(q['loop_held']):.0f} MiB) | "
        f"{q['engine_held']:,} tokens ({mib(q['engine_held']):.0f} MiB) | {q['engine_held'] / q['loop_held']:.3f} |",
        f"| cache read per decode step (mean) | {q['loop_read']:,} tokens ({mib(q['loop_read']):.0f} MiB) | "
        f"{q['engine_read']:,.0f} tokens ({mib(q['engine_read']):.0f} MiB) | {q['engine_read'] / q['loop_read']:.3f} |",
        f"| cache read over the rollout | {q['loop_read'] * q['loop_steps'] / 2**20:,.0f} Mi-token | "
        f"{q['engine_read'] * q['engine_steps'] / 2**20:,.1f} Mi-token | "
        f"{q['engine_read'] * q['engine_steps'] / (q['loop_read'] * q['loop_steps']):.3f} |",
        "",
    ]
    return "\n".join(lines)


def main():
    args = parse_args()
    import jax
    import numpy as np
    import torch

    torch.set_num_threads(os.cpu_count() or 1)
    repeats = args.repeats or (2 if args.quick else 5)
    full_lengths = (32, 64) if args.quick else FULL_LENGTHS
    tail_lengths = (32, 128) if args.quick else TAIL_LENGTHS
    hf, ours, _ = build(PROMPT_LEN + max(*full_lengths, *tail_lengths) + 8)
    ids = np.random.RandomState(0).randint(1, MODEL["vocab_size"], (PROMPTS, PROMPT_LEN)).astype(np.int32)
    mask = np.ones_like(ids)
    full = full_length(args, hf, ours, ids, mask, full_lengths, repeats)
    tail = long_tail(args, ours, ids, mask, tail_lengths, repeats)
    del hf
    _, ours_kv, _ = build(1024 + (64 if args.quick else 2048) + 8)
    kv = kv_bytes(ours_kv, 64 if args.quick else 2048)
    text = report(args, full, tail, kv, repeats)
    print(text)
    if args.out:
        Path(args.out).write_text(text)
    jax.clear_caches()


if __name__ == "__main__":
    main()
