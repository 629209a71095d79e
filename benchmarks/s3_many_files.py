"""Many small source objects on SeaweedFS against one object with the same rows (issue 19 item 4).

    .venv/bin/python benchmarks/s3_many_files.py [--files 10000]

Starts a private SeaweedFS (``weed mini``, the integration tests' helper: loopback, free ports, its own folder),
uploads the first ``--files`` files of ``.data/person1m_10k_files/`` (``run.py --scale`` writes them: 100 rows
each) as objects, and one object holding the same rows under one header. Each is then loaded by
``dativo-dagster materialize`` (the console script's code path, as ``run.py``), source and warehouse on the same
server (catalog: a local SQLite file), followed by a second run of the many-objects spec that finds nothing new.
Prints the four steps and the whole command of each, and the ratio many / one.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import yaml

BENCH = Path(__file__).resolve().parent
PROJECT = BENCH.parent
sys.path.insert(0, str(BENCH))
sys.path.insert(0, str(PROJECT))

import run  # noqa: E402 - the benchmark's own helpers, next to this file

SOURCE_BUCKET = "bench-source"
WAREHOUSE_BUCKET = "bench-warehouse"
UPLOAD_THREADS = 32


def upload(client, files: list[Path]) -> float:  # noqa: ANN001 - boto3's client
    """The small files under ``many/`` and their rows as one object ``one/person.csv``; returns the seconds."""
    started = time.perf_counter()

    def put(path: Path) -> None:
        client.put_object(Bucket=SOURCE_BUCKET, Key=f"many/{path.name}", Body=path.read_bytes())

    with ThreadPoolExecutor(UPLOAD_THREADS) as pool:
        list(pool.map(put, files))
    header = files[0].read_bytes().split(b"\n", 1)[0] + b"\n"
    body = b"".join(path.read_bytes().split(b"\n", 1)[1] for path in files)
    client.put_object(Bucket=SOURCE_BUCKET, Key="one/person.csv", Body=header + body)
    return time.perf_counter() - started


def write_specs(folder: Path) -> dict[str, str]:
    """The benchmark's person spec twice, over the objects and over the one object; name -> kind."""
    raw = yaml.safe_load((BENCH / "specs" / "person1m_10k_files.yaml").read_text())
    names = {}
    for kind, path in (("many", f"s3://{SOURCE_BUCKET}/many/*.csv"), ("one", f"s3://{SOURCE_BUCKET}/one/person.csv")):
        spec = {**raw, "name": f"bench_s3_{kind}", "source": {**raw["source"], "files": [{"path": path}]}}
        (folder / f"{spec['name']}.yaml").write_text(yaml.safe_dump(spec, sort_keys=False))
        names[spec["name"]] = kind
    return names


def materialize(python: Path, specs: Path, asset: str, env: dict[str, str], work: Path, tag: str) -> dict:
    """One ``dativo-dagster materialize`` of ``asset``: its steps, the whole command, the summary line."""
    step_file = work / f"steps-{tag}.json"
    cmd = [str(python), str(BENCH / "dativo_cli.py"), "materialize", "--specs", str(specs), "--select", asset]
    proc = run.run_process(cmd, env={**env, "BENCH_STEP_TIMES": str(step_file)}, cwd=work, log_dir=work / tag)
    stdout = (work / tag / "stdout.txt").read_text(errors="replace")
    summary = next((line for line in stdout.splitlines() if line.startswith(f"{asset}: ")), "")
    if proc.returncode != 0 or not summary:
        stderr = run.tail(work / tag / "stderr.txt")
        raise RuntimeError(f"{asset} exited {proc.returncode}:\n{stdout[-2000:]}\n{stderr}")
    steps, _ = run.step_times(step_file, asset)
    return {"steps": sum(steps.values()), "wall": proc.wall, "rss": proc.maxrss_mib, "others": proc.foreign_cores,
            "summary": summary, "by_step": steps}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--files", type=int, default=run.MANY_FILES, help="objects of 100 rows (default 10,000)")
    parser.add_argument("--keep", action="store_true", help="keep the server's and the runs' folder")
    args = parser.parse_args(argv)
    from dativo_dagster_tests.integration.servers import SeaweedFS  # noqa: PLC0415 - the tests' server helper

    folder = run.datasets()["person1m_10k_files"].path
    files = sorted(folder.glob("*.csv"))[: args.files]
    if len(files) < args.files:
        print(f"{folder} holds {len(files)} files; run `run.py --scale --cases person1m_10k_files` first",
              file=sys.stderr)
        return 2
    python = run.ensure_product_venv()
    work = Path(tempfile.mkdtemp(prefix="s3-many-files-"))
    server = SeaweedFS(work / "seaweedfs")
    server.start()
    try:
        for bucket in (SOURCE_BUCKET, WAREHOUSE_BUCKET):
            server.create_bucket(bucket)
        client = server.boto3_client()
        uploaded = upload(client, files)
        print(f"uploaded {len(files):,} objects and the one object in {uploaded:.1f} s", flush=True)
        specs = work / "specs"
        specs.mkdir()
        names = write_specs(specs)
        env = {k: v for k, v in os.environ.items() if not k.startswith(("DATIVO_", "DAGSTER_", "AWS_"))}
        env.update(server.env())
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(PROJECT), os.environ.get("PYTHONPATH")]))
        env["DATIVO_WAREHOUSE"] = f"s3://{WAREHOUSE_BUCKET}"
        env["DATIVO_CATALOG_URI"] = f"sqlite:///{work / 'catalog.db'}"
        env["DATIVO_STAGING_DIR"] = str(work / "staging")
        results = {}
        for asset, kind in sorted(names.items(), key=lambda item: item[1] != "one"):
            results[kind] = materialize(python, specs, asset, env, work, kind)
            print(f"{kind}: {results[kind]['summary']}", flush=True)
        many = next(asset for asset, kind in names.items() if kind == "many")
        results["rerun"] = materialize(python, specs, many, env, work, "rerun")
        print(f"rerun: {results['rerun']['summary']}", flush=True)
        if "nothing_new" not in results["rerun"]["summary"]:
            raise RuntimeError(f"the second run was not nothing-new: {results['rerun']['summary']}")
    finally:
        server.stop()
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    one, many, rerun = results["one"], results["many"], results["rerun"]
    print()
    print(f"SeaweedFS, {len(files):,} objects x 100 rows against one object of {len(files) * 100:,} rows"
          " (source and warehouse on the server, SQLite catalog)")
    print()
    print("| source | four steps s (ratio) | whole command s | peak RSS MiB | steps | others' cores |")
    print("|---|---:|---:|---:|---|---:|")
    for label, r in ((f"one object ({len(files) * 100:,} rows)", one), (f"{len(files):,} objects", many),
                     (f"{len(files):,} objects, nothing-new rerun", rerun)):
        ratio = r["steps"] / one["steps"]
        steps = " ".join(f"{k}={v:.2f}" for k, v in r["by_step"].items())
        print(f"| {label} | {r['steps']:.2f} ({ratio:.2f}x) | {r['wall']:.2f} | {r['rss']:.0f} | {steps} "
              f"| {r['others']:.1f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
