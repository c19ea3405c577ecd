"""LoRA against full fine-tuning: memory at 8B, and learning on the built-in task.

    python benchmarks/lora.py memory   # -> results/lora_memory.md  (jaxrl-llm plan, nothing allocated)
    python benchmarks/lora.py train    # -> results/lora_arithmetic.md (two 500-step runs, ~6 min on 2 cores)

`memory`: `jaxrl_llm.training.plan.plan` of RLOO on Llama-3.1-8B (config only), full fine-tuning
against LoRA (rank 16 on every projection), on 1 device and on 8 (fsdp), bfloat16 compute over
float32 master weights; LoRA's frozen base is bfloat16 and is also the reference.

`train`: `configs/rloo_arithmetic.yaml` (full fine-tuning, the main job) and
`configs/rloo_arithmetic_lora.yaml`, one after the other in this process: held-out accuracy
before and after, and wall time.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
LLAMA_8B = ROOT / "benchmarks" / "model_configs" / "llama-3.1-8b"
GB = 1e9
QUIET = ["train.progress=false", "train.plot=false", "train.tensorboard=false"]


def memory() -> None:
    from jaxrl_llm.training.plan import use_fake_cpu_devices

    use_fake_cpu_devices(8)
    import jax

    from jaxrl_llm.training import load_config
    from jaxrl_llm.training.plan import plan

    rows, peaks = [], {}
    for devices in (1, 8):
        for name, lora in (("full", []), ("LoRA r=16", ["model.lora={rank: 16, alpha: 32}"])):
            config = load_config(None, [
                f"model.path={LLAMA_8B}", "algo.name=rloo", "algo.num_samples=4", "rollout.prompts_per_step=8",
                "rollout.prompt_length=512", "rollout.max_new_tokens=512", "model.dtype=bfloat16",
                "model.remat=layer", "model.scan_layers=true", f"mesh.fsdp={devices}",
                "train.micro_batch_size=8", "rollout.micro_batch_size=8", *lora])
            start = time.perf_counter()
            result = plan(config, devices=devices)
            by_name = {m.name: m.peak / GB for m in result["programs"]}
            peak = max(by_name.values())
            peaks[devices, name] = (peak, result["state_bytes"] / GB)
            rows.append(f"| {name} | {devices} | {result['state_bytes'] / GB:.1f} | {by_name['generate']:.1f} | "
                        f"{by_name['prepare']:.1f} | {by_name['update']:.1f} | **{peak:.1f}** | "
                        f"{'yes' if peak <= 80 else 'no'} |")
            print(rows[-1], f"({time.perf_counter() - start:.0f} s to compile)", flush=True)
    ratios = [f"| {d} | {peaks[d, 'full'][1]:.1f} | {peaks[d, 'LoRA r=16'][1]:.1f} | "
              f"{peaks[d, 'LoRA r=16'][1] / peaks[d, 'full'][1]:.2f} | {peaks[d, 'full'][0]:.1f} | "
              f"{peaks[d, 'LoRA r=16'][0]:.1f} | {peaks[d, 'LoRA r=16'][0] / peaks[d, 'full'][0]:.2f} |" for d in (1, 8)]
    text = "\n".join([
        "# Memory plan: LoRA against full fine-tuning, Llama-3.1-8B, RLOO",
        "",
        "`python benchmarks/lora.py memory` (each row is `jaxrl-llm plan`; nothing is allocated).",
        "",
        f"Compiled by XLA:{jax.devices()[0].platform.upper()} (jax {jax.__version__}); GB = 1e9 bytes per device. "
        "Batch: 8 prompts x K=4 = 32 sequences of 512 prompt + 512 completion tokens, micro-batches of 8 "
        "sequences (sampler, prepare and update), remat per layer, scanned layers, bfloat16 compute. "
        "Full fine-tuning: float32 master weights + AdamW (12 B per weight) and a bfloat16 reference copy "
        "(2 B). LoRA (rank 16, alpha 32, on q k v o gate up down: 42M adapter weights): the frozen "
        "base once in bfloat16 (2 B per weight), which with the adapters off is also the reference; "
        "float32 adapters and their AdamW state.",
        "",
        "| run | devices | train state | generate | prepare | update | peak | fits 80 GB |",
        "|---|---|---|---|---|---|---|---|",
        *rows,
        "",
        "| devices | full state | LoRA state | ratio | full peak | LoRA peak | ratio |",
        "|---|---|---|---|---|---|---|",
        *ratios,
        "",
        "XLA:CPU's buffer assignment; a GPU compiler fuses and schedules differently, so keep a margin.",
        "",
    ])
    (RESULTS / "lora_memory.md").write_text(text)
    print(text)


def train() -> None:
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from algorithms import machine

    from jaxrl_llm.training import Trainer, load_config

    rows = []
    for name, path in (("full fine-tuning", "configs/rloo_arithmetic.yaml"),
                       ("LoRA r=8 (every projection)", "configs/rloo_arithmetic_lora.yaml")):
        run_dir = Path("/tmp") / f"lora_bench_{Path(path).stem}"
        config = load_config(ROOT / path, [*QUIET, f"train.run_dir={run_dir}"])
        start = time.perf_counter()
        trainer = Trainer(config)
        trained = sum(x.size for x in __import__("jax").tree.leaves(trainer.state.params["policy"]))
        summary = trainer.run()
        seconds = time.perf_counter() - start
        curve = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
        curve = [(r["step"], r["eval/accuracy"]) for r in curve if "eval/accuracy" in r]
        rows.append((name, path, trained, summary, seconds, curve))
        print(name, summary["eval/accuracy_before"], summary["eval/accuracy_after"], f"{seconds:.0f} s", flush=True)
    lines = [
        "# LoRA against full fine-tuning on the built-in arithmetic task",
        "",
        f"`python benchmarks/lora.py train` on {machine()}: the two configs run one after the other in one "
        "process, 500 RLOO steps each (64 prompts x K=4, oversample 3), the same seed.",
        "",
        "| run | config | trained weights | held-out accuracy before | after | pass@4 after | wall time |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, path, trained, s, seconds, _ in rows:
        lines.append(f"| {name} | `{path}` | {trained:,} | {s['eval/accuracy_before']:.1%} | "
                     f"**{s['eval/accuracy_after']:.1%}** | {s['eval/pass@4_after']:.1%} | {seconds:.0f} s |")
    lines += ["", "Held-out accuracy over steps:", "",
              "| step | " + " | ".join(r[0] for r in rows) + " |", "|---|" + "---|" * len(rows)]
    for i, (step, _) in enumerate(rows[0][5]):
        lines.append(f"| {step} | " + " | ".join(f"{r[5][i][1]:.1%}" if i < len(r[5]) else "" for r in rows) + " |")
    lines.append("")
    (RESULTS / "lora_arithmetic.md").write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("what", choices=["memory", "train"])
    args = parser.parse_args()
    memory() if args.what == "memory" else train()
