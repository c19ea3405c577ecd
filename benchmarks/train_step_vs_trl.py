"""One RLOO training step, ours against TRL's `RLOOTrainer`, on the same set-up.

    python benchmarks/train_step_vs_trl.py [--steps 30] [--warmup 5] [--out benchmarks/results/train_step_vs_trl.md]

The shipped tiny policy (`builtin:tiny_arithmetic`, a Hugging Face Llama) on the built-in
arithmetic task: 16 prompts x 4 completions per step, at most 8 new tokens, temperature 1,
lr 1e-4 (constant, no warm-up), KL coefficient 0.05, one optimizer update per generation batch.
Both sides score completions with the task's own verifier. A step, timed to completion, is
generation + reward + reference/policy forward passes + one optimizer update, on both sides.

Each side runs in its own subprocess (this script with `--side ours|trl`), one after the other,
so that peak RSS (`ru_maxrss`) is its own; the parent writes the Markdown table. TRL runs on
the CPU (`use_cpu=True`, float32, torch threads = `--torch-threads`), ours on JAX's CPU backend
unless `--accelerator` is given (then ours on JAX's default devices, TRL with `use_cpu=False`).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PROMPTS, SAMPLES, NEW_TOKENS, LR, KL_COEF, TEMPERATURE = 16, 4, 8, 1e-4, 0.05, 1.0
TARGET = 3.0  # ours should be at least this many times faster than TRL
RESULT = "RESULT "  # the prefix of a side's JSON line on its stdout


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: kilobytes


def call_times(fn, *args, repeats: int) -> list[float]:
    """Seconds of `repeats` calls of `fn(*args)`, each to completion, after one warm-up call."""
    import jax

    jax.block_until_ready(fn(*args))
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - start)
    return times


def matmul_rate(rows=896, width=512, repeats=20) -> float:
    """GFLOP/s of XLA's best float32 matmul here on the update's row count (64 sequences x 14
    positions), a [rows, width] x [width, width] product: the rate the step's FLOPs can run at."""
    import jax
    import jax.numpy as jnp

    x, w = jnp.ones((rows, width)), jnp.ones((width, width))
    times = call_times(jax.jit(lambda x, w: x @ w), x, w, repeats=repeats)
    return 2 * rows * width * width * repeats / sum(times) / 1e9


def weight_gradient_products(rows=896, width=128, out=512, repeats=50) -> dict:
    """ms of the update's widest weight products on XLA:CPU: the forward x @ W, the weight gradient
    x^T g as autodiff writes it (a dot contracting the rows), and the same with x transposed in
    memory first (an optimization barrier keeps XLA from folding the transpose back)."""
    import jax
    import jax.numpy as jnp

    x, w, g = jnp.ones((rows, width)), jnp.ones((width, out)), jnp.ones((rows, out))
    products = {"forward x @ W": (lambda x, w, g: x @ w),
                "weight gradient x^T g": (lambda x, w, g: x.T @ g),
                "x^T g, x transposed first": (lambda x, w, g: jax.lax.optimization_barrier(x.T) @ g)}
    return {name: statistics.median(call_times(jax.jit(fn), x, w, g, repeats=repeats)) * 1e3
            for name, fn in products.items()}


def forward_and_backward_ms(trainer, state, batch, repeats=20) -> dict:
    """ms of the update's loss alone (the forward) and of its value and gradient, jitted apart."""
    import jax

    algorithm, base = trainer.algorithm, state.base_params
    calls = {"forward": jax.jit(lambda p, b: algorithm.loss(p, b, base=base)),
             "forward + backward": jax.jit(lambda p, b: algorithm.value_and_grad(p, b, base))}
    return {name: statistics.median(call_times(fn, state.params, batch, repeats=repeats)) * 1e3
            for name, fn in calls.items()}


# -- our trainer ----------------------------------------------------------------------------------


