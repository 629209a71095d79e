"""Object storage: one interface over a local folder and an S3-compatible bucket."""

from __future__ import annotations

import contextlib
import functools
import posixpath
import re
import uuid
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any
from urllib.parse import quote, urlencode, urlparse

import pyarrow.fs as pafs

from dativo_dagster.errors import DativoError, StorageError, TerminalError

# S3 limits (https://docs.aws.amazon.com/AmazonS3/latest/userguide/UsingMetadata.html, .../object-tagging.html)
MAX_USER_METADATA_BYTES = 2048  # keys and values together, UTF-8
MAX_TAGS = 10
MAX_TAG_KEY = 128
MAX_TAG_VALUE = 256
_TAG_UNSAFE = re.compile(r"[^A-Za-z0-9 _.:/=+\-@]")
# Metadata travels as HTTP headers: printable ASCII only; anything else (and '%') is percent-encoded as UTF-8.
_METADATA_SAFE = "".join(chr(c) for c in range(0x20, 0x7F) if chr(c) != "%")
MULTIPART_THRESHOLD = 16 << 20  # bytes: larger uploads go in parts of this size, several at a time
MULTIPART_CHUNK = 16 << 20
UPLOAD_CONCURRENCY = 4
READ_BUFFER = 8 << 20  # bytes fetched per S3 request when a source file is streamed

# Answers of an S3 endpoint that retrying cannot change.
_REFUSED = {
    "AccessDenied": "access denied: the credentials lack permission",
    "InvalidAccessKeyId": "the access key id is not known to the server (AWS_ACCESS_KEY_ID)",
    "SignatureDoesNotMatch": "the secret key does not match the access key (AWS_SECRET_ACCESS_KEY)",
    "InvalidToken": "the session token is invalid",
    "ExpiredToken": "the session token has expired",
    "AllAccessDisabled": "all access to this object has been disabled",
    "NoSuchBucket": "the bucket does not exist",
    "403": "access denied (HTTP 403): wrong credentials or missing permission",
    "404": "not found (HTTP 404)",
}


class StorageAccessError(TerminalError):
    """Object storage refused the request (credentials, permissions, missing bucket): retrying cannot help."""


@dataclass(frozen=True)
class S3Settings:
    """How to reach S3 (or an S3-compatible store). Secrets are never printed."""

    endpoint: str | None = None
    region: str | None = None
    access_key_id: str | None = field(default=None, repr=False)
    secret_access_key: str | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        # an endpoint without a scheme means HTTPS, as for AWS itself (botocore refuses one without)
        if self.endpoint and "://" not in self.endpoint:
            object.__setattr__(self, "endpoint", f"https://{self.endpoint}")

    @property
    def region_name(self) -> str:
        return self.region or "us-east-1"

    def describe(self) -> str:
        """The endpoint for messages: never the credentials."""
        return f"S3 endpoint {mask_uri(self.endpoint)}" if self.endpoint else "AWS S3"

    def secret_values(self) -> list[str]:
        """Values that must never appear in messages."""
        return [s for s in (self.secret_access_key,) if s]

    def pyarrow_filesystem(self) -> pafs.S3FileSystem:
        """A pyarrow S3 filesystem with path-style addressing when an endpoint is set."""
        return _pyarrow_s3(self)

    def boto3_client(self) -> Any:
        """A boto3 S3 client (SigV4; path-style addressing when an endpoint is set), shared per settings."""
        return _boto3_s3(self)

    def pyiceberg_properties(self) -> dict[str, str]:
        """FileIO properties for pyiceberg."""
        props = {"s3.region": self.region_name}
        if self.endpoint:
            props["s3.endpoint"] = self.endpoint
            props["s3.path-style-access"] = "true"
        if self.access_key_id and self.secret_access_key:
            props["s3.access-key-id"] = self.access_key_id
            props["s3.secret-access-key"] = self.secret_access_key
        return props


@functools.lru_cache(maxsize=16)
def _pyarrow_s3(s3: S3Settings) -> pafs.S3FileSystem:
    kwargs: dict[str, Any] = {
        "region": s3.region_name,
        "connect_timeout": 10,
        "request_timeout": 60,
        "retry_strategy": pafs.AwsStandardS3RetryStrategy(max_attempts=5),
    }
    if s3.endpoint:
        parsed = urlparse(s3.endpoint)
        kwargs["endpoint_override"] = parsed.netloc or parsed.path
        kwargs["scheme"] = parsed.scheme or "https"
        kwargs["force_virtual_addressing"] = False
    if s3.access_key_id and s3.secret_access_key:
        kwargs["access_key"] = s3.access_key_id
        kwargs["secret_key"] = s3.secret_access_key
    return pafs.S3FileSystem(**kwargs)


