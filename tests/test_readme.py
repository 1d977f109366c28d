"""The README's runnable examples run (documentation that rots is worse than none)."""

import pathlib
import re

import pytest

README = pathlib.Path(__file__).resolve().parent.parent / "README.md"
BLOCKS = re.findall(r"```python\n(.*?)```", README.read_text(), re.S)
# Snippets that need the reference implementation's code are illustrations, not programs.
RUNNABLE = [b for b in BLOCKS if "create_model(" not in b]


def test_readme_has_runnable_examples():
    assert len(RUNNABLE) >= 3


@pytest.mark.parametrize("code", RUNNABLE, ids=[f"block{i}" for i in range(len(RUNNABLE))])
def test_readme_example_runs(code):
    exec(compile(code, str(README), "exec"), {"__name__": "readme_example"})


def _commands() -> list[list[str]]:
    """Every `switch-dit ...` and `torchrun ... -m switch_dit.{cli,train}` line of the README's
    bash blocks, as the argument list of `switch-dit` (comments dropped)."""
    out = []
    for block in re.findall(r"```bash\n(.*?)```", README.read_text(), re.S):
        for line in block.splitlines():
            words = line.split("#")[0].split()
            if words[:1] == ["switch-dit"]:
                out.append(words[1:])
            elif words[:1] == ["torchrun"]:
                module = words[words.index("-m") + 1]
                rest = words[words.index("-m") + 2 :]
                out.append(rest if module == "switch_dit.cli" else [module.rsplit(".", 1)[1], *rest])
    return out


def test_readme_commands_parse():
    """The shell commands the README shows are accepted by the command line as written."""
    from switch_dit.cli import build_parser

    commands = _commands()
    assert {c[0] for c in commands} >= {"train", "extract-latents", "sample", "eval", "figure", "compare"}
    parser = build_parser()
    for argv in commands:
        parser.parse_args(argv)  # argparse exits (a test failure) on a flag the README got wrong
