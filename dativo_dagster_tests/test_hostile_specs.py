"""Hostile asset specs: refused fast with one precise line per problem, and nothing in a spec ever runs.

What ``test_spec.py`` and ``cases/specs/invalid`` already hold (a basic alias bomb, ``!!python/...`` tags as
values, 1 MiB + 1 byte, deep nesting, unknown partition field, minute 61, duplicate names and tables) is not
repeated here. This file adds: a full billion-laughs document and the merge key, a 5 MB document and a node
count bound (a 1 MiB flow list used to take a minute to load), tags in keys, verbatim tags and a document tag,
names that are paths, look-alikes or too long, owners Dagster would refuse, partitions and crons in every
wrong form, more duplicate names, and ``retryable_errors`` patterns that do not compile or could backtrack for
ages.

Cases with fixed text live in ``cases/hostile/specs/<case>.yaml`` with the exact problem lines in
``<case>.expected``.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from dativo_dagster.definitions import build_definitions
from dativo_dagster.errors import SpecError, is_transient
from dativo_dagster.spec import MAX_SPEC_BYTES, MAX_YAML_NODES, load_specs
from dativo_dagster_tests.conftest import CASES, base_spec

SPECS = CASES / "hostile" / "specs"
CASE_NAMES = sorted(p.stem for p in SPECS.glob("*.expected"))
FAST_SECONDS = 2.0


@pytest.fixture
def specs_dir(tmp_path: Path) -> Path:
    folder = tmp_path / "asset_specs"
    folder.mkdir()
    return folder


def problems_of(specs_dir: Path) -> list[str]:
    with pytest.raises(SpecError) as info:
        load_specs(specs_dir)
    return info.value.problems


def timed_problems(specs_dir: Path) -> tuple[list[str], float]:
    started = time.perf_counter()
    problems = problems_of(specs_dir)
    return problems, time.perf_counter() - started


def write(specs_dir: Path, name: str, spec: dict | str) -> Path:
    path = specs_dir / name
    path.write_text(spec if isinstance(spec, str) else yaml.safe_dump(spec, sort_keys=False))
    return path


@pytest.mark.parametrize("case", CASE_NAMES)
def test_case_reports_exactly_the_expected_problems(case: str, specs_dir: Path) -> None:
    shutil.copy(SPECS / f"{case}.yaml", specs_dir / f"{case}.yaml")
    expected = (SPECS / f"{case}.expected").read_text(encoding="utf-8").splitlines()
    problems, seconds = timed_problems(specs_dir)
    assert problems == expected
    assert seconds < FAST_SECONDS


def test_every_case_file_has_its_expected_lines() -> None:
    assert {p.stem for p in SPECS.glob("*.yaml")} == set(CASE_NAMES)
    assert len(CASE_NAMES) >= 9


# --- size and expansion -----------------------------------------------------------------------------------------


def test_billion_laughs_is_refused_at_the_first_alias_without_expanding(specs_dir: Path) -> None:
    """Nine levels of nine aliases would be 9**9 (387 million) strings; the file itself is under 1 KiB."""
    shutil.copy(SPECS / "billion_laughs.yaml", specs_dir)
    assert (specs_dir / "billion_laughs.yaml").stat().st_size < 1024
    problems, seconds = timed_problems(specs_dir)
    assert problems == [
        "asset_specs/billion_laughs.yaml: (document): line 4, column 10: YAML aliases (*name) are not allowed in asset specs"
    ]
    assert seconds < 0.5


def test_a_5_mb_document_is_refused_unread(specs_dir: Path) -> None:
    entry = "  - {name: column_%d, type: string, description: a long description of this column}\n"
    body = "".join(entry % i for i in range(60_000))
    text = yaml.safe_dump(base_spec(), sort_keys=False).replace("schema:\n", "schema:\n" + body, 1)
    path = write(specs_dir, "huge.yaml", text)
    size = path.stat().st_size
    assert size > 5 * 10**6
    problems, seconds = timed_problems(specs_dir)
    assert problems == [
        f"asset_specs/huge.yaml: (document): file is {size} bytes; asset specs are limited to {MAX_SPEC_BYTES} bytes (1 MiB)"
    ]
    assert seconds < FAST_SECONDS


@pytest.mark.parametrize(
    ("text", "where"),
    [
        ("tags: [" + ",".join(["x"] * 400_000) + "]\n", "line 1, column 40002"),
        ("".join(f"k{i}: {i}\n" for i in range(75_000)), "line 10000, column 8"),
    ],
    ids=["flow-list", "block-mapping"],
)
def test_a_document_under_1_mib_with_too_many_nodes_is_refused_in_seconds(
    text: str, where: str, specs_dir: Path
) -> None:
    """Pure-Python YAML needs about 0.1 ms a node: these took 1-1.5 minutes to load before the node bound."""
    write(specs_dir, "nodes.yaml", text)
    assert len(text.encode()) <= MAX_SPEC_BYTES
    problems, seconds = timed_problems(specs_dir)
    assert problems == [
        f"asset_specs/nodes.yaml: (document): {where}: more than {MAX_YAML_NODES} YAML nodes (values, lists and"
        f" mappings); asset specs are limited to {MAX_YAML_NODES}"
    ]
    assert seconds < 5, seconds  # measured: 1.1-1.3 s on the 2-core CI machine


def test_a_wide_but_honest_schema_still_loads(specs_dir: Path) -> None:
    """1,500 fully described columns stay under the node bound."""
    columns = [
        {"name": f"column_{i}", "type": "string", "required": False, "description": f"column {i}", "classification": "internal"}
        for i in range(1500)
    ]
    write(specs_dir, "wide.yaml", base_spec(schema=columns))
    started = time.perf_counter()
    [loaded] = load_specs(specs_dir)
    assert len(loaded.spec.fields) == 1500
    assert time.perf_counter() - started < 5


# --- nothing in a spec ever runs --------------------------------------------------------------------------------


def _tagged_specs(marker: Path) -> dict[str, str]:
    command = f"touch {marker}"
    minimal = (CASES / "specs" / "valid" / "minimal.yaml").read_text()
    return {
        "in_key.yaml": minimal + f'? !!python/object/apply:os.system ["{command}"]\n: value\n',
        "nested.yaml": minimal.replace("{name: id, type: integer}", f'{{name: id, type: !!python/object/apply:os.system ["{command}"]}}'),
        "verbatim.yaml": minimal.replace('version: "1"', f'version: !<tag:yaml.org,2002:python/object/apply:os.system> ["{command}"]'),
        "document.yaml": f'--- !!python/object/apply:subprocess.check_call [["touch", "{marker}"]]\n',
        "module.yaml": minimal.replace("domain: cases", "domain: !!python/module:os"),
        "new.yaml": minimal.replace("tenant: acme", f'tenant: !!python/object/new:subprocess.Popen [["touch", "{marker}"]]'),
    }


def test_tags_anywhere_never_construct_anything(specs_dir: Path, tmp_path: Path) -> None:
    marker = tmp_path / "executed"
    for name, text in _tagged_specs(marker).items():
        write(specs_dir, name, text)
    assert problems_of(specs_dir) == [
        f"asset_specs/{file}: (document): line {line}, column {column}: YAML tag '{tag}' is not allowed in asset specs"
        for file, line, column, tag in [
            ("document.yaml", 1, 5, "!!python/object/apply:subprocess.check_call"),
            ("in_key.yaml", 13, 3, "!!python/object/apply:os.system"),
            ("module.yaml", 4, 9, "!!python/module:os"),
            ("nested.yaml", 9, 22, "!!python/object/apply:os.system"),
            ("new.yaml", 6, 9, "!!python/object/new:subprocess.Popen"),
            ("verbatim.yaml", 3, 10, "!!python/object/apply:os.system"),  # written !<tag:yaml.org,2002:python/...>
        ]
    ]
    assert not marker.exists()


def test_building_definitions_and_the_cli_never_run_a_spec(specs_dir: Path, tmp_path: Path) -> None:
    """The whole load path (``build_definitions``, ``dativo-dagster validate``) refuses the same specs, and a
    source path or cron that looks like a shell command is only ever text."""
    marker = tmp_path / "executed"
    for name, text in _tagged_specs(marker).items():
        write(specs_dir, name, text)
    shell = base_spec("shell", source={"type": "csv", "files": [{"path": f"$(touch {marker})"}, {"path": f"`touch {marker}`"}]})
    write(specs_dir, "shell.yaml", shell)
    with pytest.raises(SpecError):
        build_definitions(specs_dir)
    result = subprocess.run(
        [str(Path(sys.executable).parent / "dativo-dagster"), "validate", "--specs", str(specs_dir)],
        capture_output=True, text=True, timeout=300, check=False,
    )
    assert result.returncode == 2
    assert "asset_specs/verbatim.yaml" in result.stdout + result.stderr
    assert not marker.exists()

    for path in specs_dir.glob("*.yaml"):
        if path.name != "shell.yaml":
            path.unlink()
    (specs_dir.parent / "data").mkdir()
    from dativo_dagster_tests.conftest import Project  # noqa: PLC0415

    run = Project(specs_dir.parent).materialize()
    assert not run.success
    [failure] = run.get_step_failure_events()
    assert "source file not found" in failure.event_specific_data.user_failure_data.description
    assert not marker.exists()


# --- partitions, crons, names -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "cron",
    ["", "* * * *", "* * * * * *", "@reboot", "0 25 * * *", "*/0 * * * *", "0 0 31 2 *", "0 0 * * 8", "; rm -rf /"],
)
def test_invalid_cron_in_every_form(cron: str, specs_dir: Path) -> None:
    write(specs_dir, "cron.yaml", base_spec(schedule={"cron": cron}))
    assert problems_of(specs_dir) == [
        f"asset_specs/cron.yaml: schedule.cron: invalid cron expression {cron!r}; expected five fields such as"
        " '0 * * * *' or @hourly/@daily"
    ]


def test_cron_that_is_not_text(specs_dir: Path) -> None:
    write(specs_dir, "cron.yaml", base_spec(schedule={"cron": 5}))
    assert problems_of(specs_dir) == ["asset_specs/cron.yaml: schedule.cron: expected text; got 5 (quote it in YAML)"]


def test_three_specs_with_one_name_and_copies_of_one_file(specs_dir: Path) -> None:
    for folder in ("a", "b", "c"):
        (specs_dir / folder).mkdir()
        write(specs_dir / folder, "people.yaml", base_spec("people", domain=f"domain_{folder}"))
    write(specs_dir, "copy_1.yml", base_spec("PEOPLE"))
    assert problems_of(specs_dir) == [
        "asset_specs/b/people.yaml: name: asset name 'people' is already used by asset_specs/a/people.yaml",
        "asset_specs/c/people.yaml: name: asset name 'people' is already used by asset_specs/a/people.yaml",
        "asset_specs/copy_1.yml: name: asset name 'people' is already used by asset_specs/a/people.yaml",
    ]


def test_a_table_named_like_another_specs_quarantine_table(specs_dir: Path) -> None:
    """``x__rejects`` is taken in x's domain only; in another domain it is just a name."""
    write(specs_dir, "people.yaml", base_spec("people"))
    write(specs_dir, "rejects.yaml", base_spec("people__rejects"))
    assert problems_of(specs_dir) == [
        "asset_specs/rejects.yaml: name: table testdomain.people__rejects is already written by asset_specs/people.yaml"
    ]
    write(specs_dir, "rejects.yaml", base_spec("people__rejects", domain="elsewhere"))
    assert [s.spec.name for s in load_specs(specs_dir)] == ["people", "people__rejects"]


