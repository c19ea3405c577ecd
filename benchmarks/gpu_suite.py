"""Every GPU figure in one command: kernels, sampler, update MFU, a full step against TRL, and the tests.

    python benchmarks/gpu_suite.py [--out benchmarks/results/gpu_suite.md] [--stages a,b,...] [--smoke]

On one NVIDIA H100/H200 it runs, each stage in its own process under its own time limit (a stage
that fails or runs out of time is reported as such, the others still run), and writes one
Markdown file, rewritten after every stage:

1. `objectives`: RLOO loss + gradient from logits [32, 512, 151936] in float32 and bfloat16,
   ours against PyTorch eager and `torch.compile` (all checked equal to a float32 reference
   first), and `linear_token_logprobs` from bfloat16 hidden states against eager's matmul +
   log-softmax, time and working memory.
2. `sampler`: our KV-cache sampler against transformers `generate`, Qwen2.5-0.5B's shape, 64
   prompts x 256 new tokens, in bfloat16 and float32.
   `engine`: the rollout engine at RL lengths, bfloat16, the 0.5B shape: (a) nano-vllm's
   `bench.py` workload (256 sequences, prompt and output lengths uniform in [100, 1024], EOS
   ignored, temperature 0.6; output tokens/s, against vLLM 0.10.2's 17,711 tok/s on an A800) and
   (b) RL's shape, 64 prompts x 8 samples, lognormal lengths up to 4096, against `generate`.
3. `update`: one RLOO update of the 0.5B shape (128 sequences of 256 + 256 tokens, bfloat16
   compute over float32 masters): tokens/s and MFU under each remat policy, with XLA's memory.
4. `trl_ours`, `trl`: one full RLOO step (sample, reward, reference, update), our `Trainer` and
   TRL's `RLOOTrainer` (which samples with transformers `generate`), on the same random
   0.5B-shaped model, tokenizer and batch.
5. `pytest`: `python -m pytest -m "not slow and not real_model"` with the GPU as JAX's default
   device (GPU-only tests marked `gpu` included).

`--smoke` runs every stage at tiny shapes on whatever JAX and torch find (a CPU: a few minutes),
to check the suite itself. Timing: warm-up calls first, then calls timed to completion one
after the other, per side (never interleaved), medians reported. Nothing is downloaded: the
models are random, the tokenizer is built here.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

QWEN = ROOT / "benchmarks" / "model_configs" / "qwen2.5-0.5b"
# Dense bfloat16 tensor-core peak (no sparsity), FLOP/s, by `device_kind` substring.
PEAK_BF16 = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L4": 121e12, "A10": 125e12}
# Seconds per stage (the whole suite stays within 8 minutes on one H200); pytest gets what is left.
BUDGET = {"objectives": 100, "sampler": 65, "engine": 150, "update": 90, "trl_ours": 80, "trl": 50, "pytest": 95}
STAGES = tuple(BUDGET)
RESULT = "STAGE-RESULT "

# The shapes of each stage: full (a GPU) and smoke (a CPU, minutes).
SHAPES = {
    False: dict(logits=(32, 512, 151936), hidden_rows=16384, sampler=(64, 16, 256), update=(32, 4, 256, 256),
                # engine: nano-vllm's bench.py (sequences, prompt and output lengths uniform in
                # [lo, hi]); RL's shape (prompts, samples, prompt length, longest completion).
                engine_serving=(256, 100, 1024), engine_rl=(64, 8, 256, 4096),
                trl=(16, 4, 32, 128), trl_steps=(2, 3), repeats=7),
    True: dict(logits=(4, 16, 1000), hidden_rows=64, sampler=(4, 8, 8), update=(2, 2, 8, 8), trl=(2, 2, 8, 8),
               engine_serving=(8, 4, 24), engine_rl=(2, 4, 8, 48),
               trl_steps=(1, 1), repeats=2),
}


def small_model_config(config: dict) -> dict:
    """The 0.5B config shrunk for --smoke (same family, biases and tied head)."""
    return {**config, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
            "num_key_value_heads": 2, "vocab_size": 1000}


# -- shared helpers --------------------------------------------------------------------------------


START = time.perf_counter()


def say(message: str) -> None:
    print(f"[{time.perf_counter() - START:6.1f} s] {message}", flush=True)


def emit(result: dict) -> dict:
    """Print a stage's results so far: a stage stopped at its time limit still reports what it measured."""
    print(RESULT + json.dumps(result), flush=True)
    return result


def sync():
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()


def median_ms(call, *, warmup: int = 2, repeats: int = 7) -> float:
    """Median wall time of `call()` (which must block until its work is done), after warm-up calls."""
    time.sleep(0.5)  # the previous side's threads and kernels are done
    for _ in range(warmup):
        call()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        call()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


def device_summary() -> dict:
    import jax
    import torch

    device = jax.devices()[0]
    return {"jax": jax.__version__, "jax_device": f"{device.device_kind} ({device.platform})",
            "torch": torch.__version__,
            "torch_device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"}


def qwen_config(smoke: bool) -> dict:
    """Qwen2.5-0.5B's published shape (`benchmarks/model_configs/`), as keyword arguments of a
    `LlamaConfig` with attention biases (Qwen2's q/k/v biases, plus one on the output
    projection): a Llama model type lets `AutoTokenizer` load the word tokenizer saved beside it,
    where a Qwen2 model type would rebuild Qwen2's own BPE tokenizer."""
    config = json.loads((QWEN / "config.json").read_text())
    for key in ("architectures", "model_type", "torch_dtype", "use_sliding_window", "sliding_window",
                "max_window_layers"):
        config.pop(key, None)
    config.update(bos_token_id=1, eos_token_id=2, pad_token_id=0, max_position_embeddings=4096, attention_bias=True)
    return small_model_config(config) if smoke else config


def word_tokenizer(vocab_size: int):
    """A word-level tokenizer over the whole vocabulary ("w3" ... "w{V-1}", with <pad>, <s>, </s>):
    every id decodes, so both libraries turn any sampled completion into text for the reward."""
    import transformers
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, **{f"w{i}": i for i in range(3, vocab_size)}}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="<pad>"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token="<s>", eos_token="</s>",
                                                pad_token="<pad>", unk_token="<pad>")


