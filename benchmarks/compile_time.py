"""Compile time of a deep model's gradient with and without `scan_layers` (and remat).

    python benchmarks/compile_time.py [--layers 32 64] [--out benchmarks/results/compile_time.md]

`jit(value_and_grad(sum of logits))` of a narrow Llama (hidden 64, 2 heads, so that the time
is compilation, not arithmetic), each configuration in a fresh process (nothing cached), the
compiler warmed up on an unrelated program first. Median of `--repeats` processes.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

ONE_RUN = r"""
import json, sys, time
import jax, jax.numpy as jnp, numpy as np, transformers
from flax import nnx
from jaxrl_llm import models
layers, scan, remat = int(sys.argv[1]), sys.argv[2] == "1", sys.argv[3]
jax.jit(lambda x: jnp.sin(x) @ x.T).lower(jnp.ones((8, 8))).compile()
cfg = transformers.LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=layers,
                               num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=256)
ids = jnp.asarray(np.random.RandomState(0).randint(1, 128, (2, 64)))
model = models.from_config(cfg).set_execution(scan_layers=scan, remat=remat)
graphdef, state = nnx.split(model)
fn = jax.jit(jax.value_and_grad(lambda s: jnp.sum(nnx.merge(graphdef, s)(ids, jnp.ones_like(ids)))))
t0 = time.perf_counter(); lowered = fn.lower(state); t1 = time.perf_counter(); lowered.compile(); t2 = time.perf_counter()
print(json.dumps({"trace": t1 - t0, "compile": t2 - t1}))
"""


def measure(layers: int, scan: bool, remat: str) -> dict:
    done = subprocess.run([sys.executable, "-c", ONE_RUN, str(layers), str(int(scan)), remat],
                          capture_output=True, text=True, check=True, cwd=ROOT)
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, nargs="+", default=[32, 64])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "compile_time.md"))
    args = parser.parse_args()
    import jax

    rows = []
    for layers in args.layers:
        for remat in ("none", "layer"):
            for scan in (False, True):
                runs = [measure(layers, scan, remat) for _ in range(args.repeats)]
                trace = statistics.median(r["trace"] for r in runs)
                compile_s = statistics.median(r["compile"] for r in runs)
                rows.append(f"| {layers} | {remat} | {'yes' if scan else 'no'} | {trace:.2f} | {compile_s:.2f} | "
                            f"**{trace + compile_s:.2f}** |")
                print(rows[-1], flush=True)
    text = "\n".join([
        "# Compile time with and without `model.scan_layers`",
        "",
        "`python benchmarks/compile_time.py`: `jit(value_and_grad(sum of logits))` of a narrow Llama "
        "(hidden 64, 2 heads, 2 x 64 tokens), each configuration in a fresh process, median of "
        f"{args.repeats}; seconds. Machine: {jax.devices()[0].platform}, jax {jax.__version__}.",
        "",
        "| layers | remat | scan_layers | trace + lower | compile | total |",
        "|---|---|---|---|---|---|",
        *rows,
        "",
    ])
    Path(args.out).write_text(text)
    print(text)


if __name__ == "__main__":
    main()
