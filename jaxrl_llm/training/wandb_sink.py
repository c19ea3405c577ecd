"""Weights & Biases sink for `MetricsLogger`.

It logs exactly what TensorBoard gets: the finite scalars of each step, at that step (the W&B
x axis is the training step), and the eval samples as a table. Its files go under the run
directory (`run_dir/wandb/`); mode "offline" needs no network (sync later with `wandb sync`),
"disabled" makes every call a no-op. `wandb` is imported here, lazily, so the library imports
without it.
"""

from __future__ import annotations

from pathlib import Path

from jaxrl_llm.errors import UserError

MODES = ("online", "offline", "disabled")


class WandbSink:
    def __init__(self, *, run_dir: Path, project: str, name: str | None, mode: str, config: dict):
        if mode not in MODES:
            raise UserError(f"`train.wandb.mode`: got {mode!r}, expected one of {', '.join(map(repr, MODES))}")
        try:
            import wandb
        except ImportError:
            raise UserError(
                "`train.wandb`: the wandb package is not installed; "
                "pip install 'jaxrl_llm[wandb]' (or remove train.wandb)"
            ) from None
        self._wandb = wandb
        run_dir = Path(run_dir)
        run_dir.mkdir(parents=True, exist_ok=True)
        try:
            self.run = wandb.init(
                project=project,
                name=name,
                mode=mode,
                dir=str(run_dir),
                config=config,
                # A run of its own each time, even when another is open in this process
                # (two trainings in one test); `close` finishes it.
                reinit="create_new",
                # Quiet: no banner, no console capture under the trainer's progress bar.
                settings=wandb.Settings(silent=True, console="off"),
            )
        except wandb.errors.UsageError as e:  # e.g. mode "online" without `wandb login`
            first_line = (str(e).splitlines() or [type(e).__name__])[0]
            raise UserError(
                f"`train.wandb`: {first_line} (or set train.wandb.mode to 'offline' and `wandb sync` later)"
            ) from e
        self._closed = False

    def log_scalars(self, step: int, scalars: dict[str, float]) -> None:
        """`scalars` at training step `step` (finite numbers only, as TensorBoard gets them)."""
        if scalars:
            self.run.log({k: float(v) for k, v in scalars.items()}, step=int(step))

    def log_text(self, step: int, key: str, columns: list[str], rows: list[list]) -> None:
        """A table (e.g. the eval samples: prompt, completion, reward) under `key` at `step`."""
        table = self._wandb.Table(columns=list(columns), data=[list(row) for row in rows])
        self.run.log({key: table}, step=int(step))

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            self.run.finish()


__all__ = ["WandbSink"]
