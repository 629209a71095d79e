"""Object storage helpers without a server: URIs, masking, S3-safe metadata and tags, error classification, globs.

Real S3 behaviour is proven against SeaweedFS in integration/; here only what needs no server, plus moto for
error paths a real server cannot be made to produce on demand."""

from __future__ import annotations

import re
from typing import Any
from urllib.parse import unquote

import pytest
from boto3.exceptions import S3UploadFailedError
from botocore.exceptions import ClientError, EndpointConnectionError
from botocore.stub import Stubber

from dativo_dagster.errors import StorageError, TerminalError, TransientError, is_transient
from dativo_dagster.sources.csv import _glob_match
from dativo_dagster.storage import (
    MAX_USER_METADATA_BYTES,
    S3Settings,
    StorageAccessError,
    join_uri,
    list_s3_objects,
    mask_uri,
    object_metadata,
    object_tags,
    s3_error,
    scrub,
    split_s3_uri,
    tag_safe,
)

TAG_CHARS = re.compile(r"^[A-Za-z0-9 +\-=._:/@]*$")


def client_error(code: str, status: int, message: str = "") -> ClientError:
    return ClientError(
        {"Error": {"Code": code, "Message": message}, "ResponseMetadata": {"HTTPStatusCode": status}}, "PutObject"
    )


@pytest.mark.parametrize(
    ("uri", "expected"),
    [
        ("s3://lake/warehouse/x.parquet", ("lake", "warehouse/x.parquet")),
        ("s3://lake", ("lake", "")),
        ("s3://lake/", ("lake", "")),
        ("s3a://lake/a/b", ("lake", "a/b")),
        ("s3://lake/in/?.csv", ("lake", "in/?.csv")),  # not a URL query: a glob character
        ("s3://lake/a#b.csv", ("lake", "a#b.csv")),
    ],
)
def test_split_s3_uri_keeps_keys_as_written(uri: str, expected: tuple[str, str]) -> None:
    assert split_s3_uri(uri) == expected


def test_join_uri() -> None:
    assert join_uri("s3://lake/wh/", "d", "/p/", "n") == "s3://lake/wh/d/p/n"


@pytest.mark.parametrize(
    ("text", "masked"),
    [
        ("postgresql+psycopg2://u:s3cr3t@db:5432/cat", "postgresql+psycopg2://u:***@db:5432/cat"),
        ("http://id:se/cr@et@host/x", "http://id:***@host/x"),
        ("sqlite:////tmp/catalog.db", "sqlite:////tmp/catalog.db"),
        ("http://127.0.0.1:8181", "http://127.0.0.1:8181"),
        ("postgresql://u@h/db?password=pw&sslmode=require", "postgresql://u@h/db?password=***&sslmode=require"),
        ("see https://a:b@h and http://c:d@e", "see https://a:***@h and http://c:***@e"),
        ("", ""),
    ],
)
def test_mask_uri(text: str, masked: str) -> None:
    assert mask_uri(text) == masked


def test_scrub_replaces_every_secret_longest_first() -> None:
    text = "key AK:verysecret failed for verysecret at http://u:pw@h"
    assert scrub(text, ["verysecret", "AK:verysecret", None, ""]) == "key *** failed for *** at http://u:***@h"


def test_settings_never_print_secrets_and_normalise_the_endpoint() -> None:
    settings = S3Settings("minio:9000", None, "AKID", "the-secret")
    assert "the-secret" not in repr(settings) and "AKID" not in repr(settings)
    assert settings.endpoint == "https://minio:9000"
    assert settings.region_name == "us-east-1"
    assert settings.describe() == "S3 endpoint https://minio:9000"
    assert S3Settings().describe() == "AWS S3"
    props = S3Settings("http://127.0.0.1:9000", "eu-west-1", "AKID", "the-secret").pyiceberg_properties()
    assert props == {
        "s3.region": "eu-west-1", "s3.endpoint": "http://127.0.0.1:9000", "s3.path-style-access": "true",
        "s3.access-key-id": "AKID", "s3.secret-access-key": "the-secret",
    }
    assert S3Settings().pyiceberg_properties() == {"s3.region": "us-east-1"}  # AWS default chain, no endpoint


