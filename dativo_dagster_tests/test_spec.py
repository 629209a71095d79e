"""Spec loading (dativo_dagster.spec): the cases in cases/specs/ as real files, partitioning, YAML safety.

Invalid cases: ``cases/specs/invalid/<case>.yaml`` (or a folder ``<case>/`` for problems across files) is copied
into a fresh ``asset_specs/`` folder; ``<case>.expected`` holds the exact problem lines, one per line, in the
order ``load_specs`` reports them (files in path order, each file's problems in key order, then conflicts
between files).
"""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import pytest
from pyiceberg import transforms as tf

from dativo_dagster.errors import SpecError
from dativo_dagster.spec import (
    MAX_SPEC_BYTES,
    MAX_YAML_DEPTH,
    TRANSFORM_KINDS,
    AssetSpecModel,
    CatalogKind,
    LoadedSpec,
    PartitionField,
    SpecProblems,
    ValidationMode,
    WriteMode,
    load_spec_file,
    load_specs,
)
from dativo_dagster.types import ColumnType, TypeKind
from dativo_dagster_tests.conftest import CASES

SPEC_CASES = CASES / "specs"
VALID = SPEC_CASES / "valid"
INVALID = SPEC_CASES / "invalid"
REPO = Path(__file__).resolve().parents[1]
INVALID_CASES = sorted(p.stem for p in INVALID.glob("*.expected"))
PROBLEM_LINE = re.compile(r"^asset_specs/[\w./-]+\.ya?ml: [\w.\[\]()]+: \S.*$")


@pytest.fixture
def specs_dir(tmp_path: Path) -> Path:
    folder = tmp_path / "asset_specs"
    folder.mkdir()
    return folder


def copy_case(case: str, specs_dir: Path) -> None:
    """Copy an invalid case (a file or a folder) into ``specs_dir``."""
    source = INVALID / case
    if source.is_dir():
        shutil.copytree(source, specs_dir, dirs_exist_ok=True)
        return
    files = [p for p in INVALID.glob(f"{case}.*") if p.suffix != ".expected"]
    assert len(files) == 1, f"case {case}: expected one spec file, found {files}"
    shutil.copy(files[0], specs_dir / files[0].name)


def problems_of(specs_dir: Path) -> list[str]:
    with pytest.raises(SpecError) as info:
        load_specs(specs_dir)
    return info.value.problems


def load_valid(name: str) -> AssetSpecModel:
    """One valid case loaded on its own."""
    path = next(VALID.rglob(name))
    loaded, problems = load_spec_file(path, VALID.parent)
    assert problems == []
    assert loaded is not None
    return loaded.spec


# --- invalid specs: exact messages ---------------------------------------------------------------------------


@pytest.mark.parametrize("case", INVALID_CASES)
def test_invalid_case_reports_exactly_the_expected_problems(case: str, specs_dir: Path) -> None:
    copy_case(case, specs_dir)
    expected = (INVALID / f"{case}.expected").read_text(encoding="utf-8").splitlines()
    assert problems_of(specs_dir) == expected


def test_every_invalid_case_has_an_expected_file_and_back() -> None:
    specs = {p.stem for p in INVALID.iterdir() if p.suffix in (".yaml", ".yml") or p.is_dir()}
    assert specs == set(INVALID_CASES)
    assert len(INVALID_CASES) >= 40


@pytest.mark.parametrize("case", INVALID_CASES)
def test_expected_lines_name_file_key_path_and_message(case: str) -> None:
    for line in (INVALID / f"{case}.expected").read_text(encoding="utf-8").splitlines():
        assert PROBLEM_LINE.match(line), line


def test_several_bad_files_are_all_reported_in_path_order_and_valid_ones_are_not(specs_dir: Path) -> None:
    copy_case("several_bad_files", specs_dir)
    first = problems_of(specs_dir)
    files = [line.split(": ", 1)[0] for line in first]
    assert files == sorted(files)
    assert {*files} == {
        "asset_specs/a_unknown_key.yaml",
        "asset_specs/nested/c_bad_type.yaml",
        "asset_specs/z_syntax.yml",
    }
    assert not any("valid" in line.split(": ", 1)[0] for line in first)
    assert problems_of(specs_dir) == first


def test_file_problems_come_before_conflicts_between_files(specs_dir: Path) -> None:
    copy_case("duplicate_asset_names", specs_dir)
    copy_case("unknown_type", specs_dir)
    problems = problems_of(specs_dir)
    assert problems[0].startswith("asset_specs/unknown_type.yaml: schema[2].type: unknown type 'integr'")
    assert problems[1:] == (INVALID / "duplicate_asset_names.expected").read_text().splitlines()


