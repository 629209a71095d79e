"""`run.py --databases`: the person rows in a private PostgreSQL and MariaDB, read into Iceberg side by side.

The benchmark starts both servers itself (the integration tests' helpers: loopback, free ports, private folders,
stopped at the end), loads person5m.csv into table ``person`` of each and its first tenth into ``person_small``,
then takes turns run by run, each in a fresh process:

- the whole asset: ``dativo-dagster materialize`` of a ``postgres`` / ``mysql`` spec (person5m's schema) in the
  product venv, as run.py measures the CSV asset (four steps from the event log, and the whole command);
- the raw baseline (db_baseline.py): ADBC (PostgreSQL) and ConnectorX (both), typed Arrow, one ``write_table``;
- dlt (dlt_sql_load.py): ``sql_table`` with the pyarrow backend into an Iceberg table (its own venv).

The small table is read by the asset only, for flatness: peak RSS on 5M rows at most 1.15x that on 500K.
The asset's specs are cursor incremental (on ``business_entity_id``, CONTRACT 7): right after each run of the full
table the same command runs again, finds nothing new past the committed mark, and must add no snapshot.
The section "Database sources" of RESULTS.md is replaced (or added); the rest of the file stays.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import re
import shutil
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import run as bench  # the CSV benchmark's helpers (processes, venvs, data, checks)

PROJECT = bench.PROJECT
SECTION = "## Database sources"
DLT_DB_VENV = bench.BENCH / ".venv-dlt-db"
# dlt's own set as for CSV, plus its sql_database extra and the SQLAlchemy drivers; ConnectorX for the baseline
DLT_DB_REQUIREMENTS = (
    "dlt[filesystem,pyiceberg,parquet,sql_database]==1.31.0",
    "pyiceberg==0.12.0",
    "pyarrow==26.0.1",
    "psycopg2-binary==2.9.13",
    "pymysql==1.2.4",
    "connectorx==0.4.6",
)
DB = "bench"
FULL, SMALL = "person", "person_small"
TARGET_BASELINE_RATIO = 1.5
TARGET_DLT_SPEEDUP = 2.0
TARGET_NOTHING_NEW_S = 2.0  # the second run's four steps, when the table has nothing past the committed mark
CURSOR_FIELD = "business_entity_id"  # 1..N in person5m.csv: each row its own cursor value

PG_DDL = """CREATE TABLE {table} (business_entity_id integer NOT NULL, person_type text, title text, first_name text,
 middle_name text, last_name text NOT NULL, email_promotion integer NOT NULL, modified_date date, score double precision,
 is_active boolean)"""
MYSQL_DDL = """CREATE TABLE {table} (business_entity_id INT NOT NULL, person_type VARCHAR(10), title VARCHAR(20),
 first_name VARCHAR(100), middle_name VARCHAR(100), last_name VARCHAR(100) NOT NULL, email_promotion INT NOT NULL,
 modified_date DATE, score DOUBLE, is_active TINYINT(1), PRIMARY KEY (business_entity_id)) CHARACTER SET utf8mb4"""
COLUMNS = ("business_entity_id", "person_type", "title", "first_name", "middle_name", "last_name", "email_promotion",
           "modified_date", "score", "is_active")


@dataclass(frozen=True)
class DbCase:
    db: str  # postgres | mysql
    tool: str  # dativo | adbc | connectorx | dlt
    table: str

    @property
    def label(self) -> str:
        return f"{self.db}/{self.table}/{self.tool}"


@dataclass
class DbRun:
    seconds: float  # the work: four steps (dativo), read + write (baseline), pipeline.run (dlt)
    wall: float
    rss_mib: float
    cpu: float
    foreign_cores: float
    rows: int
    steps: dict[str, float] = field(default_factory=dict)
    errors: list[str] = field(default_factory=list)
    # the second run of the same cursor spec, nothing new in the table: four steps, whole command, peak RSS
    rerun_seconds: float = 0.0
    rerun_wall: float = 0.0
    rerun_rss_mib: float = 0.0
    rerun_cpu: float = 0.0
    rerun_foreign_cores: float = 0.0


def start_servers() -> tuple[object, object]:
    sys.path.insert(0, str(PROJECT))
    from dativo_dagster_tests.integration.servers import MariaDBServer, PostgresCluster  # noqa: PLC0415

    postgres, mariadb = PostgresCluster(), MariaDBServer()
    postgres.start()
    try:
        mariadb.start()
    except BaseException:
        postgres.stop()
        raise
    return postgres, mariadb


def load_tables(postgres, mariadb, csv: Path, rows: int) -> dict[str, str]:  # noqa: ANN001 - the tests' servers
    """person5m.csv into ``person`` of both databases (COPY / LOAD DATA), its first tenth into ``person_small``;
    returns the URLs (libpq / MySQL style) by database kind."""
    began = time.monotonic()
    postgres.create_database(DB)
    conn = postgres.connect(DB)
    conn.autocommit = True
    with conn.cursor() as cur, csv.open() as f:
        cur.execute(PG_DDL.format(table=FULL))
        cur.copy_expert(f"COPY {FULL} FROM STDIN (FORMAT csv, HEADER true)", f)
        cur.execute(f"CREATE TABLE {SMALL} AS SELECT * FROM {FULL} ORDER BY business_entity_id LIMIT {rows // 10}")
        for table in (FULL, SMALL):  # the cursor's column is the key, as in AdventureWorks: indexed
            cur.execute(f"ALTER TABLE {table} ADD PRIMARY KEY ({CURSOR_FIELD})")
        cur.execute("VACUUM ANALYZE")
    conn.close()
    print(f"  PostgreSQL loaded in {time.monotonic() - began:.0f} s", flush=True)
    began = time.monotonic()
    mariadb.execute(f"CREATE DATABASE IF NOT EXISTS {DB}")
    import pymysql  # noqa: PLC0415

    conn = pymysql.connect(host=mariadb.host, port=mariadb.port, user="root", database=DB, local_infile=True,
                           autocommit=True)
    variables = ", ".join(f"@{c}" for c in COLUMNS)
    assignments = ", ".join(
        f"{c} = " + (f"IF(@{c} = '', NULL, @{c} = 'true')" if c == "is_active" else f"NULLIF(@{c}, '')")
        for c in COLUMNS
    )
    with conn.cursor() as cur:
        cur.execute(MYSQL_DDL.format(table=FULL))
        cur.execute(f"LOAD DATA LOCAL INFILE %s INTO TABLE {FULL} FIELDS TERMINATED BY ',' LINES TERMINATED BY '\\n'"
                    f" IGNORE 1 LINES ({variables}) SET {assignments}", (str(csv),))
        cur.execute(f"CREATE TABLE {SMALL} AS SELECT * FROM {FULL} ORDER BY business_entity_id LIMIT {rows // 10}")
        cur.execute(f"ALTER TABLE {SMALL} ADD PRIMARY KEY ({CURSOR_FIELD})")
    conn.close()
    print(f"  MariaDB loaded in {time.monotonic() - began:.0f} s", flush=True)
    return {
        "postgres": f"postgresql://{postgres.user}@{postgres.host}:{postgres.port}/{DB}",
        "mysql": f"mysql://root@{mariadb.host}:{mariadb.port}/{DB}",
    }


def write_specs(folder: Path) -> dict[tuple[str, str], str]:
    """One spec per (database, table), person5m's schema; asset names by (db, table)."""
    import yaml  # noqa: PLC0415

    base = yaml.safe_load((bench.SPECS / "person5m.yaml").read_text())
    folder.mkdir(parents=True, exist_ok=True)
    names = {}
    for db in ("postgres", "mysql"):
        for table in (FULL, SMALL):
            name = f"bench_{'pg' if db == 'postgres' else 'my'}_{table}"
            spec = {**base, "name": name, "description": {"purpose": f"person rows from {db} table {table}"},
                    "source": {"type": db, "connection": {"url_env": f"BENCH_{db.upper()}_URL"}, "table": table,
                               "incremental": {"strategy": "cursor", "cursor_field": CURSOR_FIELD}}}
            (folder / f"{name}.yaml").write_text(yaml.safe_dump(spec, sort_keys=False))
            names[(db, table)] = name
    return names


