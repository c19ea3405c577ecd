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

    python benchmarks/rollout.py [--device cpu|gpu] [--cpu-devices N] [--sizes tiny,small] [--out FILE]
"""

from __future__ import annotations

import argparse
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

    from jaxrl_llm.rollout import generate, lower_generate

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

        options = dict(max_new_tokens=new, temperature=1.0, eos_token_id=None, mesh=mesh)

        def run(seed):
            return jax.block_until_ready(generate(model, ids, mask, rng=jax.random.key(seed), **options))
        run.lower = lambda: lower_generate(model, ids, mask, rng=jax.random.key(0), **options)
        return run

    def run_hf(seed):
        torch.manual_seed(seed)
        with torch.no_grad():
            out = hf.generate(input_ids=t_ids, attention_mask=t_mask, do_sample=True, temperature=1.0, top_k=0,
                              top_p=1.0, max_new_tokens=new, pad_token_id=0)
        if torch_device != "cpu":
            torch.cuda.synchronize()
        return out

    meshes = {f"jaxrl_llm, 1 {jax.default_backend()} device": None}
    if split_mesh is not None and batch % split_mesh.size == 0:
        meshes[f"jaxrl_llm, {split_mesh.size} CPU devices (prompts split)"] = split_mesh
    sides = {side: ours_fn(mesh) for side, mesh in meshes.items()}
    sides["transformers generate"] = run_hf
    devices = {side: 1 if mesh is None else mesh.size for side, mesh in meshes.items()}
    devices["transformers generate"] = 0

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

    breakdown = None
    if torch_device == "cpu":
        fastest = min(meshes, key=lambda side: statistics.median(times[side]))
        run = sides[fastest]
        breakdown = dict(model=name, side=fastest, **op_time_breakdown(run, run.lower(), devices[fastest]))
        print(f"{name:5s} time by op kind {breakdown}", flush=True)

    hf_s = statistics.median(times["transformers generate"])
    rows = []
    for side in sides:
        median = statistics.median(times[side])
        rows.append(dict(
            model=name, cfg=cfg_kwargs, params=n_params, batch=batch, prompt=prompt_len, new=new, side=side,
            devices=devices[side],  # 0: transformers
            tps=batch * new / median, best_tps=batch * new / min(times[side]), ms_step=1e3 * median / new,
            ratio=hf_s / median, first_call=first_call[side],
        ))
        print(f"{name:5s} {side:45s} {rows[-1]['tps']:9,.0f} tok/s  {rows[-1]['ms_step']:6.2f} ms/step  "
              f"{rows[-1]['ratio']:5.2f}x transformers  runs {[round(1e3 * t, 1) for t in times[side]]} ms",
              flush=True)
    return rows, breakdown


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

    cfg_kwargs, batch, prompt_len, new = SIZES[name]
    by_side = {r["side"]: r for r in rows_by_side if r["model"] == name}
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


def markdown(rows, floors, breakdowns, args, rounds, loads, torch_device) -> str:
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
    rows, breakdowns = [], []
    for name in args.sizes.split(","):
        size_rows, breakdown = bench_size(name, args, rounds, torch_device, split_mesh)
        rows += size_rows
        breakdowns += [breakdown] if breakdown else []
    floors = []
    if args.device == "cpu":
        for name in args.sizes.split(","):
            floors.append(matmul_floor(name, rows, split_mesh))
            print(f"{name:5s} matmul floor {floors[-1]}", flush=True)
    loads.append(load_average())
    text = markdown(rows, floors, breakdowns, args, rounds, loads, torch_device)
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text)


if __name__ == "__main__":
    main()
