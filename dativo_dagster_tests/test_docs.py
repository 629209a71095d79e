"""The docs stay true: the spec reference is generated from the models and current, its example is a valid spec,
the guarantees name tests that exist, links and images resolve, and the CI and logging pages match the code."""

from __future__ import annotations

import copy
import json
import logging
import os
import re
import shutil
import struct
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from dativo_dagster.logging import JsonLineFormatter
from dativo_dagster.spec import parse_spec_document, spec_json_schema
from dativo_dagster.spec_reference import (
    DATABASE_SOURCE_EXAMPLE,
    EXAMPLE,
    KEY_DOCS,
    PARTITIONS_EXAMPLE,
    REGENERATE,
    key_paths,
    render_spec_reference,
)
from dativo_dagster_tests.test_getting_started import NO_INSTALL  # make must not install into this venv

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"
README = ROOT / "README.md"
SCREENSHOTS = ("asset-graph.png", "asset-catalog.png", "asset-page.png", "asset-checks.png")


def test_spec_reference_is_current() -> None:
    path = DOCS / "spec-reference.md"
    current = path.read_text() if path.exists() else ""
    assert current == render_spec_reference(), f"{path} is out of date; regenerate it with: {REGENERATE}"


def test_spec_reference_has_a_row_for_every_key() -> None:
    text = render_spec_reference()
    for path in key_paths():
        section = path.rsplit(".", 1)[0] if "." in path else None
        key = path.rsplit(".", 1)[-1]
        assert re.search(rf"^\| `{re.escape(key)}` \|", text, re.M), path
        if section:
            assert f"## `{section}`" in text, section


def _flat_keys(document: Any, prefix: str = "") -> set[str]:
    keys: set[str] = set()
    if isinstance(document, dict):
        for key, value in document.items():
            keys.add(prefix + key)
            keys |= _flat_keys(value, f"{prefix}{key}.")
    elif isinstance(document, list):
        for item in document:
            keys |= _flat_keys(item, prefix.rstrip(".") + "[].")
    return keys


def test_the_complete_example_is_a_valid_spec_that_sets_every_key() -> None:
    jsonschema = pytest.importorskip("jsonschema")
    document = yaml.safe_load(EXAMPLE)
    model, problems = parse_spec_document(document, "example.yaml")
    assert model is not None, problems
    database = _database_variant(document)
    model, problems = parse_spec_document(database, "database.yaml")
    assert model is not None, problems
    partitioned = _partitioned_variant(document)
    model, problems = parse_spec_document(partitioned, "partitioned.yaml")
    assert model is not None, problems
    # a database source takes exactly one of table / query: the example sets table
    assert _flat_keys(document) | _flat_keys(database) | _flat_keys(partitioned) | {"source.query"} == set(key_paths())
    jsonschema.validate(document, spec_json_schema())
    jsonschema.validate(database, spec_json_schema())
    jsonschema.validate(partitioned, spec_json_schema())


def _database_variant(document: dict[str, Any]) -> dict[str, Any]:
    """The complete example with the database source instead of files (its sensor compares the cursor's max)."""
    return {**document, **yaml.safe_load(DATABASE_SOURCE_EXAMPLE)}


def _partitioned_variant(document: dict[str, Any]) -> dict[str, Any]:
    """The complete example as a time-partitioned asset (no sensor: not supported with partitions)."""
    partitioned = {**document, **yaml.safe_load(PARTITIONS_EXAMPLE)}
    partitioned.pop("sensor")
    return partitioned


def _set(document: dict[str, Any], path: str, value: Any) -> None:
    """Set ``value`` at a key path; in a list, on the first entry that has the key (else the first entry)."""
    head, _, rest = path.partition(".")
    if head.endswith("[]"):
        entries = document[head[:-2]]
        key = rest.split(".", 1)[0]
        target = next((entry for entry in entries if key in entry), entries[0])
        _set(target, rest, value)
    elif rest:
        _set(document.setdefault(head, {}), rest, value)
    else:
        document[head] = value


