"""Every README code block works when pasted on its own, and its commands match CI.

``python`` blocks each run alone, in a fresh interpreter started in an empty directory (as a
user pasting one would), with none of the test suite's environment for JAX devices: a block
that wants several CPU devices sets ``jax_num_cpu_devices`` itself.

A block that is not self-contained says so on its FIRST line, with exactly one of

    # continues the block above
    # continues the "<heading>" block

The first names the previous ``python`` block in the README; the second the only ``python``
block under the Markdown heading ``<heading>`` (its exact text, without the leading ``#``s;
a heading with no or several ``python`` blocks is an error). The test runs the referenced
block, and before it whatever that block continues in turn, then the block itself, in one
interpreter. A first line that starts with ``# continues`` but matches neither form fails.

``bash`` blocks (installs, training runs: too slow for a unit test) are checked, not run: every
``jaxrl-llm ...`` command in them (after joining ``\\`` line continuations, dropping ``# ...``
comments and splitting ``&&``/``||``/``;``/``|`` chains) must parse with the CLI's own argument
parser, and when it names ``--config``, that file (relative to the repository root) must load
with the command's ``section.key=value`` overrides, and a ``model.path`` it ends up with must
exist unless it is ``builtin:...``. Placeholders such as ``my_run.yaml`` therefore fail:
README commands name shipped files.

The "Your own data" section is run for real, shortened: its data block, its reward file (the
``python`` block whose first line is ``# <name>.py``, saved under that name) and its ``jaxrl-llm
train ... task.name=dataset`` command, in one directory: 20 steps in CI, and 150 steps with the
held-out accuracy rise asserted under ``-m slow``.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[1]
README = ROOT / "README.md"
CONTINUES = re.compile(r'# continues (?:the block above|the "(?P<heading>[^"]+)" block)')
OPERATORS = {"&&", "||", ";", "|", "&"}


@dataclass(frozen=True)
class Block:
    lang: str
    code: str
    heading: str
    line: int  # line of the opening fence in the README

    @property
    def id(self) -> str:
        first = self.code.strip().splitlines()[0] if self.code.strip() else ""
        return f"L{self.line} {self.heading}: {first[:50]}"


def parse_blocks(text: str) -> list[Block]:
    """The fenced code blocks of a Markdown text, with the heading each one is under."""
    blocks, heading, fence = [], "", None
    for number, line in enumerate(text.splitlines(), start=1):
        if fence is None:
            if line.startswith("```"):
                fence, start, body = line[3:].strip(), number, []
            elif re.match(r"#{1,6} ", line):
                heading = line.lstrip("#").strip()
        elif line.startswith("```"):
            blocks.append(Block(fence, "\n".join(body) + "\n", heading, start))
            fence = None
        else:
            body.append(line)
    assert fence is None, f"README: the code block opened at line {start} is never closed"
    return blocks


def with_continued(blocks: list[Block], index: int) -> list[Block]:
    """The python block ``blocks[index]``, preceded by the blocks it continues, outermost first."""
    python = [b for b in blocks if b.lang == "python"]
    block = blocks[index]
    chain = [block]
    while True:
        first = block.code.lstrip().splitlines()[0] if block.code.strip() else ""
        if not first.startswith("# continues"):
            return chain[::-1]
        match = CONTINUES.fullmatch(first.rstrip())
        assert match, (f"README line {block.line + 1}: {first!r} is neither '# continues the block above' nor "
                       "'# continues the \"<heading>\" block'")
        if match["heading"] is None:
            position = python.index(block)
            assert position > 0, f"README line {block.line + 1}: no python block above to continue"
            block = python[position - 1]
        else:
            under = [b for b in python if b.heading == match["heading"]]
            assert len(under) == 1, (f"README line {block.line + 1}: {len(under)} python blocks under the heading "
                                     f"{match['heading']!r}, expected exactly one")
            block = under[0]
        assert block not in chain, f"README line {block.line + 1}: blocks continue each other in a cycle"
        chain.append(block)


def commands(code: str) -> list[list[str]]:
    """The simple commands of a bash block: continuations joined, comments dropped, chains split."""
    result = []
    for line in code.replace("\\\n", " ").splitlines():
        lexer = shlex.shlex(line, posix=True, punctuation_chars=True)
        lexer.whitespace_split = True
        current = []
        for token in lexer:
            if token in OPERATORS:
                result.append(current)
                current = []
            else:
                current.append(token)
        result.append(current)
    return [c for c in result if c]


BLOCKS = parse_blocks(README.read_text())
PYTHON = [i for i, b in enumerate(BLOCKS) if b.lang == "python"]
CLI_COMMANDS = [(b, c) for b in BLOCKS if b.lang == "bash" for c in commands(b.code) if c[0] == "jaxrl-llm"]


def test_readme_has_the_examples():
    assert len(PYTHON) >= 2
    assert len(BLOCKS[PYTHON[0]].code.strip().splitlines()) <= 16  # the research-code example stays short
    assert not CONTINUES.match(BLOCKS[PYTHON[0]].code.lstrip())
    assert {c[1] for _, c in CLI_COMMANDS} >= {"train", "eval", "export", "plan"}


def user_env() -> dict:
    return {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}  # conftest's fake devices: not the user's


@pytest.mark.parametrize("index", PYTHON, ids=[BLOCKS[i].id for i in PYTHON])
def test_readme_python_block_runs_alone(index, tmp_path):
    chain = with_continued(BLOCKS, index)
    code = "\n".join(b.code for b in chain)
    done = subprocess.run([sys.executable, "-"], input=code, cwd=tmp_path, env=user_env(), capture_output=True,
                          text=True, timeout=300)
    numbered = "\n".join(f"{n:3d} {line}" for n, line in enumerate(code.splitlines(), start=1))
    assert done.returncode == 0, (
        f"README blocks at lines {[b.line for b in chain]} failed when run alone:\n{numbered}\n"
        f"--- stderr ---\n{done.stderr[-4000:]}")


@pytest.mark.parametrize("block, argv", CLI_COMMANDS, ids=[f"L{b.line} {shlex.join(c)[:70]}" for b, c in CLI_COMMANDS])
def test_readme_cli_command_parses_and_its_config_loads(block, argv):
    from jaxrl_llm.cli import _parser
    from jaxrl_llm.training import load_config
    from jaxrl_llm.training.reward_model import load_rm_config

    try:
        args = _parser().parse_args(argv[1:])
    except SystemExit as e:
        pytest.fail(f"README line {block.line}: `{shlex.join(argv)}` is rejected by the CLI's parser (exit {e.code})")
    config_path = getattr(args, "config", None)
    if config_path is None:
        return
    try:
        loader = load_rm_config if argv[1] == "train-rm" else load_config  # a reward model's config has its own sections
        config = loader(ROOT / config_path, list(getattr(args, "overrides", None) or []))
    except Exception as e:  # the library's config errors, whatever their class
        pytest.fail(f"README line {block.line}: `{shlex.join(argv)}`: {type(e).__name__}: {e}")
    model_path = config.model.path
    assert model_path.startswith("builtin:") or (ROOT / model_path).exists(), (
        f"README line {block.line}: model.path {model_path!r} does not exist")


def run_your_own_data_section(tmp_path, steps: int) -> dict:
    """The "Your own data" section pasted into an empty directory (with the repository's configs
    beside it), its run cut to `steps`; returns the run's summary."""
    section = [b for b in BLOCKS if b.heading == "Your own data"]
    files = [b for b in section if b.lang == "python" and re.fullmatch(r"# \S+\.py", b.code.splitlines()[0])]
    scripts = [b for b in section if b.lang == "python" and b not in files]
    train = [c for b in section if b.lang == "bash" for c in commands(b.code)
             if c[:2] == ["jaxrl-llm", "train"] and "task.name=dataset" in c]
    assert len(files) == 1 and len(scripts) == 1 and len(train) == 1
    (tmp_path / files[0].code.splitlines()[0][2:]).write_text(files[0].code)
    (tmp_path / "configs").symlink_to(ROOT / "configs")
    made = subprocess.run([sys.executable, "-"], input=scripts[0].code, cwd=tmp_path, env=user_env(),
                          capture_output=True, text=True, timeout=300)
    assert made.returncode == 0, made.stderr
    shortened = [f"train.steps={steps}", "train.eval_every=1000", f"train.checkpoint_every={steps}",
                 "train.progress=false", "train.tensorboard=false", "train.eval_samples=0"]
    run = subprocess.run([sys.executable, "-m", "jaxrl_llm.cli", *train[0][1:], *shortened], cwd=tmp_path,
                         env=user_env(), capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-4000:]
    run_dir = next(a.split("=", 1)[1] for a in train[0] if a.startswith("train.run_dir="))
    return json.loads((tmp_path / run_dir / "summary.json").read_text())