def test_asset_names_collide_after_lower_casing(specs_dir: Path) -> None:
    text = (VALID / "minimal.yaml").read_text()
    (specs_dir / "a.yaml").write_text(text)
    (specs_dir / "b.yaml").write_text(text.replace("name: minimal", "name: MINIMAL"))
    assert problems_of(specs_dir) == [
        "asset_specs/b.yaml: name: asset name 'minimal' is already used by asset_specs/a.yaml"
    ]


def test_spec_error_message_lists_every_problem(specs_dir: Path) -> None:
    copy_case("missing_required", specs_dir)
    with pytest.raises(SpecError) as info:
        load_specs(specs_dir)
    assert str(info.value).startswith("8 problem(s) in asset specs:\n")
    for problem in info.value.problems:
        assert f"  {problem}" in str(info.value)


# --- YAML safety and file limits ------------------------------------------------------------------------------


def test_python_tag_is_refused_and_nothing_runs(
    specs_dir: Path, tmp_path: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    marker = tmp_path / "executed"
    copy_case("python_tag", specs_dir)
    (specs_dir / "touch.yaml").write_text(f'name: !!python/object/apply:os.system ["touch {marker}"]\n')
    problems = problems_of(specs_dir)
    assert problems[1] == (
        "asset_specs/touch.yaml: (document): line 1, column 7: "
        "YAML tag '!!python/object/apply:os.system' is not allowed in asset specs"
    )
    assert not marker.exists()
    assert "hi" not in capfd.readouterr().out


@pytest.mark.parametrize(
    "text",
    [
        "!!python/name:os.system\n",
        "name: !!python/object/new:subprocess.Popen [[echo, hi]]\n",
        "name: !custom value\n",
    ],
)
def test_every_non_standard_tag_is_refused(text: str, specs_dir: Path) -> None:
    (specs_dir / "tag.yaml").write_text(text)
    [problem] = problems_of(specs_dir)
    pattern = r"asset_specs/tag\.yaml: \(document\): line 1, column \d+: YAML tag '.+' is not allowed in asset specs"
    assert re.fullmatch(pattern, problem)


def test_deep_nesting_is_refused_without_recursing(specs_dir: Path) -> None:
    (specs_dir / "deep.yaml").write_text("[" * 100_000)
    assert problems_of(specs_dir) == [
        f"asset_specs/deep.yaml: (document): line 1, column {MAX_YAML_DEPTH + 1}: "
        f"nesting deeper than {MAX_YAML_DEPTH} levels"
    ]


def test_file_over_one_mib_is_refused_unread(specs_dir: Path) -> None:
    (specs_dir / "big.yaml").write_bytes(b"#" * (MAX_SPEC_BYTES + 1))
    assert problems_of(specs_dir) == [
        "asset_specs/big.yaml: (document): file is 1048577 bytes; asset specs are limited to 1048576 bytes (1 MiB)"
    ]


def test_file_of_exactly_one_mib_loads(specs_dir: Path) -> None:
    text = (VALID / "minimal.yaml").read_text()
    padding = MAX_SPEC_BYTES - len(text.encode()) - 2
    (specs_dir / "padded.yaml").write_text(text + "#" + "x" * padding + "\n")
    assert (specs_dir / "padded.yaml").stat().st_size == MAX_SPEC_BYTES
    assert [item.spec.name for item in load_specs(specs_dir)] == ["minimal"]


def test_anchor_without_alias_is_harmless(specs_dir: Path) -> None:
    text = (VALID / "minimal.yaml").read_text().replace("team: {owner", "team: &team {owner")
    (specs_dir / "anchor.yaml").write_text(text)
    assert load_specs(specs_dir)[0].spec.team.owner == "owner@example.com"


# --- valid specs: parsed values --------------------------------------------------------------------------------


def test_valid_cases_load_together_with_paths_relative_to_the_project(tmp_path: Path) -> None:
    specs_dir = tmp_path / "asset_specs"
    shutil.copytree(VALID, specs_dir)
    loaded = load_specs(specs_dir)
    assert [item.display_path for item in loaded] == [
        "asset_specs/catalog_none.yaml",
        "asset_specs/contract_example.yaml",
        "asset_specs/decimal_types.yaml",
        "asset_specs/minimal.yaml",
        "asset_specs/nested/deeper/nested_spec.yaml",
        "asset_specs/overwrite.yaml",
        "asset_specs/partition_transforms.yaml",
        "asset_specs/primary_key.yaml",
        "asset_specs/timestamp_format.yaml",
        "asset_specs/uppercase_name.yaml",
        "asset_specs/warn_mode.yaml",
        "asset_specs/yml_suffix.yml",
    ]
    for item in loaded:
        assert item.base_dir == tmp_path.resolve()
        assert item.path.is_absolute()
        assert item.path == (specs_dir / item.display_path.split("/", 1)[1]).resolve()


def test_contract_example_loads_with_every_value() -> None:
    spec = load_valid("contract_example.yaml")
    assert (spec.api_version, spec.kind, spec.name, spec.version, spec.status) == (
        "v3.0.2",
        "DataContract",
        "csv_person",
        "1.0",
        "active",
    )
    assert (spec.domain, spec.data_product, spec.tenant) == ("dativo", "adventureworks", "test_tenant")
    assert spec.description is not None
    assert spec.description.purpose == "People from AdventureWorks"
    assert spec.tags == ["adventureworks", "person"]
    assert spec.team.owner == "data-team@company.com"
    assert (spec.compliance.classification, spec.compliance.retention_days) == (["internal"], 90)
    assert [(f.name, str(f.type), f.required, f.classification) for f in spec.fields] == [
        ("BusinessEntityID", "integer", True, None),
        ("PersonType", "string", False, None),
        ("ModifiedDate", "timestamp", True, None),
        ("Rate", "decimal(10,4)", False, None),
        ("Email", "string", False, "PII"),
    ]
    assert (spec.fields[3].type.precision, spec.fields[3].type.scale) == (10, 4)
    assert [(f.path, f.object) for f in spec.source.files] == [("data/adventureworks/Person.csv", "Person")]
    options = spec.source.options
    assert (options.delimiter, options.quote_char, options.encoding, options.header) == (",", '"', "utf-8", True)
    assert options.null_values == ["", "NULL", "null", "None"]
    assert spec.source.incremental is not None
    assert (spec.source.incremental.strategy.value, spec.source.incremental.lookback_days) == ("file_modified_time", 0)
    target = spec.target
    assert (target.catalog, target.warehouse, target.branch) == (CatalogKind.ICEBERG, "s3://lake", "test_tenant")
    assert target.partition_fields == [PartitionField(transform="day", source="_ingested_at")]
    assert (target.parquet_target_size_mb, target.write_mode) == (128, WriteMode.APPEND)
    assert spec.schema_validation_mode is ValidationMode.STRICT
    retry = spec.retry_config
    assert (retry.max_retries, retry.retry_delay_seconds, retry.backoff) == (3, 5, "exponential")
    assert retry.retryable_errors == []
    assert spec.schedule is not None
    assert (spec.schedule.cron, spec.schedule.timezone) == ("0 * * * *", "UTC")
    assert spec.sensor is not None
    assert spec.sensor.minimum_interval_seconds == 60
    assert spec.branch == "test_tenant"
    assert spec.table_identifier == ("dativo", "csv_person")
    assert spec.rejects_identifier == ("dativo", "csv_person__rejects")
    assert spec.table_path == "dativo/adventureworks/csv_person"


def test_minimal_spec_takes_the_documented_defaults() -> None:
    spec = load_valid("minimal.yaml")
    assert (spec.api_version, spec.kind, spec.status, spec.description, spec.tags) == (
        "v3.0.2",
        "DataContract",
        None,
        None,
        [],
    )
    assert (spec.compliance.classification, spec.compliance.retention_days) == ([], None)
    assert spec.source.type == "csv"
    options = spec.source.options
    assert (options.delimiter, options.quote_char, options.encoding, options.header) == (",", '"', "utf-8", True)
    assert options.null_values == ["", "NULL", "null", "None"]
    assert spec.source.incremental is None
    target = spec.target
    assert (target.catalog, target.warehouse, target.branch) == (CatalogKind.ICEBERG, None, None)
    assert target.partitioning == []
    assert (target.parquet_target_size_mb, target.write_mode) == (128, WriteMode.APPEND)
    assert spec.branch == "acme"
    assert spec.schema_validation_mode is ValidationMode.STRICT
    assert (spec.retry_config.max_retries, spec.retry_config.retry_delay_seconds, spec.retry_config.backoff) == (
        3,
        5,
        "exponential",
    )
    assert (spec.schedule, spec.sensor) == (None, None)
    assert [(f.name, str(f.type), f.required, f.format) for f in spec.fields] == [("id", "integer", False, None)]


def test_every_partition_transform() -> None:
    spec = load_valid("partition_transforms.yaml")
    assert [(p.transform, p.source, p.width, p.name, str(p)) for p in spec.target.partition_fields] == [
        ("identity", "Region", None, "region", "Region"),
        ("year", "event_date", None, "event_date_year", "year(event_date)"),
        ("month", "event_time", None, "event_time_month", "month(event_time)"),
        ("day", "logged_at", None, "logged_at_day", "day(logged_at)"),
        ("hour", "event_time", None, "event_time_hour", "hour(event_time)"),
        ("bucket", "user_id", 16, "user_id_bucket_16", "bucket(16, user_id)"),
        ("truncate", "sku", 4, "sku_truncate_4", "truncate(4, sku)"),
        ("bucket", "amount", 8, "amount_bucket_8", "bucket(8, amount)"),
        ("day", "_ingested_at", None, "ingest_date", "ingest_date"),
    ]


def test_partition_transforms_are_accepted_by_the_iceberg_partition_spec() -> None:
    from dativo_dagster.table_schema import iceberg_schema, partition_spec  # noqa: PLC0415

    spec = load_valid("partition_transforms.yaml")
    built = partition_spec(spec, iceberg_schema(spec.fields))
    assert [f.name for f in built.fields] == [p.name for p in spec.target.partition_fields]


def test_decimal_types_and_type_aliases() -> None:
    spec = load_valid("decimal_types.yaml")
    assert [(f.name, f.type.kind, f.type.precision, f.type.scale, str(f.type)) for f in spec.fields] == [
        ("smallest", TypeKind.DECIMAL, 1, 0, "decimal(1,0)"),
        ("largest", TypeKind.DECIMAL, 38, 38, "decimal(38,38)"),
        ("spaced", TypeKind.DECIMAL, 10, 4, "decimal(10,4)"),
        ("money", TypeKind.DECIMAL, 18, 2, "decimal(18,2)"),
        ("as_long", TypeKind.INTEGER, 0, 0, "integer"),
        ("as_double", TypeKind.FLOAT, 0, 0, "float"),
        ("as_float", TypeKind.FLOAT, 0, 0, "float"),
        ("as_bool", TypeKind.BOOLEAN, 0, 0, "boolean"),
    ]
    assert spec.fields[3].required is True


def test_format_on_date_and_timestamp_fields() -> None:
    spec = load_valid("timestamp_format.yaml")
    assert [(f.name, str(f.type), f.format) for f in spec.fields] == [
        ("day", "date", "%d/%m/%Y"),
        ("seen_at", "timestamp", "%d.%m.%Y %H:%M"),
        ("logged_at", "timestamptz", "%Y-%m-%dT%H:%M:%S%z"),
    ]


def test_catalog_none() -> None:
    spec = load_valid("catalog_none.yaml")
    assert (spec.target.catalog, spec.target.warehouse, spec.target.parquet_target_size_mb) == (
        CatalogKind.NONE,
        "s3://lake/plain",
        0.5,
    )
    assert spec.version == "2.1"
    assert [(f.path, f.object) for f in spec.source.files] == [("s3://landing/cases/plain/*.csv", "plain")]


def test_overwrite_with_branch_schedule_and_csv_options() -> None:
    spec = load_valid("overwrite.yaml")
    assert spec.target.write_mode is WriteMode.OVERWRITE
    assert (spec.target.branch, spec.branch) == ("staging", "staging")
    options = spec.source.options
    assert (options.delimiter, options.encoding, options.header) == ("|", "utf-16", False)
    assert spec.schedule is not None
    assert (spec.schedule.cron, spec.schedule.timezone) == ("@daily", "Europe/Berlin")


def test_publish_defaults_to_off_and_is_read_from_target(tmp_path: Path) -> None:
    assert load_valid("minimal.yaml").target.publish is False
    text = (VALID / "minimal.yaml").read_text(encoding="utf-8") + "target: {publish: true}\n"
    (tmp_path / "asset_specs").mkdir()
    (tmp_path / "asset_specs" / "published.yaml").write_text(text, encoding="utf-8")
    loaded, problems = load_spec_file(tmp_path / "asset_specs" / "published.yaml", tmp_path)
    assert problems == []
    assert loaded is not None
    assert (loaded.spec.target.publish, loaded.spec.branch) == (True, "acme")


def test_publish_from_a_tenant_named_main_is_a_spec_error(tmp_path: Path) -> None:
    text = (VALID / "minimal.yaml").read_text(encoding="utf-8").replace("tenant: acme", "tenant: Main")
    (tmp_path / "asset_specs").mkdir()
    (tmp_path / "asset_specs" / "published.yaml").write_text(text + "target: {publish: true}\n", encoding="utf-8")
    loaded, problems = load_spec_file(tmp_path / "asset_specs" / "published.yaml", tmp_path)
    assert loaded is None
    assert problems == [
        "asset_specs/published.yaml: target.publish: the branch is main itself, so there is nothing to publish;"
        " commit to another branch (target.branch, default: the tenant) or remove publish"
    ]


def test_warn_mode_with_sensor_and_incremental() -> None:
    spec = load_valid("warn_mode.yaml")
    assert spec.schema_validation_mode is ValidationMode.WARN
    options = spec.source.options
    assert (options.delimiter, options.quote_char, options.encoding) == ("\t", "'", "iso8859-1")
    assert options.null_values == ["", "n/a"]
    assert spec.source.incremental is not None
    assert spec.source.incremental.lookback_days == 7
    assert [(f.path, f.object) for f in spec.source.files] == [
        ("data/events_a.csv", None),
        ("data/events_b.csv", "events_b"),
    ]
    assert spec.sensor is not None
    assert spec.sensor.minimum_interval_seconds == 30
    assert (spec.retry_config.max_retries, spec.retry_config.backoff, spec.retry_config.retryable_errors) == (
        0,
        "none",
        ["CommitError"],
    )
    assert spec.compliance.regulations == ["GDPR"]
    assert (spec.team.owner, spec.team.name) == ("owner@example.com", "Events team")
    assert spec.fields[1].description == "free text"


def test_names_are_lower_cased_and_column_names_keep_their_case() -> None:
    spec = load_valid("uppercase_name.yaml")
    assert (spec.name, spec.domain, spec.data_product, spec.tenant) == (
        "upper_case_name",
        "cases",
        "mixed_product",
        "acme",
    )
    assert spec.table_identifier == ("cases", "upper_case_name")
    assert [f.name for f in spec.fields] == ["CustomerID"]


def test_yml_suffix_and_numeric_version() -> None:
    spec = load_valid("yml_suffix.yml")
    assert (spec.name, spec.version) == ("yml_suffix", "3")


def test_display_path_uses_the_specs_folder_name(tmp_path: Path) -> None:
    specs_dir = tmp_path / "project" / "contracts"
    (specs_dir / "team_a").mkdir(parents=True)
    shutil.copy(VALID / "minimal.yaml", specs_dir / "team_a" / "minimal.yaml")
    (specs_dir / "notes.md").write_text("not a spec")
    (specs_dir / "data.csv").write_text("id\n1\n")
    [item] = load_specs(specs_dir)
    assert isinstance(item, LoadedSpec)
    assert item.display_path == "contracts/team_a/minimal.yaml"
    assert item.base_dir == (tmp_path / "project").resolve()


def test_a_folder_named_like_a_spec_is_searched_not_read(specs_dir: Path) -> None:
    (specs_dir / "odd.yaml").mkdir()
    shutil.copy(VALID / "minimal.yaml", specs_dir / "odd.yaml" / "inner.yml")
    assert [item.display_path for item in load_specs(specs_dir)] == ["asset_specs/odd.yaml/inner.yml"]


def test_empty_specs_folder_loads_nothing(specs_dir: Path) -> None:
    assert load_specs(specs_dir) == []


def test_missing_specs_folder(tmp_path: Path) -> None:
    missing = tmp_path / "nope"
    assert problems_of(missing) == [f"{missing.resolve()}: asset specs folder does not exist"]


def test_specs_folder_that_is_a_file(tmp_path: Path) -> None:
    not_a_folder = tmp_path / "asset_specs"
    not_a_folder.write_text("")
    assert problems_of(not_a_folder) == [f"{not_a_folder.resolve()}: expected a folder of asset specs; this is a file"]


def test_repo_demo_specs_load_and_their_relative_sources_exist() -> None:
    loaded = load_specs(REPO / "asset_specs")
    assert sorted(item.spec.name for item in loaded) == ["csv_person", "dim_currency", "listening_history"]
    for item in loaded:
        assert item.base_dir == REPO
        for source in item.spec.source.files:
            assert list(item.base_dir.glob(source.path)), f"{item.display_path}: {source.path} matches no file"


# --- partitioning entries --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "transform", "source", "width", "name"),
    [
        ("ingest_date", "day", "_ingested_at", None, "ingest_date"),
        (" ingest_date ", "day", "_ingested_at", None, "ingest_date"),
        ("Region", "identity", "Region", None, "region"),
        ("identity(Region)", "identity", "Region", None, "region"),
        ("day( ts )", "day", "ts", None, "ts_day"),
        ("month(ts)", "month", "ts", None, "ts_month"),
        ("year(ts)", "year", "ts", None, "ts_year"),
        ("hour(ts)", "hour", "ts", None, "ts_hour"),
        ("hour(_ingested_at)", "hour", "_ingested_at", None, "_ingested_at_hour"),
        ("bucket(16, user_id)", "bucket", "user_id", 16, "user_id_bucket_16"),
        ("bucket(1,user_id)", "bucket", "user_id", 1, "user_id_bucket_1"),
        ("truncate(4, sku)", "truncate", "sku", 4, "sku_truncate_4"),
    ],
)
def test_partition_field_parse(text: str, transform: str, source: str, width: int | None, name: str) -> None:
    part = PartitionField.parse(text)
    assert (part.transform, part.source, part.width, part.name) == (transform, source, width, name)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("bucket(x, id)", "'bucket(x, id)': expected bucket(n, field) with a positive whole number n"),
        ("bucket(0, id)", "'bucket(0, id)': expected bucket(n, field) with a positive whole number n"),
        ("bucket(-2, id)", "'bucket(-2, id)': expected bucket(n, field) with a positive whole number n"),
        ("bucket(4)", "'bucket(4)': expected bucket(n, field) with a positive whole number n"),
        ("bucket(4, )", "'bucket(4, )': expected bucket(n, field) with a positive whole number n"),
        ("truncate(id, 4)", "'truncate(id, 4)': expected truncate(n, field) with a positive whole number n"),
        ("day()", "'day()': expected day(field)"),
        ("month(a, b)", "'month(a, b)': expected month(field)"),
        ("week(ts)", "'week(ts)': unknown transform 'week'; expected a field name, day(f), month(f), year(f)"),
        ("day(ts", "cannot read partition 'day(ts'; expected a field name, day(f)"),
        ("a, b", "cannot read partition 'a, b'; expected a field name"),
        ("", "cannot read partition ''; expected a field name"),
    ],
)
def test_partition_field_parse_refuses(text: str, message: str) -> None:
    with pytest.raises(ValueError, match=f"^{re.escape(message)}"):
        PartitionField.parse(text)