def random_model_dir(workdir: Path, smoke: bool) -> Path:
    """A random Qwen2.5-0.5B-shaped model (float32) with the word tokenizer, saved once per suite."""
    import torch
    import transformers

    path = workdir / "qwen0.5b_random"
    if (path / "config.json").exists():
        return path
    torch.manual_seed(0)
    config = transformers.LlamaConfig(**qwen_config(smoke))
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.generation_config.eos_token_id, model.generation_config.pad_token_id = 2, 0
    model.save_pretrained(path)
    word_tokenizer(config.vocab_size).save_pretrained(path)
    settings = json.loads((path / "tokenizer_config.json").read_text())
    (path / "tokenizer_config.json").write_text(json.dumps({**settings, "tokenizer_class": "PreTrainedTokenizerFast"}))
    return path


def kernel_kind(name: str) -> str:
    """What a GPU kernel is, from its name (XLA names fusions after their kind; cuBLAS, cuDNN and
    Triton GEMMs name themselves)."""
    lowered = name.lower()
    for kind, marks in (("matmul", ("gemm", "xmma", "cutlass", "nvjet", "cublas", "matmul", "dot")),
                        ("attention (cuDNN)", ("cudnn", "fmha", "flash", "sdpa")),
                        ("copy / memset", ("memcpy", "memset", "copy", "transpose")),
                        ("reduction fusion", ("reduce", "reduction", "input_")),
                        ("elementwise fusion", ("fusion", "loop_", "wrapped_", "convert", "add", "multiply"))):
        if any(mark in lowered for mark in marks):
            return kind
    return "other"


def device_profile(call, calls: int = 3, top: int = 12) -> dict:
    """Where `call`'s device time goes, from a JAX profile of `calls` calls: ms per call by kind of
    kernel (`kernel_kind`) and the costliest kernels, from the events on the device's planes."""
    import glob

    import jax

    with tempfile.TemporaryDirectory() as trace_dir:
        call()
        jax.profiler.start_trace(trace_dir)
        for _ in range(calls):
            call()
        jax.profiler.stop_trace()
        (path,) = glob.glob(os.path.join(trace_dir, "**", "*.xplane.pb"), recursive=True)
        profile = jax.profiler.ProfileData.from_file(path)
    per_kernel = {}
    for plane in profile.planes:
        if not plane.name.startswith("/device:"):
            continue
        for line in plane.lines:
            if line.name.startswith("Stream"):  # the kernels as they ran (other lines group them)
                for event in line.events:
                    per_kernel[event.name] = per_kernel.get(event.name, 0.0) + event.duration_ns / 1e6 / calls
    by_kind = {}
    for name, ms in per_kernel.items():
        by_kind[kernel_kind(name)] = by_kind.get(kernel_kind(name), 0.0) + ms
    costly = sorted(per_kernel, key=per_kernel.get, reverse=True)[:top]
    return {"device_ms": sum(per_kernel.values()), "by_kind": by_kind, "kernels": len(per_kernel),
            "top": [(name[:90], kernel_kind(name), per_kernel[name]) for name in costly]}


# -- 1. objectives from logits and from hidden states -----------------------------------------------