@pytest.mark.parametrize("path", sorted(KEY_DOCS))
def test_every_documented_example_value_is_valid_for_its_key(path: str) -> None:
    document = yaml.safe_load(EXAMPLE)
    database = _database_variant(document)
    if path.startswith(("partitions", "source.fan_out")):  # fan_out: not with the example's merge
        document = _partitioned_variant(document)
    elif path not in _flat_keys(document):  # a key of the database source
        document = database
    document = copy.deepcopy(document)
    _set(document, path, yaml.safe_load(KEY_DOCS[path][1]))
    if path == "source.query":
        del document["source"]["table"]  # exactly one of table / query
    model, problems = parse_spec_document(document, "example.yaml")
    assert model is not None, (path, problems)


def test_guarantees_name_tests_that_exist() -> None:
    text = (DOCS / "guarantees.md").read_text()
    references = re.findall(r"(dativo_dagster_tests/[\w/]+\.py)(?:::(\w+))?", text)
    assert len(references) > 40
    for file, test in references:
        source = ROOT / file
        assert source.is_file(), f"docs/guarantees.md names {file}, which does not exist"
        if test:
            assert re.search(rf"^\s*def {test}\(", source.read_text(), re.M), f"{file} has no test {test}"


def _slug(heading: str) -> str:
    """GitHub's anchor for a heading."""
    text = heading.strip().lower().replace("`", "")
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


@pytest.mark.parametrize("page", [README, *sorted(DOCS.glob("*.md"))], ids=lambda p: p.name)
def test_links_and_images_resolve(page: Path) -> None:
    text = page.read_text()
    for target in re.findall(r"\]\(([^)\s]+)\)", text):
        if re.match(r"^[a-z]+:", target):
            continue
        file, _, anchor = target.partition("#")
        linked = (page.parent / file).resolve() if file else page
        assert linked.exists(), f"{page.name}: link to {target} does not resolve"
        if anchor and linked.suffix == ".md":
            headings = re.findall(r"^#+ (.+)$", linked.read_text(), re.M)
            assert anchor in {_slug(h) for h in headings}, f"{page.name}: no heading #{anchor} in {linked.name}"


def test_screenshots_are_full_pngs() -> None:
    for name in SCREENSHOTS:
        data = (DOCS / "images" / name).read_bytes()
        assert data.startswith(b"\x89PNG\r\n\x1a\n"), name
        width, height = struct.unpack(">II", data[16:24])
        assert (width, height) == (1600, 1000), (name, width, height)


def test_ci_example_is_a_workflow_using_the_documented_commands() -> None:
    text = (DOCS / "ci.md").read_text()
    blocks = re.findall(r"```yaml\n(.*?)```", text, re.S)
    assert len(blocks) == 1
    workflow = yaml.safe_load(blocks[0])
    steps = [step for job in workflow["jobs"].values() for step in job["steps"]]
    runs = [" ".join(step["run"].split()) for step in steps if "run" in step]
    assert any(".venv/bin/dativo-dagster validate" in run for run in runs)
    assert any(".venv/bin/dativo-dagster materialize" in run and 'case "$code"' in run for run in runs)
    materialize = next(run for run in runs if "dagster asset materialize" in run)
    assert "dagster asset materialize -m dativo_dagster.definitions --select" in materialize
    config = re.search(r"--config-json '([^']+)'", materialize)
    assert config is not None and json.loads(config.group(1)) == {"loggers": {"console": {}}}
    for code in ("**0**", "**1**", "**2**"):
        assert code in text


def test_ui_page_lists_metadata_the_assets_write() -> None:
    text = (DOCS / "ui.md").read_text()
    table = text.split("### Materialization metadata", 1)[1].split("\n## ", 1)[0]
    first_cells = [line.split("|")[1] for line in table.splitlines() if line.startswith("| `")]
    keys = re.findall(r"`([\w/]+)`", "\n".join(first_cells))
    assets_source = (ROOT / "dativo_dagster" / "assets.py").read_text()
    assert len(keys) > 15
    for key in keys:
        assert f'"{key}"' in assets_source, f"docs/ui.md lists {key}, which assets.py does not write"


def test_logging_page_lists_the_keys_of_every_line() -> None:
    text = (DOCS / "logging.md").read_text()
    table = text.split("Every line has:", 1)[1].split("\n\n", 2)[1]
    documented = re.findall(r"^\| `(\w+)` \|", table, re.M)
    record = logging.LogRecord("dagster", logging.INFO, __file__, 1, "hello", None, None)
    assert documented == list(json.loads(JsonLineFormatter().format(record)))


