"""Where metrics go: `metrics.jsonl` (one line per step), `samples.jsonl` (eval completions),
TensorBoard events, Weights & Biases when configured, a PNG at the end; and the progress bar
and held-out summary lines the trainer prints.

Every JSON file here is strict JSON: a non-finite number (a NaN reward mean when every sample
failed) is written as `null`, which every JSON reader accepts, never as a bare `NaN`.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

SAMPLE_COLUMNS = ("prompt", "completion", "reward", "correct", "answer", "finished")


def json_safe(value):
    """`value` with every non-finite float replaced by None (nested dicts, lists, tuples)."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    return value


def to_json(value, **kwargs) -> str:
    """Strict JSON (`allow_nan=False`) of `value`, non-finite floats as null."""
    return json.dumps(json_safe(value), allow_nan=False, **kwargs)


class MetricsLogger:
    """Appends each step's metrics to `metrics.jsonl` and mirrors the finite scalars to
    TensorBoard and W&B (`wandb`: a `WandbConfig`, or None); eval samples go to `samples.jsonl`
    and, as a table, to both. `write=False` (every process of a multi-process run but the first)
    keeps the history in memory and writes nothing."""

    def __init__(self, run_dir: Path, *, tensorboard: bool = True, append: bool = False, wandb=None,
                 config: dict | None = None, write: bool = True):
        self.run_dir = run_dir
        self.write = write
        self.path = run_dir / "metrics.jsonl"
        self.samples_path = run_dir / "samples.jsonl"
        self.history: list[dict] = []
        self.writer = self.wandb = None
        if not write:
            return
        if not append:
            for path in (self.path, self.samples_path):
                path.unlink(missing_ok=True)
        if append and self.path.exists():
            self.history = [json.loads(line) for line in self.path.read_text().splitlines() if line.strip()]
        if tensorboard:
            from tensorboardX import SummaryWriter

            self.writer = SummaryWriter(str(run_dir / "tensorboard"))
        if wandb is not None:
            from jaxrl_llm.training.wandb_sink import WandbSink

            self.wandb = WandbSink(run_dir=run_dir, project=wandb.project, name=wandb.name, mode=wandb.mode,
                                   config=config or {})

    def log(self, step: int, metrics: dict) -> None:
        row = {"step": int(step), **{k: _plain(v) for k, v in metrics.items()}}
        self.history.append(row)
        if not self.write:
            return
        with self.path.open("a") as f:
            f.write(to_json(row) + "\n")
        scalars = {k: v for k, v in row.items()
                   if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)}
        if self.writer is not None:
            for key, value in scalars.items():
                self.writer.add_scalar(key, value, int(step))
        if self.wandb is not None:
            self.wandb.log_scalars(step, scalars)

    def log_samples(self, step: int, rows: list[dict]) -> None:
        """Eval completions (`SAMPLE_COLUMNS`) at `step`: JSON lines, a TensorBoard text table, a
        W&B table."""
        if not rows or not self.write:
            return
        with self.samples_path.open("a") as f:
            f.writelines(to_json({"step": int(step), **row}) + "\n" for row in rows)
        if self.writer is not None:
            self.writer.add_text("eval/samples", markdown_table(rows), int(step))
        if self.wandb is not None:
            self.wandb.log_text(step, "eval/samples", list(SAMPLE_COLUMNS),
                                [[json_safe(row.get(c)) for c in SAMPLE_COLUMNS] for row in rows])

    def drop_after(self, step: int) -> None:
        """Forget rows past `step` (a resumed run replays them)."""
        self.history = [row for row in self.history if row["step"] <= step]
        if not self.write:
            return
        self.path.write_text("".join(to_json(row) + "\n" for row in self.history))
        if self.samples_path.exists():
            kept = [line for line in self.samples_path.read_text().splitlines()
                    if line.strip() and json.loads(line)["step"] <= step]
            self.samples_path.write_text("".join(line + "\n" for line in kept))

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
        if self.wandb is not None:
            self.wandb.close()


