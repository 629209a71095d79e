"""What `pip install dativo-dagster` gives is enough to run it: every module the package imports comes from a
declared dependency or from one of theirs (pandas, an extra, aside)."""

from __future__ import annotations

import ast
import importlib.metadata
import sys
import tomllib
from pathlib import Path

from packaging.requirements import Requirement

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "dativo_dagster"


def _closure(requirements: list[str]) -> set[str]:
    """Distribution names (normalised) of the requirements and, recursively, of what they require."""
    seen: set[str] = set()
    todo = [Requirement(r) for r in requirements]
    while todo:
        req = todo.pop()
        name = req.name.lower().replace("_", "-")
        key = f"{name}[{','.join(sorted(req.extras))}]"
        if key in seen:
            continue
        seen.add(key)
        for dep in importlib.metadata.requires(req.name) or []:
            sub = Requirement(dep)
            envs = [{"extra": extra} for extra in req.extras] or [{"extra": ""}]
            if sub.marker is None or any(sub.marker.evaluate(env) for env in envs):
                todo.append(sub)
    return {key.split("[")[0] for key in seen}


def _imported_top_levels() -> set[str]:
    names: set[str] = set()
    for path in PACKAGE.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names |= {alias.name.split(".")[0] for alias in node.names}
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names.add(node.module.split(".")[0])
    return names - set(sys.stdlib_module_names) - {"__future__", "dativo_dagster"}


def test_every_imported_module_comes_with_the_declared_dependencies() -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    installed = _closure(project["dependencies"])
    providers = importlib.metadata.packages_distributions()
    missing = {
        module: providers.get(module)
        for module in _imported_top_levels()
        if not {d.lower().replace("_", "-") for d in providers.get(module, [])} & installed
    }
    assert missing == {}, f"imported but not installed by pyproject's dependencies: {missing}"
    # pandas stays an extra: ingestion never imports it (test_io_manager runs the CLI without it)
    assert "pandas" not in installed