def stage_objectives(smoke: bool, workdir: Path) -> dict:
    import jax
    import jax.numpy as jnp
    import torch

    import jaxrl_llm as rl
    from jaxrl_llm.lowering import kernels_of
    from jaxrl_llm.objectives import logprobs as kernel

    shapes = SHAPES[smoke]
    n, t, vocab = shapes["logits"]
    k, beta = 4, 0.05
    device = "cuda" if torch.cuda.is_available() else "cpu"
    keys = jax.random.split(jax.random.key(0), 5)
    base = 2.0 * jax.random.normal(keys[0], (n, t, vocab), jnp.float32)
    tokens = jax.random.randint(keys[1], (n, t), 0, vocab)
    ref = -3.0 + jax.random.normal(keys[2], (n, t))
    scores = jax.random.normal(keys[3], (n,))
    lengths = jax.random.randint(keys[4], (n,), t // 2, t + 1)
    mask = (jnp.arange(t)[None] < lengths[:, None]).astype(jnp.float32)
    as_torch = lambda x: torch.from_dlpack(x).to(device)  # noqa: E731 - zero-copy on one device
    tb = {name: as_torch(x) for name, x in (("tokens", tokens), ("ref", ref), ("scores", scores), ("mask", mask))}
    tb["tokens"] = tb["tokens"].long()

    def torch_rloo(logits):
        logp = torch.log_softmax(logits.float(), dim=-1).gather(-1, tb["tokens"][..., None])[..., 0]
        m = tb["mask"]
        reward = tb["scores"] - beta * ((logp.detach() - tb["ref"]) * m).sum(-1)
        group = reward.view(-1, k)
        advantage = (group - (group.sum(-1, keepdim=True) - group) / (k - 1)).view(-1)
        return -(advantage[:, None] * logp * m).sum(-1).mean()

    def ours_rloo(logits):
        logp = rl.token_logprobs(logits, tokens)
        return rl.rloo_loss(logp, ref, scores, mask, num_samples=k, kl_coef=beta)[0]

    rows, reference = [], None
    for dtype in os.environ.get("GPU_SUITE_DTYPES", "float32,bfloat16").split(","):
        logits = base.astype(dtype)
        t_logits = as_torch(logits)
        if reference is None or dtype == "bfloat16":  # the reference: float32 eager on these very logits
            x = t_logits.float().detach().requires_grad_()
            loss = torch_rloo(x)
            loss.backward()
            reference = (float(loss), x.grad.float())  # stays on the device: 10 GB is no host copy
            del x

        def torch_call(fn):
            x = t_logits.detach().requires_grad_()

            def call():
                x.grad = None
                loss = fn(x)
                loss.backward()
                sync()
                return loss, x.grad
            return call

        def jax_call(program):
            def call():
                return jax.block_until_ready(program(logits))
            return call

        sides = [("PyTorch eager", torch_call(torch_rloo)),
                 ("torch.compile", torch_call(torch.compile(torch_rloo)))]
        # Ours as a GPU gets it (one fused pass over float32 logits, XLA's two plain reductions over
        # bfloat16 ones), beside the other reduction, and (float32) the CPU program (cache-sized row
        # blocks) run on this device: the kernel before it chose its blocking by platform.
        other = "two_pass" if dtype == "float32" else "one_pass"
        for label, stats, platform in (("ours", None, None), (f"ours, {other.replace('_', '-')} reductions", other, None),
                                       ("ours, CPU blocking", None, "cpu")):
            if platform == "cpu" and (dtype != "float32" or jax.default_backend() == "cpu"):
                continue
            kernel.ACCELERATOR_ROW_STATS = stats
            # A new function per variant: jit's cache must not hand back another variant's trace.
            # The CPU's kernels in a program for this device (`kernels_of`), not a CPU module.
            with kernels_of(platform) if platform else contextlib.nullcontext():
                lowered = jax.jit(jax.value_and_grad(lambda x: ours_rloo(x))).trace(logits).lower()
            sides.append((label, jax_call(lowered.compile())))
            kernel.ACCELERATOR_ROW_STATS = None
        for label, call in sides:
            loss, grad = call()
            loss = float(loss)
            grad = grad if isinstance(grad, torch.Tensor) else as_torch(grad)  # compared on the device
            error = max(abs(loss - reference[0]) / max(abs(reference[0]), 1e-6),
                        float((grad.float() - reference[1]).abs().max() / reference[1].abs().max()))
            limit = 2e-4 if dtype == "float32" else 2e-2  # bfloat16 gradients: 8 bits of mantissa
            if not error <= limit:
                raise SystemExit(f"{label} ({dtype}): differs from the float32 reference by {error:.2e} (> {limit})")
            del grad
            ms = median_ms(call, repeats=shapes["repeats"])
            rows.append(dict(what=f"RLOO from logits {n}x{t}x{vocab}", dtype=dtype, side=label, ms=ms, error=error))
            say(f"objectives {dtype} {label}: {ms:.2f} ms (error {error:.1e})")
            emit({"rows": rows})
        del t_logits, logits
    rows += linear_logprobs_rows(smoke, lambda more: emit({"rows": rows + more}))
    return {"rows": rows}


def linear_logprobs_rows(smoke: bool, emit_rows) -> list[dict]:
    """`linear_token_logprobs` + gradient from bfloat16 hidden states, against PyTorch eager
    (matmul, float32 log-softmax, gather): time and the working memory beyond the inputs."""
    import jax
    import jax.numpy as jnp
    import numpy as np
    import torch

    import jaxrl_llm as rl

    shapes = SHAPES[smoke]
    rows_n, vocab = shapes["hidden_rows"], shapes["logits"][2]
    width = qwen_config(smoke)["hidden_size"]
    device = "cuda" if torch.cuda.is_available() else "cpu"
    keys = jax.random.split(jax.random.key(1), 4)
    hidden = jax.random.normal(keys[0], (1, rows_n, width), jnp.bfloat16)
    weight = (0.05 * jax.random.normal(keys[1], (width, vocab))).astype(jnp.bfloat16)
    tokens = jax.random.randint(keys[2], (1, rows_n), 0, vocab)
    g = jax.random.normal(keys[3], (1, rows_n))
    th, tw, ty, tg = (torch.from_dlpack(x).to(device) for x in (hidden, weight, tokens, g))
    ty = ty.long()
    out = []

    h = th.detach().requires_grad_()
    w = tw.detach().requires_grad_()

    def torch_call():
        h.grad = w.grad = None
        logits = (h @ w).float()
        logp = torch.log_softmax(logits, dim=-1).gather(-1, ty[..., None])[..., 0]
        loss = (logp * tg).sum()
        loss.backward()
        sync()
        return float(loss)

    torch_value = torch_call()
    if device == "cuda":
        sync()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        torch_call()
        torch_memory = torch.cuda.max_memory_allocated() - before
    else:
        torch_memory = None
    ms = median_ms(torch_call, repeats=shapes["repeats"])
    out.append(dict(what=f"from hidden [{rows_n}, {width}] x [{width}, {vocab}]", dtype="bfloat16",
                    side="PyTorch eager", ms=ms, memory=torch_memory))
    for label, chunk, vocab_chunk in (("ours, unchunked", None, None),
                                      ("ours, chunks 4096 x 32768 (trainer default)", 4096, 32768),
                                      ("ours, chunks 8192 x whole vocabulary", 8192, None)):
        def loss(h, w, chunk=chunk, vocab_chunk=vocab_chunk):
            logp, _ = rl.linear_token_logprobs(h, w, tokens, chunk_size=chunk, vocab_chunk_size=vocab_chunk)
            return jnp.sum(logp * g)

        compiled = jax.jit(jax.value_and_grad(loss, argnums=(0, 1))).lower(hidden, weight).compile()
        analysis = compiled.memory_analysis()
        memory = None if analysis is None else analysis.temp_size_in_bytes + analysis.output_size_in_bytes
        value = float(compiled(hidden, weight)[0])
        # The same loss (bfloat16 operands, float32 softmax) on both sides, to bf16 matmul rounding.
        if not abs(value - torch_value) <= 2e-2 * max(abs(torch_value), 1.0):
            raise SystemExit(f"linear {label}: loss {value} differs from PyTorch's {torch_value}")
        ms = median_ms(lambda compiled=compiled: jax.block_until_ready(compiled(hidden, weight)),
                       repeats=shapes["repeats"])
        out.append(dict(what=f"from hidden [{rows_n}, {width}] x [{width}, {vocab}]", dtype="bfloat16", side=label,
                        ms=ms, memory=memory, value=value))
        say(f"linear {label}: {ms:.2f} ms, memory {memory}")
        emit_rows(out)
    del np
    return out


# -- 2. the sampler --------------------------------------------------------------------------------


def stage_sampler(smoke: bool, workdir: Path) -> dict:
    import jax
    import jax.numpy as jnp
    import numpy as np
    import torch
    import transformers

    from jaxrl_llm import models
    from jaxrl_llm.rollout import generate

    prompts, prompt_len, new = SHAPES[smoke]["sampler"]
    path = random_model_dir(workdir, smoke)
    say("sampler: model saved")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    vocab = qwen_config(smoke)["vocab_size"]
    ids = np.random.default_rng(0).integers(3, vocab, (prompts, prompt_len)).astype(np.int32)
    mask = np.ones_like(ids)
    t_ids, t_mask = torch.tensor(ids, dtype=torch.long, device=device), torch.tensor(mask, device=device)
    rows = []
    for dtype in ("bfloat16", "float32"):
        ours = models.from_pretrained(path, dtype=jnp.dtype(dtype))
        seeds = iter(range(1000))

        def ours_call():
            out = generate(ours, ids, mask, max_new_tokens=new, rng=jax.random.key(next(seeds)), temperature=1.0,
                           eos_token_id=None, cache_dtype=jnp.dtype(dtype))
            jax.block_until_ready(out.tokens)
            return out

        say(f"sampler {dtype}: ours loaded")
        assert ours_call().tokens.shape == (prompts, new)
        say(f"sampler {dtype}: ours compiled and ran once")
        ours_ms = median_ms(ours_call, warmup=1, repeats=3)
        del ours
        hf = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=getattr(torch, dtype)).to(device).eval()
        hf.generation_config.eos_token_id = None  # every row runs to max_new_tokens, as ours

        def hf_call():
            with torch.no_grad():
                out = hf.generate(input_ids=t_ids, attention_mask=t_mask, do_sample=True, temperature=1.0, top_k=0,
                                  top_p=1.0, max_new_tokens=new, min_new_tokens=new, pad_token_id=0)
            sync()
            return out

        say(f"sampler {dtype}: ours {ours_ms:.0f} ms; transformers loaded")
        assert tuple(hf_call().shape) == (prompts, prompt_len + new)
        say(f"sampler {dtype}: transformers ran once")
        hf_ms = median_ms(hf_call, warmup=0, repeats=2)
        del hf
        if device == "cuda":
            torch.cuda.empty_cache()
        tokens = prompts * new
        rows.append(dict(dtype=dtype, ours_tps=tokens / ours_ms * 1e3, hf_tps=tokens / hf_ms * 1e3,
                         ours_ms=ours_ms, hf_ms=hf_ms))
        say(f"sampler {dtype}: ours {tokens / ours_ms * 1e3:,.0f} tok/s, generate {tokens / hf_ms * 1e3:,.0f}")
        emit({"rows": rows, "shape": dict(prompts=prompts, prompt_len=prompt_len, new=new)})
    return {"rows": rows, "shape": dict(prompts=prompts, prompt_len=prompt_len, new=new)}


