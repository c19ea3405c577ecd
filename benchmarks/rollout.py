"""Sampling throughput: jaxrl_llm's jitted KV-cache sampler vs transformers' ``generate`` (PyTorch).

Both run the SAME random Llama weights (built in PyTorch, saved, loaded by our ``from_pretrained``),
the same prompt batch and lengths, temperature 1 / top_k 0 / top_p 1, EOS disabled so every row
generates exactly ``new`` tokens. Each side is warmed up first, then timed over several repeats;
the median is reported. torch uses 2 threads.

    python benchmarks/rollout.py [--device cpu] [--quick] [--out benchmarks/results/rollout.md]
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import tempfile
import time

SIZES = {
    # name: (config kwargs, batch, prompt length, new tokens)
    "tiny": (dict(hidden_size=128, num_hidden_layers=4, intermediate_size=512, num_attention_heads=4,
                  num_key_value_heads=4, vocab_size=2048), 64, 16, 32),
    "small": (dict(hidden_size=512, num_hidden_layers=8, intermediate_size=1536, num_attention_heads=8,
                   num_key_value_heads=8, vocab_size=32000), 16, 16, 64),
}


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cpu", help="JAX platform (cpu, gpu, tpu); torch always runs on CPU")
    p.add_argument("--quick", action="store_true", help="fewer repeats (a smoke run)")
    p.add_argument("--repeats", type=int, default=None, help="timed repeats per side (default 7, quick 2)")
    p.add_argument("--sizes", default=",".join(SIZES), help="comma-separated subset of " + ",".join(SIZES))
    p.add_argument("--cache-dtype", default=None, help="KV-cache dtype for ours (default: float32, the params')")
    p.add_argument("--out", default=None, help="write a markdown table here")
    return p.parse_args()


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def load_average() -> str:
    try:
        with open("/proc/loadavg") as f:
            return f.read().split()[0]
    except OSError:
        return "n/a"


def timed(fn, repeats: int) -> list[float]:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return times


def bench_size(name, args, repeats):
    import jax
    import numpy as np
    import torch
    import transformers

    from jaxrl_llm import models
    from jaxrl_llm.rollout import generate

    cfg_kwargs, batch, prompt_len, new = SIZES[name]
    config = transformers.LlamaConfig(**cfg_kwargs, max_position_embeddings=256, pad_token_id=0,
                                      tie_word_embeddings=False)
    torch.manual_seed(0)
    hf = transformers.AutoModelForCausalLM.from_config(config).eval()
    with tempfile.TemporaryDirectory() as path:
        hf.save_pretrained(path)
        ours = models.from_pretrained(path)
    n_params = sum(p.numel() for p in hf.parameters())

    ids = np.random.RandomState(0).randint(1, config.vocab_size, (batch, prompt_len)).astype(np.int32)
    mask = np.ones_like(ids)

    # --- ours: first call = trace + compile + one run; then warm-up and timed runs.
    def run_ours(seed):
        out = generate(ours, ids, mask, max_new_tokens=new, rng=jax.random.key(seed), temperature=1.0,
                       eos_token_id=None, cache_dtype=args.cache_dtype)
        return jax.block_until_ready(out)

    start = time.perf_counter()
    out = run_ours(0)
    first_call = time.perf_counter() - start
    assert out.tokens.shape == (batch, new) and int(out.mask.sum()) == batch * new
    run_ours(1)

    # --- transformers: sampling, EOS disabled, exactly `new` tokens.
    t_ids, t_mask = torch.tensor(ids, dtype=torch.long), torch.tensor(mask, dtype=torch.long)

    def run_hf():
        with torch.no_grad():
            return hf.generate(input_ids=t_ids, attention_mask=t_mask, do_sample=True, temperature=1.0, top_k=0,
                               top_p=1.0, max_new_tokens=new, min_new_tokens=new, eos_token_id=None,
                               pad_token_id=0)

    result = run_hf()
    assert result.shape == (batch, prompt_len + new), result.shape
    run_hf()

    # Interleave the two sides so both see the same background load; a pause after each run lets
    # the other library's spinning worker threads go to sleep first.
    ours_times, hf_times = [], []
    for seed in range(2, 2 + repeats):
        time.sleep(0.3)
        ours_times += timed(lambda: run_ours(seed), 1)
        time.sleep(0.3)
        hf_times += timed(run_hf, 1)
    ours_s, hf_s = statistics.median(ours_times), statistics.median(hf_times)
    compile_s = max(first_call - ours_s, 0.0)

    tokens = batch * new
    row = dict(model=name, params=n_params, cfg=cfg_kwargs, batch=batch, prompt=prompt_len, new=new,
               ours_tps=tokens / ours_s, hf_tps=tokens / hf_s, ours_ms_step=1e3 * ours_s / new,
               hf_ms_step=1e3 * hf_s / new, compile_s=compile_s, first_call_s=first_call)
    row["ratio"] = row["ours_tps"] / row["hf_tps"]
    row["ours_best_tps"], row["hf_best_tps"] = tokens / min(ours_times), tokens / min(hf_times)
    print(f"{name}: ours {row['ours_tps']:,.0f} tok/s ({row['ours_ms_step']:.2f} ms/step; runs "
          f"{[round(t, 3) for t in ours_times]} s), transformers {row['hf_tps']:,.0f} tok/s "
          f"({row['hf_ms_step']:.2f} ms/step; runs {[round(t, 3) for t in hf_times]} s), ratio {row['ratio']:.2f}x, "
          f"compile {compile_s:.2f} s", flush=True)
    return row


def markdown(rows, args, repeats) -> str:
    import jax
    import torch
    import transformers

    lines = [
        "# Rollout throughput: jaxrl_llm sampler vs transformers `generate`",
        "",
        f"Command: `python benchmarks/rollout.py --device {args.device}"
        + (" --quick" if args.quick else "") + (f" --cache-dtype {args.cache_dtype}" if args.cache_dtype else "") + "`",
        "",
        f"Machine: {cpu_model()}, {os.cpu_count()} cores visible; JAX {jax.__version__} "
        f"({jax.devices()[0].platform}), torch {torch.__version__} ({torch.get_num_threads()} threads), "
        f"transformers {transformers.__version__}, Python {sys.version.split()[0]}.",
        "",
        "Same random float32 Llama weights on both sides, same prompts (no padding), sampling at "
        "temperature 1, top_k 0, top_p 1, EOS disabled (every row generates all new tokens). "
        f"Median of {repeats} timed runs after warm-up, the two sides interleaved; tok/s counts generated "
        "tokens (batch x new) and includes the prompt prefill. 'best' columns: fastest single run. "
        f"Load average before/after: {rows[0]['load_before']} / {rows[-1]['load_after']}.",
        "",
        "| model | params | batch | prompt | new tokens | ours tok/s | transformers tok/s | ratio | ours best | transformers best | ours ms/step | transformers ms/step | ours compile (s) |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        c = r["cfg"]
        desc = (f"{r['model']} (hidden {c['hidden_size']}, {c['num_hidden_layers']} layers, "
                f"intermediate {c['intermediate_size']}, {c['num_attention_heads']} heads, vocab {c['vocab_size']})")
        lines.append(
            f"| {desc} | {r['params'] / 1e6:.1f}M | {r['batch']} | {r['prompt']} | {r['new']} | "
            f"{r['ours_tps']:,.0f} | {r['hf_tps']:,.0f} | {r['ratio']:.2f}x | {r['ours_best_tps']:,.0f} | "
            f"{r['hf_best_tps']:,.0f} | {r['ours_ms_step']:.2f} | "
            f"{r['hf_ms_step']:.2f} | {r['compile_s']:.1f} |"
        )
    return "\n".join(lines) + "\n"


def main():
    args = parse_args()
    os.environ.setdefault("JAX_PLATFORMS", args.device)
    import torch

    torch.set_num_threads(2)
    repeats = args.repeats or (3 if args.quick else 9)
    rows = []
    for name in args.sizes.split(","):
        load_before = load_average()
        rows.append(bench_size(name, args, repeats))
        rows[-1].update(load_before=load_before, load_after=load_average())
    text = markdown(rows, args, repeats)
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text)


if __name__ == "__main__":
    main()
