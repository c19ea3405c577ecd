"""The README's Python examples run as written, in order, and its commands match CI."""

import re
from pathlib import Path

ROOT = Path(__file__).parents[1]


def test_readme_python_examples_run():
    blocks = re.findall(r"```python\n(.*?)```", (ROOT / "README.md").read_text(), flags=re.S)
    assert len(blocks) >= 2
    assert len(blocks[0].strip().splitlines()) <= 16  # the research-code example stays short
    namespace = {}
    for block in blocks:
        exec(compile(block, "README.md", "exec"), namespace)  # noqa: S102
    assert abs(float(namespace["loss"]) - float(namespace["jit_loss"])) < 1e-6


def test_ci_runs_the_readme_test_command():
    commands = re.findall(r"```bash\n(.*?)\n```", (ROOT / "README.md").read_text(), flags=re.S)
    test_command = next(c for c in commands if "pytest" in c)
    assert test_command in (ROOT / ".ci" / "run").read_text()
