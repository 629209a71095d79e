"""Both databases through the Dagster UI: ``dagster dev`` over a postgres spec and a mysql spec (their URLs in the
variables the specs name, each with a password), each asset's run launched with the UI's own ``launchRun`` mutation,
the rows read back with pyiceberg, and the pages opened in headless Chromium: the materialization's metadata, the
checks, and a run whose spec names a variable that is not set failing with that name on its run page. No page and
no GraphQL answer holds a password.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from dataclasses import dataclass

import pytest

from dativo_dagster.spec import load_specs
from dativo_dagster_tests.conftest import DEPLOYMENT_VARS, Project, base_spec, branch_rows

from .browser import HeadlessChromium
from .dagster_dev import DagsterDev
from .servers import MariaDBServer, PostgresCluster
from .test_database_dagster_cli import EXPECTED, SCHEMA
from .test_ui_browser import (
    DemoUI,
    assert_asset_checks_tab_shows_every_check_with_its_result,
    assert_asset_page_shows_owner_row_count_and_run_metadata,
    shipped_dagster_home,
)

DB = "ui_shop"
READER = "ui_reader"
# the secrets the tests look for: one per server, neither may show in a page or a GraphQL answer
PASSWORDS = {"postgres": "Pg-ui-4fT8kq-never-shown", "mysql": "My-ui-9Zr2wd-never-shown"}  # noqa: S105
URL_ENVS = {"postgres": "DATIVO_TEST_UI_PG_ORDERS_URL", "mysql": "DATIVO_TEST_UI_MY_ORDERS_URL"}
ASSETS = {"postgres": "pg_orders_ui", "mysql": "my_orders_ui"}
# a spec whose variable name is misspelt (ORDER for ORDERS): the variable is not set where the run executes
MISNAMED, MISNAMED_ENV = "my_orders_misnamed", "DATIVO_TEST_UI_MY_ORDER_URL"

# what the UI's pages and the GraphQL answers below carry: every event of a run with its message, error and
# metadata, and each asset's definition and latest materialization
METADATA = """
  label description
  ... on TextMetadataEntry { text }
  ... on UrlMetadataEntry { url }
  ... on PathMetadataEntry { path }
  ... on JsonMetadataEntry { jsonString }
  ... on MarkdownMetadataEntry { mdStr }
  ... on IntMetadataEntry { intRepr }
