"""Deployment settings as Dagster resources: object storage, the Iceberg catalog and op staging."""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import dagster as dg
import sqlalchemy.exc
from pydantic import Field
from pyiceberg.catalog import Catalog
from pyiceberg.catalog.rest import RestCatalog
from pyiceberg.catalog.sql import SqlCatalog

from dativo_dagster.errors import CatalogAccessError, CommitError, DeploymentError
from dativo_dagster.spec import AssetSpecModel
from dativo_dagster.storage import (
    S3Settings,
    check_s3_access,
    delete_s3_object,
    is_s3_uri,
    join_uri,
    list_s3_objects,
    mask_uri,
    read_small_object,
    scrub,
    write_small_object,
)

CATALOG_NAME = "dativo"
DEFAULT_SPECS_DIR = Path(__file__).resolve().parent.parent / "asset_specs"
# the Iceberg REST spec's OAuth2 token endpoint, relative to the catalog URI
REST_TOKEN_PATH = "/v1/oauth/tokens"  # noqa: S105 - a path, not a password
# first runs on a new SQL catalog race to create pyiceberg's own tables: the loser tries again this often
CATALOG_INIT_ATTEMPTS = 5
CATALOG_INIT_BACKOFF_SECONDS = 0.1


def project_root(specs_dir: Path) -> Path:
    """The folder relative source paths and the embedded default resolve against."""
    return specs_dir.resolve().parent


class StorageResource(dg.ConfigurableResource):
    """Where data files go: a local folder or an S3-compatible bucket."""

    warehouse: str = Field(description="Warehouse root: a local folder or s3://bucket[/prefix] (DATIVO_WAREHOUSE).")
    s3_endpoint: str | None = Field(default=None, description="S3-compatible endpoint URL (DATIVO_S3_ENDPOINT).")
    aws_region: str | None = Field(default=None, description="Region for S3 (AWS_REGION).")
    aws_access_key_id: str | None = Field(default=None, description="Access key id (AWS_ACCESS_KEY_ID).")
    aws_secret_access_key: str | None = Field(default=None, description="Secret key (AWS_SECRET_ACCESS_KEY).")

    def s3_settings(self) -> S3Settings:
        """How to reach object storage."""
        return S3Settings(
            endpoint=self.s3_endpoint,
            region=self.aws_region,
            access_key_id=self.aws_access_key_id,
            secret_access_key=self.aws_secret_access_key,
        )

    def warehouse_for(self, spec: AssetSpecModel) -> str:
        """The warehouse root for an asset: the spec's ``target.warehouse`` or the deployment's."""
        root = spec.target.warehouse or self.warehouse
        if is_s3_uri(root):
            return root.rstrip("/")
        return str(Path(root).resolve())

    def table_location(self, spec: AssetSpecModel, suffix: str = "") -> str:
        """``<warehouse>/<domain>/<dataProduct>/<name><suffix>``."""
        return join_uri(self.warehouse_for(spec), spec.domain, spec.data_product, spec.name + suffix)

    def check_access(self, spec: AssetSpecModel) -> None:
        """Fail at once, with a message naming the bucket and the endpoint, when the asset's S3 warehouse
        refuses these credentials (nothing is written then); a local warehouse needs no check.

        Raises:
            StorageAccessError: wrong credentials, missing permission or bucket (terminal).
            StorageError: the endpoint cannot be reached (transient).
        """
        root = self.warehouse_for(spec)
        if is_s3_uri(root):
            check_s3_access(root + "/", self.s3_settings())