_ICEBERG_TRANSFORMS = {
    "identity": tf.IdentityTransform(),
    "year": tf.YearTransform(),
    "month": tf.MonthTransform(),
    "day": tf.DayTransform(),
    "hour": tf.HourTransform(),
    "bucket": tf.BucketTransform(4),
    "truncate": tf.TruncateTransform(4),
}


@pytest.mark.parametrize("transform", sorted(_ICEBERG_TRANSFORMS))
@pytest.mark.parametrize("kind", list(TypeKind))
def test_transform_kinds_agree_with_iceberg(transform: str, kind: TypeKind) -> None:
    iceberg_type = ColumnType(kind, 10, 2).iceberg_type
    assert (kind in TRANSFORM_KINDS[transform]) == _ICEBERG_TRANSFORMS[transform].can_transform(iceberg_type)


# --- the model used directly ------------------------------------------------------------------------------------


def test_model_validation_outside_the_loader_names_every_problem() -> None:
    document = {
        "name": "direct",
        "version": "1",
        "domain": "d",
        "dataProduct": "p",
        "tenant": "t",
        "team": {"owner": "o"},
        "schema": [{"name": "a", "type": "string"}, {"name": "A", "type": "string"}],
        "source": {"files": [{"path": "x.csv"}]},
        "target": {"partitioning": ["zone"]},
    }
    both = r"schema\[1\]\.name: duplicate column 'A'.*target\.partitioning\[0\]: unknown field 'zone'"
    with pytest.raises(ValueError, match=both):
        AssetSpecModel.model_validate(document)