# ---------------------------------------------------------------------------------------------- the README
FENCED = re.compile(r"^```(\w*)\n(.*?)^```", re.M | re.S)
VENV = Path(sys.prefix)
# how each fenced block of the README is checked: python and sql run against the demo warehouse, bash blocks
# name make targets (checked with `make -n`) and are otherwise run, yaml is a spec or run config
CHECKED_LANGUAGES = {"python", "sql", "bash", "yaml", ""}
DUCKDB_SETUP = """
from pathlib import Path
import sys
import duckdb, duckdb_extension_avro, duckdb_extension_iceberg
con = duckdb.connect()
for name, package in (("avro", duckdb_extension_avro), ("iceberg", duckdb_extension_iceberg)):
    con.execute(f"INSTALL '{next(Path(package.__file__).parent.rglob(name + '.duckdb_extension'))}'")
    con.execute(f"LOAD {name}")
print(con.execute(sys.stdin.read()).fetchall())
"""


def _readme_blocks(language: str) -> list[str]:
    return [code for lang, code in FENCED.findall(README.read_text()) if lang == language]


def _clean_env() -> dict[str, str]:
    drop = ("DAGSTER_HOME", "MAKEFLAGS", "MAKELEVEL", "PYTHONWARNINGS")
    return {k: v for k, v in os.environ.items() if not k.startswith("DATIVO_") and k not in drop}


