"""Recipes on data files, measured end to end.

    python benchmarks/recipes.py dataset [--steps 500]      # -> results/dataset_task.md
    python benchmarks/recipes.py gemma [--steps 3] [--cpu]  # -> results/gemma3_270m_math.md
                                   [--host-malloc tuned|default]  # glibc as `jaxrl-llm` sets it (tuned)

`dataset`: the main job (`configs/rloo_arithmetic.yaml`) twice, on the built-in task and on a
JSONL copy of its prompts with a Python reward file (the README's "Your own data" section): the
held-out accuracy curves should rise alike.

`gemma`: `configs/rloo_gemma3_270m_math.yaml` (Gemma-3-270M, word problems, the `numeric`
verifier) for `--steps` steps: step times (median after the first, which compiles), rewards
and held-out accuracy. `--cpu` shrinks the batch to what a laptop CPU runs in minutes.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from algorithms import machine  # noqa: E402

from jaxrl_llm.tasks import ArithmeticTask  # noqa: E402
from jaxrl_llm.training import Trainer, load_config, tune_glibc_malloc  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
QUIET = ["train.progress=false", "train.plot=false", "train.tensorboard=false"]
REWARD_FILE = '''def correct(completions, answer, finished, **kwargs):
    return [float(done and text.strip() == want) for text, want, done in zip(completions, answer, finished)]
'''


def write_arithmetic_copy(directory: Path) -> list[str]:
    """The README's data block: every training pair and the 200 held-out pairs as JSONL, and its
    reward file; returns the overrides that train on them."""
    task = ArithmeticTask()
    with open(directory / "prompts.jsonl", "w") as f:
        for a in range(100):
            for b in range(100):
                if not task.is_held_out(a, b):
                    f.write(json.dumps({"prompt": f"{a}+{b}=", "answer": str(a + b)}) + "\n")
    with open(directory / "heldout.jsonl", "w") as f:
        for example in task.eval_examples():
            f.write(json.dumps({"prompt": example.prompt, "answer": example.answer}) + "\n")
    (directory / "my_rewards.py").write_text(REWARD_FILE)
    return ["task.name=dataset",
            f"task.options={{path: {directory / 'prompts.jsonl'}, eval_path: {directory / 'heldout.jsonl'}, "
            "answer_field: answer}",
            f"reward.terms=[{{kind: python, target: '{directory / 'my_rewards.py'}:correct'}}]"]


def run(config_path: Path, overrides: list[str]) -> tuple[dict, list[dict], float]:
    """`(summary, metrics rows, wall seconds)` of one training run."""
    config = load_config(config_path, [*QUIET, *overrides])
    start = time.perf_counter()
    summary = Trainer(config).run()
    wall = time.perf_counter() - start
    rows = [json.loads(line) for line in (Path(config.train.run_dir) / "metrics.jsonl").read_text().splitlines()]
    return summary, rows, wall


def accuracy_curve(rows: list[dict]) -> dict[int, float]:
    return {r["step"]: r["eval/accuracy"] for r in rows if "eval/accuracy" in r}


def dataset(args, work: Path) -> str:
    config = ROOT / "configs" / "rloo_arithmetic.yaml"
    common = [f"train.steps={args.steps}", "train.eval_every=50", "train.eval_samples=0",
              f"train.checkpoint_every={args.steps}"]
    runs = {"built-in task": run(config, [*common, f"train.run_dir={work / 'builtin'}"]),
            "JSONL copy + reward file": run(config, [*common, f"train.run_dir={work / 'dataset'}",
                                                     *write_arithmetic_copy(work)])}
    curves = {name: accuracy_curve(rows) for name, (_, rows, _) in runs.items()}
    steps = sorted(set.intersection(*(set(c) for c in curves.values())))
    lines = [f"# The main job on its built-in task and on a JSONL copy ({args.steps} steps)", "",
             f"Machine: {machine()}. Command: `python benchmarks/recipes.py dataset --steps {args.steps}`.", "",
             "Both runs: `configs/rloo_arithmetic.yaml`, same seed, same 200 held-out problems, greedy accuracy. "
             "The copy is the README's \"Your own data\" section: every training pair as `prompts.jsonl` "
             "(9,000 rows, read in shuffled epochs instead of the built-in task's independent draws), the "
             "held-out pairs as `heldout.jsonl`, and a 2-line Python reward.", "",
             "| step | " + " | ".join(curves) + " |", "|---|" + "---|" * len(curves)]
    lines += [f"| {s} | " + " | ".join(f"{curves[n][s]:.3f}" for n in curves) + " |" for s in steps]
    lines += ["", "| run | accuracy before | accuracy after | wall (s) | epochs of the file |", "|---|---|---|---|---|"]
    for name, (summary, _, wall) in runs.items():
        epochs = f"{summary['data/epoch']:.2f}" if "data/epoch" in summary else "-"
        lines.append(f"| {name} | {summary['eval/accuracy_before']:.3f} | {summary['eval/accuracy_after']:.3f} | "
                     f"{wall:.0f} | {epochs} |")
    return "\n".join(lines) + "\n"


def gemma(args, work: Path) -> str:
    config = ROOT / "configs" / "rloo_gemma3_270m_math.yaml"
    cpu = ["model.dtype=float32", "rollout.prompts_per_step=2", "algo.num_samples=2", "task.num_eval=48",
           "rollout.max_new_tokens=32"] if args.cpu else []
    overrides = [*cpu, f"train.steps={args.steps}", f"train.run_dir={work / 'gemma'}",
                 f"train.checkpoint_every={args.steps}", f"train.eval_every={args.steps if args.cpu else max(args.steps // 8, 1)}"]
    summary, rows, wall = run(config, overrides)
    trained = [r for r in rows if "step_time_s" in r]
    later = [r["step_time_s"] for r in trained[1:]] or [trained[0]["step_time_s"]]
    lines = [f"# RLOO on Gemma-3-270M, word problems ({args.steps} steps{', CPU-sized batch' if args.cpu else ''})", "",
             f"Machine: {machine()}. Command: `python benchmarks/recipes.py gemma --steps {args.steps}"
             f"{' --cpu' if args.cpu else ''} --host-malloc {args.host_malloc}` (glibc's malloc "
             f"{'tuned for large buffers, as `jaxrl-llm` runs' if args.host_malloc == 'tuned' else 'as glibc sets it'}"
             ").", "",
             f"Overrides of `configs/rloo_gemma3_270m_math.yaml`: `{' '.join(cpu) or 'none'}`.", "",
             f"- first step (compiles): {trained[0]['step_time_s']:.1f} s; later steps: median "
             f"{statistics.median(later):.1f} s over {len(later)}; wall {wall:.0f} s with loading and evaluation",
             "- held-out (numeric verifier), before -> after: " + ", ".join(
                 f"{key.split('/')[1].removesuffix('_before')} {summary[key]:.3f} -> "
                 f"{summary[key.replace('_before', '_after')]:.3f}"
                 for key in sorted(summary) if key.startswith("eval/") and key.endswith("_before")), "",
             "| step | reward/mean | kl | completion/mean_length | eos_fraction | step time (s) | eval/accuracy |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        if "step_time_s" not in r:
            continue
        acc = f"{r['eval/accuracy']:.3f}" if "eval/accuracy" in r else ""
        lines.append(f"| {r['step']} | {r['reward/mean']:.3f} | {r.get('kl', float('nan')):.4f} | "
                     f"{r['completion/mean_length']:.1f} | {r['completion/eos_fraction']:.2f} | "
                     f"{r['step_time_s']:.1f} | {acc} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("recipe", choices=["dataset", "gemma"])
    parser.add_argument("--steps", type=int, default=None)
    parser.add_argument("--cpu", action="store_true", help="gemma: a batch sized for a CPU")
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--host-malloc", choices=["tuned", "default"], default="tuned",
                        help="glibc's malloc, as `jaxrl-llm --host-malloc` sets it (tuned, the CLI's default)")
    args = parser.parse_args()
    if args.host_malloc == "tuned":  # before JAX starts its threads, as the CLI does
        tune_glibc_malloc()
    args.steps = args.steps or (500 if args.recipe == "dataset" else 200)
    out = args.out or ROOT / "benchmarks" / "results" / (
        "dataset_task.md" if args.recipe == "dataset" else f"gemma3_270m_math{'_cpu' if args.cpu else ''}.md")
    with tempfile.TemporaryDirectory() as work:
        report = (dataset if args.recipe == "dataset" else gemma)(args, Path(work))
    out.write_text(report)
    print(report)


if __name__ == "__main__":
    main()