def test_boto3_clients_are_shared_per_settings_and_path_style_for_endpoints() -> None:
    a = S3Settings("http://127.0.0.1:9000", None, "AK", "SK")
    assert a.boto3_client() is S3Settings("http://127.0.0.1:9000", None, "AK", "SK").boto3_client()
    assert a.boto3_client() is not S3Settings("http://127.0.0.1:9001", None, "AK", "SK").boto3_client()
    config = a.boto3_client().meta.config
    assert config.s3["addressing_style"] == "path" and config.signature_version == "s3v4"
    assert a.boto3_client().meta.endpoint_url == "http://127.0.0.1:9000"


# what a server or a library may echo back: the secret key, and an endpoint URL with a password in it
ECHO = "signed with SK-secret at http://u:pw@127.0.0.1:9000/lake"


@pytest.mark.parametrize(
    ("error", "kind", "phrase"),
    [
        (client_error("SignatureDoesNotMatch", 403, ECHO), StorageAccessError, "AWS_SECRET_ACCESS_KEY"),
        (client_error("InvalidAccessKeyId", 403, ECHO), StorageAccessError, "AWS_ACCESS_KEY_ID"),
        (client_error("AccessDenied", 403, ECHO), StorageAccessError, "lack permission"),
        (client_error("NoSuchBucket", 404, ECHO), StorageAccessError, "bucket does not exist"),
        (client_error("403", 403, ECHO), StorageAccessError, "HTTP 403"),
        (client_error("SlowDown", 503, f"Please reduce your request rate; {ECHO}"), StorageError,
         "reduce your request rate"),
        (client_error("InternalError", 500, ECHO), StorageError, "InternalError"),
        (EndpointConnectionError(endpoint_url="http://u:pw@127.0.0.1:1/?secret=SK-secret"), StorageError,
         "Could not connect"),
        (OSError(f"socket closed: {ECHO}"), StorageError, "socket closed"),
        (RuntimeError(f"unexpected: {ECHO}"), StorageError, "RuntimeError: unexpected"),
    ],
)
def test_s3_errors_are_terminal_refusals_or_transient_failures(error: Exception, kind: type, phrase: str) -> None:
    settings = S3Settings("http://u:pw@127.0.0.1:9000", None, "AK", "SK-secret")
    assert "SK-secret" in str(error)  # the error to scrub holds the secret
    converted = s3_error(error, action="upload", uri="s3://lake/x.parquet", s3=settings)
    assert type(converted) is kind
    assert isinstance(converted, TerminalError if kind is StorageAccessError else TransientError)
    assert is_transient(converted) is (kind is StorageError)
    text = str(converted)
    assert phrase in text and "s3://lake/x.parquet" in text and "upload" in text
    # the secret key and the endpoint's password are gone, wherever they were in the error
    assert "SK-secret" not in text and ":pw@" not in text and "u:***@" in text


def test_s3_error_finds_the_client_error_inside_an_upload_failure() -> None:
    try:
        try:
            raise client_error("SignatureDoesNotMatch", 403)
        except ClientError as inner:
            raise S3UploadFailedError("Failed to upload: SignatureDoesNotMatch") from inner
    except S3UploadFailedError as outer:
        converted = s3_error(outer, action="upload", uri="s3://b/k", s3=S3Settings())
    assert isinstance(converted, StorageAccessError) and "SignatureDoesNotMatch" in str(converted)


