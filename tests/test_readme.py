"""The README's command lines against the CLI: every `t2ray …` line in its bash blocks names a real command with
real options, and the files it names under experiments/ exist, so the docs cannot drift from the code."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest
import typer

from t2ray.cli import app

ROOT = Path(__file__).resolve().parents[1]


def readme_commands() -> list[str]:
    """Each `t2ray …` command of the README's ```bash blocks (comments cut, `|`-separated ones split)."""
    blocks = re.findall(r"```bash\n(.*?)```", (ROOT / "README.md").read_text(), flags=re.S)
    lines = []
    for block in blocks:
        for line in block.replace("\\\n", " ").splitlines():
            line = line.split(" #", 1)[0].strip()
            lines += [part.strip() for part in line.split("|") if part.strip().startswith("t2ray ")]
    return lines


COMMANDS = readme_commands()


def test_the_readme_has_command_lines():
    assert len(COMMANDS) > 30 and "t2ray quickstart" in COMMANDS


@pytest.mark.parametrize("line", COMMANDS)
def test_readme_command_parses_against_the_cli(line):
    words = shlex.split(line.replace("$E", ""))[1:]
    command = typer.main.get_command(app)  # typer's own (vendored) click: groups have .commands
    while hasattr(command, "commands") and words and words[0] in command.commands:
        command = command.commands[words.pop(0)]
    assert not hasattr(command, "commands"), f"{line}: no such command"
    options = {opt for p in command.params for opt in (*p.opts, *p.secondary_opts)}
    flags = {
        opt
        for p in command.params
        if p.param_type_name == "option" and (p.is_flag or p.count)
        for opt in (*p.opts, *p.secondary_opts)
    }
    arguments = [p for p in command.params if p.param_type_name == "argument"]
    positional = []
    while words:
        word = words.pop(0)
        if word.startswith("--"):
            name = word.split("=", 1)[0]
            assert name in options, f"{line}: {command.name} has no option {name}; it has {sorted(options)}"
            if name not in flags and "=" not in word:
                words.pop(0)  # its value
        else:
            positional.append(word)
    assert len(positional) <= len(arguments), f"{line}: extra arguments {positional}"
    for word in positional + [w for w in shlex.split(line) if w.startswith("experiments/")]:
        if word.startswith("experiments/"):
            assert (ROOT / word).exists(), f"{line}: {word} does not exist"