"""
RUN_EVENTS = f"""
query RunEvents($id: ID!) {{
  runOrError(runId: $id) {{
    __typename
    ... on Run {{
      status runConfigYaml tags {{ key value }}
      eventConnection {{
        events {{
          __typename
          ... on MessageEvent {{ message }}
          ... on ExecutionStepFailureEvent {{ error {{ message stack cause {{ message stack }} }} }}
          ... on RunFailureEvent {{ pipelineFailureError: error {{ message stack }} }}
          ... on MaterializationEvent {{ metadataEntries {{ {METADATA} }} }}
          ... on ObservationEvent {{ metadataEntries {{ {METADATA} }} }}
          ... on AssetCheckEvaluationEvent {{ evaluation {{ metadataEntries {{ {METADATA} }} }} }}
        }}
      }}
    }}
  }}
}}
"""
ASSET_NODE = f"""
query AssetNode($path: [String!]!) {{
  assetNodeOrError(assetKey: {{path: $path}}) {{
    __typename
    ... on AssetNode {{
      description opNames kinds
      owners {{ ... on UserAssetOwner {{ email }} ... on TeamAssetOwner {{ team }} }}
      tags {{ key value }}
      metadataEntries {{ {METADATA} }}
      assetMaterializations(limit: 5) {{ runId metadataEntries {{ {METADATA} }} }}
    }}
  }}
}}
"""


@dataclass
class DatabaseUI:
    ui: DemoUI
    urls: dict[str, str]  # by kind, with the password
    runs: dict[str, str]  # asset name -> run id
    statuses: dict[str, str]  # asset name -> the run's final status
    sources: dict[str, str]  # by kind: the source as `_source_file` shows it, without credentials


def _load_orders(postgres: PostgresCluster, mariadb: MariaDBServer) -> None:
    """The orders of ``test_database_dagster_cli.EXPECTED`` in both servers, readable by ``ui_reader`` with its
    password only (PostgreSQL asks it for a scram-sha-256 password on loopback)."""
    postgres.create_database(DB)
    hba = postgres.data_dir / "pg_hba.conf"
    hba.write_text(f"host all {READER} 127.0.0.1/32 scram-sha-256\n" + hba.read_text())
    conn = postgres.connect(DB)
    conn.autocommit = True
    with conn.cursor() as cur:
        cur.execute("SELECT pg_reload_conf()")
        cur.execute(f"CREATE ROLE {READER} LOGIN PASSWORD '{PASSWORDS['postgres']}'")
        cur.execute("CREATE TABLE orders (id integer PRIMARY KEY, amount numeric(12,2) NOT NULL, paid boolean,"
                    " placed_at timestamptz NOT NULL, note text)")
        cur.execute("INSERT INTO orders VALUES (1, 12.50, true, '2024-03-01 12:00:00+02', 'first'),"
                    " (2, 0.99, false, '2024-03-02 23:30:15+00', NULL),"
                    " (3, 1000, NULL, '2024-03-03 00:00:00Z', 'Grüße')")
        cur.execute(f"GRANT SELECT ON orders TO {READER}")
    conn.close()
    mariadb.execute([
        f"CREATE DATABASE {DB}",
        f"CREATE USER '{READER}'@'%' IDENTIFIED BY '{PASSWORDS['mysql']}'",
        f"GRANT SELECT ON {DB}.* TO '{READER}'@'%'",
    ])
    mariadb.execute([
        "SET time_zone = '+00:00'",  # the TIMESTAMP literals are UTC
        "CREATE TABLE orders (id INT PRIMARY KEY, amount DECIMAL(12,2) NOT NULL, paid TINYINT(1),"
        " placed_at TIMESTAMP NOT NULL, note VARCHAR(20)) CHARACTER SET utf8mb4",
        "INSERT INTO orders VALUES (1, 12.50, 1, '2024-03-01 10:00:00', 'first'),"
        " (2, 0.99, 0, '2024-03-02 23:30:15', NULL), (3, 1000, NULL, '2024-03-03 00:00:00', 'Grüße')",
    ], DB)


@pytest.fixture(scope="module")
def database_ui(
    tmp_path_factory: pytest.TempPathFactory, postgres: PostgresCluster, mariadb: MariaDBServer
) -> Iterator[DatabaseUI]:
    _load_orders(postgres, mariadb)
    servers = {"postgres": postgres, "mysql": mariadb}
    schemes = {"postgres": "postgresql", "mysql": "mysql"}
    hosts = {kind: f"{server.host}:{server.port}/{DB}" for kind, server in servers.items()}
    urls = {kind: f"{schemes[kind]}://{READER}:{PASSWORDS[kind]}@{hosts[kind]}" for kind in servers}
    sources = {kind: f"{schemes[kind]}://{hosts[kind]}/orders" for kind in servers}

    root = tmp_path_factory.mktemp("database-ui")
    project = Project(root / "project")
    for kind, name in ASSETS.items():
        source = {"type": kind, "connection": {"url_env": URL_ENVS[kind]}, "table": "orders"}
        project.write_spec(base_spec(name, schema=SCHEMA, source=source))
    source = {"type": "mysql", "connection": {"url_env": MISNAMED_ENV}, "table": "orders"}
    project.write_spec(base_spec(MISNAMED, schema=SCHEMA, source=source))

    drop = (*DEPLOYMENT_VARS, "DAGSTER_HOME", "DATIVO_LOG_FORMAT", MISNAMED_ENV)
    env = {k: v for k, v in os.environ.items() if k not in drop}
    env.update({URL_ENVS[kind]: url for kind, url in urls.items()})
    with DagsterDev(shipped_dagster_home(root), project.specs_dir, env=env) as dev:
        # one run per asset, as each asset page's Materialize button launches it: all three queued at once
        runs = {name: dev.launch_assets([name]) for name in (*ASSETS.values(), MISNAMED)}
        statuses = {name: dev.wait_for_run(run_id) for name, run_id in runs.items()}
        with HeadlessChromium() as browser:
            ui = DemoUI(dev=dev, browser=browser, project=project, specs=load_specs(project.specs_dir),
                        screenshots=root / "screenshots")
            yield DatabaseUI(ui=ui, urls=urls, runs=runs, statuses=statuses, sources=sources)


@pytest.mark.parametrize("kind", ["postgres", "mysql"])
def test_a_database_asset_materialized_from_the_ui_commits_its_rows_and_its_page_shows_them(
    database_ui: DatabaseUI, kind: str
) -> None:
    name = ASSETS[kind]
    run_id = database_ui.runs[name]
    assert database_ui.statuses[name] == "SUCCESS", f"{name}: run {run_id}\n{database_ui.ui.dev.log_tail()}"
    table = database_ui.ui.project.table(f"testdomain.{name}")
    rows = sorted(branch_rows(table, "acme"), key=lambda r: r["id"])
    assert [{k: r[k] for k in EXPECTED[0]} for r in rows] == EXPECTED
    assert {(r["_source_file"], r["_run_id"]) for r in rows} == {(database_ui.sources[kind], run_id)}
    # the asset's page: the materialization's rows and the snapshot id read back from the table, the columns, the
    # owner; then the checks tab: every check with the result the table implies
    text = assert_asset_page_shows_owner_row_count_and_run_metadata(database_ui.ui, name)
    assert database_ui.sources[kind] in text  # source_files: the source without credentials
    assert_asset_checks_tab_shows_every_check_with_its_result(database_ui.ui, name)


def test_a_spec_naming_an_unset_variable_fails_its_run_and_the_run_page_names_the_variable(
    database_ui: DatabaseUI,
) -> None:
    run_id = database_ui.runs[MISNAMED]
    assert database_ui.statuses[MISNAMED] == "FAILURE"
    message = f"environment variable {MISNAMED_ENV} is not set"
    ui = database_ui.ui
    ui.open(f"/runs/{run_id}")
    text = ui.browser.wait_for_text(["Failure", MISNAMED, message])
    assert f"{MISNAMED}.yaml" in text.split(message)[0].rsplit("\n", 1)[-1], text  # the line names the spec file
    # the asset's page shows the failed run, no materialization
    ui.open(f"/assets/{MISNAMED}")
    page = ui.browser.wait_for_text([MISNAMED, "Failed"])
    assert "rows_committed" not in page, page
    # nothing was written: the run failed before any table existed
    assert not ui.project.catalog().table_exists(f"testdomain.{MISNAMED}")


def test_no_password_in_any_page_or_graphql_answer(database_ui: DatabaseUI) -> None:
    ui = database_ui.ui
    seen: list[str] = []
    for run_id in database_ui.runs.values():
        answer = ui.dev.graphql(RUN_EVENTS, {"id": run_id})["runOrError"]
        assert answer["__typename"] == "Run" and answer["eventConnection"]["events"], answer
        seen.append(json.dumps(answer, ensure_ascii=False))
    for name in (*ASSETS.values(), MISNAMED):
        answer = ui.dev.graphql(ASSET_NODE, {"path": [name]})["assetNodeOrError"]
        assert answer["__typename"] == "AssetNode", answer
        seen.append(json.dumps(answer, ensure_ascii=False))
    paths = ["/assets", "/runs", *(f"/runs/{run_id}" for run_id in database_ui.runs.values())]
    for name in (*ASSETS.values(), MISNAMED):
        paths += [f"/assets/{name}", f"/assets/{name}?view=checks", f"/assets/{name}?view=definition"]
    for path in paths:
        ui.open(path)
        ui.browser.wait_for_text(["Runs"])
        ui.browser.wait_until("!document.querySelector('[class*=Skeleton_skeleton]')")
        seen.append(ui.browser.text())
        seen.append(str(ui.browser.evaluate("document.documentElement.outerHTML")))
    everything = "\n".join(seen)
    # what was fetched holds the sources (so it is where a leak would show), the variable names, never a password
    for kind in ("postgres", "mysql"):
        assert database_ui.sources[kind] in everything, kind
        assert PASSWORDS[kind] not in everything, kind
        assert database_ui.urls[kind] not in everything, kind
    assert f"environment variable {MISNAMED_ENV} is not set" in everything