def test_object_metadata_is_ascii_reversible_and_within_2kb() -> None:
    metadata = object_metadata({"owner": " Équipe 100% <x@y.z> ", "classification": "internal,pii", "empty": ""})
    assert metadata == {
        "owner": "%C3%89quipe 100%25 <x@y.z>", "classification": "internal,pii", "empty": "",
    }
    assert unquote(metadata["owner"]) == "Équipe 100% <x@y.z>"
    assert all(v.isascii() and v.isprintable() for v in metadata.values())

    long = object_metadata({"a": "x" * 3000, "b": "é" * 500, "c": "short", "d": "y" * 900})
    assert sum(len(k) + len(v) for k, v in long.items()) <= MAX_USER_METADATA_BYTES
    assert long["c"] == "short"  # short values are kept whole
    assert long["a"].endswith("...") and long["b"].endswith("...") and long["d"].endswith("...")
    assert not re.search(r"%[0-9A-F]?\.\.\.$", long["b"])  # never half an escape
    assert abs(len(long["a"]) - len(long["d"])) <= 6  # the longest are shortened evenly


def test_object_tags_are_the_contract_ones_few_and_safe() -> None:
    metadata = {
        "domain": "sales", "data-product": "crm", "tenant-id": "acme", "owner": "Équipe <x@y.z>; drop",
        "classification": "internal,pii", "asset-name": "people", "run-id": "r1", "partition": "ingest_date=x",
    }
    tags = object_tags(metadata)
    assert tags == {
        "domain": "sales", "data-product": "crm", "tenant": "acme", "owner": "_quipe _x@y.z__ drop",
        "classification": "internal_pii",
    }
    assert all(TAG_CHARS.match(k) and TAG_CHARS.match(v) for k, v in tags.items())
    assert object_tags({"domain": "d"}) == {"domain": "d"}  # empty values are left out
    assert len(tag_safe("x" * 500, 256)) == 256


@pytest.mark.parametrize(
    ("pattern", "key", "matches"),
    [
        ("in/*.csv", "in/a.csv", True),
        ("in/*.csv", "in/sub/a.csv", False),
        ("in/**/*.csv", "in/a.csv", True),
        ("in/**/*.csv", "in/x/y/a.csv", True),
        ("in/**", "in/x/y/a.csv", True),
        ("in/?.csv", "in/ab.csv", False),
        ("in/[ab].csv", "in/b.csv", True),
        ("in*/*.csv", "inbox/e.csv", True),
        ("in/a.csv", "in/a.csv", True),
    ],
)
def test_glob_over_keys_level_by_level(pattern: str, key: str, matches: bool) -> None:
    assert _glob_match(pattern.split("/"), key.split("/")) is matches


@pytest.mark.parametrize(
    ("pattern", "key", "matches"),
    [
        ("in/**", "in", True),  # ** matches zero levels, also at the end
        ("**", "a/b/c", True),
        ("**/a.csv", "a.csv", True),
        ("in/**/**/x/*.csv", "in/x/a.csv", True),
        ("in/**/x/**/*.csv", "in/p/x/q/r/a.csv", True),
        ("in/**/x/**/*.csv", "in/p/q/r/a.csv", False),
        ("in/**/*.csv", "out/a.csv", False),
        ("in/*/", "in/a/", True),  # an empty last level is matched as a level
        ("in/*", "in/a/b", False),
    ],
)
def test_glob_double_star_spans_zero_or_more_levels(pattern: str, key: str, matches: bool) -> None:
    assert _glob_match(pattern.split("/"), key.split("/")) is matches