def test_spec_problems_keeps_its_pairs() -> None:
    error = SpecProblems([("a.b", "first"), ("", "second")])
    assert error.problems == [("a.b", "first"), ("", "second")]
    assert str(error) == "a.b: first; second"


def _postgres_spec_problems(source: dict, **overrides: object) -> list[str]:
    from dativo_dagster.spec import parse_spec_document  # noqa: PLC0415
    from dativo_dagster_tests.conftest import base_spec  # noqa: PLC0415

    model, problems = parse_spec_document(base_spec("orders", source=source, **overrides), "asset_specs/orders.yaml")
    assert (model is None) == bool(problems)
    return problems


@pytest.mark.parametrize(
    ("source", "expected"),
    [
        ({"connection": {"url_env": "DB"}}, "asset_specs/orders.yaml: source.table: expected exactly one of table or query"),
        (
            {"connection": {"url_env": "DB"}, "table": "t", "query": "SELECT 1"},
            "asset_specs/orders.yaml: source.query: expected exactly one of table or query",
        ),
        (
            {"connection": {"url_env": "DB"}, "table": "t", "incremental": {"strategy": "cursor"}},
            "asset_specs/orders.yaml: source.incremental.cursor_field: required key is missing",
        ),
        ({"connection": {"url_env": "postgresql://u:pw@h/db"}, "table": "t"}, "source.connection.url_env: expected the NAME"),
        ({"connection": {"url_env": "DB"}, "table": "t; DROP TABLE t"}, "source.table: expected a table or view name"),
        ({"connection": {"url_env": "DB"}, "tabel": "t"}, "source.tabel: unknown key (did you mean 'table'?)"),
        ({"table": "t"}, "asset_specs/orders.yaml: source.connection: required key is missing"),
    ],
)
def test_postgres_source_spec_problems_name_the_key(source: dict, expected: str) -> None:
    problems = _postgres_spec_problems({"type": "postgres", **source})
    assert any(p.startswith(expected) or expected in p for p in problems), problems
    assert not any("pw@" in p for p in problems)  # a URL written where the variable's name belongs is not echoed