class CatalogResource(dg.ConfigurableResource):
    """The Iceberg catalog named ``dativo``: SQL (SQLite/PostgreSQL) or REST."""

    uri: str = Field(description="sqlite:///..., postgresql+psycopg2://... or http(s)://... (DATIVO_CATALOG_URI).")
    credential: str | None = Field(default=None, description="REST catalog credential id:secret (DATIVO_CATALOG_CREDENTIAL).")
    storage: StorageResource

    def load_catalog(self) -> Catalog:
        """A pyiceberg catalog client for this deployment.

        A catalog that cannot be reached or fails a request (here or in any later call on the client or
        its tables) raises :class:`CommitError` (transient), one that refuses the credentials
        :class:`CatalogAccessError` (terminal), each naming the catalog URI with credentials masked;
        commit conflicts keep pyiceberg's own exceptions.

        Raises:
            CommitError: the catalog cannot be reached or failed.
            CatalogAccessError: the catalog refused the credentials.
        """
        storage = self.storage.s3_settings()
        props = storage.pyiceberg_properties()
        guard = {"display_uri": self.display_uri, "secrets": self._secrets(storage)}
        if self.is_rest:
            rest_props = {**props, "uri": self.uri, "warehouse": self.storage.warehouse}
            if self.credential:
                rest_props["credential"] = self.credential
                # explicit, or pyiceberg warns that its fallback to the same URL is deprecated
                rest_props["oauth2-server-uri"] = self.uri.rstrip("/") + REST_TOKEN_PATH
            with catalog_errors(self.display_uri, "connect", guard["secrets"]):
                return GuardedRestCatalog(CATALOG_NAME, **guard, **rest_props)
        warehouse = self.storage.warehouse
        if not is_s3_uri(warehouse):
            warehouse = Path(warehouse).resolve().as_uri()
        if self.uri.startswith("sqlite:///"):
            Path(self.uri[len("sqlite:///"):]).parent.mkdir(parents=True, exist_ok=True)
        with catalog_errors(self.display_uri, "connect", guard["secrets"]):
            return retry_catalog_tables_race(
                lambda: GuardedSqlCatalog(CATALOG_NAME, **guard, uri=self.uri, warehouse=warehouse, **props)
            )

    @property
    def is_rest(self) -> bool:
        """Whether the catalog is an Iceberg REST endpoint (it then assigns table locations itself)."""
        return self.uri.startswith(("http://", "https://"))

    def _secrets(self, storage: S3Settings) -> list[str]:
        values = [*storage.secret_values(), urlparse(self.uri).password or ""]
        if self.credential:
            values += [self.credential, self.credential.partition(":")[2]]
        return [v for v in values if v]

    @property
    def display_uri(self) -> str:
        """The catalog URI with credentials masked."""
        return mask_uri(self.uri)


def is_catalog_tables_race(exc: BaseException) -> bool:
    """Whether ``exc`` is a lost race to create pyiceberg's catalog tables on a new SQL catalog database.

    Two processes that find the tables missing both create them; the second fails with "table
    iceberg_tables already exists" (SQLite), "relation ... already exists" or a duplicate key in
    ``pg_type`` (PostgreSQL). The tables are there by then, so building the client again succeeds.
    """
    if not isinstance(exc, sqlalchemy.exc.DBAPIError):
        return False
    text = str(exc).lower()
    return "already exists" in text or (isinstance(exc, sqlalchemy.exc.IntegrityError) and "duplicate key" in text)


def retry_catalog_tables_race(build: Callable[[], Catalog]) -> Catalog:
    """``build()``, tried again with a doubling pause (``CATALOG_INIT_ATTEMPTS`` tries in all) while it loses the
    race to create the catalog's tables; any other error is raised at once."""
    for attempt in range(CATALOG_INIT_ATTEMPTS - 1):
        try:
            return build()
        except sqlalchemy.exc.DBAPIError as exc:
            if not is_catalog_tables_race(exc):
                raise
        time.sleep(CATALOG_INIT_BACKOFF_SECONDS * 2**attempt)
    return build()


class StagingResource(dg.ConfigurableResource):
    """Where the small records (JSON) the ops of one run pass each other are kept: a local folder, or an
    ``s3://`` prefix when the steps of a run may run on different machines (Kubernetes, Celery executors)."""

    root: str = Field(
        description="Folder for staged op outputs (DATIVO_STAGING_DIR): a local path, or s3://bucket/prefix where "
        "the steps of a run run on different machines. A run's records are removed once it commits."
    )
    storage: StorageResource

    def _uri(self, run_id: str, step_key: str, name: str) -> str:
        return join_uri(self.root, run_id, step_key, f"{name}.json")

    def write(self, run_id: str, step_key: str, name: str, text: str) -> None:
        """Keep one record of ``run_id``'s step ``step_key`` (whole or not at all)."""
        write_small_object(self._uri(run_id, step_key, name), text.encode(), self.storage.s3_settings())

    def read(self, run_id: str, step_key: str, name: str) -> str:
        """A record :meth:`write` kept.

        Raises:
            FileNotFoundError: there is none (its step never finished, or the run's records were removed).
        """
        uri = self._uri(run_id, step_key, name)
        data = read_small_object(uri, self.storage.s3_settings())
        if data is None:
            raise FileNotFoundError(
                f"staged record {step_key}.{name} missing at {uri}: its step never finished, or the maintenance job"
                f" removed run {run_id}'s records (older than its older_than_hours); materialize the asset in a new run"
            )
        return data.decode()

    def remove_steps(self, run_id: str, step_prefix: str) -> None:
        """Delete the staged records of one asset's steps; a local run folder goes once it is empty."""
        if is_s3_uri(self.root):
            settings = self.storage.s3_settings()
            for item in list_s3_objects(join_uri(self.root, run_id, step_prefix), settings):
                delete_s3_object(item.uri, settings)
            return
        run_dir = Path(self.root) / run_id
        for path in run_dir.glob(f"{step_prefix}*"):
            shutil.rmtree(path, ignore_errors=True)
        try:
            run_dir.rmdir()
        except OSError:
            pass


