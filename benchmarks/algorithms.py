"""Every algorithm preset on the arithmetic task: reward and held-out accuracy before/after, step time.

    python benchmarks/algorithms.py [--steps 500] [--presets rloo dapo ...] [--out benchmarks/results/algorithms.md]

Runs `configs/<preset>_arithmetic.yaml` for `--steps` steps each (same seed, the shipped tiny
policy), on whatever devices JAX sees, and writes a Markdown table. The presets are one per
algorithm plus those that combine options (DAPO: GRPO with clip-higher, token-mean, dynamic
sampling, truncated completions masked and the overlong penalty).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from pathlib import Path

import jax

from jaxrl_llm.training import ALGORITHMS, Trainer, load_config

ROOT = Path(__file__).resolve().parents[1]


def machine() -> str:
    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")),
               platform.processor()) if os.path.exists("/proc/cpuinfo") else platform.processor()
    return f"{cpu}, {os.cpu_count()} cores, {jax.devices()[0].platform} x{jax.device_count()}, jax {jax.__version__}"


def time_compiled_calls(trainer) -> list[float]:
    """Wrap the trainer's compiled `_prepare` and `_update` so that each call is timed to completion;
    returns the list the times go to. Sampling and rewards are left out: this is the cost of the
    forward/backward passes an algorithm needs."""
    times = []

    def timed(fn):
        def call(*args):
            start = time.perf_counter()
            out = jax.block_until_ready(fn(*args))
            times.append(time.perf_counter() - start)
            return out
        return call

    trainer._prepare, trainer._update = timed(trainer._prepare), timed(trainer._update)
    return times


def presets() -> list[str]:
    """One per algorithm (in the registry's order), then every other `configs/*_arithmetic.yaml`
    that trains a policy (the reward-model config `rm_arithmetic.yaml` does not)."""
    extra = sorted(p.name.removesuffix("_arithmetic.yaml") for p in (ROOT / "configs").glob("*_arithmetic.yaml"))
    return list(ALGORITHMS) + [name for name in extra if name not in ALGORITHMS and name != "rm"]


def run(preset: str, steps: int, run_dir: Path, overrides: list[str]) -> dict:
    config = load_config(ROOT / "configs" / f"{preset}_arithmetic.yaml", [
        f"train.steps={steps}", f"train.run_dir={run_dir}", "train.progress=false", "train.plot=false",
        "train.tensorboard=false", f"train.eval_every={steps}", f"train.checkpoint_every={steps}", *overrides,
    ])
    start = time.perf_counter()
    trainer = Trainer(config)
    call_times = time_compiled_calls(trainer)
    calls_per_step = 1 + config.algo.update_epochs * config.algo.num_minibatches
    summary = trainer.run()
    wall = time.perf_counter() - start
    per_step = [sum(call_times[i : i + calls_per_step]) for i in range(0, len(call_times), calls_per_step)]
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    rows = [r for r in rows if r["step"] > 0]  # step 0 holds only the evaluation before training
    k = max(1, min(10, steps // 5))
    mean = lambda key, part: sum(r[key] for r in part) / len(part)
    return {
        "preset": preset,
        "algo": config.algo.name,
        "completions/step": config.rollout.prompts_per_step * config.algo.num_samples,
        "reward first": mean("reward/mean", rows[:k]),
        "reward last": mean("reward/mean", rows[-k:]),
        "eval before": summary.get("eval/accuracy_before", float("nan")),
        "eval after": summary.get("eval/accuracy_after", float("nan")),
        "step time (s)": sorted(r["step_time_s"] for r in rows[1:])[len(rows[1:]) // 2],
        "prepare+update (s)": sorted(per_step[1:])[len(per_step[1:]) // 2],
        "wall (s)": wall,
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=500)
    parser.add_argument("--presets", nargs="*", default=presets())
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "algorithms.md"))
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE",
                        help="config overrides for every run, e.g. algo.critic=shared")
    args = parser.parse_args()
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for preset in args.presets:
            results.append(run(preset, args.steps, Path(tmp) / preset, args.set))
            print(json.dumps(results[-1]))
    keys = list(results[0])
    lines = [
        f"# Algorithm presets on the arithmetic task ({args.steps} steps each)",
        "",
        f"Machine: {machine()}. Command: `python benchmarks/algorithms.py --steps {args.steps}"
        + "".join(f" --set {o}" for o in args.set) + "`.",
        "Reward: mean verifier reward of the sampled completions (first/last 10 steps);",
        "eval: held-out greedy accuracy on 200 problems; step time: median, compilation excluded;",
        "prepare+update: median per step of the compiled forward/backward calls alone (no sampling, no rewards).",
        "",
        "| " + " | ".join(keys) + " |",
        "|" + "---|" * len(keys),
    ]
    for r in results:
        lines.append("| " + " | ".join(f"{r[k]:.3f}" if isinstance(r[k], float) else str(r[k]) for k in keys) + " |")
    Path(args.out).write_text("\n".join(lines) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
