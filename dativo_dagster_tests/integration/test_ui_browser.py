"""The Dagster UI in a real browser: ``dagster dev`` with the demo specs, one run launched over GraphQL, and
Debian's headless Chromium on the asset catalog, the asset graph, each asset's page and its checks.

What the pages must show is taken from the specs (names, owners, checks) and from the Iceberg tables read
back with pyiceberg (row counts, snapshot ids, quarantined rows), not from Dagster itself. Screenshots are
saved under the test's temporary folder; with ``DATIVO_UPDATE_SCREENSHOTS=1`` they also replace the ones in
``docs/images/`` that the README and the docs show.
"""

from __future__ import annotations

import os
import re
import shutil
import time
import urllib.parse
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from dativo_dagster.assets import RECONCILIATION_CHECK, SCHEMA_DRIFT_CHECK, VALIDATION_CHECK
from dativo_dagster.freshness import FRESHNESS_CHECK, freshness_limit
from dativo_dagster.spec import LoadedSpec, load_specs
from dativo_dagster_tests.conftest import DEPLOYMENT_VARS, Project, branch_rows

from .browser import HeadlessChromium
from .dagster_dev import DagsterDev

ROOT = Path(__file__).resolve().parents[2]
DOCS_IMAGES = ROOT / "docs" / "images"
CHECKS = (VALIDATION_CHECK, SCHEMA_DRIFT_CHECK, RECONCILIATION_CHECK)
# the asset page whose screenshots go into the docs: warn mode, quarantined rows, a sensor
SHOWCASE = "listening_history"
# the demo's assets, one test case each (the fixture loads its own copy of the same specs)
DEMO_ASSETS = [item.spec.name for item in load_specs(ROOT / "asset_specs")]
assert SHOWCASE in DEMO_ASSETS
# the placeholders Dagster's UI shows while a part of the page is still loading
LOADING = "[class*=Skeleton_skeleton]"
# the asset graph, the address `make dev` and the README send users to
GRAPH_PATH = "/asset-groups"
# Dagster's "Join the Dagster community" dialog (shown over every page unless the instance turns `nux` off)
DIALOG = "[role=dialog]"


@dataclass
class DemoUI:
    dev: DagsterDev
    browser: HeadlessChromium
    project: Project
    specs: list[LoadedSpec]
    screenshots: Path

    def spec(self, name: str) -> LoadedSpec:
        return next(item for item in self.specs if item.spec.name == name)

    def open(self, path: str) -> None:
        self.browser.open(self.dev.url + path)

    def screenshot(self, name: str) -> Path:
        """Save the page as ``<name>.png`` (and into docs/images/ with DATIVO_UPDATE_SCREENSHOTS=1), once every
        part of it has loaded."""
        self.browser.wait_until(f"!document.querySelector({LOADING!r}) && !document.body.innerText.includes('Loading')")
        time.sleep(0.5)  # the last data arrived: let the page paint it
        path = self.browser.screenshot(self.screenshots / f"{name}.png")
        data = path.read_bytes()
        assert data.startswith(b"\x89PNG\r\n\x1a\n") and len(data) > 20_000, f"{path}: not a full-page PNG"
        if os.environ.get("DATIVO_UPDATE_SCREENSHOTS") == "1":
            DOCS_IMAGES.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(path, DOCS_IMAGES / path.name)
        return path


def _demo_project(root: Path) -> Project:
    """A copy of the repository's demo (specs + data), so its own .dativo/ is never touched."""
    for folder in ("asset_specs", "data"):
        shutil.copytree(ROOT / folder, root / folder)
    return Project(root)


def shipped_dagster_home(root: Path) -> Path:
    """An instance made from the shipped dagster.yaml as it is (what `make dev` copies): what users see is tested."""
    home = root / "dagster_home"
    home.mkdir()
    shutil.copyfile(ROOT / "dagster.yaml", home / "dagster.yaml")
    return home


