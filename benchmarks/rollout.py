"""Sampling throughput: jaxrl_llm's jitted KV-cache sampler vs transformers' ``generate`` (PyTorch).

Both sides run the SAME random float32 Llama weights (built in PyTorch, saved, loaded by our
``from_pretrained``), the same prompts and lengths, sampling at temperature 1 (top_k 0, top_p 1),
EOS disabled so every row generates exactly ``new`` tokens. tok/s counts generated tokens
(batch x new) over the whole call, prompt prefill included.

Our sampler is timed in two set-ups on the CPU, both on all the machine's cores:
  * one JAX device: one XLA program, whose large matmuls XLA splits over its intra-op threads;
  * one JAX CPU device per core (``jax_num_cpu_devices``) with the prompts split over them
    (``generate(..., mesh=...)``): each core prefills and decodes its own rows.
transformers runs with as many torch threads as there are cores. With ``--device gpu`` both sides
run on the GPU (torch on CUDA when it has it).

Method: every side is warmed up (the first call, which compiles, is reported separately), then
``--repeats`` rounds; in each round every side, in turn, sleeps 0.2 s (so the other library's
threads go idle) and runs three times back to back, and the last two runs are timed (the first
re-warms its own thread pools). The median is reported.

    python benchmarks/rollout.py [--device cpu|gpu] [--cpu-devices N] [--sizes tiny,small] [--out FILE]
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
TIMED_PER_ROUND = 2  # runs timed per side per round, after one untimed re-warm run


def cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cpu", choices=["cpu", "gpu"], help="where both libraries run")
    p.add_argument("--cpu-devices", type=int, default=None,
                   help="JAX CPU devices for the split set-up (default: one per core)")
    p.add_argument("--sizes", default=",".join(SIZES), help="comma-separated subset of " + ",".join(SIZES))
    p.add_argument("--repeats", type=int, default=None, help="rounds (default 7; 2 with --quick)")
    p.add_argument("--quick", action="store_true", help="a smoke run: fewer rounds")
    p.add_argument("--out", default=None, help="write the Markdown table here")
    args = p.parse_args()
    for name in args.sizes.split(","):
        if name not in SIZES:
            p.error(f"--sizes: got {name!r}, expected names from {sorted(SIZES)}")
    if args.cpu_devices is not None and args.cpu_devices < 1:
        p.error(f"--cpu-devices: got {args.cpu_devices}, expected a positive integer")
    return args


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


def build_models(cfg_kwargs, torch_device):
    import torch
    import transformers

    from jaxrl_llm import models

    config = transformers.LlamaConfig(**cfg_kwargs, max_position_embeddings=256, pad_token_id=0,
                                      tie_word_embeddings=False)
    torch.manual_seed(0)
    hf = transformers.AutoModelForCausalLM.from_config(config).eval()
    with tempfile.TemporaryDirectory() as path:
        hf.save_pretrained(path)
        ours = models.from_pretrained(path)
    hf.generation_config.eos_token_id = None  # no EOS: every row runs to max_new_tokens, no extra processors
    return hf.to(torch_device), ours, config


def bench_size(name, args, rounds, torch_device, split_mesh):
    import jax
    import numpy as np
    import torch
    from flax import nnx
    from jax.sharding import NamedSharding, PartitionSpec as P

    from jaxrl_llm.rollout import generate

    cfg_kwargs, batch, prompt_len, new = SIZES[name]
    hf, ours, config = build_models(cfg_kwargs, torch_device)
    n_params = sum(p.numel() for p in hf.parameters())
    ids = np.random.RandomState(0).randint(1, config.vocab_size, (batch, prompt_len)).astype(np.int32)
    mask = np.ones_like(ids)
    t_ids = torch.tensor(ids, dtype=torch.long, device=torch_device)
    t_mask = torch.tensor(mask, dtype=torch.long, device=torch_device)

    def ours_fn(mesh):
        model = ours
        if mesh is not None:  # as a user would: parameters replicated on the mesh once, not per call
            model = jax.tree.map(lambda x: x, ours)
            nnx.update(model, jax.device_put(nnx.state(model), NamedSharding(mesh, P())))

        def run(seed):
            out = generate(model, ids, mask, max_new_tokens=new, rng=jax.random.key(seed), temperature=1.0,
                           eos_token_id=None, mesh=mesh)
            return jax.block_until_ready(out)
        return run

    def run_hf(seed):
        torch.manual_seed(seed)
        with torch.no_grad():
            out = hf.generate(input_ids=t_ids, attention_mask=t_mask, do_sample=True, temperature=1.0, top_k=0,
                              top_p=1.0, max_new_tokens=new, pad_token_id=0)
        if torch_device != "cpu":
            torch.cuda.synchronize()
        return out

    sides = {f"jaxrl_llm, 1 {jax.default_backend()} device": ours_fn(None)}
    if split_mesh is not None and batch % split_mesh.size == 0:
        sides[f"jaxrl_llm, {split_mesh.size} CPU devices (prompts split)"] = ours_fn(split_mesh)
    sides["transformers generate"] = run_hf

    first_call = {}
    for side, fn in sides.items():
        start = time.perf_counter()
        out = fn(0)
        first_call[side] = time.perf_counter() - start
        fn(1)
        if side == "transformers generate":
            assert tuple(out.shape) == (batch, prompt_len + new), out.shape
        else:
            assert out.tokens.shape == (batch, new) and int(out.mask.sum()) == batch * new

    times = {side: [] for side in sides}
    order = list(sides)
    for r in range(rounds):
        for side in order[r % len(order):] + order[: r % len(order)]:  # rotate who goes first
            time.sleep(0.2)
            sides[side](1000 + r)
            for i in range(TIMED_PER_ROUND):
                start = time.perf_counter()
                sides[side](2000 + r * TIMED_PER_ROUND + i)
                times[side].append(time.perf_counter() - start)

    hf_s = statistics.median(times["transformers generate"])
    rows = []
    for side in sides:
        median = statistics.median(times[side])
        rows.append(dict(
            model=name, cfg=cfg_kwargs, params=n_params, batch=batch, prompt=prompt_len, new=new, side=side,
            tps=batch * new / median, best_tps=batch * new / min(times[side]), ms_step=1e3 * median / new,
            ratio=hf_s / median, first_call=first_call[side],
        ))
        print(f"{name:5s} {side:45s} {rows[-1]['tps']:9,.0f} tok/s  {rows[-1]['ms_step']:6.2f} ms/step  "
              f"{rows[-1]['ratio']:5.2f}x transformers  runs {[round(1e3 * t, 1) for t in times[side]]} ms",
              flush=True)
    return rows


def markdown(rows, args, rounds, loads, torch_device) -> str:
    import jax
    import torch
    import transformers

    command = f"python benchmarks/rollout.py --device {args.device}"
    command += f" --cpu-devices {args.cpu_devices}" if args.cpu_devices else ""
    command += " --quick" if args.quick else ""
    torch_threads = f"{torch.get_num_threads()} threads" if torch_device == "cpu" else torch_device
    lines = [
        "# Rollout throughput: jaxrl_llm sampler vs transformers `generate`",
        "",
        f"Command: `{command}`",
        "",
        f"Machine: {cpu_model()}, {cores()} cores; JAX {jax.__version__} ({jax.default_backend()}, "
        f"{jax.device_count()} devices), torch {torch.__version__} ({torch_threads}), "
        f"transformers {transformers.__version__}, Python {sys.version.split()[0]}. "
        f"Load average before/after: {loads[0]} / {loads[1]}.",
        "",
        "Same random float32 Llama weights on both sides, same prompts (no padding), sampling at "
        "temperature 1, top_k 0, top_p 1, EOS disabled (every row generates all new tokens). tok/s = "
        "batch x new tokens / wall time of the whole call (prefill included). "
        f"Median of {rounds * TIMED_PER_ROUND} timed runs per side: {rounds} rounds, each side in turn "
        f"runs 3 times back to back after a 0.2 s pause and the last {TIMED_PER_ROUND} are timed. "
        "'ratio' = transformers' median time / this side's. 'first call' includes compilation.",
        "",
        "| model | params | batch x new (prompt) | side | tok/s | best tok/s | ms/step | ratio | first call (s) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        c = r["cfg"]
        desc = (f"{r['model']} (hidden {c['hidden_size']}, {c['num_hidden_layers']} layers, "
                f"vocab {c['vocab_size']})")
        lines.append(
            f"| {desc} | {r['params'] / 1e6:.1f}M | {r['batch']} x {r['new']} ({r['prompt']}) | {r['side']} | "
            f"{r['tps']:,.0f} | {r['best_tps']:,.0f} | {r['ms_step']:.2f} | **{r['ratio']:.2f}x** | "
            f"{r['first_call']:.1f} |"
        )
    return "\n".join(lines) + "\n"


def main():
    args = parse_args()
    os.environ.setdefault("JAX_PLATFORMS", "cuda" if args.device == "gpu" else "cpu")
    import jax
    from jax.sharding import AxisType

    split = args.cpu_devices or cores()
    if args.device == "cpu" and split > 1:
        jax.config.update("jax_num_cpu_devices", split)  # before the CPU backend starts
    import torch

    torch_device = "cuda" if args.device == "gpu" and torch.cuda.is_available() else "cpu"
    torch.set_num_threads(cores())
    split_mesh = None
    if args.device == "cpu" and split > 1:
        split_mesh = jax.make_mesh((split,), ("batch",), axis_types=(AxisType.Auto,),
                                   devices=jax.devices("cpu")[:split])
    rounds = args.repeats or (2 if args.quick else 7)
    loads = [load_average()]
    rows = []
    for name in args.sizes.split(","):
        rows += bench_size(name, args, rounds, torch_device, split_mesh)
    loads.append(load_average())
    text = markdown(rows, args, rounds, loads, torch_device)
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text)


if __name__ == "__main__":
    main()