def s3_timestamp(text: str) -> datetime:
    """A time stamp of an S3 response as an aware datetime: ISO 8601 (listings) by ``datetime.fromisoformat``, other
    forms (the HTTP dates of HEAD) by botocore's own parser. botocore's default, dateutil, took about a third of the
    time of listing 10,000 objects."""
    stamp = None
    if isinstance(text, str) and "T" in text:
        with contextlib.suppress(ValueError):
            stamp = datetime.fromisoformat(text)
    if stamp is None:
        from botocore.utils import parse_timestamp  # noqa: PLC0415

        return parse_timestamp(text)
    return stamp if stamp.tzinfo is not None else stamp.replace(tzinfo=timezone.utc)


@functools.lru_cache(maxsize=16)
def _boto3_s3(s3: S3Settings) -> Any:
    import boto3  # noqa: PLC0415 - boto3 takes ~0.3 s to import; local-only deployments never need it
    from botocore.config import Config  # noqa: PLC0415

    config = Config(
        signature_version="s3v4",
        s3={"addressing_style": "path"} if s3.endpoint else {},
        retries={"max_attempts": 5, "mode": "standard"},
        connect_timeout=10,
        read_timeout=60,
        # S3-compatible stores (MinIO, SeaweedFS, older Ceph) do not all accept the CRC trailers that
        # botocore adds by default since 1.36; send checksums only where the API requires them.
        request_checksum_calculation="when_required" if s3.endpoint else "when_supported",
        response_checksum_validation="when_required" if s3.endpoint else "when_supported",
    )
    import botocore.session  # noqa: PLC0415

    core = botocore.session.get_session()
    core.get_component("response_parser_factory").set_parser_defaults(timestamp_parser=s3_timestamp)
    session = boto3.session.Session(botocore_session=core)
    return session.client(
        "s3",
        endpoint_url=s3.endpoint or None,
        region_name=s3.region_name,
        aws_access_key_id=s3.access_key_id or None,
        aws_secret_access_key=s3.secret_access_key or None,
        config=config,
    )


# user:password@host; the password ends at the last "@" of the authority (an unencoded "@" may be inside it)
_USER_INFO = re.compile(r"//([^:/@\s]+):(\S*?)@(?=[^@/\s]*(?:[/\s?#]|$))")
_SECRET_PARAMS = re.compile(r"(?i)\b(password|passwd|secret|token|credential|key)=([^&\s]+)")


def mask_uri(uri: str | None) -> str:
    """The URI (or any text holding URIs) with passwords and secret query parameters replaced by ``***``."""
    if not uri:
        return ""
    return _SECRET_PARAMS.sub(r"\1=***", _USER_INFO.sub(r"//\1:***@", uri))


def scrub(text: str, secrets: Sequence[str | None]) -> str:
    """``text`` with every secret value replaced by ``***`` and URIs masked, safe for messages and logs."""
    for secret in sorted((s for s in secrets if s), key=len, reverse=True):
        text = text.replace(secret, "***")
    return mask_uri(text)


def is_s3_uri(uri: str) -> bool:
    """Whether ``uri`` names an S3 object or prefix."""
    return uri.startswith(("s3://", "s3a://"))


def split_s3_uri(uri: str) -> tuple[str, str]:
    """``s3://bucket/key`` -> (bucket, key). Keys are taken as written: ``?`` and ``#`` are key characters
    (and glob characters in source patterns), not a URL's query or fragment."""
    bucket, _, key = uri.split("://", 1)[-1].partition("/")
    return bucket, key.lstrip("/")


def filesystem_for(uri: str, s3: S3Settings) -> tuple[pafs.FileSystem, str]:
    """The pyarrow filesystem for ``uri`` and the path to use with it."""
    if is_s3_uri(uri):
        bucket, key = split_s3_uri(uri)
        return s3.pyarrow_filesystem(), posixpath.join(bucket, key) if key else bucket
    if uri.startswith("file://"):
        uri = urlparse(uri).path
    return pafs.LocalFileSystem(), uri


