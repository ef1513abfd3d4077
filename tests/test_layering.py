"""The layering is a checked contract (pyproject.toml, import-linter): the real tree keeps it, no module of t2ray is
in an import cycle, and a deliberate violation in a copy of the package breaks it."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import grimp
import networkx as nx
import pytest

ROOT = Path(__file__).resolve().parents[1]
LINT_IMPORTS = Path(sys.executable).with_name("lint-imports")


def lint_imports(package_parent: Path) -> subprocess.CompletedProcess:
    """lint-imports with the project's contracts, on the t2ray package found under `package_parent`."""
    env = {**os.environ, "PYTHONPATH": str(package_parent)}
    return subprocess.run(
        [str(LINT_IMPORTS), "--config", str(ROOT / "pyproject.toml"), "--no-cache"],
        cwd=package_parent,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_the_tree_keeps_every_contract():
    run = lint_imports(ROOT)
    assert run.returncode == 0, run.stdout + run.stderr
    assert "0 broken" in run.stdout


def test_no_import_cycle_in_t2ray():
    graph = grimp.build_graph("t2ray")
    edges = nx.DiGraph(
        (module, imported)
        for module in graph.modules
        for imported in graph.find_modules_directly_imported_by(module)
        if imported.startswith("t2ray")
    )
    cycles = [sorted(c) for c in nx.strongly_connected_components(edges) if len(c) > 1]
    assert cycles == []


@pytest.mark.parametrize(
    ("module", "line", "contract"),
    [
        ("experts.py", "from t2ray.lora.layer import read_lora_expert", "Layers point one way"),
        ("svf/layer.py", "import ray", "import no Ray"),
        ("tasks/base.py", "import ray.train", "import no Ray"),
    ],
)
def test_a_deliberate_violation_breaks_the_contract(tmp_path, module, line, contract):
    shutil.copytree(ROOT / "t2ray", tmp_path / "t2ray", ignore=shutil.ignore_patterns("__pycache__", "data"))
    path = tmp_path / "t2ray" / module
    path.write_text(path.read_text() + f"\n{line}  # a deliberate violation\n")
    run = lint_imports(tmp_path)
    assert run.returncode != 0
    assert f"{contract}" in run.stdout and "BROKEN" in run.stdout, run.stdout