def _catalog_failures() -> tuple[type[BaseException], ...]:
    """Exceptions that mean the catalog is unreachable or refused the request (not a commit conflict)."""
    import requests  # noqa: PLC0415
    from pyiceberg.exceptions import (  # noqa: PLC0415
        AuthorizationExpiredError,
        ForbiddenError,
        OAuthError,
        ServerError,
        ServiceUnavailableError,
        TooManyRequestsError,
        UnauthorizedError,
    )

    return (
        requests.exceptions.RequestException,
        sqlalchemy.exc.DBAPIError,  # connection refused, permission denied, server gone
        sqlalchemy.exc.TimeoutError,  # connection pool exhausted
        AuthorizationExpiredError,
        ForbiddenError,
        OAuthError,
        ServerError,
        ServiceUnavailableError,
        TooManyRequestsError,
        UnauthorizedError,
        ConnectionError,
        TimeoutError,
    )


# what a SQL catalog's database answers to a login it refuses (PostgreSQL, MySQL/MariaDB, SQLAlchemy's own)
_REFUSED_LOGIN = re.compile(
    r"password authentication failed|authentication failed|no pg_hba\.conf entry|no password supplied|"
    r"access denied for user",
    re.IGNORECASE,
)


def _refused_credentials(exc: BaseException) -> bool:
    """Whether the catalog refused the credentials: a REST catalog's 401/403 or its token endpoint's refusal (pyiceberg
    has already fetched a new token once for a 401), or a database refusing the login. A catalog that is down, busy
    or failing is not."""
    from pyiceberg.exceptions import ForbiddenError, OAuthError, UnauthorizedError  # noqa: PLC0415

    if isinstance(exc, (ForbiddenError, OAuthError, UnauthorizedError)):
        return True
    return isinstance(exc, sqlalchemy.exc.DBAPIError) and bool(_REFUSED_LOGIN.search(str(exc)))


@contextlib.contextmanager
def catalog_errors(display_uri: str, action: str, secrets: Sequence[str]) -> Iterator[None]:
    """Turn a catalog that refuses the credentials into :class:`CatalogAccessError` (terminal), and one that cannot
    be reached or fails into :class:`CommitError` (transient), each naming the masked URI.

    The original exception is not chained: its text (already scrubbed) goes into the message, so no
    credential can reach Dagster's event log through a traceback.
    """
    try:
        yield
    except _catalog_failures() as exc:
        lines = str(exc).strip().splitlines()
        detail = f"{type(exc).__name__}: {scrub(lines[0] if lines else '', secrets)[:500]}"
        if _refused_credentials(exc):
            raise CatalogAccessError(
                f"Iceberg catalog {display_uri} refused the credentials ({action}): {detail}"
            ) from None
        raise CommitError(f"Iceberg catalog {display_uri} refused or could not be reached ({action}): {detail}") from None


class _CatalogErrors:
    """Mixin for a pyiceberg catalog: every call that talks to the catalog goes through :func:`catalog_errors`."""

    def __init__(self, name: str, *, display_uri: str, secrets: Sequence[str], **properties: Any):
        self._display_uri = display_uri
        self._secret_values = list(secrets)
        super().__init__(name, **properties)  # type: ignore[call-arg]

    def _errors(self, action: str) -> contextlib.AbstractContextManager[None]:
        return catalog_errors(self._display_uri, action, self._secret_values)

    def load_table(self, identifier: Any) -> Any:
        with self._errors(f"load table {_name(identifier)}"):
            return super().load_table(identifier)  # type: ignore[misc]

    def table_exists(self, identifier: Any) -> bool:
        with self._errors(f"look up table {_name(identifier)}"):
            return bool(super().table_exists(identifier))  # type: ignore[misc]

    def create_table(self, identifier: Any, *args: Any, **kwargs: Any) -> Any:
        with self._errors(f"create table {_name(identifier)}"):
            return super().create_table(identifier, *args, **kwargs)  # type: ignore[misc]

    def create_namespace(self, namespace: Any, *args: Any, **kwargs: Any) -> None:
        with self._errors(f"create namespace {_name(namespace)}"):
            super().create_namespace(namespace, *args, **kwargs)  # type: ignore[misc]

    def commit_table(self, table: Any, *args: Any, **kwargs: Any) -> Any:
        with self._errors(f"commit to table {_name(table.name())}"):
            return super().commit_table(table, *args, **kwargs)  # type: ignore[misc]

    def drop_table(self, identifier: Any) -> None:
        with self._errors(f"drop table {_name(identifier)}"):
            super().drop_table(identifier)  # type: ignore[misc]

    def list_tables(self, namespace: Any) -> Any:
        with self._errors(f"list tables of {_name(namespace)}"):
            return super().list_tables(namespace)  # type: ignore[misc]

    def list_namespaces(self, *args: Any, **kwargs: Any) -> Any:
        with self._errors("list namespaces"):
            return super().list_namespaces(*args, **kwargs)  # type: ignore[misc]