def test_unknown_source_type_and_valid_postgres_spec() -> None:
    assert _postgres_spec_problems({"type": "mysqlx", "table": "t"}) == [
        "asset_specs/orders.yaml: source.type: expected one of 'csv', 'postgres', 'mysql'; got 'mysqlx'"
    ]
    assert _postgres_spec_problems({"type": "postgres", "connection": {"url_env": "DB"}, "table": '"Sales"."Orders"'}) == []
    problems = _postgres_spec_problems(
        {"type": "postgres", "connection": {"url_env": "DB"}, "table": "t"}, sensor={"minimum_interval_seconds": 60}
    )
    assert len(problems) == 1 and problems[0].startswith(
        "asset_specs/orders.yaml: sensor: a postgres source's sensor compares the source's highest cursor value"
    ), problems


CURSOR_SCHEMA = [
    {"name": "id", "type": "integer", "required": True, "primary_key": True},
    {"name": "updated_at", "type": "timestamptz", "required": True},
    {"name": "day", "type": "date", "required": True},
    {"name": "note", "type": "string", "required": True},
    {"name": "loose", "type": "timestamp"},
]


@pytest.mark.parametrize("kind", ["postgres", "mysql"])
@pytest.mark.parametrize(
    ("incremental", "expected"),
    [
        ({"strategy": "cursor", "cursor_field": "updated_at", "lookback_seconds": 300}, None),
        ({"strategy": "cursor", "cursor_field": "id"}, None),
        ({"strategy": "cursor", "cursor_field": "day"}, None),
        ({"strategy": "cursor", "cursor_field": "nope"},
         "source.incremental.cursor_field: 'nope' is not a field of schema; expected one of id, updated_at"),
        ({"strategy": "cursor", "cursor_field": "note"},
         "source.incremental.cursor_field: 'note' is string; a cursor field must be integer/long, date, timestamp"),
        ({"strategy": "cursor", "cursor_field": "loose"}, "source.incremental.cursor_field: 'loose' must be required"),
        ({"strategy": "cursor", "cursor_field": "id", "lookback_seconds": 60},
         "source.incremental.lookback_seconds: only time stamp cursors have a lookback; 'id' is integer"),
        ({"strategy": "cursor", "cursor_field": "updated_at", "lookback_seconds": -1},
         "source.incremental.lookback_seconds: "),
        ({"strategy": "file_modified_time"},
         "source.incremental.strategy: 'file_modified_time' is for csv sources only; database sources use 'cursor'"),
        ({"strategy": "cursor", "cursor_field": "id", "lookback_days": 1}, "source.incremental.lookback_days: unknown key"),
    ],
)
def test_cursor_incremental_spec_checks_name_the_key(kind: str, incremental: dict, expected: str | None) -> None:
    source = {"type": kind, "connection": {"url_env": "DB"}, "table": "t", "incremental": incremental}
    problems = _postgres_spec_problems(source, schema=CURSOR_SCHEMA, sensor={"minimum_interval_seconds": 30})
    if expected is None:
        assert problems == []
    else:
        assert any(p.startswith(f"asset_specs/orders.yaml: {expected}") for p in problems), problems