@pytest.fixture(scope="module")
def demo_ui(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DemoUI]:
    root = tmp_path_factory.mktemp("ui")
    project = _demo_project(root / "project")
    specs = load_specs(project.specs_dir)
    env = {k: v for k, v in os.environ.items() if k not in (*DEPLOYMENT_VARS, "DAGSTER_HOME", "DATIVO_LOG_FORMAT")}
    with DagsterDev(shipped_dagster_home(root), project.specs_dir, env=env) as dev:
        # as the UI's `Materialize all` does: the code location's executor, no run config
        run_id = dev.launch_assets([item.spec.name for item in specs])
        status = dev.wait_for_run(run_id)
        assert status == "SUCCESS", f"run {run_id}: {status}\n{dev.log_tail()}"
        with HeadlessChromium() as browser:
            yield DemoUI(dev=dev, browser=browser, project=project, specs=specs, screenshots=root / "screenshots")


def checks_of(item: LoadedSpec) -> tuple[str, ...]:
    """The asset's checks: the three of every asset, and freshness for a spec with a schedule or a sensor."""
    return CHECKS + ((FRESHNESS_CHECK,) if freshness_limit(item.spec) is not None else ())


def branch_state(project: Project, item: LoadedSpec) -> tuple[int, int, int]:
    """(rows on the branch, head snapshot id, quarantined rows) read back with pyiceberg."""
    spec = item.spec
    table = project.table(f"{spec.domain}.{spec.name}")
    head = table.snapshot_by_name(spec.branch)
    assert head is not None, f"{spec.name}: no branch {spec.branch}"
    rejects_name = f"{spec.domain}.{spec.name}__rejects"
    rejects = 0
    if project.catalog().table_exists(rejects_name):
        rejects = len(branch_rows(project.table(rejects_name), spec.branch))
    return len(branch_rows(table, spec.branch)), head.snapshot_id, rejects


def test_first_screens_show_no_dialog_and_the_graph_address_shows_the_asset_graph(demo_ui: DemoUI) -> None:
    """The first test of the module, on a browser profile that has never dismissed anything: Dagster's own
    landing page and the asset graph open without the community dialog, on the shipped instance settings."""
    demo_ui.open("/")
    demo_ui.browser.wait_for_text(["Overview", "Runs", "Catalog"])
    demo_ui.browser.wait_until(f"!document.querySelector({LOADING!r})")
    # the dialog comes up once the UI has asked the server about it, a moment after the page settled
    time.sleep(3)
    assert demo_ui.browser.evaluate(f"document.querySelectorAll({DIALOG!r}).length") == 0, demo_ui.browser.text()
    assert "Join the Dagster community" not in demo_ui.browser.text()
    demo_ui.screenshot("landing-page")

    demo_ui.open(GRAPH_PATH)
    groups = sorted({item.spec.data_product for item in demo_ui.specs})
    # the whole graph, one box per group (dataProduct) with its asset count
    text = demo_ui.browser.wait_for_text(["Global asset lineage", *groups, "Materialize all"])
    demo_ui.browser.wait_until(f"!document.querySelector({LOADING!r})")
    time.sleep(3)
    assert demo_ui.browser.evaluate(f"document.querySelectorAll({DIALOG!r}).length") == 0, text
    assert "Join the Dagster community" not in demo_ui.browser.text()
    assert demo_ui.browser.evaluate("location.pathname") == GRAPH_PATH
    demo_ui.screenshot("first-screen-asset-graph")


def test_catalog_lists_every_asset_as_materialized(demo_ui: DemoUI) -> None:
    names = [item.spec.name for item in demo_ui.specs]
    demo_ui.open("/assets")
    groups = [item.spec.data_product for item in demo_ui.specs]
    text = demo_ui.browser.wait_for_text([*names, *groups], until=lambda t: t.count("Materialized") >= len(names))
    assert text.count("Materialized") == len(names), text
    demo_ui.screenshot("asset-catalog")