def test_your_own_data_section_runs(tmp_path):
    summary = run_your_own_data_section(tmp_path, steps=20)
    assert 0.30 <= summary["eval/accuracy_before"] <= 0.45  # the held-out file is the built-in task's set
    assert summary["reward/valid_fraction"] == 1.0 and 0 < summary["data/epoch"] < 1


@pytest.mark.slow
def test_your_own_data_section_raises_held_out_accuracy(tmp_path):
    """As the main job's test does on the built-in task (tests/test_main_job.py); the full
    500-step comparison is benchmarks/results/dataset_task.md."""
    summary = run_your_own_data_section(tmp_path, steps=150)
    before, after = summary["eval/accuracy_before"], summary["eval/accuracy_after"]
    assert 0.30 <= before <= 0.45 and after >= before + 0.10, (before, after)
    assert summary["data/epoch"] > 1  # 150 steps read the file more than once


def test_continuation_markers_are_parsed():
    text = "\n".join([
        "## One", "```python", "a = 1", "```", "```bash", "echo", "```",
        "## Two", "```python", "# continues the block above", "b = a + 1", "```",
        "```python", '# continues the "One" block', "c = a + 2", "```",
        "```python", "# continues the block above", "d = c", "```",
    ]) + "\n"
    blocks = parse_blocks(text)
    python = [i for i, b in enumerate(blocks) if b.lang == "python"]
    assert [[b.line for b in with_continued(blocks, i)] for i in python] == [[2], [2, 9], [2, 13], [2, 13, 17]]
    assert [b.heading for b in blocks] == ["One", "One", "Two", "Two", "Two"]
    bad = parse_blocks("```python\n# continues the One block\n```\n")
    with pytest.raises(AssertionError, match="neither"):
        with_continued(bad, 0)
    assert commands("pip install -e '.[test]' && jaxrl-llm train --config a.yaml \\\n  x.y=1   # note\n") == [
        ["pip", "install", "-e", ".[test]"], ["jaxrl-llm", "train", "--config", "a.yaml", "x.y=1"]]


def test_ci_runs_the_readme_test_command():
    test_command = next(b.code.strip() for b in BLOCKS if b.lang == "bash" and "pytest" in b.code)
    assert test_command in (ROOT / ".ci" / "run").read_text()
