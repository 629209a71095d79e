"""``run.py --profile``: where dativo-dagster spends time and memory on person5m.

Runs ``dativo-dagster materialize`` on person5m once under py-spy (sampling, native frames included, from
PyPI into benchmarks/.tools), samples the process's RSS split into anonymous and file-backed pages, and
times the imports with ``python -X importtime``. Writes benchmarks/PROFILE.md (top costs per step, with
file:function names) and keeps the raw collapsed stacks under benchmarks/.data/profiles/.
"""

from __future__ import annotations

import collections
import datetime as dt
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

from run import (
    BENCH,
    DATA,
    SPECS,
    STEPS,
    Runner,
    code_snapshot,
    code_version,
    datasets,
    ensure_data,
    ensure_product_venv,
    ensure_pyspy,
    machine,
    run_process,
    step_memory,
    step_times,
    versions,
)

SPEC = "person5m"
ASSET = "bench_person5m"
RATE = 100  # samples per second
TOP = 12

# The innermost of these on a stack names the stage the sample belongs to. The rows stream through three
# threads at once inside the extract step (pipeline.py): the reader, the validator and the writer (the step's
# own thread), so samples are attributed by the stage's functions, not by the step that was running.
STEP_MARKERS = (
    ("commit", ("_commit (", "commit_files (")),
    ("write", ("_write_stage (", "write_batches (")),
    ("validate", ("validate_batch (",)),
    ("extract", ("iter_source_batches (", "read_source_file (")),
)


def classify(frames: list[str]) -> str:
    for step, markers in STEP_MARKERS:
        if any(marker in frame for frame in frames for marker in markers):
            return step
    if any("import" in frame and "<frozen importlib" in frame for frame in frames):
        return "imports"
    return "other (Dagster, definitions, exit)"


def short(frame: str) -> str:
    """``function (path:line)`` -> ``path-tail:function``, native frames as ``library:symbol``."""
    match = re.match(r"^(?P<fn>.*?) \((?P<file>[^():]+)(?::(?P<line>\d+))?\)$", frame.strip())
    if not match:
        return frame.strip()[:100]
    file = match.group("file")
    for anchor in ("site-packages/", "benchmarks/", "/lib/python3.11/"):
        if anchor in file:
            file = file.split(anchor, 1)[1]
            break
    if "dativo_dagster/" in file:
        file = "dativo_dagster/" + file.split("dativo_dagster/", 1)[1]
    fn = match.group("fn")
    if len(fn) > 70:
        fn = fn[:67] + "..."
    return f"{file}:{fn}"


def is_python(frame: str) -> bool:
    return ".py:" in frame or ".py)" in frame


def analyse(collapsed: Path) -> dict[str, dict[str, collections.Counter]]:
    """Per step: samples in total, self time by frame, inclusive time by Python function."""
    result: dict[str, dict[str, collections.Counter]] = collections.defaultdict(
        lambda: {
            "total": collections.Counter(),
            "self": collections.Counter(),
            "python_self": collections.Counter(),
            "inclusive": collections.Counter(),
        }
    )
    for line in collapsed.read_text(errors="replace").splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        frames = [f for f in stack.split(";") if f]
        if frames and frames[0].startswith("process"):
            frames = frames[1:]
        if frames and frames[0].startswith("thread"):
            frames = frames[1:]
        if not frames:
            continue
        step = classify(frames)
        bucket = result[step]
        bucket["total"]["samples"] += count
        bucket["self"][short(frames[-1])] += count
        python_frames = [f for f in frames if is_python(f)]
        if python_frames:
            bucket["python_self"][short(python_frames[-1])] += count
        for name in {short(f) for f in python_frames if "dativo_dagster/" in f or "pyarrow/" in f or "pyiceberg/" in f}:
            bucket["inclusive"][name] += count
    return result


def import_times(env: dict[str, str], python: Path) -> list[tuple[float, str]]:
    """Cumulative import time (s) of the top-level packages the command loads, from ``-X importtime``."""
    code = "import dativo_dagster.cli, dagster; from dativo_dagster.definitions import build_definitions"
    proc = subprocess.run(  # noqa: S603
        [str(python), "-X", "importtime", "-c", code], env=env, capture_output=True, text=True, check=False
    )
    top: dict[str, float] = {}
    for line in proc.stderr.splitlines():
        match = re.match(r"import time:\s+\d+ \|\s+(\d+) \|( *)(\S+)", line)
        if match and len(match.group(2)) <= 1:  # top-level imports only
            name = match.group(3).split(".")[0]
            top[name] = top.get(name, 0.0) + int(match.group(1)) / 1e6
    return sorted(((s, n) for n, s in top.items()), reverse=True)


def idle_rss(env: dict[str, str], python: Path) -> str:
    code = (
        "import re, dagster, dativo_dagster.cli; from dativo_dagster.definitions import build_definitions; "
        "s=open('/proc/self/status').read(); print(*re.findall(r'(RssAnon|RssFile):\\s+(\\d+)', s))"
    )
    proc = subprocess.run([str(python), "-c", code], env=env, capture_output=True, text=True, check=False)  # noqa: S603
    return proc.stdout.strip()