def _name(identifier: Any) -> str:
    return identifier if isinstance(identifier, str) else ".".join(identifier)


class GuardedSqlCatalog(_CatalogErrors, SqlCatalog):
    """pyiceberg's SqlCatalog (SQLite, PostgreSQL) raising :class:`CommitError` when unreachable or refusing."""


class GuardedRestCatalog(_CatalogErrors, RestCatalog):
    """pyiceberg's RestCatalog raising :class:`CommitError` when unreachable or refusing."""


def _env(name: str) -> dg.EnvVar | None:
    return dg.EnvVar(name) if os.environ.get(name) else None


# The variables that make a deployment (CONTRACT 6). AWS_* alone are not one (they may be set in any user's shell
# for other tools), nor are DATIVO_ASSET_SPECS_DIR and DATIVO_STAGING_DIR (they only move folders).
DEPLOYMENT_VARIABLES = ("DATIVO_WAREHOUSE", "DATIVO_CATALOG_URI", "DATIVO_CATALOG_CREDENTIAL", "DATIVO_S3_ENDPOINT")
# a deployment that sets any of them sets these two
REQUIRED_VARIABLES = ("DATIVO_WAREHOUSE", "DATIVO_CATALOG_URI")


def check_deployment(environ: Mapping[str, str] | None = None) -> None:
    """Refuse a partial deployment: one of ``DEPLOYMENT_VARIABLES`` set without both ``REQUIRED_VARIABLES``.

    The embedded default applies only when none is set; otherwise a pod that got its warehouse but not its
    catalog would commit to a throwaway SQLite catalog and lose the incremental state. Names variables only,
    never their values (a catalog URI or credential holds secrets).

    Raises:
        DeploymentError: names the variables that are set and those that are missing.
    """
    env = os.environ if environ is None else environ
    present = [name for name in DEPLOYMENT_VARIABLES if env.get(name)]
    missing = [name for name in REQUIRED_VARIABLES if not env.get(name)]
    if present and missing:
        raise DeploymentError(
            f"partial deployment: {', '.join(present)} {'is' if len(present) == 1 else 'are'} set but "
            + " and ".join(f"{name} is not set" for name in missing)
            + f"; set {' and '.join(REQUIRED_VARIABLES)} together. The embedded default (a local warehouse and a"
            f" SQLite catalog under .dativo/) applies only when none of {', '.join(DEPLOYMENT_VARIABLES)} is set.",
            missing=missing,
        )


def embedded_defaults(specs_dir: Path, project_dir: Path | None = None) -> dict[str, str]:
    """The embedded default: a warehouse folder and a SQLite catalog under ``<project>/.dativo``.

    ``project_dir`` is the project that holds ``.dativo/``; by default the parent of ``specs_dir``
    (``project_root``). A ``dg`` project passes its own root, so that the default stays out of its package.
    """
    base = (project_dir.resolve() if project_dir is not None else project_root(specs_dir)) / ".dativo"
    return {
        "warehouse": str(base / "warehouse"),
        "catalog_uri": f"sqlite:///{base / 'catalog.db'}",
        "staging": str(base / "staging"),
    }


def resources_from_env(specs_dir: Path, project_dir: Path | None = None) -> dict[str, object]:
    """Resources for the deployment that the environment describes (CONTRACT section 6).

    Each setting is a ``dg.EnvVar`` when its variable is set, so secrets stay out of config and
    the UI; with none of the deployment's variables set, the embedded default (under ``project_dir``,
    see ``embedded_defaults``).

    Raises:
        DeploymentError: a partial deployment (``check_deployment``).
    """
    check_deployment()
    defaults = embedded_defaults(specs_dir, project_dir)
    storage = StorageResource(
        warehouse=_env("DATIVO_WAREHOUSE") or defaults["warehouse"],
        s3_endpoint=_env("DATIVO_S3_ENDPOINT"),
        aws_region=_env("AWS_REGION"),
        aws_access_key_id=_env("AWS_ACCESS_KEY_ID"),
        aws_secret_access_key=_env("AWS_SECRET_ACCESS_KEY"),
    )
    catalog = CatalogResource(
        uri=_env("DATIVO_CATALOG_URI") or defaults["catalog_uri"],
        credential=_env("DATIVO_CATALOG_CREDENTIAL"),
        storage=storage,
    )
    staging = StagingResource(root=_env("DATIVO_STAGING_DIR") or defaults["staging"], storage=storage)
    return {"dativo_storage": storage, "dativo_catalog": catalog, "dativo_staging": staging}
