"""Generation and update throughput of a Qwen2.5-0.5B-shaped policy in bfloat16, and the update's MFU.

    python benchmarks/gpu_step.py [--prompts 32] [--samples 4] [--prompt-length 256] [--new-tokens 256]
                                  [--out benchmarks/results/gpu.md]

A randomly initialised policy of Qwen2.5-0.5B's published shape (`benchmarks/model_configs/`,
no download), float32 master weights, bfloat16 compute, remat per layer: what a real run on one
accelerator does. Measured after a warm-up call, as the median of blocks of calls:
- generation: completion tokens per second of the KV-cache sampler (every row runs to the
  end: no EOS is ever sampled, `eos_token_id` None);
- update: tokens (prompt + completion) per second of one RLOO optimizer step, and its model
  FLOPs utilisation, MFU = (6 * parameters * tokens + attention FLOPs) / time / peak, where the
  peak is the card's dense bfloat16 rate (the recomputation that remat adds is not counted, as
  in MaxText's and PaLM's definition).
Meant for a GPU; on a CPU it runs (small shapes help) but the MFU has no peak to compare with.
"""

from __future__ import annotations

import argparse
import functools
import statistics
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import transformers
from flax import nnx

from jaxrl_llm import models
from jaxrl_llm.rollout import generate
from jaxrl_llm.training import load_config
from jaxrl_llm.training.algorithms import Algorithm, RolloutBatch
from jaxrl_llm.training.state import TrainState
from jaxrl_llm.training.trainer import make_optimizer, update_step

ROOT = Path(__file__).resolve().parents[1]
MODEL = ROOT / "benchmarks" / "model_configs" / "qwen2.5-0.5b"
# Dense bfloat16 tensor-core peak (no sparsity), FLOP/s, by `device_kind` substring.
PEAK_BF16 = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L4": 121e12, "A10": 125e12}


def peak_flops(device) -> float | None:
    kind = device.device_kind
    return next((peak for name, peak in PEAK_BF16.items() if name in kind), None)


def median_seconds(fn, *, warmup: int = 1, blocks: int = 3, calls: int = 2) -> float:
    for _ in range(warmup):
        jax.block_until_ready(fn())
    times = []
    for _ in range(blocks):
        start = time.perf_counter()
        for _ in range(calls):
            jax.block_until_ready(fn())
        times.append((time.perf_counter() - start) / calls)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompts", type=int, default=32)
    parser.add_argument("--samples", type=int, default=4)
    parser.add_argument("--prompt-length", type=int, default=256)
    parser.add_argument("--new-tokens", type=int, default=256)
    parser.add_argument("--micro-batch-size", type=int, default=None)
    parser.add_argument("--remat", default="layer")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "gpu.md"))
    args = parser.parse_args()

    hf_config = transformers.AutoConfig.from_pretrained(MODEL)
    policy = models.from_config(hf_config, dtype=jnp.float32, rngs=nnx.Rngs(0))
    policy.set_execution(remat=args.remat)
    graphdef, params = nnx.split(policy)
    num_params = sum(x.size for x in jax.tree.leaves(params))
    config = load_config(None, [
        "algo.name=rloo", f"algo.num_samples={args.samples}", f"rollout.prompts_per_step={args.prompts}",
        f"rollout.prompt_length={args.prompt_length}", f"rollout.max_new_tokens={args.new_tokens}",
        "model.dtype=bfloat16", f"model.remat={args.remat}",
        *([f"train.micro_batch_size={args.micro_batch_size}"] if args.micro_batch_size else []),
    ])
    algorithm = Algorithm(config.algo, graphdef=graphdef, temperature=1.0, chunk_size=config.train.logprob_chunk_size,
                          compute_dtype=jnp.bfloat16, micro_batch_size=config.train.micro_batch_size)
    optimizer = make_optimizer(config)
    state = TrainState.create(policy_params=params, optimizer=optimizer, seed=0, reference_dtype=jnp.bfloat16)

    rng = np.random.default_rng(0)
    n, p, t = args.prompts * args.samples, args.prompt_length, args.new_tokens
    vocab = hf_config.vocab_size
    prompt_ids = rng.integers(0, vocab, (args.prompts, p), dtype=np.int32)
    prompt_mask = np.ones_like(prompt_ids)

    # Generation: the bf16 policy the trainer samples from.
    sampler_policy = nnx.merge(graphdef, models.cast_floating(state.params["policy"], jnp.bfloat16))
    sample = functools.partial(generate, sampler_policy, prompt_ids, prompt_mask, max_new_tokens=t,
                               rng=jax.random.key(0), num_samples=args.samples, eos_token_id=None,
                               cache_dtype=jnp.bfloat16)
    generate_s = median_seconds(lambda: sample().tokens, blocks=3, calls=1)

    # One RLOO update (prepare: the reference forward; then the optimizer step).
    batch = RolloutBatch(np.repeat(prompt_ids, args.samples, 0), np.repeat(prompt_mask, args.samples, 0),
                         rng.integers(0, vocab, (n, t), dtype=np.int32), np.ones((n, t), np.int32),
                         rng.random(n, dtype=np.float32), np.ones(n, bool))
    prepare = jax.jit(algorithm.prepare)
    update = jax.jit(functools.partial(update_step, algorithm, optimizer))
    _, train_batch, _ = prepare(state, batch)
    prepare_s = median_seconds(lambda: prepare(state, batch)[1].ref_logprobs)
    update_s = median_seconds(lambda: update(state, train_batch)[1][1]["loss/total"])

    tokens = n * (p + t)
    heads = hf_config.num_attention_heads
    width = heads * (getattr(hf_config, "head_dim", None) or hf_config.hidden_size // heads)
    layers = hf_config.num_hidden_layers
    # Causal attention: QK^T and PV, forward 2 * 2 * S^2/2 * width per layer, x3 with the backward.
    attention_flops = 3 * 2 * layers * width * n * (p + t) ** 2
    model_flops = 6 * num_params * tokens + attention_flops
    device = jax.devices()[0]
    peak = peak_flops(device)
    mfu = model_flops / update_s / peak if peak else None
    rows = [
        ("device", f"{device.device_kind} ({device.platform}), jax {jax.__version__}"),
        ("policy", f"Qwen2.5-0.5B shape, random weights, {num_params / 1e6:.0f}M parameters, "
                   f"float32 master, bfloat16 compute, remat {args.remat}"),
        ("batch", f"{args.prompts} prompts x {args.samples} samples, {p} prompt + {t} completion tokens"),
        ("generation", f"{n * t / generate_s:,.0f} completion tokens/s ({generate_s:.2f} s per batch)"),
        ("prepare (reference forward)", f"{tokens / prepare_s:,.0f} tokens/s ({prepare_s:.3f} s)"),
        ("update (forward + backward + AdamW)", f"{tokens / update_s:,.0f} tokens/s ({update_s:.3f} s)"),
        ("update MFU", f"{mfu:.1%} of {peak / 1e12:.0f} TFLOP/s bf16" if mfu is not None else
         "no bf16 peak known for this device"),
    ]
    text = ("# GPU step: Qwen2.5-0.5B-shaped policy\n\n`python benchmarks/gpu_step.py`\n\n| what | measured |\n"
            "|---|---|\n" + "".join(f"| {k} | {v} |\n" for k, v in rows))
    Path(args.out).write_text(text)
    print(text)


if __name__ == "__main__":
    main()