def run_profile(args) -> int:  # noqa: PLR0915 - one report, section after section
    data = datasets()
    ensure_data([data[SPEC]], Path(args.make_data))
    pyspy = ensure_pyspy()
    runner = Runner(
        code=code_snapshot(args.code), dlt_python=None, product_python=ensure_product_venv(), keep=True, data=datasets()
    )
    out_dir = DATA / "profiles"
    out_dir.mkdir(parents=True, exist_ok=True)
    run_dir = DATA / "runs" / f"profile-{SPEC}"
    shutil.rmtree(run_dir, ignore_errors=True)
    run_dir.mkdir(parents=True)
    step_file = run_dir / "steps.json"
    env = runner.env(
        DATIVO_WAREHOUSE=str(run_dir / "warehouse"),
        DATIVO_CATALOG_URI=f"sqlite:///{run_dir / 'catalog.db'}",
        DATIVO_STAGING_DIR=str(run_dir / "staging"),
        BENCH_STEP_TIMES=str(step_file),
    )
    collapsed = out_dir / f"{SPEC}.collapsed.txt"
    python = runner.product_python
    command = [str(python), str(BENCH / "dativo_cli.py"), "materialize", "--specs", str(SPECS), "--select", ASSET]
    native = ["--native"] if not args.quick else []
    cmd = [
        str(pyspy),
        "record",
        "--format",
        "raw",
        "--rate",
        str(RATE),
        *native,
        "--output",
        str(collapsed),
        "--",
        *command,
    ]
    print(f"profiling {ASSET} with py-spy (native frames: {bool(native)})", flush=True)
    proc = run_process(cmd, env=env, cwd=run_dir, log_dir=run_dir / "log", sample=True)
    if proc.returncode != 0:
        print((run_dir / "log" / "stderr.txt").read_text()[-3000:], file=sys.stderr)
        return 2
    steps, windows = step_times(step_file, ASSET)
    memory = step_memory(proc.samples, windows)
    profile = analyse(collapsed)
    total_samples = sum(b["total"]["samples"] for b in profile.values())
    lines = [
        "# Profile of dativo-dagster on person5m",
        "",
        f"- **date**: {dt.datetime.now(dt.UTC).strftime('%Y-%m-%d %H:%M UTC')}",
        f"- **machine**: {machine()}",
        f"- **versions**: {versions(None)}",
        f"- **dativo-dagster**: {code_version(runner.code, args.code)}",
        f"- **how**: `py-spy record --rate {RATE} {' '.join(native)}` around "
        f"`dativo-dagster materialize --select {ASSET}` "
        f"(one run; sampling three busy threads with native frames slows it severalfold: {proc.wall:.1f} s in all, "
        "so read the shares, not the seconds); RSS sampled every 50 ms "
        "(RssAnon = heap and Arrow buffers, RssFile = file-backed pages such as shared libraries).",
        "",
        "## Time and memory per step",
        "",
        "The rows stream through reading, validation and writing at once inside the extract step (README, Design):",
        "samples are attributed to those stages by the functions on each thread's stack, the event-log seconds",
        "and memory to the step that was running.",
        "",
        "| step | seconds (event log) | samples | share of samples | peak RssAnon MiB | peak RssFile MiB |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for step in (*STEPS, "imports", "other (Dagster, definitions, exit)"):
        samples = profile[step]["total"]["samples"] if step in profile else 0
        anon, file = memory.get(step, (None, None))
        lines.append(
            f"| {step} | {steps[step]:.2f} | {samples} | {samples / max(total_samples, 1):.0%} | "
            f"{'' if anon is None else f'{anon:.0f}'} | {'' if file is None else f'{file:.0f}'} |"
            if step in steps
            else f"| {step} | | {samples} | {samples / max(total_samples, 1):.0%} | | |"
        )
    peak_anon = max((a for _, a, _ in proc.samples), default=0)
    peak_file = max((f for _, _, f in proc.samples), default=0)
    lines += [
        "",
        f"Peak of the whole process: RssAnon {peak_anon:.0f} MiB, RssFile {peak_file:.0f} MiB "
        f"(ru_maxrss {proc.maxrss_mib:.0f} MiB, py-spy's own included). After imports and definitions alone: "
        f"{idle_rss(env, python)} (kB).",
    ]
    for step in (*STEPS, "imports", "other (Dagster, definitions, exit)"):
        if step not in profile:
            continue
        bucket = profile[step]
        n = bucket["total"]["samples"]
        lines += [
            "",
            f"## {step}: top costs ({n} samples)",
            "",
            "| self: innermost frame (native or Python) | share |",
            "|---|---:|",
        ]
        lines += [f"| `{name}` | {c / n:.0%} |" for name, c in bucket["self"].most_common(TOP)]
        lines += ["", "| self: innermost Python frame | share |", "|---|---:|"]
        lines += [f"| `{name}` | {c / n:.0%} |" for name, c in bucket["python_self"].most_common(TOP)]
        if bucket["inclusive"]:
            lines += ["", "| inclusive: dativo_dagster / pyarrow / pyiceberg functions | share |", "|---|---:|"]
            lines += [f"| `{name}` | {c / n:.0%} |" for name, c in bucket["inclusive"].most_common(TOP)]
    lines += ["", "## Import time of the command (python -X importtime, cumulative per top-level package)", ""]
    lines += ["| package | seconds |", "|---|---:|"]
    lines += [f"| {name} | {seconds:.2f} |" for seconds, name in import_times(env, python)[:TOP]]
    text = "\n".join(lines) + "\n"
    output = Path(args.output) if args.output else BENCH / "PROFILE.md"
    output.write_text(text)
    (out_dir / f"{SPEC}.steps.json").write_text(json.dumps({"steps": steps, "memory": memory}))
    print(text)
    print(f"written to {output}; raw stacks in {collapsed}")
    if not args.keep:
        shutil.rmtree(run_dir, ignore_errors=True)
    return 0