# -- 2b. the rollout engine at RL lengths -----------------------------------------------------------


def imposed_lengths_uniforms(lengths, steps: int, seed: int):
    """[T, N] uniforms under which row r of a near-uniform model ends (token 0 as EOS) after exactly
    lengths[r] tokens (``benchmarks/rollout_lengths.py`` explains the construction)."""
    import numpy as np

    u = np.random.default_rng(seed).random((steps, len(lengths)), dtype=np.float32) * np.float32(0.98)
    ends = lengths < steps
    u[lengths[ends] - 1, np.flatnonzero(ends)] = np.float32(1.0) - np.float32(2.0 ** -24)
    return u


def stage_engine(smoke: bool, workdir: Path) -> dict:
    import jax
    import jax.numpy as jnp
    import numpy as np
    import torch
    import transformers

    from jaxrl_llm import models
    from jaxrl_llm.rollout.sampler import generate_with_schedule

    path = random_model_dir(workdir, smoke)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    vocab = qwen_config(smoke)["vocab_size"]
    ours = models.from_pretrained(path, dtype=jnp.bfloat16)
    rng = np.random.default_rng(0)
    result = {"rows": []}

    def ours_run(ids, mask, lengths, steps, samples, temperature):
        uniforms = imposed_lengths_uniforms(lengths, steps, seed=1)

        def call():
            out, schedule = generate_with_schedule(ours, ids, mask, max_new_tokens=steps, rng=jax.random.key(0),
                                                   num_samples=samples, temperature=temperature, eos_token_id=0,
                                                   cache_dtype=jnp.bfloat16, uniforms=uniforms)
            produced = np.asarray(out.mask).sum(axis=1)
            assert np.array_equal(produced, lengths), "a row did not end at its imposed length"
            return schedule

        say("engine: compiling (a first call)")
        chunks = len(call())
        return median_ms(call, warmup=0, repeats=2), chunks

    # (a) nano-vllm's bench.py: each sequence's own prompt and output length, EOS ignored.
    count, lo, hi = SHAPES[smoke]["engine_serving"]
    prompt_lens = rng.integers(lo, hi + 1, count)
    out_lens = rng.integers(lo, hi + 1, count).astype(np.int64)
    ids = np.zeros((count, hi), np.int32)
    mask = np.zeros((count, hi), np.int32)
    for r, n in enumerate(prompt_lens):  # left-padded to the longest prompt
        ids[r, hi - n:] = rng.integers(3, vocab, n)
        mask[r, hi - n:] = 1
    ms, chunks = ours_run(ids, mask, out_lens, hi, 1, 0.6)
    result["rows"].append(dict(workload="serving", side="ours", ms=ms, tokens=int(out_lens.sum()), chunks=chunks))
    say(f"engine (a): {out_lens.sum() / ms * 1e3:,.0f} output tok/s")
    emit(result)

    # (b) RL: prompts x samples, lognormal lengths (median max / 6.4), against transformers.
    prompts, samples, prompt_len, longest = SHAPES[smoke]["engine_rl"]
    n = prompts * samples
    lengths = np.clip(np.round(np.exp(rng.normal(np.log(longest / 6.4), 1.0, n))), 1, longest).astype(np.int64)
    ids = rng.integers(3, vocab, (prompts, prompt_len)).astype(np.int32)
    mask = np.ones_like(ids)
    ms, chunks = ours_run(ids, mask, lengths, longest, samples, 1.0)
    result["rows"].append(dict(workload="rl", side="ours", ms=ms, tokens=int(lengths.sum()), chunks=chunks))
    say(f"engine (b): ours {lengths.sum() / ms * 1e3:,.0f} tok/s")
    emit(result)
    del ours
    hf = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16).to(device).eval()
    hf.generation_config.eos_token_id = None

    class ImposedLengths(transformers.LogitsProcessor):
        """Row r emits token 0 (its EOS) at its imposed length and never before: transformers then
        produces exactly the rows the engine produced, and stops when the longest is done."""

        def __init__(self):
            self.target = torch.tensor(lengths, device=device)

        def __call__(self, input_ids, scores):
            t = input_ids.shape[1] - prompt_len  # tokens produced so far
            end = (self.target == t + 1)[:, None]
            banned = torch.full_like(scores, float("-inf"))
            eos_only = banned.clone()
            eos_only[:, 0] = 0.0
            scores = scores.clone()
            scores[:, 0] = float("-inf")
            return torch.where(end, eos_only, scores)

    t_ids = torch.tensor(np.repeat(ids, samples, axis=0), dtype=torch.long, device=device)
    t_mask = torch.ones_like(t_ids)

    def hf_call():
        with torch.no_grad():
            out = hf.generate(input_ids=t_ids, attention_mask=t_mask, do_sample=True, temperature=1.0, top_k=0,
                              top_p=1.0, max_new_tokens=longest, eos_token_id=0, pad_token_id=0,
                              logits_processor=transformers.LogitsProcessorList([ImposedLengths()]))
        sync()
        produced = ((out[:, prompt_len:] != 0).cumprod(dim=1).sum(dim=1) + 1).clamp(max=longest)
        return out, produced

    _, produced = hf_call()
    assert np.array_equal(produced.cpu().numpy(), lengths), "transformers did not stop at the imposed lengths"
    hf_ms = median_ms(hf_call, warmup=0, repeats=1)
    result["rows"].append(dict(workload="rl", side="transformers", ms=hf_ms, tokens=int(lengths.sum())))
    say(f"engine (b): transformers {lengths.sum() / hf_ms * 1e3:,.0f} tok/s")
    result["shapes"] = dict(serving=SHAPES[smoke]["engine_serving"], rl=SHAPES[smoke]["engine_rl"],
                            rl_median=int(np.median(lengths)), rl_longest=int(lengths.max()))
    return emit(result)