def join_uri(base: str, *parts: str) -> str:
    """Join a local path or URI with relative parts using forward slashes."""
    out = base.rstrip("/")
    for part in parts:
        out = f"{out}/{part.strip('/')}"
    return out


# ------------------------------------------------------------------------------------------------ S3 errors
def s3_error(exc: BaseException, *, action: str, uri: str, s3: S3Settings) -> DativoError:
    """A boto3/botocore error as ours: refusals are terminal, the rest (network, 5xx, throttling) transient.

    The message names the action, the URI and the endpoint, never a credential.
    """
    from botocore.exceptions import BotoCoreError, ClientError  # noqa: PLC0415

    cause = exc
    # s3transfer wraps the ClientError of a failed upload in S3UploadFailedError; its cause has the code
    while not isinstance(cause, ClientError) and cause.__context__ is not None:
        cause = cause.__context__
    where = f"{uri} ({s3.describe()})"
    if isinstance(cause, ClientError):
        error = cause.response.get("Error", {})
        code = str(error.get("Code") or cause.response.get("ResponseMetadata", {}).get("HTTPStatusCode", ""))
        if code in _REFUSED:
            return StorageAccessError(f"cannot {action} {where}: S3 answered {code}: {_REFUSED[code]}")
        message = _scrub(str(error.get("Message") or code), s3)
        return StorageError(f"cannot {action} {where}: S3 answered {code}: {message}")
    if isinstance(exc, BotoCoreError | OSError):
        return StorageError(f"cannot {action} {where}: {_scrub(str(exc), s3)}")
    return StorageError(f"cannot {action} {where}: {type(exc).__name__}: {_scrub(str(exc), s3)}")


def _scrub(text: str, s3: S3Settings) -> str:
    return scrub(text, s3.secret_values())


def _boto_errors() -> tuple[type[BaseException], ...]:
    import boto3.exceptions  # noqa: PLC0415
    from botocore.exceptions import BotoCoreError, ClientError  # noqa: PLC0415

    return (ClientError, BotoCoreError, boto3.exceptions.Boto3Error)


# ------------------------------------------------------------------------------------------------ S3 objects
@dataclass(frozen=True)
class S3Object:
    """One listed object: its URI, size, ETag (quotes removed) and last modification time."""

    uri: str
    key: str
    size: int
    etag: str
    last_modified: datetime | None = None


def list_s3_objects(uri: str, s3: S3Settings, *, delimiter: str | None = None) -> Iterator[S3Object]:
    """Every object whose key starts with the key part of ``uri`` (paginated ``ListObjectsV2``).

    With ``delimiter="/"`` only the objects at that level, not those in deeper "folders".

    Raises:
        StorageAccessError: the endpoint refused (credentials, permission, missing bucket).
        StorageError: the endpoint could not be reached or failed.
    """
    bucket, prefix = split_s3_uri(uri)
    client = s3.boto3_client()
    try:
        kwargs = {"Bucket": bucket, "Prefix": prefix, **({"Delimiter": delimiter} if delimiter else {})}
        pages = client.get_paginator("list_objects_v2").paginate(**kwargs)
        for page in pages:
            for item in page.get("Contents", []):
                yield S3Object(
                    uri=f"s3://{bucket}/{item['Key']}",
                    key=item["Key"],
                    size=int(item.get("Size", 0)),
                    etag=str(item.get("ETag", "")).strip('"'),
                    last_modified=item.get("LastModified"),
                )
    except _boto_errors() as exc:
        raise s3_error(exc, action="list", uri=uri, s3=s3) from None


def head_s3_object(uri: str, s3: S3Settings) -> S3Object | None:
    """The object at ``uri``, or None when there is none.

    Raises:
        StorageAccessError, StorageError: as :func:`list_s3_objects`.
    """
    head = _unless_missing(uri, s3, lambda client, bucket, key: client.head_object(Bucket=bucket, Key=key))
    if head is None:
        return None
    return S3Object(
        uri=uri,
        key=split_s3_uri(uri)[1],
        size=int(head.get("ContentLength", 0)),
        etag=str(head.get("ETag", "")).strip('"'),
        last_modified=head.get("LastModified"),
    )


