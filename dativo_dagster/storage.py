"""Object storage: one interface over a local folder and an S3-compatible bucket."""

from __future__ import annotations

import posixpath
from dataclasses import dataclass, field
from urllib.parse import urlparse

import pyarrow.fs as pafs


@dataclass(frozen=True)
class S3Settings:
    """How to reach S3 (or an S3-compatible store). Secrets are never printed."""

    endpoint: str | None = None
    region: str | None = None
    access_key_id: str | None = field(default=None, repr=False)
    secret_access_key: str | None = field(default=None, repr=False)

    def pyarrow_filesystem(self) -> pafs.S3FileSystem:
        """A pyarrow S3 filesystem with path-style addressing when an endpoint is set."""
        kwargs: dict[str, object] = {"region": self.region or "us-east-1"}
        if self.endpoint:
            parsed = urlparse(self.endpoint)
            kwargs["endpoint_override"] = parsed.netloc or parsed.path
            kwargs["scheme"] = parsed.scheme or "https"
            kwargs["force_virtual_addressing"] = False
        if self.access_key_id and self.secret_access_key:
            kwargs["access_key"] = self.access_key_id
            kwargs["secret_key"] = self.secret_access_key
        return pafs.S3FileSystem(**kwargs)

    def pyiceberg_properties(self) -> dict[str, str]:
        """FileIO properties for pyiceberg."""
        props = {"s3.region": self.region or "us-east-1"}
        if self.endpoint:
            props["s3.endpoint"] = self.endpoint
            props["s3.path-style-access"] = "true"
        if self.access_key_id and self.secret_access_key:
            props["s3.access-key-id"] = self.access_key_id
            props["s3.secret-access-key"] = self.secret_access_key
        return props


def is_s3_uri(uri: str) -> bool:
    """Whether ``uri`` names an S3 object or prefix."""
    return uri.startswith(("s3://", "s3a://"))


def split_s3_uri(uri: str) -> tuple[str, str]:
    """``s3://bucket/key`` -> (bucket, key)."""
    parsed = urlparse(uri)
    return parsed.netloc, parsed.path.lstrip("/")


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