# -- 3. the update: tokens/s and MFU per remat policy ------------------------------------------------


def stage_update(smoke: bool, workdir: Path) -> dict:
    import functools

    import jax
    import jax.numpy as jnp
    import numpy as np
    import transformers
    from flax import nnx

    from jaxrl_llm import models
    from jaxrl_llm.training import load_config
    from jaxrl_llm.training.algorithms import Algorithm, RolloutBatch
    from jaxrl_llm.training.setup import make_optimizer
    from jaxrl_llm.training.state import TrainState, update_step

    prompts, k, p, t = SHAPES[smoke]["update"]
    hf_config = transformers.LlamaConfig(**qwen_config(smoke))
    n = prompts * k
    rng = np.random.default_rng(0)
    vocab = hf_config.vocab_size
    batch = RolloutBatch(np.repeat(rng.integers(3, vocab, (prompts, p), dtype=np.int32), k, 0),
                         np.ones((n, p), np.int32), rng.integers(3, vocab, (n, t), dtype=np.int32),
                         np.ones((n, t), np.int32), rng.random(n, dtype=np.float32), np.ones(n, bool))
    device = jax.devices()[0]
    peak = next((v for name, v in PEAK_BF16.items() if name in device.device_kind), None)
    rows, train_batch, profile = [], None, None
    for remat in os.environ.get("GPU_SUITE_REMAT", "none,layer,dots_with_no_batch_dims_saveable").split(","):
        policy = models.from_config(hf_config, dtype=jnp.float32, rngs=nnx.Rngs(0))
        policy.set_execution(remat=remat)
        graphdef, params = nnx.split(policy)
        del policy
        num_params = sum(x.size for x in jax.tree.leaves(params))
        config = load_config(None, ["algo.name=rloo", f"algo.num_samples={k}", f"rollout.prompts_per_step={prompts}",
                                    "model.dtype=bfloat16", f"model.remat={remat}"])
        algorithm = Algorithm(config.algo, graphdef=graphdef, temperature=1.0,
                              chunk_size=config.train.logprob_chunk_size,
                              vocab_chunk_size=config.train.logprob_vocab_chunk_size, compute_dtype=jnp.bfloat16)
        optimizer = make_optimizer(config)
        state = TrainState.create(policy_params=params, optimizer=optimizer, seed=0, reference_dtype=jnp.bfloat16)
        if train_batch is None:  # the reference forward does not depend on remat
            _, train_batch, _ = jax.jit(algorithm.prepare)(state, batch)
        update = jax.jit(functools.partial(update_step, algorithm, optimizer))
        say(f"update remat={remat}: prepared")
        compiled = update.lower(state, train_batch).compile()
        say(f"update remat={remat}: compiled")
        analysis = compiled.memory_analysis()
        run = lambda: jax.block_until_ready(compiled(state, train_batch)[1][1]["loss/total"])  # noqa: E731
        ms = median_ms(run, warmup=1, repeats=5)
        if profile is None and jax.default_backend() != "cpu":  # where the update's device time goes
            try:
                profile = {"remat": remat, **device_profile(run)}
            except Exception as e:  # noqa: BLE001 - the table stands without it
                profile = {"error": f"{type(e).__name__}: {e}"}
        tokens = n * (p + t)
        heads = hf_config.num_attention_heads
        width = heads * (getattr(hf_config, "head_dim", None) or hf_config.hidden_size // heads)
        # 6 N per token (forward + backward), plus causal attention's QK^T and PV: 2 x 2 x S^2/2 x width
        # per layer forward, x3 with the backward. Recomputation under remat is not counted (PaLM's MFU).
        flops = 6 * num_params * tokens + 3 * 2 * hf_config.num_hidden_layers * width * n * (p + t) ** 2
        rows.append(dict(remat=remat, ms=ms, tokens_per_s=tokens / ms * 1e3,
                         mfu=None if peak is None else flops / (ms / 1e3) / peak,
                         temp_gb=None if analysis is None else analysis.temp_size_in_bytes / 2**30,
                         params_m=num_params / 1e6))
        say(f"update remat={remat}: {ms:.1f} ms, {tokens / ms * 1e3:,.0f} tok/s, MFU {rows[-1]['mfu']}")
        result = emit({"rows": rows, "shape": dict(prompts=prompts, samples=k, prompt=p, completion=t), "peak": peak,
                       "profile": profile})
        del state, compiled, params
    return result


# -- 4. one full step: our Trainer and TRL's RLOOTrainer ---------------------------------------------


def length_reward(completions, **kwargs):
    """A cheap reward that varies between samples (the share of words with an even id)."""
    scores = []
    for text in completions:
        words = text.split() or [""]
        scores.append(sum(word[1:].isdigit() and int(word[1:]) % 2 == 0 for word in words) / len(words))
    return scores


def trl_prompts(workdir: Path, smoke: bool, count: int) -> Path:
    prompts, _, prompt_len, _ = SHAPES[smoke]["trl"]
    vocab = qwen_config(smoke)["vocab_size"]
    path = workdir / "prompts.jsonl"
    rng = __import__("numpy").random.default_rng(0)
    with path.open("w") as f:
        for _ in range(count):
            f.write(json.dumps({"prompt": " ".join(f"w{i}" for i in rng.integers(3, vocab, prompt_len))}) + "\n")
    return path


def stage_trl_ours(smoke: bool, workdir: Path) -> dict:
    import jax

    from jaxrl_llm.training import Trainer, load_config

    prompts, k, prompt_len, new = SHAPES[smoke]["trl"]
    warmup, steps = SHAPES[smoke]["trl_steps"]
    path = random_model_dir(workdir, smoke)
    data = trl_prompts(workdir, smoke, prompts * (warmup + steps + 1))
    config = load_config(None, [
        f"model.path={path}", "model.dtype=bfloat16", "task.name=dataset", f"task.options={{path: {data}}}",
        "task.num_eval=0", f"reward.terms=[{{kind: python, target: '{Path(__file__).resolve()}:length_reward'}}]",
        "algo.name=rloo", f"algo.num_samples={k}", "algo.kl_coef=0.05", f"rollout.prompts_per_step={prompts}",
        f"rollout.max_new_tokens={new}", f"rollout.prompt_length={2 * prompt_len}", "rollout.temperature=1.0",
        "optim.learning_rate=1e-6", f"train.steps={warmup + steps}", f"train.run_dir={workdir / 'ours_run'}",
        "train.eval_every=1000000", "train.checkpoint_every=1000000", "train.progress=false", "train.plot=false",
        "train.tensorboard=false",
    ])
    trainer = Trainer(config)
    times = []
    say("trl_ours: trainer built")
    for _ in range(warmup + steps):
        start = time.perf_counter()
        trainer.step()
        jax.block_until_ready(trainer.state)
        times.append(time.perf_counter() - start)
        say(f"trl_ours: step {len(times)} took {times[-1]:.2f} s")
    return {"times": times[warmup:], "first_step_s": times[0]}


def stage_trl(smoke: bool, workdir: Path) -> dict:
    import torch
    import trl
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import RLOOConfig, RLOOTrainer

    prompts, k, prompt_len, new = SHAPES[smoke]["trl"]
    warmup, steps = SHAPES[smoke]["trl_steps"]
    path = random_model_dir(workdir, smoke)
    data = trl_prompts(workdir, smoke, prompts * (warmup + steps + 1))
    rows = [json.loads(line) for line in data.read_text().splitlines()]
    tokenizer = AutoTokenizer.from_pretrained(path, padding_side="left")
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)

    class StepTimer(TrainerCallback):
        def __init__(self):
            self.times, self.start = [], None

        def on_step_begin(self, args, state, control, **kwargs):
            sync()
            self.start = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            sync()
            self.times.append(time.perf_counter() - self.start)

    timer = StepTimer()
    # TRL turns gradient checkpointing on by default; transformers 5.2x renamed the field.
    fields = {f.name for f in __import__("dataclasses").fields(RLOOConfig)}
    no_checkpointing = {name: False for name in ("activation_checkpointing", "gradient_checkpointing") if name in fields}
    with tempfile.TemporaryDirectory() as tmp:
        args = RLOOConfig(
            output_dir=tmp, max_steps=warmup + steps, seed=0, per_device_train_batch_size=prompts * k,
            gradient_accumulation_steps=1, num_generations=k, num_iterations=1, max_completion_length=new,
            temperature=1.0, learning_rate=1e-6, lr_scheduler_type="constant", warmup_steps=0, beta=0.05,
            bf16=torch.cuda.is_available(), shuffle_dataset=False, **no_checkpointing,
            use_cpu=not torch.cuda.is_available(), logging_strategy="no", save_strategy="no", report_to="none",
            disable_tqdm=True, dataloader_num_workers=0)
        trainer = RLOOTrainer(model=model, reward_funcs=length_reward, args=args,
                              train_dataset=Dataset.from_list(rows), processing_class=tokenizer, callbacks=[timer])
        trainer.train()
    return {"times": timer.times[warmup:], "first_step_s": timer.times[0], "trl": trl.__version__}


