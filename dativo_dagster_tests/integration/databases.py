"""A database on the private PostgreSQL cluster or MariaDB server, read by a role that logs in with a password: the
scaffolding the database-source tests share."""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from typing import Any

from psycopg2 import sql

from .servers import MariaDBServer, PostgresCluster


def add_postgres_reader(postgres: PostgresCluster, db: str, reader: str, password: str, *,
                        log_statements: bool = False) -> bool:
    """Create database ``db`` and role ``reader``, which must give ``password`` (the cluster trusts everyone else, so
    a wrong one is refused). With ``log_statements``, every statement the reader sends goes to the server's log.

    Returns False, changing nothing else, when the role exists already (another module set it up on this cluster).
    """
    postgres.create_database(db)
    conn = postgres.connect(db)
    conn.autocommit = True
    try:
        with conn.cursor() as cur:
            cur.execute("SELECT 1 FROM pg_roles WHERE rolname = %s", (reader,))
            if cur.fetchone() is not None:
                return False
            hba = postgres.data_dir / "pg_hba.conf"
            hba.write_text(f"host all {reader} 127.0.0.1/32 scram-sha-256\n" + hba.read_text())
            cur.execute("SELECT pg_reload_conf()")
            cur.execute(sql.SQL("CREATE ROLE {} LOGIN PASSWORD %s").format(sql.Identifier(reader)), (password,))
            if log_statements:
                cur.execute(sql.SQL("ALTER ROLE {} SET log_statement = 'all'").format(sql.Identifier(reader)))
    finally:
        conn.close()
    return True


def add_mariadb_reader(mariadb: MariaDBServer, db: str, reader: str, password: str) -> None:
    """Create database ``db`` and user ``reader``, who logs in with ``password`` and may read ``db``."""
    mariadb.execute([f"CREATE DATABASE {db}", f"CREATE USER '{reader}'@'%' IDENTIFIED BY '{password}'",
                     f"GRANT SELECT ON {db}.* TO '{reader}'@'%'"])


@dataclass
class ReaderDatabase:
    """Database ``name`` on one server kind, and the reader that logs in with a password."""

    kind: str  # postgres | mysql
    server: Any
    name: str
    reader: str
    password: str

    @property
    def url(self) -> str:
        scheme = "postgresql" if self.kind == "postgres" else "mysql"
        return f"{scheme}://{self.reader}:{self.password}@{self.server.host}:{self.server.port}/{self.name}"

    def execute(self, *statements: str) -> None:
        """Run ``statements`` as the server's superuser, in the database; literals are UTC on both kinds."""
        if self.kind == "mysql":  # as the postgres cluster's sessions
            self.server.execute(["SET time_zone = '+00:00'", *statements], self.name)
            return
        conn = self.server.connect(self.name)
        conn.autocommit = True
        try:
            with conn.cursor() as cur:
                for statement in statements:
                    cur.execute(statement)
        finally:
            conn.close()


def unique(prefix: str) -> str:
    """``prefix`` and a random suffix: a table or asset name no other test uses."""
    return f"{prefix}_{uuid.uuid4().hex[:8]}"
