"""What can stop a training run, and what it costs to compile: SIGINT / SIGTERM (finish the
step, checkpoint, stop), an update whose loss or gradient is not finite, steps in which every
reward failed; and the seconds JAX spends compiling inside a step."""

from __future__ import annotations

import contextlib
import signal
import sys
import threading

import jax
import numpy as np

from jaxrl_llm.errors import Interrupted, UserError


class StopSignals:
    """SIGINT and SIGTERM during training: the first lets the current step finish, a checkpoint
    be written and the run stop (`Interrupted`); a second abandons the step at once, writing
    nothing (the last checkpoint stands). Pre-empted jobs get SIGTERM, Ctrl-C is SIGINT."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __enter__(self):
        self.signum, self._previous, self._deferred = None, {}, None
        if threading.current_thread() is threading.main_thread():  # handlers live in the main thread only
            self._previous = {s: signal.signal(s, self._handle) for s in self.SIGNALS}
        return self

    def __exit__(self, *exc):
        for s, handler in self._previous.items():
            signal.signal(s, handler)

    @property
    def received(self) -> bool:
        return self.signum is not None

    @property
    def name(self) -> str:
        return signal.Signals(self.signum).name

    @contextlib.contextmanager
    def deferred(self):
        """Signals that arrive inside the block take effect when it ends."""
        self._deferred = []
        try:
            yield
        finally:
            pending, self._deferred = self._deferred, None
            for signum in pending:
                self._handle(signum, None)

    def _handle(self, signum, frame):
        if self._deferred is not None:
            self._deferred.append(signum)
            return
        if self.received:
            raise Interrupted(signum, f"{signal.Signals(signum).name} again: the step in progress was abandoned "
                                      "and nothing written; the last checkpoint stands (--resume continues from it).")
        self.signum = signum
        print(f"\n{self.name}: finishing this step, then writing a checkpoint and stopping ({self.name} again "
              "abandons the step)", file=sys.stderr, flush=True)


class CompileTimer:
    """Seconds JAX spent tracing, lowering and compiling inside a `with` block (from JAX's own
    monitoring events, so cached programs count zero)."""

    EVENTS = ("/jax/core/compile/jaxpr_trace_duration", "/jax/core/compile/jaxpr_to_mlir_module_duration",
              "/jax/core/compile/backend_compile_duration")
    _active: list[CompileTimer] = []
    _registered = False

    def __enter__(self):
        if not CompileTimer._registered:
            jax.monitoring.register_event_duration_secs_listener(CompileTimer._record)
            CompileTimer._registered = True
        self.seconds = 0.0
        CompileTimer._active.append(self)
        return self

    def __exit__(self, *exc):
        CompileTimer._active.remove(self)

    @staticmethod
    def _record(event: str, duration: float, **_) -> None:
        if event in CompileTimer.EVENTS:
            for timer in CompileTimer._active:
                timer.seconds += duration


class NonFiniteUpdate(UserError):
    """A step's loss or gradient was NaN or infinite (with `train.on_nonfinite: stop`)."""


class InvalidRewards(UserError):
    """Every sample's reward failed for `reward.max_invalid_steps` consecutive steps."""


def report_nonfinite(metrics: dict, update_scalars: list[dict], *, step: int, on_nonfinite: str,
                     checkpointer) -> None:
    """Name the non-finite metrics of a step whose updates were not applied, then stop
    (`train.on_nonfinite: stop`) or warn and go on (`skip`)."""
    bad = sorted(k for k, v in metrics.items() if isinstance(v, float) and not np.isfinite(v))
    first = next(i for i, u in enumerate(update_scalars) if not u["finite"])
    what = (f"step {step}: non-finite {', '.join(bad) or 'loss/gradient'} in update {first + 1} of "
            f"{len(update_scalars)} ({int(metrics['train/skipped_updates'])} not applied)")
    if on_nonfinite == "stop":
        last = checkpointer.latest_step()
        raise NonFiniteUpdate(f"{what}; stopped without saving: "
                              + (f"the checkpoint of step {last} is intact (--resume continues from it)"
                                 if last is not None else "no checkpoint was written yet")
                              + ". Set train.on_nonfinite: skip to drop such updates and go on.")
    print(f"warning: {what}; the parameters are those before it (train.on_nonfinite: skip)", flush=True)


def report_invalid_rewards(invalid_steps: int, *, step: int, limit: int) -> None:
    """Warn on the `invalid_steps`-th step in a row where no sample got a reward; stop at `limit`
    (`reward.max_invalid_steps`)."""
    message = (f"step {step}: every reward failed (reward/valid_fraction 0, nothing trained), "
               f"{invalid_steps} step(s) in a row")
    if invalid_steps >= limit:
        raise InvalidRewards(f"{message}, the limit reward.max_invalid_steps={limit}: the reward terms fail on "
                             "every sample; set reward.on_error=raise to see the first failure.")
    print(f"warning: {message} (stops at reward.max_invalid_steps={limit})", flush=True)


__all__ = ["CompileTimer", "InvalidRewards", "NonFiniteUpdate", "StopSignals", "report_invalid_rewards",
           "report_nonfinite"]