def test_cursor_strategy_on_a_csv_source_is_refused() -> None:
    problems = _postgres_spec_problems(
        {"type": "csv", "files": [{"path": "data/x.csv"}], "incremental": {"strategy": "cursor"}}
    )
    assert any(
        p.startswith("asset_specs/orders.yaml: source.incremental.strategy: 'cursor' is for database sources"
                     " (postgres, mysql) only; csv sources use 'file_modified_time'") for p in problems
    ), problems


def test_missing_url_variable_is_a_terminal_error_naming_spec_and_variable(tmp_path: Path, monkeypatch) -> None:
    import yaml  # noqa: PLC0415

    from dativo_dagster.errors import (
        DatabaseSourceError,  # noqa: PLC0415
        is_transient,  # noqa: PLC0415
    )
    from dativo_dagster.sources import source_for  # noqa: PLC0415
    from dativo_dagster.spec import load_spec_file  # noqa: PLC0415
    from dativo_dagster.storage import S3Settings  # noqa: PLC0415
    from dativo_dagster_tests.conftest import base_spec  # noqa: PLC0415

    path = tmp_path / "asset_specs" / "orders.yaml"
    path.parent.mkdir()
    source = {"type": "postgres", "connection": {"url_env": "DATIVO_TEST_ORDERS_URL"}, "table": "sales.orders"}
    path.write_text(yaml.safe_dump(base_spec("orders", source=source)))
    loaded, problems = load_spec_file(path, tmp_path)
    assert loaded is not None, problems
    monkeypatch.delenv("DATIVO_TEST_ORDERS_URL", raising=False)
    with pytest.raises(DatabaseSourceError) as caught:
        source_for(loaded, S3Settings()).list_units()
    assert str(caught.value).startswith(
        "asset_specs/orders.yaml: source.connection.url_env: environment variable DATIVO_TEST_ORDERS_URL is not set"
    )
    assert not is_transient(caught.value)
    monkeypatch.setenv("DATIVO_TEST_ORDERS_URL", "postgresql://app:Secret-77@db.example:6543/shop")
    assert source_for(loaded, S3Settings()).list_units()[0].uri == "postgresql://db.example:6543/shop/sales.orders"


