"""What `pip install dativo-dagster` gives is enough to run it: every module the package imports comes from a
declared dependency or from one of theirs (pandas, an extra, aside; dagster-celery, the `celery` extra, only where
``DATIVO_EXECUTOR=celery`` asks for it)."""

from __future__ import annotations

import ast
import importlib.metadata
import os
import subprocess
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
    # the celery extra: imported by the worker's app and, when DATIVO_EXECUTOR=celery chooses it, by executors.py
    celery_extra = _closure(tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
                            ["celery"])
    assert {d.lower() for d in providers["dagster_celery"]} <= celery_extra
    missing.pop("dagster_celery", None)
    assert missing == {}, f"imported but not installed by pyproject's dependencies: {missing}"
    # pandas stays an extra: ingestion never imports it (test_io_manager runs the CLI without it)
    assert "pandas" not in installed


def test_the_code_location_loads_without_the_celery_extra(tmp_path: Path) -> None:
    """dagster-celery is imported only when DATIVO_EXECUTOR=celery asks for it: a Python that cannot import it loads
    the definitions (in a fresh process, so that no earlier import hides a module-level one)."""
    code = (
        "import sys; sys.modules['dagster_celery'] = None\n"
        "from dativo_dagster.definitions import build_definitions\n"
        "from pathlib import Path\n"
        f"defs = build_definitions(Path({str(ROOT / 'asset_specs')!r}))\n"
        "assert defs.resolve_implicit_global_asset_job_def().executor_def.name == 'dativo_in_process'\n"
        "assert 'dagster_celery' not in {m.split('.')[0] for m in sys.modules if sys.modules[m] is not None}\n"
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith(("DATIVO_", "DAGSTER_"))}
    env["DATIVO_ASSET_SPECS_DIR"] = str(ROOT / "asset_specs")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=False,
                            env=env, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
