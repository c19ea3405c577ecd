"""Per-device memory of RLOO and PPO at real model sizes, from the compiled programs (nothing allocated).

    python benchmarks/memory.py [--out benchmarks/results/memory.md] [--only llama-3.1-8b]

Every row is `jaxrl_llm.training.plan.plan`: the trainer's sampler, `prepare` and update
compiled ahead of time for abstract inputs on fake CPU devices (64 of them, in this one
process), with XLA's memory analysis read per device. The batch is the issue's: 64 prompts x
K=4, 512 prompt + 512 completion tokens, bfloat16 compute over float32 master weights and
AdamW state. `scan_layers` is on in every row: XLA:CPU removes the optimisation barriers of
a remat in an unrolled layer loop and common-subexpression-eliminates the recomputation
away, so only a scanned loop shows what remat saves (GPU and TPU compilers keep them).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MODELS = ("llama-3.2-1b", "qwen2.5-1.5b", "qwen2.5-7b", "llama-3.1-8b")
GB = 1e9
DEVICE_MEMORY_GB = 80


def rows_to_plan(only: str | None):
    """(model, algo, devices, mesh overrides, remat, micro_batch_size) of each row."""
    fsdp8 = (8, ["mesh.fsdp=8"])
    data8_fsdp8 = (64, ["mesh.data=8", "mesh.fsdp=8"])
    rows = []
    for model in MODELS:
        for algo in ("rloo", "ppo"):
            rows.append((model, algo, *fsdp8, "layer", 64))
    for algo in ("rloo", "ppo"):  # the 8B sweep
        for remat in ("none", "layer"):
            for micro in (None, 16):  # (layer, 64) is in the rows above
                rows.append(("llama-3.1-8b", algo, *fsdp8, remat, micro))
        rows.append(("llama-3.1-8b", algo, *data8_fsdp8, "layer", 64))
        rows.append(("llama-3.1-8b", algo, *data8_fsdp8, "layer", None))
    return [r for r in rows if only is None or r[0] == only]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "memory.md"))
    parser.add_argument("--only", default=None, help="one model directory name")
    args = parser.parse_args()

    from jaxrl_llm.training.plan import use_fake_cpu_devices

    use_fake_cpu_devices(64)
    import jax

    from jaxrl_llm.training import load_config
    from jaxrl_llm.training.plan import plan

    lines = []
    peaks = {}
    for model, algo, devices, mesh, remat, micro in rows_to_plan(args.only):
        config = load_config(None, [
            f"model.path={ROOT / 'benchmarks' / 'model_configs' / model}", f"algo.name={algo}", "algo.critic=separate",
            "algo.num_samples=4", "rollout.prompts_per_step=64", "rollout.prompt_length=512",
            "rollout.max_new_tokens=512", "model.dtype=bfloat16", f"model.remat={remat}", "model.scan_layers=true",
            *mesh, *([f"train.micro_batch_size={micro}", f"rollout.micro_batch_size={micro}"] if micro else []),
        ])
        start = time.perf_counter()
        result = plan(config, devices=devices)
        seconds = time.perf_counter() - start
        by_name = {m.name: m.peak / GB for m in result["programs"]}
        peak = max(by_name.values())
        peaks[model, algo, devices, remat, micro] = peak
        mesh_text = "x".join(f"{k} {v}" for k, v in result["mesh"].items() if v > 1)
        lines.append(f"| {model} | {algo} | {devices} ({mesh_text}) | {remat} | {micro or 'all 256'} | "
                     f"{result['state_bytes'] / GB:.1f} | {by_name['generate']:.1f} | {by_name['prepare']:.1f} | "
                     f"{by_name['update']:.1f} | **{peak:.1f}** | {'yes' if peak <= DEVICE_MEMORY_GB else 'no'} |")
        print(lines[-1], f"({seconds:.0f} s to compile)", flush=True)

    ratios = []
    for (model, algo, devices, remat, micro), peak in peaks.items():
        other = peaks.get((model, "ppo", devices, remat, micro))
        if algo == "rloo" and other:
            ratios.append(f"| {model} | {devices} | {remat} | {micro or 'all 256'} | {peak:.1f} | {other:.1f} | "
                          f"{peak / other:.2f} |")
    device = jax.devices()[0]
    text = "\n".join([
        "# Memory plan: RLOO vs PPO at real size",
        "",
        "`python benchmarks/memory.py` (each row is `jaxrl-llm plan`; nothing is allocated).",
        "",
        f"Compiled by XLA:{device.platform.upper()} (jax {jax.__version__}) for 64 fake devices; GB = 1e9 bytes per "
        "device. Batch: 64 prompts x K=4 = 256 sequences of 512 prompt + 512 completion tokens; "
        "bfloat16 compute, float32 master weights and AdamW state, bfloat16 frozen reference; PPO with "
        "a separate critic (its own backbone: the source document's fourth model copy). "
        "`scan_layers` on in every row (see the script's docstring). Micro-batch: sequences per "
        "forward/backward pass of `prepare` and the update (`train.micro_batch_size`) and per sampler "
        "call (`rollout.micro_batch_size`).",
        "",
        "Peak = arguments + outputs - donated + temporaries of the largest of the three programs. "
        "These are XLA:CPU's buffer assignments: a GPU compiler fuses and schedules differently, "
        "so keep a margin.",
        "",
        f"| model | algo | devices | remat | micro-batch | train state | generate | prepare | update | peak | "
        f"fits {DEVICE_MEMORY_GB} GB |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
        *lines,
        "",
        "## RLOO's peak over PPO's (same model, devices, remat, micro-batch)",
        "",
        "| model | devices | remat | micro-batch | RLOO peak | PPO peak | RLOO / PPO |",
        "|---|---|---|---|---|---|---|",
        *ratios,
        "",
    ])
    Path(args.out).write_text(text)
    print(text)


if __name__ == "__main__":
    sys.exit(main())
