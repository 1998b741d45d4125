"""The README works as written: its runnable API example runs, every `appo ...` command in it parses and
resolves to a valid config, the files its commands and links name exist, and nothing points outside the
repository (a clone is all a user has)."""

import re
import shlex
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
README = REPO / "README.md"
DOCS = [README, *sorted((REPO / "docs").glob("*.md"))]


def runnable_blocks() -> list[str]:
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
    return [b for b in blocks if b.startswith("# runnable")]


def shell_commands(text: str) -> list[str]:
    """Every command of the ```bash blocks and of the inline `appo ...` spans, comments dropped, split at &&."""
    blocks = [block.replace("\\\n", " ") for block in re.findall(r"```bash\n(.*?)```", text, flags=re.S)]
    lines = [line for block in blocks for line in block.splitlines()]  # continuation lines joined
    lines += re.findall(r"`(appo (?:train|eval|plot)[^`]*)`", text)
    commands = []
    for line in lines:
        line = re.split(r"\s+#\s", line)[0].strip()
        commands += [part.strip() for part in line.split("&&") if part.strip()]
    return commands


def test_readme_api_example_runs(capsys):
    blocks = runnable_blocks()
    assert blocks, "README.md lost its runnable API example"
    for block in blocks:
        exec(compile(block, str(README), "exec"), {})
    printed = capsys.readouterr().out
    assert printed.strip(), "the example prints the chosen branch points"


def test_every_appo_command_parses_to_a_valid_config(tmp_path):
    from appo.cli import build_parser
    from appo.config import load_config

    commands = [c for c in shell_commands(README.read_text()) if c.startswith("appo ")]
    assert {"appo train", "appo eval --model runs/appo-demo --limit 32 --samples 4"} <= set(commands)
    parser = build_parser()
    (tmp_path / "my.yaml").write_text("steps: 3\n")  # the README's example config file
    for command in commands:
        args = parser.parse_args(shlex.split(command)[1:])
        if args.command in ("train", "eval"):
            config_file = tmp_path / "my.yaml" if args.config else None
            algo = [f"algo.name={args.algo}"] if getattr(args, "algo", None) else []
            try:
                load_config(config_file, [*algo, *args.overrides])
            except ValueError as err:
                if "data.path" not in str(err):  # the README's own file names are examples
                    raise AssertionError(f"{command}: {err}") from err


def test_commands_name_files_that_exist():
    named = {word for command in shell_commands(README.read_text()) for word in shlex.split(command)
             if re.fullmatch(r"(scripts|bench|examples|\.ci)/[\w./-]+", word)}
    assert "scripts/install.sh" in named
    missing = sorted(w for w in named if not (REPO / w).exists())
    assert not missing, f"README commands name missing files: {missing}"


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: p.name)
def test_links_stay_inside_the_repository(doc):
    text = doc.read_text()
    assert "../shared" not in text, f"{doc.name} points at ../shared, which a clone does not have"
    for target in re.findall(r"\]\(([^)]+)\)", text):
        if target.startswith("#"):
            continue
        assert "://" not in target, f"{doc.name} links outside the repository: {target}"
        assert (doc.parent / target.split("#")[0]).exists(), f"{doc.name}: broken link {target}"
