"""Argument checks shared by the objectives.

Shape, dtype and option checks look only at static information, so they run at
trace time and hold under `jit`. Value checks (non-finite rewards) need concrete
arrays: they run when a function is called eagerly and are skipped for tracers;
the trainer repeats them at its host boundary.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jaxrl_llm.errors import UserError


def _shape(x) -> tuple[int, ...]:
    return tuple(np.shape(x))


def as_float(x):
    """`x` as a float array of at least float32 precision (bf16 -> f32, f64 stays f64)."""
    x = jnp.asarray(x)
    return x.astype(jnp.promote_types(x.dtype, jnp.float32))


def check_rank(name: str, x, rank: int, *, what: str = "") -> None:
    if np.ndim(x) != rank:
        expected = f" ({what})" if what else ""
        raise UserError(
            f"`{name}` must have rank {rank}{expected}; got shape {_shape(x)}."
        )


def check_shape(name: str, x, shape: tuple[int, ...], *, like: str) -> None:
    if _shape(x) != tuple(shape):
        raise UserError(
            f"`{name}` must have shape {tuple(shape)} (the shape of `{like}`); "
            f"got {_shape(x)}."
        )


def check_float(name: str, x) -> None:
    dtype = jnp.result_type(x)
    if not jnp.issubdtype(dtype, jnp.floating):
        raise UserError(
            f"`{name}` must be a floating-point array (log-probabilities, rewards "
            f"and values are real numbers); got dtype {dtype}."
        )


def check_mask(name: str, mask, shape: tuple[int, ...], *, like: str) -> None:
    check_shape(name, mask, shape, like=like)
    dtype = jnp.result_type(mask)
    if not (
        dtype == jnp.bool_
        or jnp.issubdtype(dtype, jnp.integer)
        or jnp.issubdtype(dtype, jnp.floating)
    ):
        raise UserError(f"`{name}` must be a bool, integer or float 0/1 array; got {dtype}.")


def check_choice(name: str, value, choices: Sequence[str]) -> None:
    if value not in choices:
        raise UserError(f"`{name}` must be one of {list(choices)}; got {value!r}.")


def check_positive_int(name: str, value, *, minimum: int = 1) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise UserError(f"`{name}` must be an integer >= {minimum}; got {value!r}.")


def check_positive_float(name: str, value) -> None:
    if isinstance(value, jax.core.Tracer):
        return
    if not np.all(np.asarray(value) > 0) or not np.all(np.isfinite(np.asarray(value))):
        raise UserError(f"`{name}` must be a positive finite number; got {value!r}.")


def check_num_samples(num_samples, batch_size: int, *, minimum: int = 2, name: str = "num_samples") -> int:
    """`num_samples` is K, the completions per prompt; N must split into groups of K."""
    check_positive_int(name, num_samples, minimum=minimum)
    if batch_size % num_samples:
        raise UserError(
            f"The batch size N={batch_size} must be divisible by `{name}`={num_samples}: "
            f"completions are laid out prompt-major in groups of K "
            f"(and, when the batch is split across devices, each device must hold whole groups)."
        )
    return int(num_samples)


def is_concrete(x) -> bool:
    return not isinstance(x, jax.core.Tracer)


def check_finite(name: str, x) -> None:
    """Raise if a concrete `x` holds NaN or inf; no-op on tracers (under jit)."""
    if not is_concrete(x):
        return
    values = np.asarray(x)
    bad = ~np.isfinite(values)
    if bad.any():
        index = tuple(int(i) for i in np.argwhere(bad)[0])
        raise UserError(
            f"`{name}` holds {int(bad.sum())} non-finite value(s), the first "
            f"{values[index]!r} at index {index}. Fix the reward source, or pass "
            f"`nonfinite_scores='mask'` to drop those completions from the baseline and the loss."
        )