class DbRunner:
    def __init__(self, urls: dict[str, str], specs: Path, names: dict[tuple[str, str], str], product: Path,
                 dlt: Path, expected: dict[str, int], keep: bool) -> None:
        self.urls, self.specs, self.names, self.product, self.dlt = urls, specs, names, product, dlt
        self.expected, self.keep = expected, keep

    def env(self, **extra: str) -> dict[str, str]:
        env = {k: v for k, v in bench.os.environ.items() if not k.startswith(("DATIVO_", "DAGSTER_"))}
        env["PYTHONPATH"] = str(PROJECT)
        env.update(extra)
        return env

    def run(self, case: DbCase, index: int) -> DbRun:
        run_dir = bench.RUNS / f"db-{case.db}-{case.table}-{case.tool}-{index}"
        shutil.rmtree(run_dir, ignore_errors=True)
        run_dir.mkdir(parents=True)
        try:
            return self._dativo(case, run_dir) if case.tool == "dativo" else self._peer(case, run_dir)
        finally:
            if not self.keep:
                shutil.rmtree(run_dir, ignore_errors=True)

    def _peer(self, case: DbCase, run_dir: Path) -> DbRun:
        url = self.urls[case.db]
        if case.tool == "dlt":
            sqlalchemy = url.replace("postgresql://", "postgresql+psycopg2://").replace("mysql://", "mysql+pymysql://")
            cmd = [str(self.dlt), str(bench.BENCH / "dlt_sql_load.py"), "--url", sqlalchemy, "--table", case.table]
        else:
            python = self.product if case.tool == "adbc" else self.dlt
            cmd = [str(python), str(bench.BENCH / "db_baseline.py"), "--driver", case.tool, "--url", url,
                   "--table", case.table]
        cmd += ["--out", str(run_dir / "out")]
        proc = bench.run_process(cmd, env=self.env(), cwd=bench.BENCH, log_dir=run_dir / "log")
        if proc.returncode != 0:
            raise RuntimeError(f"{case.label} exited {proc.returncode}:\n{bench.tail(run_dir / 'log' / 'stderr.txt')}")
        result = bench.last_json_line(run_dir / "log" / "stdout.txt")
        m = DbRun(result["seconds"], proc.wall, proc.maxrss_mib, proc.cpu, proc.foreign_cores, result["rows"])
        if m.rows != self.expected[case.table]:
            m.errors.append(f"{case.label}: {m.rows} rows, expected {self.expected[case.table]}")
        return m

    def _dativo(self, case: DbCase, run_dir: Path) -> DbRun:
        asset = self.names[(case.db, case.table)]
        warehouse, catalog_uri, step_file = run_dir / "warehouse", f"sqlite:///{run_dir / 'catalog.db'}", run_dir / "steps.json"
        env = self.env(DATIVO_WAREHOUSE=str(warehouse), DATIVO_CATALOG_URI=catalog_uri,
                       DATIVO_STAGING_DIR=str(run_dir / "staging"), BENCH_STEP_TIMES=str(step_file),
                       **{f"BENCH_{case.db.upper()}_URL": self.urls[case.db]})
        cmd = [str(self.product), str(bench.BENCH / "dativo_cli.py"), "materialize", "--specs", str(self.specs),
               "--select", asset]
        proc = bench.run_process(cmd, env=env, cwd=run_dir, log_dir=run_dir / "log", sample=True)
        stdout = (run_dir / "log" / "stdout.txt").read_text(errors="replace")
        if proc.returncode != 0:
            raise RuntimeError(f"{case.label} exited {proc.returncode}:\n{stdout[-2000:]}\n"
                               + bench.tail(run_dir / "log" / "stderr.txt"))
        summary = re.search(rf"^{asset}: \w+ rows_read=(\d+) committed=(\d+) rejected=(\d+)", stdout, re.MULTILINE)
        if summary is None:
            raise RuntimeError(f"no summary line for {asset}:\n{stdout[-2000:]}")
        read, committed, rejected = (int(g) for g in summary.groups())
        steps, _ = bench.step_times(step_file, asset)
        m = DbRun(sum(steps.values()), proc.wall, proc.maxrss_mib, proc.cpu, proc.foreign_cores, committed, steps)
        expected = self.expected[case.table]
        if (read, committed, rejected) != (expected, expected, 0):
            m.errors.append(f"{case.label}: read {read}, committed {committed}, rejected {rejected}; expected {expected}")
        files = bench.data_files(warehouse / "bench" / "person" / asset / "data")
        m.errors += bench.check_table(asset, catalog_uri, warehouse, f"bench.{asset}", files, committed)
        if case.table == FULL and not m.errors:
            m.errors += self._nothing_new(case, run_dir, cmd, env, m, (catalog_uri, warehouse, f"bench.{asset}"))
        return m

    def _nothing_new(  # noqa: PLR0913, PLR0917 - the first run's command, environment, result and table
        self, case: DbCase, run_dir: Path, cmd: list[str], env: dict[str, str], m: DbRun,
        table: tuple[str, Path, str],
    ) -> list[str]:
        """The same command again right after the first run: nothing past the committed mark, so it reads no row,
        commits none and adds no snapshot (the table's snapshots before and after are compared)."""
        asset = self.names[(case.db, case.table)]
        before = snapshot_ids(*table)
        step_file = run_dir / "steps-rerun.json"
        proc = bench.run_process(cmd, env={**env, "BENCH_STEP_TIMES": str(step_file)}, cwd=run_dir,
                                 log_dir=run_dir / "log-rerun", sample=True)
        stdout = (run_dir / "log-rerun" / "stdout.txt").read_text(errors="replace")
        summary = re.search(rf"^{asset}: \w+ rows_read=(\d+) committed=(\d+).*$", stdout, re.MULTILINE)
        line = summary.group(0) if summary else "no summary"
        m.rerun_wall, m.rerun_rss_mib, m.rerun_cpu = proc.wall, proc.maxrss_mib, proc.cpu
        m.rerun_foreign_cores = proc.foreign_cores
        if step_file.exists():
            m.rerun_seconds = sum(bench.step_times(step_file, asset)[0].values())
        after = snapshot_ids(*table)
        errors = []
        if proc.returncode != 0 or summary is None or summary.groups() != ("0", "0") or "nothing_new" not in line:
            errors.append(f"{case.label}: the second run exited {proc.returncode} and printed {line!r}; expected"
                          " nothing new: 0 rows read and committed")
        if after != before:
            errors.append(f"{case.label}: the second run changed the table's snapshots ({len(before)} -> {len(after)},"
                          f" branch {bench.BRANCH} head {before[-1:]} -> {after[-1:]}); expected none added")
        return errors


