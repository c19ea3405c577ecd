"""The package's layers: no module imports a package in a layer above its own.

Every module under `jaxrl_llm/` is parsed (not imported) and each of its `import` and
`from ... import` statements of `jaxrl_llm` is checked, at module level and inside functions
alike (a deferred import still runs up the layers when it runs), relative imports resolved.
A package may import itself and anything below it:

    errors, assets    the one user-facing exception type; files shipped with the package
    loading           objects a config names (`module:name`, `file.py:name`)
    objectives        pure array functions (no models, optax or I/O)
    models            Flax NNX causal LMs, heads, LoRA, HF import/export
    parallel          device mesh, shardings, several processes
    rollout           the KV-cache sampler, padding, batched sampling, decoding completions,
                      multi-turn episodes (the sampler continued between environment turns)
    environments      environments and tools: the protocol, tool-call formats, loading them
    tasks             prompt streams, verifiers (built-in and the tasks' own), evaluation
    rewards           reward terms (verifiers, Python functions, reward models) and their sum
    training          config, algorithms, state, the trainer, checkpoints, plan, train-rm
    cli, jaxrl_llm    the command line and the package's public names

Imports by name at run time (`importlib.import_module`) are not statements and are not seen.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = "jaxrl_llm"
ROOT = Path(__file__).resolve().parents[1] / PACKAGE
LAYERS = [
    ("base", {"errors", "assets", "lowering"}),
    ("loading", {"loading"}),
    ("objectives", {"objectives"}),
    ("models", {"models"}),
    ("parallel", {"parallel"}),
    ("rollout", {"rollout"}),
    ("environments", {"environments"}),
    ("tasks", {"tasks"}),
    ("rewards", {"rewards"}),
    ("training", {"training"}),
    ("entry points", {"cli", ""}),  # "": the package itself (jaxrl_llm/__init__.py)
]
LAYER_OF = {part: (rank, name) for rank, (name, parts) in enumerate(LAYERS) for part in parts}


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def is_module(name: str) -> bool:
    """Whether the dotted `name` is a module or package of this source tree."""
    path = ROOT.parent.joinpath(*name.split("."))
    return path.with_suffix(".py").is_file() or (path / "__init__.py").is_file()


def imported_modules(source: str, module: str, *, is_package: bool) -> list[tuple[str, int]]:
    """`(module imported, line)` of every import of `jaxrl_llm` in `source`, at any depth;
    `from a import b` counts as importing `a.b` when that is a module, else `a`."""
    package = module if is_package else module.rpartition(".")[0]
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found += [(alias.name, node.lineno) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: level 1 is this module's package, 2 its parent, ...
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module
            for alias in node.names:
                found.append((f"{target}.{alias.name}" if is_module(f"{target}.{alias.name}") else target,
                              node.lineno))
    return [(name, line) for name, line in found if name == PACKAGE or name.startswith(PACKAGE + ".")]


def layer(module: str) -> tuple[int, str]:
    """The rank and name of the layer of `module`'s top-level package (`jaxrl_llm.X...`: X)."""
    top = module.split(".")[1] if "." in module else ""
    if top not in LAYER_OF:
        pytest.fail(f"{module}: its package {top!r} is in no layer; add it to LAYERS in tests/test_layers.py.")
    return LAYER_OF[top]


def violations() -> list[str]:
    found = []
    for path in sorted(ROOT.rglob("*.py")):
        module = module_name(path)
        (rank, name), own = layer(module), (module.split(".") + [""])[1]
        for imported, line in imported_modules(path.read_text(), module, is_package=path.name == "__init__.py"):
            if (imported.split(".") + [""])[1] == own:
                continue  # a package may import itself
            other_rank, other_name = layer(imported)
            if other_rank >= rank:
                found.append(f"{module} (layer {name!r}, line {line}) imports {imported} (layer {other_name!r}), "
                             f"which is {'above' if other_rank > rank else 'beside'} it")
    return found


def test_no_module_imports_a_higher_layer():
    found = violations()
    assert not found, "imports up the layers:\n" + "\n".join(found)


def test_every_import_form_is_seen():
    """Module- and function-level imports, `import a.b as c`, `from a import module`, relative."""
    source = """
import jaxrl_llm.objectives as obj
from jaxrl_llm import models
from jaxrl_llm.errors import UserError
from . import padding
from .. import parallel
from ..tasks.base import Example

def later():
    from jaxrl_llm.training.trainer import Trainer
"""
    got = imported_modules(source, "jaxrl_llm.rollout.sampler", is_package=False)
    assert [name for name, _ in got] == ["jaxrl_llm.objectives", "jaxrl_llm.models", "jaxrl_llm.errors",
                                         "jaxrl_llm.rollout.padding", "jaxrl_llm.parallel",
                                         "jaxrl_llm.tasks.base", "jaxrl_llm.training.trainer"]
    assert layer("jaxrl_llm.tasks.gold_judge") < layer("jaxrl_llm.training.trainer")


def compared_algorithm_names(source: str, names: set[str]) -> list[tuple[str, int]]:
    """`(name, line)` of every algorithm name that appears in a comparison (`==`, `!=`, `in`,
    `not in`, alone or in a literal tuple/list/set) or as a `match` pattern in `source`."""
    found = []

    def constants(node):
        if isinstance(node, ast.Constant) and node.value in names:
            yield node.value
        elif isinstance(node, (ast.Tuple, ast.List, ast.Set)):
            for element in node.elts:
                yield from constants(element)

    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Compare):
            for operand in (node.left, *node.comparators):
                found += [(name, node.lineno) for name in constants(operand)]
        elif isinstance(node, ast.MatchValue):
            found += [(name, node.lineno) for name in constants(node.value)]
    return found


def test_no_algorithm_is_compared_by_name_outside_its_own_module():
    """One algorithm, one place: the shared machinery (trainer, plan, config, the core of
    `training/algorithms/`) reads a spec's fields, never `algo.name == "ppo"`. Only an algorithm's
    own module (and the registry that maps names to them) may spell its name in a comparison."""
    from jaxrl_llm.training.algorithms import ALGORITHMS

    names = set(ALGORITHMS)
    spec_modules = {f"{name}.py" for name in names} | {"registry.py"}
    offenders = []
    for path in sorted(ROOT.rglob("*.py")):
        if path.parent == ROOT / "training" / "algorithms" and path.name in spec_modules:
            continue
        for name, line in compared_algorithm_names(path.read_text(), names):
            offenders.append(f"{path.relative_to(ROOT.parent)}:{line} compares with {name!r}")
    assert not offenders, "algorithm names compared outside their spec modules (use the spec's fields):\n" + \
        "\n".join(offenders)


def test_the_name_check_sees_each_form_of_comparison():
    names = {"ppo", "grpo"}
    source = ("a == 'ppo'\nif x.name in ('rloo', 'grpo'): pass\nb = 'ppo' != y\n"
              "match n:\n    case 'grpo': pass\nc = name == 'rloo'\n")
    assert compared_algorithm_names(source, names) == [("ppo", 1), ("grpo", 2), ("ppo", 3), ("grpo", 5)]
