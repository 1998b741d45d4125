"""The README's runnable example runs as written (a README that lies is worse than none)."""

import re
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def runnable_blocks() -> list[str]:
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
    return [b for b in blocks if b.startswith("# runnable")]


def test_readme_api_example_runs(capsys):
    blocks = runnable_blocks()
    assert blocks, "README.md lost its runnable API example"
    for block in blocks:
        exec(compile(block, str(README), "exec"), {})
    printed = capsys.readouterr().out
    assert printed.strip(), "the example prints the chosen branch points"