def markdown_table(rows: list[dict], columns=SAMPLE_COLUMNS, *, width: int = 60) -> str:
    """Rows as a Markdown table (TensorBoard renders it), each cell on one line, cut at `width`
    (a prompt keeps its end: the question comes after any few-shot examples)."""
    def cell(value, column) -> str:
        text = "" if value is None else f"{value:.3g}" if isinstance(value, float) else str(value)
        text = text.replace("\n", "⏎").replace("|", "\\|")
        if len(text) <= width:
            return text
        return "…" + text[1 - width:] if column == "prompt" else text[: width - 1] + "…"

    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(cell(row.get(c), c) for c in columns) + " |" for row in rows]
    return "\n".join(lines)


def _plain(value):
    try:
        return float(value) if not isinstance(value, (int, str, bool)) else value
    except (TypeError, ValueError):
        return str(value)


def plot_curves(history: list[dict], path: Path, title: str) -> None:
    """Reward, held-out accuracy and KL against the step, as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [("reward/mean", "reward"), ("eval/accuracy", "held-out accuracy"), ("kl", "KL to reference (per token)")]
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.2))
    for ax, (key, label) in zip(axes, panels):
        points = [(row["step"], row[key]) for row in history if isinstance(row.get(key), (int, float))]
        if points:
            ax.plot(*zip(*points), marker="." if len(points) < 30 else None)
        ax.set_title(label)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def describe_eval(metrics: dict) -> str:
    """`accuracy 41.0%, pass@4 60.5%, mean@4 35.2%, reward 0.410`."""
    parts = [f"{key.split('/', 1)[1]} {value:.1%}" for key, value in metrics.items()
             if key.startswith(("eval/accuracy", "eval/pass@", "eval/mean@"))]
    return ", ".join(parts + [f"reward {metrics['eval/reward']:.3f}"])


class Progress:
    """The progress bar. The first step of a process compiles the sampler, prepare and update:
    that is reported once, and the bar starts after it, so its rate and ETA are steady-state
    (and on `--resume` it continues from the resumed step)."""

    def __init__(self, *, enabled: bool, total: int, before: dict):
        self.enabled, self.total, self.bar = enabled, total, None
        self.latest_eval = self.headline(before)

    @staticmethod
    def headline(metrics: dict) -> tuple[str, float] | None:
        """The held-out number shown: accuracy, or the reward without a verifier."""
        for key, label in (("eval/accuracy", "eval"), ("eval/reward", "eval reward")):
            if key in metrics:
                return label, metrics[key]
        return None

    def update(self, done: int, metrics: dict, compile_seconds: float) -> None:
        if not self.enabled:
            return
        if self.bar is None:
            from tqdm.auto import tqdm

            print(f"step {done}: compiled in {compile_seconds:.1f} s, step time "
                  f"{metrics['step_time_s']:.2f} s with compilation", flush=True)
            self.bar = tqdm(initial=done, total=self.total, desc="RL steps", unit="step", dynamic_ncols=True)
        else:
            self.bar.update(1)
        self.latest_eval = self.headline(metrics) or self.latest_eval
        self.bar.set_postfix(self.fields(metrics))

    def fields(self, metrics: dict) -> dict:
        """What the bar shows, named for the samples each covers: the mean reward of everything
        sampled this step, the exact-answer rate of the groups trained on, the KL to the
        reference, and the latest held-out accuracy."""
        shown = {"reward(all)": metrics["reward/mean"]}
        if "train/accuracy" in metrics:  # a task with a verifier
            shown["acc(trained)"] = metrics["train/accuracy"]
        if "kl" in metrics:  # raft has no reference
            shown["kl"] = metrics["kl"]
        if self.latest_eval is not None:
            shown[self.latest_eval[0]] = self.latest_eval[1]
        return {k: f"{v:.3f}" for k, v in shown.items()}

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
