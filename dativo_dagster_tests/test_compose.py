"""docker-compose.yml, deploy/ and the Dockerfile agree with the settings table (CONTRACT section 6) and with each
other. No Docker engine runs here: the files are parsed and cross-checked."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import pytest
import yaml

from dativo_dagster.markers import committed_files_sql

ROOT = Path(__file__).resolve().parent.parent
DAGSTER_STORAGE_VARS = {
    "DAGSTER_POSTGRES_HOST", "DAGSTER_POSTGRES_PORT", "DAGSTER_POSTGRES_USER", "DAGSTER_POSTGRES_PASSWORD",
    "DAGSTER_POSTGRES_DB",
}
# Settings that a deployment may leave unset (CONTRACT 6: "if the catalog needs one").
OPTIONAL_SETTINGS = {"DATIVO_CATALOG_CREDENTIAL"}
DEFAULT = re.compile(r"^\$\{(?P<name>[A-Z0-9_]+):-(?P<default>[^}]*)\}$")


def resolve(value: Any) -> str:
    """A compose value with ``${VAR:-default}`` replaced by its default (what runs without a .env file)."""
    text = str(value)
    return re.sub(r"\$\{[A-Z0-9_]+:-([^}]*)\}", r"\1", text)


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    return yaml.safe_load((ROOT / "docker-compose.yml").read_text())


@pytest.fixture(scope="module")
def services(compose: dict[str, Any]) -> dict[str, Any]:
    return compose["services"]


@pytest.fixture(scope="module")
def instance() -> dict[str, Any]:
    return yaml.safe_load((ROOT / "deploy" / "dagster.docker.yaml").read_text())


@pytest.fixture(scope="module")
def dockerfile() -> str:
    return (ROOT / "Dockerfile").read_text()


def settings_table() -> dict[str, str]:
    """The variables of the settings table in the contract, with their meaning."""
    text = (ROOT / "docs" / "CONTRACT.md").read_text()
    section = text[text.index("## 6."):]
    rows = re.findall(r"^\| (`[^|]+`) \| ([^|]+) \|", section, flags=re.MULTILINE)
    names: dict[str, str] = {}
    for cell, meaning in rows:
        for name in re.findall(r"`([A-Z0-9_]+)`", cell):
            names[name] = meaning.strip()
    return names


def env(service: dict[str, Any]) -> dict[str, str]:
    return {k: resolve(v) for k, v in (service.get("environment") or {}).items()}


def dockerfile_env(dockerfile: str) -> dict[str, str]:
    block = re.search(r"^ENV (.+?)(?=\n\S)", dockerfile, flags=re.MULTILINE | re.DOTALL)
    assert block
    return dict(re.findall(r"([A-Z0-9_]+)=(\S+)", block.group(1)))


def test_the_expected_services_are_there(services: dict[str, Any]) -> None:
    assert set(services) == {"minio", "minio-init", "iceberg-rest", "postgres", "code", "webserver", "daemon"}
    for name in ("code", "webserver", "daemon"):
        assert services[name]["image"] == "dativo-dagster:local" and services[name]["build"]["context"] == "."


def test_the_code_location_gets_every_setting_of_the_contract(services: dict[str, Any], dockerfile: str) -> None:
    table = settings_table()
    assert {"DATIVO_WAREHOUSE", "DATIVO_CATALOG_URI", "DATIVO_S3_ENDPOINT", "AWS_SECRET_ACCESS_KEY"} <= set(table)
    code = env(services["code"])
    image = dockerfile_env(dockerfile)
    missing = [name for name in table if name not in code and name not in image and name not in OPTIONAL_SETTINGS]
    assert not missing, f"settings of CONTRACT 6 that the code service does not get: {missing}"
    # and nothing it gets is unknown to the code
    resources = (ROOT / "dativo_dagster" / "resources.py").read_text() + (
        ROOT / "dativo_dagster" / "definitions.py"
    ).read_text()
    for name in code:
        if name.startswith(("DATIVO_", "AWS_")):
            assert f'"{name}"' in resources, f"{name} is set for the code service but never read"
    # the specs folder the image points at is the one it copies
    assert image["DATIVO_ASSET_SPECS_DIR"] == "/opt/dagster/app/asset_specs"
    assert re.search(r"^WORKDIR /opt/dagster/app$", dockerfile, flags=re.MULTILINE)
    assert re.search(r"^COPY asset_specs \./asset_specs$", dockerfile, flags=re.MULTILINE)
    # only the code service runs asset code: the others do not get the deployment's secrets
    for name in ("webserver", "daemon"):
        assert not {k for k in env(services[name]) if k.startswith(("AWS_", "DATIVO_"))}


def test_object_storage_settings_point_at_minio_and_its_bucket(services: dict[str, Any]) -> None:
    code, minio = env(services["code"]), services["minio"]
    endpoint = urlparse(code["DATIVO_S3_ENDPOINT"])
    assert endpoint.scheme == "http" and endpoint.hostname == "minio"
    assert f":{endpoint.port}" in minio["command"]  # MinIO serves S3 on that port
    assert any(p.endswith(f":{endpoint.port}:{endpoint.port}") for p in minio["ports"])
    # the same credentials open MinIO and are used by the code, the bucket creator and the REST catalog
    minio_env = minio["environment"]
    assert minio_env["MINIO_ROOT_USER"] == services["code"]["environment"]["AWS_ACCESS_KEY_ID"]
    assert minio_env["MINIO_ROOT_PASSWORD"] == services["code"]["environment"]["AWS_SECRET_ACCESS_KEY"]
    for name in ("minio-init", "iceberg-rest"):
        for key in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_REGION"):
            assert services[name]["environment"][key] == services["code"]["environment"][key]
    # the warehouse bucket is the one minio-init creates
    bucket = urlparse(code["DATIVO_WAREHOUSE"]).netloc
    init = " ".join(services["minio-init"]["command"])
    assert f"mc mb --ignore-existing local/{bucket}" in init
    assert f"http://minio:{endpoint.port}" in init
    assert services["minio-init"]["depends_on"]["minio"]["condition"] == "service_healthy"


def test_the_rest_catalog_serves_the_same_warehouse_on_the_same_store(services: dict[str, Any]) -> None:
    code, rest = env(services["code"]), env(services["iceberg-rest"])
    catalog = urlparse(code["DATIVO_CATALOG_URI"])
    assert catalog.scheme == "http" and catalog.hostname == "iceberg-rest"
    assert any(p.endswith(f":{catalog.port}:{catalog.port}") for p in services["iceberg-rest"]["ports"])
    assert f"localhost:{catalog.port}/v1/config" in " ".join(services["iceberg-rest"]["healthcheck"]["test"])
    assert rest["CATALOG_WAREHOUSE"] == code["DATIVO_WAREHOUSE"]
    assert rest["CATALOG_S3_ENDPOINT"] == code["DATIVO_S3_ENDPOINT"]
    assert rest["CATALOG_S3_PATH__STYLE__ACCESS"] == "true"  # MinIO, like our clients: path-style
    assert rest["CATALOG_IO__IMPL"] == "org.apache.iceberg.aws.s3.S3FileIO"
    assert rest["CATALOG_URI"].startswith("jdbc:sqlite:/home/iceberg/")  # on the iceberg-catalog volume
    assert "iceberg-catalog:/home/iceberg" in services["iceberg-rest"]["volumes"]
    assert services["iceberg-rest"]["depends_on"]["minio-init"]["condition"] == "service_completed_successfully"
    assert services["code"]["depends_on"]["iceberg-rest"]["condition"] == "service_healthy"


def test_postgres_serves_dagster_storage_and_the_optional_sql_catalog(
    services: dict[str, Any], instance: dict[str, Any], compose: dict[str, Any]
) -> None:
    storage = instance["storage"]["postgres"]["postgres_db"]
    used = {v["env"] for v in storage.values() if isinstance(v, dict)}
    assert used == DAGSTER_STORAGE_VARS
    assert storage["scheme"] == "postgresql+psycopg2"
    postgres = env(services["postgres"])
    for name in ("code", "webserver", "daemon"):
        service_env = env(services[name])
        assert set(service_env) >= DAGSTER_STORAGE_VARS, name
        assert service_env["DAGSTER_POSTGRES_HOST"] == "postgres"
        assert service_env["DAGSTER_POSTGRES_PORT"] == "5432"
        assert service_env["DAGSTER_POSTGRES_USER"] == postgres["POSTGRES_USER"]
        assert service_env["DAGSTER_POSTGRES_PASSWORD"] == postgres["POSTGRES_PASSWORD"]
        assert service_env["DAGSTER_POSTGRES_DB"] == postgres["POSTGRES_DB"]
        assert services[name]["depends_on"]["postgres"]["condition"] == "service_healthy"
    # the SQL catalog database that the header comment and docs/deployment.md tell users to point at
    init = services["postgres"]["volumes"]
    assert "./deploy/postgres-init:/docker-entrypoint-initdb.d:ro" in init
    sql = "\n".join(p.read_text() for p in sorted((ROOT / "deploy" / "postgres-init").glob("*.sql")))
    assert "CREATE DATABASE iceberg_catalog;" in sql
    header = (ROOT / "docker-compose.yml").read_text()
    documented = re.search(r"DATIVO_CATALOG_URI=(postgresql\+psycopg2://\S+)", header)
    assert documented
    uri = urlparse(documented.group(1))
    assert (uri.hostname, uri.port, uri.path) == ("postgres", 5432, "/iceberg_catalog")
    assert (uri.username, uri.password) == (postgres["POSTGRES_USER"], postgres["POSTGRES_PASSWORD"])


def test_instance_queues_runs_and_disables_telemetry(instance: dict[str, Any]) -> None:
    assert instance["run_coordinator"]["class"] == "QueuedRunCoordinator"
    assert instance["run_launcher"]["class"] == "DefaultRunLauncher"
    assert instance["telemetry"]["enabled"] is False


def test_webserver_and_daemon_reach_the_code_server(services: dict[str, Any], dockerfile: str) -> None:
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["dagster"]
    command = services["code"]["command"]
    assert command[:3] == ["dagster", "code-server", "start"]
    port = int(command[command.index("-p") + 1])
    assert command[command.index("-h") + 1] == "0.0.0.0"  # noqa: S104 - inside its container, published nowhere
    assert command[command.index("-m") + 1] == pyproject["module_name"]
    assert str(port) in " ".join(services["code"]["healthcheck"]["test"])
    for workspace_file, host in (("workspace.docker.yaml", "code"), ("workspace.local.yaml", "127.0.0.1")):
        workspace = yaml.safe_load((ROOT / "deploy" / workspace_file).read_text())
        [entry] = workspace["load_from"]
        assert entry["grpc_server"] == {"host": host, "port": port, "location_name": pyproject["code_location_name"]}
    image_workspace = re.search(r"^COPY deploy/workspace\.docker\.yaml (\S+)$", dockerfile, flags=re.MULTILINE)
    assert image_workspace
    for name in ("webserver", "daemon"):
        cmd = services[name]["command"]
        assert cmd[cmd.index("-w") + 1] == image_workspace.group(1)
        assert services[name]["depends_on"]["code"]["condition"] == "service_healthy"
    assert re.search(r"^COPY deploy/dagster\.docker\.yaml \$\{DAGSTER_HOME\}/dagster\.yaml$", dockerfile, re.MULTILINE)
    webserver = services["webserver"]["command"]
    assert f"127.0.0.1:{webserver[webserver.index('-p') + 1]}:" in " ".join(services["webserver"]["ports"])


def test_ports_are_published_on_loopback_only(services: dict[str, Any]) -> None:
    for name, service in services.items():
        for port in service.get("ports", []):
            assert str(port).startswith("127.0.0.1:"), f"{name} publishes {port} on every interface"


def test_volumes_are_declared_used_and_prepared_in_the_image(compose: dict[str, Any], dockerfile: str) -> None:
    declared = set(compose["volumes"])
    used: dict[str, set[str]] = {}
    for service in compose["services"].values():
        for mount in service.get("volumes", []):
            source, target = str(mount).split(":")[:2]
            if not source.startswith("."):
                used.setdefault(source, set()).add(target)
    assert set(used) == declared
    # volumes shared by the Dagster services are mounted at folders the image creates for its user
    image_env = dockerfile_env(dockerfile)
    prepared = re.search(r"mkdir -p ([^\n&]+)", dockerfile)
    assert prepared
    folders = {f.replace("${DAGSTER_HOME}", image_env["DAGSTER_HOME"]) for f in prepared.group(1).split()}
    for volume in ("staging", "compute-logs"):
        assert used[volume] <= folders, volume
    assert env(compose["services"]["code"])["DATIVO_STAGING_DIR"] in used["staging"]
    assert used["compute-logs"] == {f"{image_env['DAGSTER_HOME']}/storage"}  # Dagster's default compute logs


def test_dependency_healthchecks_exist(services: dict[str, Any]) -> None:
    for name, service in services.items():
        for dependency, rule in (service.get("depends_on") or {}).items():
            assert dependency in services, f"{name} depends on unknown {dependency}"
            if rule["condition"] == "service_healthy":
                assert "healthcheck" in services[dependency], f"{dependency} has no healthcheck"


def test_the_image_installs_dagster_postgres_of_the_pinned_release(dockerfile: str) -> None:
    pins = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    dagster = next(p for p in pins if p.startswith("dagster=="))
    dagster_aws = next(p for p in pins if p.startswith("dagster-aws=="))
    # dagster 1.x.y ships with its libraries 0.(x+16).y: the same release as dagster-aws
    assert f"dagster-postgres=={dagster_aws.split('==')[1]}" in dockerfile
    assert dagster.split("==")[1].split(".")[2] == dagster_aws.split("==")[1].split(".")[2]


def test_docs_explain_both_ways_and_hold_the_marker_query() -> None:
    docs = (ROOT / "docs" / "deployment.md").read_text()
    assert "docker compose up --build" in docs
    assert "weed mini" in docs and "pg_ctl" in docs and "deploy/workspace.local.yaml" in docs
    assert committed_files_sql("s3://lake/warehouse/sales/crm/orders") in docs
    for name in settings_table():
        assert f"`{name}`" in docs, f"{name} is not documented in docs/deployment.md"