def run_ours(steps: int, warmup: int) -> dict:
    import jax

    from benchmarks.algorithms import machine
    from jaxrl_llm.training import Trainer, load_config

    with tempfile.TemporaryDirectory() as tmp:
        config = load_config(ROOT / "configs" / "rloo_arithmetic.yaml", [
            f"rollout.prompts_per_step={PROMPTS}", "rollout.oversample=1", f"algo.num_samples={SAMPLES}",
            f"rollout.max_new_tokens={NEW_TOKENS}", f"rollout.temperature={TEMPERATURE}",
            f"optim.learning_rate={LR}", "optim.warmup_steps=0", "optim.schedule=constant",
            f"algo.kl_coef={KL_COEF}", f"train.steps={warmup + steps}", f"train.run_dir={tmp}",
            "train.eval_every=1000000", "train.checkpoint_every=1000000", "train.progress=false",
            "train.plot=false", "train.tensorboard=false",
        ])
        trainer = Trainer(config)
        prepare, update, seen = trainer._prepare, trainer._update, {}
        parts = {"collect": [], "prepare": [], "update": []}  # where a step's time goes

        def timed(name, fn):
            def call(*call_args):
                # The first call's argument shapes, for the analyses below (the state is donated).
                seen.setdefault(name, jax.tree.map(
                    lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding)
                    if isinstance(x, jax.Array) else x, call_args))
                start = time.perf_counter()
                out = jax.block_until_ready(fn(*call_args))
                parts[name].append(time.perf_counter() - start)
                return out
            return call

        trainer.collect = timed("collect", trainer.collect)
        trainer._prepare, trainer._update = timed("prepare", prepare), timed("update", update)
        setup_rss = peak_rss_mb()
        times, rewards = [], []
        for _ in range(warmup + steps):
            start = time.perf_counter()
            metrics = trainer.step()  # collect (sample, decode, reward) + prepare + update
            jax.block_until_ready(trainer.state)
            times.append(time.perf_counter() - start)
            rewards.append(metrics["reward/mean"])
        result = {"times": times[warmup:], "reward": statistics.mean(rewards), "peak_rss_mb": peak_rss_mb(),
                  "setup_rss_mb": setup_rss, "machine": machine(), "torch_imported": "torch" in sys.modules,
                  "parts": {k: statistics.median(v[warmup:]) for k, v in parts.items()},
                  "matmul_gflops": matmul_rate(), "weight_products_ms": weight_gradient_products()}
        batch = trainer.collect()[0]
        state, train_batch, _ = prepare(trainer.state, batch)
        result["update_passes_ms"] = forward_and_backward_ms(trainer, state, train_batch)
        # The compute floor: the FLOPs XLA counts in the compiled prepare and update (sampling adds about
        # one more forward pass over the same tokens) at the best matmul rate of this machine.
        result["gflop"] = {name: fn.lower(*seen[name]).compile().cost_analysis().get("flops", 0.0) / 1e9
                           for name, fn in (("prepare", prepare), ("update", update))}
        try:  # XLA's own accounting of the compiled update (a recompilation, outside the timings)
            stats = update.lower(*seen["update"]).compile().memory_analysis()
            mb = lambda n: n / 2**20
            result["xla_update_mb"] = {
                "arguments": mb(stats.argument_size_in_bytes), "outputs": mb(stats.output_size_in_bytes),
                "aliased": mb(stats.alias_size_in_bytes), "temporaries": mb(stats.temp_size_in_bytes)}
        except Exception as e:  # noqa: BLE001 - optional: the table stands without it
            result["xla_update_mb"] = f"unavailable ({type(e).__name__}: {e})"
    return result


# -- TRL ------------------------------------------------------------------------------------------