def snapshot_ids(catalog_uri: str, warehouse: Path, identifier: str) -> list[int]:
    """Every snapshot of the table (all refs), then the head of the benchmark's branch last."""
    from pyiceberg.catalog.sql import SqlCatalog  # noqa: PLC0415

    catalog = SqlCatalog("dativo", uri=catalog_uri, warehouse=warehouse.as_uri())
    try:
        table = catalog.load_table(identifier)
        head = table.snapshot_by_name(bench.BRANCH)
        return [s.snapshot_id for s in table.metadata.snapshots] + [head.snapshot_id if head else -1]
    finally:
        catalog.engine.dispose()


def plan() -> list[DbCase]:
    cases = []
    for db in ("postgres", "mysql"):
        baselines = ("adbc", "connectorx") if db == "postgres" else ("connectorx",)
        cases += [DbCase(db, tool, FULL) for tool in (*baselines, "dativo", "dlt")]
        cases.append(DbCase(db, "dativo", SMALL))
    return cases


def med(runs: list[DbRun], attr: str) -> float:
    return statistics.median(getattr(r, attr) for r in runs)


def section(measured: dict[DbCase, list[DbRun]], header: dict[str, str], errors: list[str], rows: int) -> list[str]:
    lines = [SECTION, "", *[f"- **{k}**: {v}" for k, v in header.items()], ""]
    lines += [
        f"person5m's {rows:,} rows (10 columns: integers, text, date, double, boolean; primary key"
        f" `{CURSOR_FIELD}`) in a private PostgreSQL ({FULL}) and MariaDB table, and their first {rows // 10:,}"
        f" ({SMALL}) for flatness, each tool in a fresh",
        "process, taking turns run by run. Seconds: the work (dativo-dagster: its four steps from the event log;",
        "baseline: typed Arrow read + `pyarrow.parquet.write_table`; dlt: `pipeline.run`) and the whole process. In",
        "brackets: the ratio to that database's baseline (the faster of its drivers). RSS: peak of the process tree.",
        "",
        "| database | table | tool | seconds (ratio) | whole process s (ratio) | peak RSS MiB | CPU s | others' cores |",
        "|---|---|---|---:|---:|---:|---:|---:|",
    ]
    labels = {"adbc": "baseline: ADBC + write_table", "connectorx": "baseline: ConnectorX + write_table",
              "dativo": "**dativo-dagster materialize**", "dlt": "dlt sql_table (pyarrow backend)"}
    verdicts = []
    for db in ("postgres", "mysql"):
        baselines = [c for c in measured if c.db == db and c.tool in ("adbc", "connectorx") and measured[c]]
        base = min(baselines, key=lambda c: med(measured[c], "seconds")) if baselines else None
        base_s = med(measured[base], "seconds") if base else None
        base_wall = med(measured[base], "wall") if base else None
        for case, runs in measured.items():
            if case.db != db or not runs:
                continue
            s, w = med(runs, "seconds"), med(runs, "wall")
            ratio = f" ({s / base_s:.2f}x)" if base_s and case.table == FULL else ""
            wratio = f" ({w / base_wall:.2f}x)" if base_wall and case.table == FULL else ""
            lines.append(f"| {db} | {case.table} | {labels[case.tool]} | {s:.2f}{ratio} | {w:.2f}{wratio} |"
                         f" {med(runs, 'rss_mib'):.0f} | {med(runs, 'cpu'):.1f} | {med(runs, 'foreign_cores'):.1f} |")
            if case.tool == "dativo" and case.table == FULL and med(runs, "rerun_wall"):
                lines.append(f"| {db} | {case.table} | **dativo-dagster materialize, second run: nothing new** |"
                             f" {med(runs, 'rerun_seconds'):.2f} | {med(runs, 'rerun_wall'):.2f} |"
                             f" {med(runs, 'rerun_rss_mib'):.0f} | {med(runs, 'rerun_cpu'):.1f} |"
                             f" {med(runs, 'rerun_foreign_cores'):.1f} |")
        dativo = measured.get(DbCase(db, "dativo", FULL))
        small = measured.get(DbCase(db, "dativo", SMALL))
        dlt = measured.get(DbCase(db, "dlt", FULL))
        if dativo and base_s:
            r = med(dativo, "seconds") / base_s
            verdicts.append(f"| dativo-dagster (four steps) <= {TARGET_BASELINE_RATIO}x the raw baseline | {db} |"
                            f" {r:.2f}x ({base.tool}); whole command {med(dativo, 'wall') / base_wall:.2f}x |"
                            f" {'met' if r <= TARGET_BASELINE_RATIO else '**missed**'} |")
        if dativo and dlt:
            r = med(dlt, "seconds") / med(dativo, "seconds")
            whole = med(dlt, "wall") / med(dativo, "wall")
            verdicts.append(f"| >= {TARGET_DLT_SPEEDUP:g}x faster than dlt | {db} | {r:.2f}x (four steps vs"
                            f" pipeline.run); {whole:.2f}x (whole processes) |"
                            f" {'met' if r >= TARGET_DLT_SPEEDUP else '**missed**'} |")
        if dativo:
            rss = med(dativo, "rss_mib")
            verdicts.append(f"| peak RSS <= {bench.TARGET_RSS_MIB} MiB | {db} | {rss:.0f} MiB |"
                            f" {'met' if rss <= bench.TARGET_RSS_MIB else '**missed**'} |")
        if dativo and med(dativo, "rerun_wall"):
            rerun = med(dativo, "rerun_seconds")
            verdicts.append(f"| second run, nothing new: < {TARGET_NOTHING_NEW_S:g} s of work, no snapshot | {db} |"
                            f" {rerun:.2f} s (four steps); whole command {med(dativo, 'rerun_wall'):.2f} s |"
                            f" {'met' if rerun < TARGET_NOTHING_NEW_S else '**missed**'} |")
        if dativo and small:
            flat = med(dativo, "rss_mib") / med(small, "rss_mib")
            verdicts.append(f"| 10x the rows <= {bench.TARGET_RSS_FLAT}x the RSS | {db} |"
                            f" {med(dativo, 'rss_mib'):.0f} / {med(small, 'rss_mib'):.0f} MiB = {flat:.3f}x |"
                            f" {'met' if flat <= bench.TARGET_RSS_FLAT else '**missed**'} |")
    lines += ["", "| target (issue 17) | database | measured | |", "|---|---|---|---|", *verdicts]
    lines += ["", f"The asset's specs are cursor incremental on `{CURSOR_FIELD}` (CONTRACT 7). Right after each run"
              f" of {FULL} the same command runs again with nothing past the committed mark (the second run row): it"
              " reads the rows at the mark (one), skips them as committed, commits nothing, and the table's snapshots"
              " before and after are compared (none added, or the run counts as wrong). MySQL 8 itself is not"
              " installable on this machine (Debian's packages carry MariaDB only): the MySQL rows are MariaDB"
              " 10.11's."]
    if errors:
        lines += ["", *[f"- WRONG: {e}" for e in errors]]
    return lines


