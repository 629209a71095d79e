"""``dativo-dagster validate`` and ``dagster definitions validate`` on good and broken spec folders."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from dativo_dagster.cli import EXIT_FAILED, EXIT_OK, main
from dativo_dagster_tests.conftest import CASES

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
CONSOLE_SCRIPT = BIN / "dativo-dagster"
INVALID = CASES / "specs" / "invalid"
VALID = CASES / "specs" / "valid"


def run(args: list[str], cwd: Path, **env: str) -> subprocess.CompletedProcess[str]:
    """Run a command with the test's (cleaned) environment plus ``env``."""
    return subprocess.run(
        args, cwd=cwd, env={**os.environ, **env}, capture_output=True, text=True, timeout=300, check=False
    )


@pytest.fixture
def broken_specs(tmp_path: Path) -> Path:
    """A project whose asset_specs/ holds three bad specs and two good ones."""
    specs_dir = tmp_path / "project" / "asset_specs"
    shutil.copytree(INVALID / "several_bad_files", specs_dir)
    return specs_dir


@pytest.fixture
def good_specs(tmp_path: Path) -> Path:
    specs_dir = tmp_path / "project" / "asset_specs"
    shutil.copytree(VALID, specs_dir)
    return specs_dir


def expected_problems(case: str) -> list[str]:
    return (INVALID / f"{case}.expected").read_text(encoding="utf-8").splitlines()


def test_console_script_exits_0_and_lists_valid_specs(good_specs: Path, tmp_path: Path) -> None:
    result = run([str(CONSOLE_SCRIPT), "validate", "--specs", str(good_specs)], cwd=tmp_path)
    assert result.returncode == EXIT_OK, result.stderr
    assert result.stderr == ""
    lines = result.stdout.splitlines()
    assert lines[0] == "asset_specs/catalog_none.yaml: ok (catalog_none -> cases.catalog_none)"
    assert "asset_specs/contract_example.yaml: ok (csv_person -> dativo.csv_person)" in lines
    assert "asset_specs/nested/deeper/nested_spec.yaml: ok (nested_spec -> cases.nested_spec)" in lines
    specs = sorted(p for p in good_specs.rglob("*") if p.suffix in (".yaml", ".yml"))
    assert len(specs) >= 12
    assert lines[-1] == f"{len(specs)} asset spec(s) valid in {good_specs.resolve()}"
    assert len(lines) == len(specs) + 1


def test_console_script_exits_2_with_every_problem_on_stderr(broken_specs: Path, tmp_path: Path) -> None:
    result = run([str(CONSOLE_SCRIPT), "validate", "--specs", str(broken_specs)], cwd=tmp_path)
    assert result.returncode == EXIT_FAILED
    problems = expected_problems("several_bad_files")
    assert result.stderr.splitlines() == [*problems, f"{len(problems)} problem(s) found in {broken_specs.resolve()}"]
    assert result.stdout == ""


def test_module_entry_point_reads_the_specs_folder_from_the_environment(broken_specs: Path, tmp_path: Path) -> None:
    result = run(
        [sys.executable, "-m", "dativo_dagster.cli", "validate"], cwd=tmp_path, DATIVO_ASSET_SPECS_DIR=str(broken_specs)
    )
    assert result.returncode == EXIT_FAILED
    assert result.stderr.splitlines()[:-1] == expected_problems("several_bad_files")


def test_default_is_the_projects_own_asset_specs_whatever_the_working_directory(tmp_path: Path) -> None:
    result = run([str(CONSOLE_SCRIPT), "validate"], cwd=tmp_path)
    assert result.returncode == EXIT_OK, result.stderr
    assert result.stdout.splitlines() == [
        "asset_specs/adventureworks/dim_currency.yaml: ok (dim_currency -> adventureworks.dim_currency)",
        "asset_specs/adventureworks/person.yaml: ok (csv_person -> adventureworks.csv_person)",
        "asset_specs/music/listening_history.yaml: ok (listening_history -> music.listening_history)",
        f"3 asset spec(s) valid in {REPO / 'asset_specs'}",
    ]


def test_relative_specs_folder_resolves_against_the_working_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    project = tmp_path / "project"
    shutil.copytree(INVALID / "duplicate_asset_names", project / "contracts")
    monkeypatch.chdir(project)
    assert main(["validate", "--specs", "contracts"]) == EXIT_FAILED
    err = capsys.readouterr().err.splitlines()
    assert err == [
        "contracts/shop/orders.yaml: name: asset name 'orders' is already used by contracts/sales/orders.yaml",
        f"1 problem(s) found in {(project / 'contracts').resolve()}",
    ]


def test_missing_specs_folder_exits_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    missing = tmp_path / "nowhere"
    assert main(["validate", "--specs", str(missing)]) == EXIT_FAILED
    assert capsys.readouterr().err.splitlines()[0] == f"{missing.resolve()}: asset specs folder does not exist"


def test_empty_specs_folder_exits_0_with_a_note(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    empty = tmp_path / "asset_specs"
    empty.mkdir()
    assert main(["validate", "--specs", str(empty)]) == EXIT_OK
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err == f"no asset specs (*.yaml, *.yml) found in {empty.resolve()}\n"


def test_dagster_definitions_validate_fails_on_a_broken_spec(broken_specs: Path, tmp_path: Path) -> None:
    """Dagster's own CLI refuses the code location and shows the problem lines (takes a few seconds)."""
    env = {k: v for k, v in os.environ.items() if k != "DAGSTER_HOME"}
    result = subprocess.run(
        [str(BIN / "dagster"), "definitions", "validate", "-m", "dativo_dagster.definitions"],
        cwd=tmp_path,
        env={**env, "DATIVO_ASSET_SPECS_DIR": str(broken_specs)},
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert result.returncode != 0
    output = result.stdout + result.stderr
    for problem in expected_problems("several_bad_files"):
        assert problem in output
    assert "b_valid.yaml" not in output