def run_trl(steps: int, warmup: int, threads: int, accelerator: bool) -> dict:
    import torch
    import transformers
    import trl
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import RLOOConfig, RLOOTrainer

    from jaxrl_llm.tasks import Example, get_task
    from jaxrl_llm.tasks.arithmetic import default_policy_path

    torch.set_num_threads(threads)
    directory = str(default_policy_path())
    task = get_task("arithmetic")  # the same task (and prompt stream) as configs/rloo_arithmetic.yaml
    examples = task.train_batch(0, (warmup + steps) * PROMPTS)
    dataset = Dataset.from_dict({"prompt": [e.prompt for e in examples], "answer": [e.answer for e in examples]})
    tokenizer = AutoTokenizer.from_pretrained(directory, padding_side="left")
    model = AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32)
    eos_ids = {tokenizer.eos_token_id, *([model.generation_config.eos_token_id] if isinstance(
        model.generation_config.eos_token_id, int) else model.generation_config.eos_token_id or [])}

    rewards = []

    def arithmetic_reward(prompts, completions, completion_ids, answer, **_):
        """The task's verifier, as our trainer calls it: the text without EOS, and whether it ended with one."""
        scores = [task.score(Example(p, a), text, finished=bool(ids) and ids[-1] in eos_ids)
                  for p, a, text, ids in zip(prompts, answer, completions, completion_ids)]
        rewards.append(statistics.mean(scores))
        return scores

    class StepTimer(TrainerCallback):
        """Wall time from on_step_begin (before generation) to on_step_end (after optimizer.step)."""

        def __init__(self):
            self.times, self.start = [], None

        def on_step_begin(self, args, state, control, **kwargs):
            self.start = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            self.times.append(time.perf_counter() - self.start)

    with tempfile.TemporaryDirectory() as tmp:
        args = RLOOConfig(
            output_dir=tmp, max_steps=warmup + steps, seed=0,
            # per_device_train_batch_size counts completions: 64 = 16 prompts x 4, one update per generation.
            per_device_train_batch_size=PROMPTS * SAMPLES, gradient_accumulation_steps=1,
            num_generations=SAMPLES, num_iterations=1, max_completion_length=NEW_TOKENS,
            temperature=TEMPERATURE, learning_rate=LR, lr_scheduler_type="constant", warmup_steps=0,
            weight_decay=0.0, max_grad_norm=1.0, beta=KL_COEF,
            # TRL's defaults that differ from ours: bf16 on, gradient checkpointing on (transformers 5 renamed
            # it activation_checkpointing; setting the old name only warns), shuffled data.
            bf16=False, fp16=False, activation_checkpointing=False, shuffle_dataset=False,
            use_cpu=not accelerator, logging_strategy="no", save_strategy="no", report_to="none",
            disable_tqdm=True, dataloader_num_workers=0,
        )
        timer = StepTimer()
        trainer = RLOOTrainer(model=model, reward_funcs=arithmetic_reward, args=args, train_dataset=dataset,
                              processing_class=tokenizer, callbacks=[timer])
        setup_rss = peak_rss_mb()
        trainer.train()
    return {"times": timer.times[warmup:], "reward": statistics.mean(rewards), "peak_rss_mb": peak_rss_mb(),
            "setup_rss_mb": setup_rss,
            "optim": str(getattr(args.optim, "value", args.optim)), "torch_threads": torch.get_num_threads(),
            "versions": f"torch {torch.__version__}, trl {trl.__version__}, transformers {transformers.__version__}"}


# -- the parent: one subprocess per side, then the table ------------------------------------------


def run_side(side: str, args) -> dict:
    command = [sys.executable, __file__, "--side", side, "--steps", str(args.steps), "--warmup", str(args.warmup),
               "--torch-threads", str(args.torch_threads)] + (["--accelerator"] if args.accelerator else [])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    if not args.accelerator:
        env["JAX_PLATFORMS"] = "cpu"
    load = os.getloadavg()[0]  # other work on the machine skews both sides (torch's thread pool most)
    print(f"running {side}: {' '.join(command[1:])}", flush=True)
    done = subprocess.run(command, env=env, stdout=subprocess.PIPE, text=True)
    lines = [line for line in done.stdout.splitlines() if line.startswith(RESULT)]
    if done.returncode or not lines:
        sys.exit(f"side {side} failed (exit {done.returncode}); its stdout:\n{done.stdout}")
    result = json.loads(lines[-1][len(RESULT):])
    result["load"] = load
    result["median"] = statistics.median(result["times"])
    print(f"{side}: median step {result['median']:.4f} s over {len(result['times'])} steps, "
          f"peak RSS {result['peak_rss_mb']:.0f} MB", flush=True)
    return result