def merge_section(results: Path, block_lines: list[str]) -> str:
    text = results.read_text() if results.exists() else "# Benchmark results\n"
    block = "\n".join(block_lines) + "\n"
    start = text.find(SECTION)
    if start >= 0:
        end = text.find("\n## ", start + len(SECTION))
        return text[:start] + block + ("\n" + text[end + 1:] if end >= 0 else "")  # a blank line before the next
    anchor = text.find("## Targets (issue 5)")
    if anchor < 0:
        return text.rstrip("\n") + "\n\n" + block
    return text[:anchor] + block + "\n" + text[anchor:]


def run_databases(args: argparse.Namespace) -> int:
    """Measure the database rows; replace the section in RESULTS.md (or ``--output``)."""
    started = time.time()
    dataset = bench.datasets()["person5m"]
    bench.ensure_data([dataset], Path(args.make_data))
    csv, rows = dataset.path, dataset.rows
    if args.db_rows and args.db_rows < rows:  # a shorter run: the first rows of person5m.csv
        csv, rows = bench.DATA / f"person_first{args.db_rows}.csv", args.db_rows
        with dataset.path.open() as full, csv.open("w") as head:
            head.writelines(full.readline() for _ in range(rows + 1))
    product = bench.ensure_product_venv()
    dlt = bench.ensure_venv(DLT_DB_VENV, DLT_DB_REQUIREMENTS, " ".join(DLT_DB_REQUIREMENTS))
    specs = bench.RUNS / "db-specs"
    names = write_specs(specs)
    postgres, mariadb = start_servers()
    errors: list[str] = []
    cases = plan()
    measured: dict[DbCase, list[DbRun]] = {c: [] for c in cases}
    try:
        urls = load_tables(postgres, mariadb, csv, rows)
        runner = DbRunner(urls, specs, names, product, dlt, {FULL: rows, SMALL: rows // 10}, args.keep)
        failed: set[DbCase] = set()
        for i in range(args.runs):
            for case in cases:
                if case in failed:
                    continue
                if args.max_wait > 0:
                    bench.wait_for_quiet(args.max_wait)
                try:
                    m = runner.run(case, i)
                except (RuntimeError, ValueError, OSError) as exc:
                    errors.append(str(exc))
                    failed.add(case)
                    print(f"  {case.label:32s} run {i + 1}/{args.runs}: FAILED: {str(exc)[:2000]}", flush=True)
                    continue
                measured[case].append(m)
                errors += m.errors
                print(f"  {case.label:32s} run {i + 1}/{args.runs}: {m.seconds:7.2f} s work, {m.wall:7.2f} s process,"
                      f" {m.rss_mib:5.0f} MiB, {m.cpu:6.2f} s CPU, others {m.foreign_cores:.1f} cores"
                      + (f"  steps {' '.join(f'{k}={v:.2f}' for k, v in m.steps.items())}" if m.steps else "")
                      + (f"  nothing-new run {m.rerun_seconds:.2f} s work, {m.rerun_wall:.2f} s process"
                         if m.rerun_wall else "")
                      + ("  WRONG" if m.errors else ""), flush=True)
    finally:
        mariadb.stop()
        postgres.stop()
    header = {
        "date": dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": bench.machine(),
        "servers": "PostgreSQL 15 and MariaDB 10.11 (Debian's packages), private, on loopback, fsync off",
        "versions": f"dativo-dagster in benchmarks/.venv-product; ADBC PostgreSQL driver"
                    f" {bench.importlib.metadata.version('adbc-driver-postgresql')}, ConnectorX"
                    f" {bench.importlib.metadata.version('connectorx')} (MySQL rows), PyMySQL"
                    f" {bench.importlib.metadata.version('pymysql')} (MySQL column lookup);"
                    f" {', '.join(DLT_DB_REQUIREMENTS)} in"
                    " benchmarks/.venv-dlt-db",
        "dativo-dagster": bench.code_version(None, "worktree"),
        "command": bench.shown_command(),
        "runs": f"median of {args.runs} run(s) per case; took {(time.time() - started) / 60:.1f} min",
    }
    lines = section(measured, header, errors, rows)
    output = Path(args.output) if args.output else bench.BENCH / "RESULTS.md"
    output.write_text(merge_section(output, lines))
    print("\n".join(lines))
    print(f"written to {output}")
    print(json.dumps({c.label: [r.seconds for r in runs] for c, runs in measured.items()}), flush=True)
    return 1 if errors else 0