def _unless_missing(uri: str, s3: S3Settings, request: Callable[[Any, str, str], Any]) -> Any:
    """``request(client, bucket, key)`` for the object at ``uri``, or None when S3 says it is not there.

    Raises:
        StorageAccessError, StorageError: as :func:`list_s3_objects`.
    """
    from botocore.exceptions import ClientError  # noqa: PLC0415

    bucket, key = split_s3_uri(uri)
    try:
        return request(s3.boto3_client(), bucket, key)
    except ClientError as exc:
        if str(exc.response.get("Error", {}).get("Code")) in ("404", "NoSuchKey", "NotFound"):
            return None
        raise s3_error(exc, action="read", uri=uri, s3=s3) from None
    except _boto_errors() as exc:
        raise s3_error(exc, action="read", uri=uri, s3=s3) from None


def check_s3_access(uri: str, s3: S3Settings) -> None:
    """Fail early, with a clear message, when ``uri``'s bucket cannot be listed with these credentials.

    Raises:
        StorageAccessError: wrong credentials, missing permission or missing bucket (terminal).
        StorageError: the endpoint could not be reached (transient).
    """
    bucket, prefix = split_s3_uri(uri)
    try:
        s3.boto3_client().list_objects_v2(Bucket=bucket, Prefix=prefix, MaxKeys=1)
    except _boto_errors() as exc:
        raise s3_error(exc, action="access", uri=uri, s3=s3) from None


def upload_s3_file(
    local_path: str, uri: str, s3: S3Settings, *, metadata: Mapping[str, str], tags: Mapping[str, str],
    content_type: str = "application/octet-stream",
) -> None:
    """Upload a local file (multipart above ``MULTIPART_THRESHOLD``) with user metadata and tags.

    The object appears whole or not at all: S3 shows a multipart upload only once it completes,
    and a failed one is aborted.

    Raises:
        StorageAccessError, StorageError: as :func:`list_s3_objects`.
    """
    from boto3.s3.transfer import TransferConfig  # noqa: PLC0415

    bucket, key = split_s3_uri(uri)
    extra: dict[str, Any] = {"Metadata": dict(metadata), "ContentType": content_type}
    if tags:
        extra["Tagging"] = urlencode(dict(tags))
    config = TransferConfig(
        multipart_threshold=MULTIPART_THRESHOLD,
        multipart_chunksize=MULTIPART_CHUNK,
        max_concurrency=UPLOAD_CONCURRENCY,
    )
    try:
        s3.boto3_client().upload_file(local_path, bucket, key, ExtraArgs=extra, Config=config)
    except _boto_errors() as exc:
        raise s3_error(exc, action="upload", uri=uri, s3=s3) from None


def put_s3_bytes(uri: str, body: bytes, s3: S3Settings, *, content_type: str = "application/json") -> None:
    """Write a small object in one request (S3 makes it visible whole or not at all)."""
    bucket, key = split_s3_uri(uri)
    try:
        s3.boto3_client().put_object(Bucket=bucket, Key=key, Body=body, ContentType=content_type)
    except _boto_errors() as exc:
        raise s3_error(exc, action="write", uri=uri, s3=s3) from None


def get_s3_bytes(uri: str, s3: S3Settings) -> bytes:
    """Read a small object whole."""
    bucket, key = split_s3_uri(uri)
    try:
        return bytes(s3.boto3_client().get_object(Bucket=bucket, Key=key)["Body"].read())
    except _boto_errors() as exc:
        raise s3_error(exc, action="read", uri=uri, s3=s3) from None


def map_per_object(fn: Callable[[Any], Any], items: Sequence[Any]) -> Iterator[Any]:
    """``fn`` over ``items`` (each naming its object by ``.uri``), results in order: on pyiceberg's shared thread
    pool when they are on object storage (a round trip or two each, and a run may write hundreds of files), one
    after the other for local files (where the work is the caller's Python, which threads only slow)."""
    if len(items) > 1 and any(is_s3_uri(item.uri) for item in items):
        from pyiceberg.utils.concurrent import ExecutorFactory  # noqa: PLC0415

        return ExecutorFactory.get_or_create().map(fn, items)
    return map(fn, items)