def report(args, ours: dict, trl: dict) -> str:
    ratio = trl["median"] / ours["median"]
    verdict = (f"met ({ratio:.2f}x, {ratio / TARGET:.2f}x the target)" if ratio >= TARGET
               else f"missed ({ratio:.2f}x, short by {TARGET - ratio:.2f}x; ours would need a median of "
                    f"{trl['median'] / TARGET:.4f} s)")
    command = (f"python benchmarks/train_step_vs_trl.py --steps {args.steps} --warmup {args.warmup}"
               + (" --accelerator" if args.accelerator else "") + f" --torch-threads {args.torch_threads}")
    rows = [("ours (jaxrl_llm)", ours, ratio), ("TRL RLOOTrainer", trl, 1.0)]
    xla = ours.get("xla_update_mb")
    xla_line = (", ".join(f"{k} {v:.2f} MB" for k, v in xla.items()) if isinstance(xla, dict) else str(xla))
    lines = [
        "# One RLOO training step: jaxrl_llm vs TRL's RLOOTrainer",
        "",
        f"Command: `{command}`",
        "",
        f"Machine: {ours['machine']}; {trl['versions']} (torch threads: {trl['torch_threads']}); "
        f"1-minute load average as each side started: {ours['load']:.2f} (ours), {trl['load']:.2f} (TRL).",
        "",
        f"Set-up: the shipped tiny policy (`builtin:tiny_arithmetic`, Llama, 0.66M parameters, float32) on the "
        f"built-in arithmetic task; {PROMPTS} prompts x {SAMPLES} completions per step, at most {NEW_TOKENS} new "
        f"tokens, temperature {TEMPERATURE:g}, lr {LR:g} constant (AdamW, no warm-up, grad-norm clip 1), "
        f"KL coefficient {KL_COEF:g}, the same prompts in the same order, rewarded by the task's verifier "
        f"(exact answer then EOS). Median over {args.steps} timed steps after {args.warmup} warm-up steps "
        "(compilation and first-call costs fall in the warm-up).",
        "",
        "What a step includes, on both sides: generation of the 64 completions, decoding and reward, the "
        "reference (and policy) log-probabilities, the loss, its gradient and one optimizer update; TRL's RLOO, "
        "like ours, takes one gradient step per generation batch (`num_iterations=1`, "
        "`steps_per_generation=1`).",
        "- ours: `Trainer.step()` (collect: sample, decode, reward; prepare; update), timed until "
        "`jax.block_until_ready` on the new train state.",
        "- TRL: wall time from the `on_step_begin` to the `on_step_end` callback: `training_step` (generation, "
        "reward, reference forward, loss, backward), grad clipping, `optimizer.step()`, scheduler, `zero_grad`; "
        f"optimizer `{trl['optim']}`, `bf16=False`, `activation_checkpointing=False` (no gradient checkpointing), "
        "`shuffle_dataset=False`, no logging or saving. Fetching the step's prompt rows from the data loader "
        "happens before `on_step_begin` and is not counted.",
        "",
        "| side | median step (s) | steps/s | peak RSS (MB) | ratio (TRL median / ours) |",
        "|---|---|---|---|---|",
    ]
    for name, r, x in rows:
        lines.append(f"| {name} | {r['median']:.4f} | {1 / r['median']:.2f} | {r['peak_rss_mb']:.0f} | {x:.2f} |")
    parts, gflop, rate = ours["parts"], ours["gflop"], ours["matmul_gflops"]
    total_gflop = gflop["prepare"] + gflop["update"] / 3 + gflop["update"]  # sampling: about one more forward
    floor = total_gflop / rate
    lines += [
        "",
        f"Where our step goes (medians): collect (sampling, decoding, reward) {parts['collect'] * 1e3:.1f} ms, "
        f"prepare (reference forward) {parts['prepare'] * 1e3:.1f} ms, update (forward, backward, AdamW) "
        f"{parts['update'] * 1e3:.1f} ms; the rest, {(ours['median'] - sum(parts.values())) * 1e3:.1f} ms, is "
        "host work (metrics, the step's bookkeeping).",
        "",
        f"Compute floor: XLA counts {gflop['prepare']:.2f} GFLOP in the compiled prepare and "
        f"{gflop['update']:.2f} in the update; sampling is about one more forward pass "
        f"(about {gflop['update'] / 3:.2f}: the update is a forward and a backward of twice its cost), so a step is "
        f"about {total_gflop:.1f} GFLOP. The best float32 matmul rate measured here on the update's row count is "
        f"{rate:.0f} GFLOP/s, so no implementation of this step on this machine runs in under about "
        f"{floor * 1e3:.0f} ms. TRL runs the same FLOPs: the most any implementation could reach against its "
        f"{trl['median'] * 1e3:.0f} ms is about {trl['median'] / floor:.1f}x.",
        "",
        "Our update's passes, jitted apart (median ms): "
        + ", ".join(f"{k} {v:.1f}" for k, v in ours["update_passes_ms"].items())
        + f" (the backward: {ours['update_passes_ms']['forward + backward'] / ours['update_passes_ms']['forward'] - 1:.1f}x "
        "the forward; 2x is the FLOP ratio). Its widest weight products on XLA:CPU, [896, 128] x [128, 512] and "
        "the gradient of the weight (median ms): "
        + ", ".join(f"{k} {v:.2f}" for k, v in ours["weight_products_ms"].items())
        + ": XLA runs the weight gradient, which contracts over the rows, as a dot with a transposed operand.",
        "",
        f"target: ours >= {TARGET:g}x TRL: {verdict}.",
        "",
        *([f"Warning: the machine was busy (load average {max(ours['load'], trl['load']):.1f} on {os.cpu_count()} "
           "cores): the timings, TRL's most (torch's thread pool degrades badly under contention), are not "
           "representative.", ""] if max(ours["load"], trl["load"]) > os.cpu_count() else []),
        "Peak RSS is each side's own process (`ru_maxrss`), imports included: "
        f"{ours['setup_rss_mb']:.0f} MB (ours) and {trl['setup_rss_mb']:.0f} MB (TRL) already before the first step"
        f"{'; our process also imported torch (via transformers)' if ours['torch_imported'] else ''}. "
        f"XLA's memory analysis of our compiled update: {xla_line}. Mean sampled reward over all "
        f"{args.warmup + args.steps} steps (a check that both optimise the same reward): ours {ours['reward']:.3f}, "
        f"TRL {trl['reward']:.3f}.",
    ]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=30, help="timed steps per side")
    parser.add_argument("--warmup", type=int, default=5, help="untimed steps first (compilation, caches)")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "train_step_vs_trl.md"))
    parser.add_argument("--torch-threads", type=int, default=os.cpu_count(), help="torch.set_num_threads for TRL")
    parser.add_argument("--accelerator", action="store_true",
                        help="ours on JAX's default devices and TRL with use_cpu=False (default: both on the CPU)")
    parser.add_argument("--side", choices=["ours", "trl"], help=argparse.SUPPRESS)  # the subprocesses
    args = parser.parse_args()
    if args.warmup < 1 or args.steps < 1:
        parser.error("--steps and --warmup must be >= 1 (the first step compiles)")
    if args.side == "ours":
        print(RESULT + json.dumps(run_ours(args.steps, args.warmup)), flush=True)
    elif args.side == "trl":
        print(RESULT + json.dumps(run_trl(args.steps, args.warmup, args.torch_threads, args.accelerator)), flush=True)
    else:
        ours, trl = run_side("ours", args), run_side("trl", args)  # one after the other, never interleaved
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(report(args, ours, trl))
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