def test_one_bad_spec_hides_nothing_of_the_others(specs_dir: Path) -> None:
    """Every hostile case at once: each file's own lines, in path order, none lost."""
    for case in CASE_NAMES:
        shutil.copy(SPECS / f"{case}.yaml", specs_dir / f"{case}.yaml")
    expected = [line for case in CASE_NAMES for line in (SPECS / f"{case}.expected").read_text().splitlines()]
    problems, seconds = timed_problems(specs_dir)
    assert problems == expected
    assert seconds < FAST_SECONDS


# --- retry_config.retryable_errors -----------------------------------------------------------------------------------


def test_retryable_errors_that_do_not_compile_or_can_backtrack_forever_are_refused(specs_dir: Path) -> None:
    patterns = [
        "ReadTimeout",  # a class name
        "(?i)temporarily unavailable",
        "connection (reset|refused)",
        r"HTTP 50[0-4] \d{1,3}.*retry",
        "quota [exceeded",  # does not compile
        "(a+)+$",  # exponential: nested repeat
        "(x|xx)*y",  # exponential: alternatives that overlap, repeated
        ".*.*.*timeout",  # polynomial: three long repeats
        "",
        "x" * 201,
    ]
    write(specs_dir, "retry.yaml", base_spec(retry_config={"retryable_errors": patterns}))
    problems, seconds = timed_problems(specs_dir)
    key = "asset_specs/retry.yaml: retry_config.retryable_errors"
    assert problems == [
        f"{key}[4]: invalid regular expression 'quota [exceeded': unterminated character set at position 6",
        f"{key}[5]: '(a+)+$' has a repeat inside a repeated group, which can take exponential time on some texts"
        " (catastrophic backtracking); write it without repeating a group that repeats or alternates inside",
        f"{key}[6]: '(x|xx)*y' has an alternation inside a repeated group, which can take exponential time on some"
        " texts (catastrophic backtracking); write it without repeating a group that repeats or alternates inside",
        f"{key}[7]: '.*.*.*timeout' has 3 long repeats (*, +, {{n,}}, {{n,m}}); at most 2 are allowed, as each can"
        " multiply the matching time by the length of the error text",
        f"{key}[8]: expected non-empty text",
        f"{key}[9]: expected at most 200 characters; got 201",
    ]
    assert seconds < FAST_SECONDS


def test_accepted_retryable_errors_match_long_error_texts_quickly(specs_dir: Path) -> None:
    """The worst patterns a spec may hold, against a long hostile message: matched in its first 1,000 characters."""
    patterns = [".*.*x", r"(\w+\s?)x", r"(?:ab)+c", "a{1,20}a{1,20}b"]
    write(specs_dir, "retry.yaml", base_spec(retry_config={"retryable_errors": patterns}))
    [loaded] = load_specs(specs_dir)
    message = RuntimeError("a" * 1_000_000 + "x")
    started = time.perf_counter()
    assert is_transient(message, loaded.spec.retry_config.retryable_errors) is False  # the x is past the cut
    assert is_transient(RuntimeError("abababc"), loaded.spec.retry_config.retryable_errors) is True
    assert time.perf_counter() - started < FAST_SECONDS