# -- 5. the test suite on the GPU ---------------------------------------------------------------------


def stage_pytest(smoke: bool, workdir: Path, seconds: float) -> dict:
    """The tests with JAX's default device the accelerator; per-test outcomes are read from the
    verbose log, so a run stopped at its time limit still reports every test it finished."""
    import re

    env = {**os.environ, "JAX_PLATFORMS": "" if smoke else "cuda,cpu", "XLA_PYTHON_CLIENT_PREALLOCATE": "false"}
    targets = ["tests/test_logprob_kernel.py", "tests/test_public_api.py"] if smoke else PYTEST_TARGETS
    workers = "2" if smoke else str(min(12, os.cpu_count() or 1))
    command = [sys.executable, "-m", "pytest", "-v", "-m", "not slow and not real_model", "-n", workers,
               "-p", "no:cacheprovider", "--tb=line", *targets]
    start = time.perf_counter()
    try:
        done = subprocess.run(command, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                              timeout=seconds)
        log, timed_out = done.stdout, False
    except subprocess.TimeoutExpired as e:
        log, timed_out = (e.stdout.decode() if isinstance(e.stdout, bytes) else e.stdout or ""), True
    (workdir / "pytest.log").write_text(log)
    outcomes = {}
    for outcome, test in re.findall(r"\b(PASSED|FAILED|SKIPPED|ERROR|XFAIL|XPASS) (tests/\S+)", log):
        outcomes[test] = outcome
    for test, outcome in re.findall(r"^(?:\[gw\d+\] )?(tests/\S+) (PASSED|FAILED|SKIPPED|ERROR)", log, re.M):
        outcomes[test] = outcome
    count = lambda *kinds: sum(o in kinds for o in outcomes.values())  # noqa: E731
    failed = [t for t, o in outcomes.items() if o in ("FAILED", "ERROR")]
    reasons = {m.group(1): m.group(0) for m in re.finditer(r"^FAILED (tests/\S+) - .*$", log, re.M)}
    return {"seconds": time.perf_counter() - start, "timed_out": timed_out, "tail": log[-3000:],
            "command": " ".join(command[3:]), "passed": count("PASSED", "XFAIL", "XPASS"),
            "failed_count": len(failed), "skipped": count("SKIPPED"),
            "failed": [reasons.get(t, t)[:400] for t in failed]}


# Where the GPU-specific work lives first (a run stopped at its limit has checked these), then the rest.
PYTEST_TARGETS = ["tests/test_logprob_kernel.py", "tests/models", "tests/rollout", "tests/test_objective_gradients.py",
                  "tests/test_torch_reference.py", "tests/training", "tests"]


# -- the orchestrator -----------------------------------------------------------------------------------