@pytest.fixture(scope="module")
def demo_project(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A copy of the project on which `make run` ran twice (on this test's virtualenv), as a reader finds it."""
    root = tmp_path_factory.mktemp("readme") / "project"
    root.mkdir()
    for folder in ("asset_specs", "data"):
        shutil.copytree(ROOT / folder, root / folder)
    for name in ("Makefile", "pyproject.toml", "dagster.yaml"):
        shutil.copy2(ROOT / name, root / name)
    (root / ".venv").symlink_to(VENV)
    for attempt in range(2):
        run = subprocess.run(
            ["make", "--no-print-directory", "-C", str(root), "run", *NO_INSTALL],
            capture_output=True, text=True, timeout=600, env=_clean_env(), check=False,
        )
        # the README: exit code 1 of the warn-mode asset is reported, and `make run` exits 0; the second run
        # finds nothing new (exit code 0)
        assert run.returncode == 0, run.stdout + run.stderr
        assert ("note: exit code 1" in run.stdout) == (attempt == 0), run.stdout
    return root


def _catalog(project: Path) -> Any:
    from pyiceberg.catalog.sql import SqlCatalog

    dativo = project / ".dativo"
    return SqlCatalog("dativo", uri=f"sqlite:///{dativo / 'catalog.db'}", warehouse=str(dativo / "warehouse"))


def test_readme_snippets_run_against_the_make_run_warehouse(demo_project: Path) -> None:
    """Every fenced Python and SQL block of the README runs, as written, in the project folder after `make run`;
    together they print what pyiceberg itself reads back."""
    languages = {lang for lang, _ in FENCED.findall(README.read_text())}
    assert languages <= CHECKED_LANGUAGES, f"README.md has blocks this test does not check: {languages}"
    outputs = []
    for code in _readme_blocks("python"):
        proc = subprocess.run(
            [str(VENV / "bin" / "python"), "-c", code],
            capture_output=True, text=True, timeout=300, cwd=demo_project, env=_clean_env(), check=False,
        )
        assert proc.returncode == 0, f"README snippet failed:\n{code}\n{proc.stderr}"
        outputs.append(proc.stdout)
    for code in _readme_blocks("sql"):
        proc = subprocess.run(
            [str(VENV / "bin" / "python"), "-c", DUCKDB_SETUP], input=code,
            capture_output=True, text=True, timeout=300, cwd=demo_project, env=_clean_env(), check=False,
        )
        assert proc.returncode == 0, f"README SQL snippet failed:\n{code}\n{proc.stderr}"
        outputs.append(proc.stdout)
    printed = "\n".join(outputs)

    table = _catalog(demo_project).load_table("adventureworks.csv_person")
    head = table.snapshot_by_name("demo_tenant")
    rows = table.scan(snapshot_id=head.snapshot_id).to_arrow()
    assert rows.num_rows == 10
    assert f"{rows.num_rows} rows on branch demo_tenant" in printed, printed
    assert f"metadata: {table.metadata_location}" in printed, printed
    assert f"branch head: {head.snapshot_id}" in printed, printed
    assert "0 rows on main" in printed, printed
    assert table.scan().to_arrow().num_rows == 0
    # the published dimension: main is the branch's head, and its rows are what a plain reader sees
    published = _catalog(demo_project).load_table("adventureworks.dim_currency")
    main, branch = published.snapshot_by_name("main"), published.snapshot_by_name("demo_tenant")
    assert main.snapshot_id == branch.snapshot_id
    assert f"{published.scan().to_arrow().num_rows} rows on main of dim_currency" in printed, printed
    assert published.scan().to_arrow().num_rows == 105
    assert f"main: {main.snapshot_id} branch: {branch.snapshot_id}" in printed, printed
    # DuckDB's count per PersonType equals pyiceberg's
    counted = rows.group_by("PersonType").aggregate([("PersonType", "count")]).to_pylist()
    per_type = sorted((r["PersonType"], r["PersonType_count"]) for r in counted)
    assert repr(per_type) in printed, printed


def test_readme_demo_table_matches_the_tables_after_two_runs(demo_project: Path) -> None:
    """'What the demo did': each asset's table holds the rows the README says, also after a second `make run`
    (incremental specs add nothing, the overwrite spec replaces its rows); the warn asset quarantined 2."""
    text = README.read_text()
    section = text.split("## What the demo did", 1)[1].split("\n## ", 1)[0]
    claimed = {
        table: int(rows)
        for table, rows in re.findall(r"^\| `\w+` \([^)]*\) \| `([\w.]+)` \|.*\| (\d+) \|$", section, re.M)
    }
    specs = {path.stem for path in (ROOT / "asset_specs").rglob("*.yaml")}
    assert len(claimed) == len(specs) == 3, section
    catalog = _catalog(demo_project)
    for identifier, count in claimed.items():
        table = catalog.load_table(identifier)
        assert table.scan(snapshot_id=table.snapshot_by_name("demo_tenant").snapshot_id).to_arrow().num_rows == count
    assert "2 bad rows quarantined in `music.listening_history__rejects`" in section
    rejects = catalog.load_table("music.listening_history__rejects")
    assert rejects.scan(snapshot_id=rejects.snapshot_by_name("demo_tenant").snapshot_id).to_arrow().num_rows == 2


def test_readme_make_commands_are_targets_of_the_makefile(tmp_path: Path) -> None:
    for code in _readme_blocks("bash"):
        for line in code.splitlines():
            command = line.split("#", 1)[0].strip()
            if not command.startswith("make "):
                continue
            target = command.split()[1]
            proc = subprocess.run(["make", "-n", "-C", str(ROOT), target], capture_output=True, text=True,
                                  env=_clean_env(), check=False)
            assert proc.returncode == 0, f"README: `{command}`: {proc.stderr}"


def test_readme_example_spec_is_valid_and_incremental() -> None:
    """Copied as is, the README's example spec must not load every file again at every run."""
    [example] = [code for code in _readme_blocks("yaml") if code.startswith("apiVersion:")]
    model, problems = parse_spec_document(yaml.safe_load(example), "README.md")
    assert model is not None, problems
    assert model.target.write_mode.value == "append"
    assert model.source.incremental is not None


def test_readme_says_nothing_twice() -> None:
    """No sentence of the README's prose repeats another one (same first eight words)."""
    prose = FENCED.sub("", README.read_text())
    sentences = [" ".join(s.split()) for s in re.split(r"(?<=[.!?])\s+", prose)]
    seen: dict[str, str] = {}
    for sentence in sentences:
        words = re.findall(r"[\w`,'-]+", sentence.lower())
        if len(words) < 8:
            continue
        key = " ".join(words[:8])
        assert key not in seen, f"README.md says it twice:\n  {seen[key]}\n  {sentence}"
        seen[key] = sentence