def test_many_double_stars_against_deep_keys_take_steps_linear_in_the_key_length(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Six ``**`` against a 40-level key that does not match: a matcher that tries every way to split the key
    among the ``**`` needs C(46, 6) (about 9 million) level comparisons; one pass over the key needs at most
    one per key level and pattern level."""
    import fnmatch

    calls = 0
    original = fnmatch.fnmatchcase

    def counting(name: str, pat: str) -> bool:
        nonlocal calls
        calls += 1
        if calls > 100_000:
            raise AssertionError(f"glob matching took more than 100,000 level comparisons ({pat!r} vs {name!r})")
        return original(name, pat)

    monkeypatch.setattr(fnmatch, "fnmatchcase", counting)
    pattern = "in/**/**/**/**/**/**/*.csv".split("/")
    deep = ["in", *[f"d{i}" for i in range(40)], "a.parquet"]
    assert _glob_match(pattern, deep) is False
    assert calls <= len(deep) * len(pattern)
    calls = 0
    assert _glob_match(pattern, [*deep[:-1], "a.csv"]) is True
    assert calls <= len(deep) * len(pattern)


def test_listing_follows_pages(monkeypatch: pytest.MonkeyPatch) -> None:
    """More than one page of ListObjectsV2 (1000 keys each on AWS) is followed to the end."""
    settings = S3Settings("http://127.0.0.1:1", None, "AK", "SK")
    client = settings.boto3_client()
    stubber = Stubber(client)
    page: dict[str, Any] = {"IsTruncated": True, "NextContinuationToken": "t1", "KeyCount": 1,
                            "Contents": [{"Key": "in/a.csv", "Size": 3, "ETag": '"e1"'}]}
    stubber.add_response("list_objects_v2", page, {"Bucket": "lake", "Prefix": "in/"})
    stubber.add_response(
        "list_objects_v2",
        {"IsTruncated": False, "KeyCount": 1, "Contents": [{"Key": "in/b.csv", "Size": 4, "ETag": '"e2-3"'}]},
        {"Bucket": "lake", "Prefix": "in/", "ContinuationToken": "t1"},
    )
    with stubber:
        listed = list(list_s3_objects("s3://lake/in/", settings))
    assert [(o.uri, o.size, o.etag) for o in listed] == [
        ("s3://lake/in/a.csv", 3, "e1"), ("s3://lake/in/b.csv", 4, "e2-3")
    ]


def test_an_unreachable_endpoint_is_transient() -> None:
    settings = S3Settings("http://127.0.0.1:1", None, "AK", "SK-secret")
    with pytest.raises(StorageError) as failed:
        list(list_s3_objects("s3://lake/in/", settings))
    assert is_transient(failed.value) and "127.0.0.1:1" in str(failed.value) and "SK-secret" not in str(failed.value)


def test_s3_time_stamps_are_read_without_dateutil(monkeypatch: pytest.MonkeyPatch) -> None:
    """A listing of 10,000 objects spent about a third of its time in dateutil parsing LastModified (botocore's
    default): the ISO 8601 time stamps of listings are read by datetime itself, other forms (HTTP dates of HEAD)
    as before, to the same instants."""
    from datetime import datetime, timezone  # noqa: PLC0415

    from botocore.utils import parse_timestamp  # noqa: PLC0415

    from dativo_dagster.storage import s3_timestamp  # noqa: PLC0415

    for text in ("2026-12-08T00:25:31.123Z", "2026-12-08T00:25:31Z", "2026-12-08T00:25:31.000+00:00",
                 "Tue, 08 Dec 2026 00:25:31 GMT"):
        assert s3_timestamp(text) == parse_timestamp(text), text
        assert s3_timestamp(text).tzinfo is not None
    assert s3_timestamp("2026-12-08T00:25:31.123Z") == datetime(2026, 12, 8, 0, 25, 31, 123000, tzinfo=timezone.utc)

    import dateutil.parser  # noqa: PLC0415

    def refuse(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("dateutil parsed an ISO time stamp")

    monkeypatch.setattr(dateutil.parser, "parse", refuse)
    monkeypatch.setattr(dateutil.parser, "isoparse", refuse)
    assert s3_timestamp("2026-12-08T00:25:31.5Z").microsecond == 500000
    settings = S3Settings("http://127.0.0.1:1", None, "AK", "SK")
    parser = settings.boto3_client()._endpoint._response_parser_factory  # noqa: SLF001 - which parser the client uses
    assert parser._defaults["timestamp_parser"] is s3_timestamp  # noqa: SLF001
