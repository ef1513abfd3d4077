"""The README and docs/ against the CLI and the tree: every `t2ray …` line in their bash blocks names a real command
with real options, the files it names under experiments/ exist, every relative link resolves (anchors included), the
README links every docs page, shows every command, and stays short with `make demo` and `make test` first."""

from __future__ import annotations

import ast
import re
import shlex
from pathlib import Path

import pytest
import typer

from t2ray.cli import app

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
DOCS = sorted((ROOT / "docs").glob("*.md"))
PAGES = [README, *DOCS]
README_MAX_BYTES = 12_000  # "at most 12 KB", however a KB is counted


def page_id(page: Path) -> str:
    return page.relative_to(ROOT).as_posix()


def commands_of(page: Path) -> list[str]:
    """Each `t2ray …` command of a page's ```bash blocks (comments cut, `|`-separated ones split)."""
    blocks = re.findall(r"```bash\n(.*?)```", page.read_text(), flags=re.S)
    lines = []
    for block in blocks:
        for line in block.replace("\\\n", " ").splitlines():
            line = line.split(" #", 1)[0].strip()
            lines += [part.strip() for part in line.split("|") if part.strip().startswith("t2ray ")]
    return lines


COMMANDS = [(page_id(page), line) for page in PAGES for line in commands_of(page)]
README_COMMANDS = commands_of(README)


def cli_command(words: list[str]):
    """The click command a `t2ray` line names, and the words left after its name."""
    command = typer.main.get_command(app)  # typer's own (vendored) click: groups have .commands
    while hasattr(command, "commands") and words and words[0] in command.commands:
        command = command.commands[words.pop(0)]
    return command, words


def leaf_commands(command=None, prefix: str = "t2ray") -> list[str]:
    command = command or typer.main.get_command(app)
    if not hasattr(command, "commands"):
        return [prefix]
    return [leaf for name, sub in command.commands.items() for leaf in leaf_commands(sub, f"{prefix} {name}")]


def test_the_docs_have_command_lines():
    assert len(COMMANDS) > 30 and "t2ray quickstart" in README_COMMANDS
    pages = {"svf", "training", "adaptation", "serving", "sweeps-and-clusters", "security", "reproducing"}
    assert {f"{name}.md" for name in (*pages, "architecture", "README")} <= {page.name for page in DOCS}


@pytest.mark.parametrize("page,line", COMMANDS, ids=[f"{page}: {line}" for page, line in COMMANDS])
def test_documented_command_parses_against_the_cli(page, line):
    command, words = cli_command(shlex.split(line.replace("$E", ""))[1:])
    assert not hasattr(command, "commands"), f"{page}: {line}: no such command"
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
            assert name in options, f"{page}: {line}: {command.name} has no option {name}; it has {sorted(options)}"
            if name not in flags and "=" not in word:
                words.pop(0)  # its value
        else:
            positional.append(word)
    assert len(positional) <= len(arguments), f"{page}: {line}: extra arguments {positional}"
    for word in positional + [w for w in shlex.split(line) if w.startswith("experiments/")]:
        if word.startswith("experiments/"):
            assert (ROOT / word).exists(), f"{page}: {line}: {word} does not exist"


def test_the_readme_shows_every_command():
    shown = {" ".join(line.split()[:n]) for line in README_COMMANDS for n in (2, 3)}
    missing = [leaf for leaf in leaf_commands() if leaf not in shown]
    assert not missing, f"README.md has no example of {missing}"


def test_the_readme_is_short_and_starts_with_make_demo_and_make_test():
    text = README.read_text()
    size = len(text.encode())
    assert size <= README_MAX_BYTES, f"README.md is {size} bytes; at most {README_MAX_BYTES}"
    first_block = re.search(r"```bash\n(.*?)```", text, flags=re.S)
    first = [line.split("#", 1)[0].strip() for line in first_block.group(1).splitlines() if line.strip()]
    assert first[:2] == ["make demo", "make test"], f"the first commands shown are {first[:2]}"
    head = text.splitlines()[:30]
    for command in ("make demo", "make test"):
        assert any(line.startswith(command) for line in head), f"`{command}` is not within the first 30 lines"


def heading_anchors(page: Path) -> set[str]:
    """GitHub's anchors of a markdown page's headings (lower case, punctuation dropped, spaces → hyphens)."""
    text = re.sub(r"```.*?```", "", page.read_text(), flags=re.S)
    headings = re.findall(r"^#+\s+(.+?)\s*$", text, flags=re.M)
    return {re.sub(r"[^\w\- ]", "", h.replace("`", "").lower()).replace(" ", "-") for h in headings}


def links_of(page: Path) -> list[str]:
    text = re.sub(r"```.*?```", "", page.read_text(), flags=re.S)  # code is not markup
    return re.findall(r"\]\(([^)\s]+)\)", text)


LINKS = [(page_id(page), link) for page in PAGES for link in links_of(page) if not re.match(r"[a-z]+:", link)]


@pytest.mark.parametrize("page,link", LINKS, ids=[f"{page} -> {link}" for page, link in LINKS])
def test_relative_link_resolves(page, link):
    path, _, anchor = link.partition("#")
    target = (ROOT / page).parent / path if path else ROOT / page
    assert target.exists(), f"{page}: {link}: {target.relative_to(ROOT)} does not exist"
    if anchor and target.suffix == ".md":
        anchors = heading_anchors(target)
        assert anchor in anchors, f"{page}: {link}: no heading #{anchor} in {path or page}; it has {sorted(anchors)}"


def test_the_readme_links_every_docs_page():
    linked = {(ROOT / link.partition("#")[0]).resolve() for link in links_of(README)}
    missing = [page_id(page) for page in DOCS if page.resolve() not in linked]
    assert not missing, f"README.md does not link {missing}"


FILE_PATH = re.compile(r"`((?:t2ray|tests|bench|experiments|cluster|docs)/[\w./-]*)`")


@pytest.mark.parametrize("page", PAGES, ids=page_id)
def test_the_files_a_page_names_exist(page):
    """`t2ray/library.py`, `bench/train_math.py`, … in backticks: a renamed or removed file shows up here."""
    named = {match.split(" ")[0] for match in FILE_PATH.findall(page.read_text())}
    missing = sorted(path for path in named if not (ROOT / path).exists())
    assert not missing, f"{page_id(page)} names files that do not exist: {missing}"


def test_the_lines_the_shipped_yaml_tests_run_are_in_the_readme():
    """tests/test_shipped_yamls.py runs README lines as typed (`readme_line("…")`): moving one out breaks it there."""
    tree = ast.parse((ROOT / "tests" / "test_shipped_yamls.py").read_text())
    lines = [
        node.args[0].value
        for node in ast.walk(tree)
        if isinstance(node, ast.Call) and getattr(node.func, "id", None) == "readme_line"
    ]
    assert lines and not [line for line in lines if line not in README.read_text()]