@pytest.mark.parametrize(
    ("table", "problem"),
    [
        ("orders", None),
        ("shop.orders", None),
        ("`my shop`.`order``s`", None),  # back-quoted parts, a back quote doubled
        ('"Sales"."Orders"', "source.table: expected a table or view name such as orders or sales.orders (parts may be back-quoted)"),
        ("orders; DROP TABLE orders", "source.table: expected a table or view name"),
    ],
)
def test_mysql_source_spec_tables(table: str, problem: str | None) -> None:
    problems = _postgres_spec_problems({"type": "mysql", "connection": {"url_env": "DB"}, "table": table})
    assert (problems == []) if problem is None else any(problem in p for p in problems), problems


def test_mysql_source_uri_has_no_credentials_and_the_url_must_be_mysql(tmp_path: Path, monkeypatch) -> None:
    import yaml  # noqa: PLC0415

    from dativo_dagster.errors import DatabaseSourceError  # noqa: PLC0415
    from dativo_dagster.sources import source_for  # noqa: PLC0415
    from dativo_dagster.spec import load_spec_file  # noqa: PLC0415
    from dativo_dagster.storage import S3Settings  # noqa: PLC0415
    from dativo_dagster_tests.conftest import base_spec  # noqa: PLC0415

    path = tmp_path / "asset_specs" / "orders.yaml"
    path.parent.mkdir()
    source = {"type": "mysql", "connection": {"url_env": "DATIVO_TEST_ORDERS_URL"}, "query": "SELECT 1 AS id"}
    path.write_text(yaml.safe_dump(base_spec("orders", source=source)))
    loaded, problems = load_spec_file(path, tmp_path)
    assert loaded is not None, problems
    monkeypatch.setenv("DATIVO_TEST_ORDERS_URL", "mysql://app:Secret-77@db.example:3307/shop")
    assert source_for(loaded, S3Settings()).list_units()[0].uri == "mysql://db.example:3307/shop/query"
    monkeypatch.setenv("DATIVO_TEST_ORDERS_URL", "mysql://app:Secret-77@db.example/shop")
    assert source_for(loaded, S3Settings()).list_units()[0].uri == "mysql://db.example:3306/shop/query"
    monkeypatch.setenv("DATIVO_TEST_ORDERS_URL", "postgresql://app:Secret-77@db.example/shop")
    with pytest.raises(DatabaseSourceError) as caught:
        source_for(loaded, S3Settings()).list_units()
    assert str(caught.value) == (
        "asset_specs/orders.yaml: source.connection.url_env: environment variable DATIVO_TEST_ORDERS_URL does not"
        " hold a mysql:// URL"
    )


def test_primary_key_is_the_marked_fields_in_schema_order() -> None:
    assert load_valid("primary_key.yaml").primary_key == ["region", "id"]
    assert load_valid("minimal.yaml").primary_key == []