def test_asset_graph_shows_every_asset_with_its_checks(demo_ui: DemoUI) -> None:
    groups = sorted({item.spec.data_product for item in demo_ui.specs})
    expanded = ",".join(f"global@global:{group}" for group in groups)
    demo_ui.open("/asset-groups?" + urllib.parse.urlencode({"expanded": expanded}))
    names = [item.spec.name for item in demo_ui.specs]
    text = demo_ui.browser.wait_for_text(
        names, until=lambda t: t.count("Materialized") >= len(names) and t.count("Passed") >= len(names)
    )
    # one node per asset, each with its checks counted ("3 / 4 Passed")
    counted = sorted(int(total) for total in re.findall(r"Asset checks\n\d / (\d) Passed", text))
    assert counted == sorted(len(checks_of(item)) for item in demo_ui.specs), text
    # the graph opens zoomed onto the first group: zoom out until every group is in view
    demo_ui.browser.click("button [aria-label=zoom_out]", times=3)
    demo_ui.screenshot("asset-graph")


def assert_asset_page_shows_owner_row_count_and_run_metadata(ui: DemoUI, name: str) -> str:
    """Open the asset's page and check it against the spec and the table read back; returns the page's text."""
    item = ui.spec(name)
    spec = item.spec
    rows, snapshot_id, rejects = branch_state(ui.project, item)
    ui.open(f"/assets/{spec.name}")
    columns = [f"\n{column.name}\n" for column in spec.fields]  # the column schema, one name per cell
    text = ui.browser.wait_for_text(
        [spec.name, "Owners", spec.team.owner, "rows_committed", str(snapshot_id), *columns],
        until=lambda t: re.search(rf"Row count\n{rows:,}\n", t) is not None,
    )
    owners = text[text.index("Owners") :]
    assert spec.team.owner in owners[: owners.index("Kinds")], owners[:300]
    # run metadata, newest value per key: "<key>\n<timestamp>\n<value>"
    keys = "rows_read|rows_committed|rows_rejected|snapshot_id|branch"
    metadata = dict(re.findall(rf"\n({keys})\n[^\n]+\n([^\n]+)", text))
    assert metadata == {
        "rows_read": str(rows + rejects),
        "rows_committed": str(rows),
        "rows_rejected": str(rejects),
        "snapshot_id": str(snapshot_id),
        "branch": spec.branch,
    }, text
    return text


def assert_asset_checks_tab_shows_every_check_with_its_result(ui: DemoUI, name: str) -> str:
    """Open the asset's checks tab: every check of the asset with the result the committed table implies; returns
    the page's text."""
    item = ui.spec(name)
    _, _, rejects = branch_state(ui.project, item)
    ui.open(f"/assets/{item.spec.name}?view=checks")
    checks = checks_of(item)
    text = ui.browser.wait_for_text([f"Checks ({len(checks)})", *checks, "Latest execution"])
    results = {
        check: re.search(rf"\n{check}\n(?:{check}\n)?(Succeeded|Failed|Warning|Not evaluated)\n", text)
        for check in checks
    }
    shown = {check: match.group(1) if match else None for check, match in results.items()}
    assert shown[RECONCILIATION_CHECK] == "Succeeded", text
    assert shown[VALIDATION_CHECK] == ("Succeeded" if rejects == 0 else "Failed"), text
    assert shown[SCHEMA_DRIFT_CHECK] in ("Succeeded", "Failed"), text
    if FRESHNESS_CHECK in checks:
        # the run evaluates the asset's checks, the freshness check right after the materialization
        assert shown[FRESHNESS_CHECK] == "Succeeded", text
    return text


@pytest.mark.parametrize("name", DEMO_ASSETS)
def test_asset_page_shows_owner_row_count_and_run_metadata(demo_ui: DemoUI, name: str) -> None:
    assert_asset_page_shows_owner_row_count_and_run_metadata(demo_ui, name)
    if name == SHOWCASE:
        demo_ui.screenshot("asset-page")


@pytest.mark.parametrize("name", DEMO_ASSETS)
def test_asset_checks_tab_shows_every_check_with_its_result(demo_ui: DemoUI, name: str) -> None:
    assert_asset_checks_tab_shows_every_check_with_its_result(demo_ui, name)
    spec = demo_ui.spec(name).spec
    if spec.name == SHOWCASE:
        demo_ui.open(f"/assets/{spec.name}?view=checks&checkDetail={VALIDATION_CHECK}")
        demo_ui.browser.wait_for_text(["rows_rejected", "first_errors"])
        demo_ui.screenshot("asset-checks")