def write_small_object(uri: str, data: bytes, s3: S3Settings, *, content_type: str = "application/json") -> None:
    """Write a small object or local file that readers see whole or not at all: one PUT on S3, elsewhere a
    temporary name moved into place (a process killed meanwhile leaves no half file under the real name).

    Raises:
        StorageAccessError, StorageError: S3 refused or could not be reached.
        OSError: the local file could not be written.
    """
    if is_s3_uri(uri):
        put_s3_bytes(uri, data, s3, content_type=content_type)
        return
    fs, path = filesystem_for(uri, s3)
    fs.create_dir(posixpath.dirname(path), recursive=True)
    tmp = f"{path}.{uuid.uuid4().hex}.tmp"
    try:
        with fs.open_output_stream(tmp, compression=None) as out:  # the bytes as given, even for a .gz name
            out.write(data)
        fs.move(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            fs.delete_file(tmp)
        raise


def read_small_object(uri: str, s3: S3Settings) -> bytes | None:
    """A small object or local file whole, as stored (never decompressed by its name); None when there is none.

    Raises:
        StorageAccessError, StorageError: S3 refused or could not be reached.
        OSError: the local file could not be read.
    """
    if is_s3_uri(uri):
        return _unless_missing(
            uri, s3, lambda client, bucket, key: bytes(client.get_object(Bucket=bucket, Key=key)["Body"].read())
        )
    fs, path = filesystem_for(uri, s3)
    try:
        with fs.open_input_stream(path, compression=None) as stream:
            return stream.read()
    except FileNotFoundError:
        return None


def delete_s3_object(uri: str, s3: S3Settings) -> None:
    """Delete one object; a missing one is fine."""
    bucket, key = split_s3_uri(uri)
    try:
        s3.boto3_client().delete_object(Bucket=bucket, Key=key)
    except _boto_errors() as exc:
        raise s3_error(exc, action="delete", uri=uri, s3=s3) from None


# ------------------------------------------------------------------------------------------------ governance
def object_metadata(metadata: Mapping[str, str]) -> dict[str, str]:
    """User metadata that S3 accepts: printable ASCII values (the rest percent-encoded), 2 KB in all.

    When the values are too long together, the longest are shortened (ending in ``...``), evenly,
    until they fit; short values are kept whole.
    """
    full = {k: quote(str(v).strip(), safe=_METADATA_SAFE) for k, v in metadata.items()}
    budget = {k: len(v) for k, v in full.items()}
    ellipsis = "..."
    while (overflow := sum(len(k) + budget[k] for k in full) - MAX_USER_METADATA_BYTES) > 0:
        longest = max(budget, key=lambda k: budget[k])
        if budget[longest] <= len(ellipsis):
            break  # nothing left to shorten
        runner_up = max((b for k, b in budget.items() if k != longest), default=0)
        budget[longest] = max(budget[longest] - overflow, min(runner_up, budget[longest] - 1), len(ellipsis))
    out = {}
    for key, value in full.items():
        if budget[key] >= len(value):
            out[key] = value
        else:
            out[key] = _quoted_prefix(str(metadata[key]).strip(), budget[key] - len(ellipsis)) + ellipsis
    return out


def _quoted_prefix(text: str, limit: int) -> str:
    """The longest quoted prefix of ``text`` within ``limit`` characters, cut between characters (never
    inside a percent-escape or between the bytes of one character)."""
    low, high = 0, len(text)
    while low < high:
        middle = (low + high + 1) // 2
        if len(quote(text[:middle], safe=_METADATA_SAFE)) <= limit:
            low = middle
        else:
            high = middle - 1
    return quote(text[:low], safe=_METADATA_SAFE)


def tag_safe(value: str, limit: int) -> str:
    """A value S3 accepts as a tag key or value: its character set (others become ``_``) and length."""
    return _TAG_UNSAFE.sub("_", value)[:limit]


def object_tags(metadata: Mapping[str, str]) -> dict[str, str]:
    """At most 10 object tags drawn from the governance metadata (``classification``: ``a_b`` for ``a,b``)."""
    names = {
        "domain": "domain",
        "data-product": "data-product",
        "tenant": "tenant-id",
        "owner": "owner",
        "classification": "classification",
    }
    tags = {
        tag_safe(k, MAX_TAG_KEY): tag_safe(metadata.get(src, ""), MAX_TAG_VALUE)
        for k, src in names.items()
        if metadata.get(src)
    }
    return dict(list(tags.items())[:MAX_TAGS])
