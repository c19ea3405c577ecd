"""`algo.name` -> `AlgorithmSpec`: every module of this package that defines `SPEC` is one
algorithm, so adding one is adding a module (and a config preset), nothing else."""

from __future__ import annotations

import importlib
import pkgutil

from jaxrl_llm.errors import UserError
from jaxrl_llm.training.algorithms.base import AlgorithmSpec

_PACKAGE = __name__.rsplit(".", 1)[0]
_NOT_ALGORITHMS = {"base", "core", "registry"}


def _discover() -> dict[str, AlgorithmSpec]:
    specs = {}
    path = importlib.import_module(_PACKAGE).__path__
    for info in sorted(pkgutil.iter_modules(path), key=lambda m: m.name):
        if info.name in _NOT_ALGORITHMS:
            continue
        spec = getattr(importlib.import_module(f"{_PACKAGE}.{info.name}"), "SPEC", None)
        if isinstance(spec, AlgorithmSpec):
            if spec.name in specs:
                raise RuntimeError(f"two algorithm modules define {spec.name!r}")
            specs[spec.name] = spec
    return specs


SPECS: dict[str, AlgorithmSpec] = _discover()
ALGORITHMS: tuple[str, ...] = tuple(SPECS)


def get_spec(name: str) -> AlgorithmSpec:
    """The spec of `algo.name`; an unknown name is an error listing the known ones."""
    if name not in SPECS:
        raise UserError(f"`algo.name`: got {name!r}, expected one of {list(ALGORITHMS)}.")
    return SPECS[name]


def table() -> str:
    """The Markdown table of every algorithm: its advantage and its loss."""
    rows = ["| algorithm | advantage | loss |", "|---|---|---|"]
    for spec in SPECS.values():
        advantage, loss = (part.strip() for part in spec.summary.split("|"))
        rows.append(f"| {spec.name} | {advantage} | {loss} |")
    return "\n".join(rows)