def run_stage(name: str, smoke: bool, workdir: Path, seconds: float) -> dict:
    """`name` in a fresh process, killed after `seconds`: `{"ok": ..., "seconds": ..., ...}`."""
    if name == "pytest":  # pytest is its own process already
        result = stage_pytest(smoke, workdir, seconds)
        return {"ok": not result["timed_out"] and not result["failed_count"] and result["passed"] > 0, **result}
    command = [sys.executable, __file__, "--run-stage", name, "--workdir", str(workdir)] + (["--smoke"] if smoke else [])
    env = {**os.environ, "XLA_PYTHON_CLIENT_PREALLOCATE": "false",  # JAX and torch share the GPU
           "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    start = time.perf_counter()
    try:
        done = subprocess.run(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                              timeout=seconds)
        log, timed_out, code = done.stdout, False, done.returncode
    except subprocess.TimeoutExpired as e:
        log = e.stdout.decode() if isinstance(e.stdout, bytes) else (e.stdout or "")
        timed_out, code = True, None
    (workdir / f"{name}.log").write_text(log)
    print(log[-4000:], flush=True)
    found = [line for line in log.splitlines() if line.startswith(RESULT)]
    result = json.loads(found[-1][len(RESULT):]) if found else {}
    elapsed = time.perf_counter() - start
    why = None if found and not (timed_out or code) else ("out of time" if timed_out else f"exit {code}: "
                                                           + " / ".join(log.splitlines()[-6:]))
    return {"ok": bool(found), "partial": bool(found) and why is not None, "seconds": elapsed, "why": why, **result}


def ratio(a, b):
    return f"{a / b:.2f}x" if a and b else "n/a"


def render(results: dict, args, environment: dict) -> str:
    lines = ["# GPU suite", "", f"Command: `python benchmarks/gpu_suite.py {' '.join(sys.argv[1:])}`".rstrip(), "",
             f"Device: {environment.get('jax_device')} (jax {environment.get('jax')}); torch {environment.get('torch')} "
             f"on {environment.get('torch_device')}."
             + (" **Smoke run: tiny shapes, not a measurement.**" if args.smoke else ""), "",
             "Each stage in its own process under its own time limit; warm-up calls first, then calls timed to "
             "completion one after the other, per side (never interleaved); medians.", ""]
    for name in STAGES:
        if name not in results:
            continue
        r = results[name]
        header = {"objectives": "1. Objectives", "sampler": "2. Sampler", "engine": "2b. Rollout engine at RL lengths",
                  "update": "3. Update (RLOO, 0.5B shape)",
                  "trl_ours": None, "trl": "4. One full RLOO step against TRL", "pytest": "5. Tests on the GPU"}[name]
        if header is None:
            continue
        lines += [f"## {header}", ""]
        if name == "trl":
            lines += render_trl(results.get("trl_ours", {}), r, args)
            continue
        if not r.get("ok") and name != "pytest":
            lines += [f"Not measured: {r.get('why')} ({r.get('seconds', 0):.0f} s).", ""]
            continue
        lines += {"objectives": render_objectives, "sampler": render_sampler, "engine": render_engine,
                  "update": render_update,
                  "pytest": render_pytest}[name](r, args)
        if r.get("partial"):
            lines += [f"(Stage stopped early: {r['why']}; the rows above are what it measured.)", ""]
    return "\n".join(lines) + "\n"


def render_objectives(r, args) -> list[str]:
    out = ["Loss + gradient. From logits: RLOO (`token_logprobs` + `rloo_loss`; PyTorch: float32 log-softmax of the "
           "logits, gather, the same formula), every side checked against float32 eager on the same logits first "
           "('error': loss and gradient, relative to the largest). From hidden states: log-probabilities straight "
           "from `h @ W` (PyTorch eager: the matmul, a float32 log-softmax, gather) and their gradient for h and W; "
           "'memory' is the working memory beyond the inputs (PyTorch: peak allocated during the call; ours: XLA's "
           "temporaries and outputs).", "",
           "| what | dtype | side | median (ms) | vs eager | vs compile | error / memory |", "|---|---|---|---|---|---|---|"]
    rows = r["rows"]
    for row in rows:
        same = [x for x in rows if x["what"] == row["what"] and x["dtype"] == row["dtype"]]
        eager = next((x["ms"] for x in same if x["side"] == "PyTorch eager"), None)
        compiled = next((x["ms"] for x in same if x["side"] == "torch.compile"), None)
        extra = (f"{row['error']:.1e}" if "error" in row else
                 "n/a" if row.get("memory") is None else f"{row['memory'] / 2**30:.2f} GiB")
        out.append(f"| {row['what']} | {row['dtype']} | {row['side']} | {row['ms']:.2f} | {ratio(eager, row['ms'])} | "
                   f"{ratio(compiled, row['ms'])} | {extra} |")
    return out + [""]


def render_sampler(r, args) -> list[str]:
    s = r["shape"]
    out = [f"Random Qwen2.5-0.5B-shaped weights (the same on both sides), {s['prompts']} prompts of {s['prompt_len']} "
           f"tokens, {s['new']} new tokens each (no EOS: every row runs to the end), temperature 1. Ours: "
           "`jaxrl_llm.generate` (one compiled prefill + decode loop); transformers: `generate(do_sample=True)`.", "",
           "| dtype | ours (tok/s) | transformers generate (tok/s) | ratio |", "|---|---|---|---|"]
    for row in r["rows"]:
        out.append(f"| {row['dtype']} | {row['ours_tps']:,.0f} | {row['hf_tps']:,.0f} | "
                   f"**{row['ours_tps'] / row['hf_tps']:.1f}x** |")
    return out + ["", "Published anchor, a different workload: vLLM 0.10.2 serves Qwen2.5-0.5B at 17.7k tok/s "
                  "(256 sequences, A800)."]


def render_engine(r, args) -> list[str]:
    out = ["bfloat16, random Qwen2.5-0.5B-shaped weights, `generate_with_schedule` (the engine `generate` runs) "
           "after a first call that compiles its programs; row lengths imposed through the uniforms "
           "(`benchmarks/rollout_lengths.py`). (a) nano-vllm's `bench.py` workload: sequences with prompt and output "
           "lengths uniform in [lo, hi], EOS ignored, temperature 0.6, output tokens counted; vLLM 0.10.2 reached "
           "17,711 tok/s on one A800 (a different card). (b) RL: prompts x samples sharing each prompt, "
           "lognormal completion lengths; transformers `generate` produces the same lengths (a logits processor "
           "emits EOS at each row's length).", "",
           "| workload | side | time (s) | output tokens | tok/s |", "|---|---|---|---|---|"]
    for row in r["rows"]:
        out.append(f"| {row['workload']} | {row['side']} | {row['ms'] / 1e3:.2f} | {row['tokens']:,} | "
                   f"{row['tokens'] / row['ms'] * 1e3:,.0f} |")
    rl = {row["side"]: row for row in r["rows"] if row["workload"] == "rl"}
    if "ours" in rl and "transformers" in rl:
        out += ["", f"RL shape: the engine is **{rl['transformers']['ms'] / rl['ours']['ms']:.1f}x** `generate`."]
    return out + [""]


def render_update(r, args) -> list[str]:
    s = r["shape"]
    out = [f"One RLOO optimizer step (forward, backward, AdamW) on {s['prompts'] * s['samples']} sequences of "
           f"{s['prompt']} + {s['completion']} tokens, bfloat16 compute over float32 master weights "
           f"({r['rows'][0]['params_m']:.0f}M parameters), the trainer's default log-prob chunks. MFU = (6 x "
           "parameters x tokens + causal attention FLOPs) / time / the dense bf16 peak"
           + (f" ({r['peak'] / 1e12:.0f} TFLOP/s)" if r.get("peak") else " (no peak known for this device)")
           + "; remat's recomputation is not counted.", "",
           "| remat | update (ms) | tokens/s | MFU | XLA temporaries (GiB) |", "|---|---|---|---|---|"]
    for row in r["rows"]:
        mfu = "n/a" if row["mfu"] is None else f"**{row['mfu']:.1%}**"
        temp = "n/a" if row["temp_gb"] is None else f"{row['temp_gb']:.1f}"
        out.append(f"| {row['remat']} | {row['ms']:.1f} | {row['tokens_per_s']:,.0f} | {mfu} | {temp} |")
    profile = r.get("profile")
    if profile and "error" not in profile:
        kinds = ", ".join(f"{k} {v:.1f}" for k, v in sorted(profile["by_kind"].items(), key=lambda kv: -kv[1]))
        out += ["", f"Where the update's device time goes (remat {profile.get('remat')}, a JAX profile of 3 calls, ms per call): "
                f"{profile['device_ms']:.1f} in {profile['kernels']} distinct kernels; {kinds}. Costliest kernels:", ""]
        out += [f"- `{name}` ({kind}): {ms:.2f} ms" for name, kind, ms in profile["top"]]
    elif profile:
        out += ["", f"(No profile: {profile['error']}.)"]
    return out + [""]


def render_trl(ours, theirs, args) -> list[str]:
    prompts, k, prompt_len, new = SHAPES[args.smoke]["trl"]
    out = [f"The same random Qwen2.5-0.5B-shaped model, word tokenizer and prompts; {prompts} prompts x {k} "
           f"samples, {prompt_len} prompt tokens, {new} new tokens, RLOO, beta 0.05, lr 1e-6, one update per batch, "
           "bfloat16 compute over float32 weights on both sides. A step: sampling, reward, reference forward, "
           "update. TRL samples with transformers `generate` (no vLLM); ours with its own sampler.", ""]
    if not (ours.get("ok") and theirs.get("ok")):
        return out + [f"Not measured: ours: {ours.get('why')}; TRL: {theirs.get('why')}.", ""]
    a, b = statistics.median(ours["times"]), statistics.median(theirs["times"])
    return out + ["| side | median step (s) | first step (s, compiles) |", "|---|---|---|",
                  f"| ours (`Trainer.step`) | {a:.3f} | {ours['first_step_s']:.1f} |",
                  f"| TRL {theirs.get('trl', '')} `RLOOTrainer` | {b:.3f} | {theirs['first_step_s']:.1f} |", "",
                  f"Ours: **{b / a:.1f}x** TRL's steps/s.", ""]


def render_pytest(r, args) -> list[str]:
    out = [f"`{r['command']}` with `JAX_PLATFORMS={'' if args.smoke else 'cuda,cpu'}`: **{r['passed']} passed, "
           f"{r['failed_count']} failed, {r['skipped']} skipped** in {r['seconds']:.0f} s"
           + (" (stopped at its time limit: the tests not listed did not run)" if r["timed_out"] else "") + "."]
    if r["failed"]:
        out += ["", "Failed:", ""] + [f"- `{line}`" for line in r["failed"][:40]]
    if not r["passed"] and not r["failed"]:
        out += ["", "```", r.get("tail", "")[-1500:], "```"]
    return out + [""]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "gpu_suite.md"))
    parser.add_argument("--stages", default=",".join(STAGES), help=f"comma-separated, of {list(STAGES)}")
    parser.add_argument("--smoke", action="store_true", help="tiny shapes on any device: checks the suite itself")
    parser.add_argument("--scale-budget", type=float, default=1.0, help="multiply every stage's time limit")
    parser.add_argument("--budget", action="append", default=[], metavar="STAGE=SECONDS",
                        help="one stage's time limit (repeatable)")
    parser.add_argument("--run-stage", help=argparse.SUPPRESS)
    parser.add_argument("--workdir", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.run_stage:  # a stage's own process
        try:
            result = globals()[f"stage_{args.run_stage}"](args.smoke, Path(args.workdir))
        except BaseException:
            traceback.print_exc()
            raise
        print(RESULT + json.dumps(result), flush=True)
        return
    stages = [s for s in args.stages.split(",") if s]
    unknown = sorted(set(stages) - set(STAGES))
    if unknown:
        parser.error(f"--stages: unknown {unknown}, expected some of {list(STAGES)}")
    for item in args.budget:
        name, _, seconds = item.partition("=")
        if name not in BUDGET or not seconds.replace(".", "", 1).isdigit():
            parser.error(f"--budget: got {item!r}, expected STAGE=SECONDS with STAGE one of {list(STAGES)}")
        BUDGET[name] = float(seconds)
    out = Path(args.out)
    copy = Path(os.environ["OUT"]) / out.name if os.environ.get("OUT") else None
    results, start = {}, time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="gpu_suite_") as workdir:
        environment = json.loads(subprocess.run(
            [sys.executable, "-c", "import json, sys; sys.path.insert(0, %r); from benchmarks.gpu_suite import "
             "device_summary; print(json.dumps(device_summary()))" % str(ROOT)],
            stdout=subprocess.PIPE, text=True, env={**os.environ, "XLA_PYTHON_CLIENT_PREALLOCATE": "false"},
        ).stdout.strip().splitlines()[-1])
        print(environment, flush=True)
        for name in stages:
            seconds = BUDGET[name] * args.scale_budget
            print(f"== {name} (limit {seconds:.0f} s, {time.perf_counter() - start:.0f} s into the suite)", flush=True)
            results[name] = run_stage(name, args.smoke, Path(workdir), seconds)
            text = render(results, args, environment)
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_text(text)
            if copy is not None:
                copy.write_text(text)
                for log in Path(workdir).glob("*.log"):
                    (copy.parent / log.name).write_text(log.read_text()[-200000:])
    print(text)
    print(f"wrote {out} in {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
