"""Where metrics go: `metrics.jsonl` (one line per step), TensorBoard events, a PNG at the end."""

from __future__ import annotations

import json
import math
from pathlib import Path


class MetricsLogger:
    def __init__(self, run_dir: Path, *, tensorboard: bool = True, append: bool = False):
        self.run_dir = run_dir
        self.path = run_dir / "metrics.jsonl"
        if not append and self.path.exists():
            self.path.unlink()
        self.history: list[dict] = []
        if append and self.path.exists():
            self.history = [json.loads(line) for line in self.path.read_text().splitlines() if line.strip()]
        self.writer = None
        if tensorboard:
            from tensorboardX import SummaryWriter

            self.writer = SummaryWriter(str(run_dir / "tensorboard"))

    def log(self, step: int, metrics: dict) -> None:
        row = {"step": int(step), **{k: _plain(v) for k, v in metrics.items()}}
        self.history.append(row)
        with self.path.open("a") as f:
            f.write(json.dumps(row) + "\n")
        if self.writer is not None:
            for key, value in row.items():
                if key != "step" and isinstance(value, (int, float)) and math.isfinite(value):
                    self.writer.add_scalar(key, value, int(step))

    def drop_after(self, step: int) -> None:
        """Forget rows past `step` (a resumed run replays them)."""
        self.history = [row for row in self.history if row["step"] <= step]
        self.path.write_text("".join(json.dumps(row) + "\n" for row in self.history))

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


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
