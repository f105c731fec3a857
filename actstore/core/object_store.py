"""Arrays in object storage (S3 and S3-compatible servers), through s3fs.

Endpoint and credentials come from the standard AWS environment (AWS_ENDPOINT_URL,
AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_DEFAULT_REGION, AWS_PROFILE, …), read by botocore as
for any AWS tool. Timeouts and retries are kept short so that an unreachable endpoint fails in
seconds and one that accepts and never answers in about ATTEMPTS x (connect + read timeout);
ACTSTORE_S3_CONNECT_TIMEOUT, ACTSTORE_S3_READ_TIMEOUT (seconds) and ACTSTORE_S3_ATTEMPTS raise
them. `object_store_error` turns what the S3 client raises (no bucket, no credentials, access
denied, no connection, no answer) into one line naming the problem and the fix.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any
from urllib.parse import urlparse

from actstore.core.errors import ActstoreError, UsageError, first_line
from actstore.core.extras import FIX, PURPOSE, check_engine

# Network bounds, each raised by its variable: seconds to connect, seconds to wait for an answer,
# and attempts of a request (botocore's, which also retries throttling; s3fs adds none).
TIMEOUTS = {"ACTSTORE_S3_CONNECT_TIMEOUT": 5.0, "ACTSTORE_S3_READ_TIMEOUT": 20.0,
            "ACTSTORE_S3_ATTEMPTS": 3}  # fmt: skip
# S3 bucket names: 3-63 lower-case letters, digits, dots and hyphens, a letter or digit at
# each end.
BUCKET = re.compile(r"^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$")
DENIED = ("AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch", "403 Forbidden")
NEED_S3FS = f"{PURPOSE['s3']}, and s3fs is not installed; {FIX.format(extra='s3')}"


def _s3fs() -> Any:
    check_engine("s3")
    import s3fs

    return s3fs


def network_bounds() -> dict[str, float]:
    """The connect timeout, read timeout and attempts in force (TIMEOUTS, raised by the
    environment); a value that is not a positive number is refused in one line."""
    out = {}
    for name, default in TIMEOUTS.items():
        text = os.environ.get(name, "").strip()
        try:
            value = float(text) if text else float(default)
        except ValueError:
            value = float("nan")
        if not (value > 0 and value < 1e6) or (name.endswith("ATTEMPTS") and value != int(value)):
            kind = "whole number" if name.endswith("ATTEMPTS") else "number of seconds"
            raise UsageError(f"{name}={text[:40]}: give a positive {kind} (default {default})")
        out[name] = value
    return out


def endpoint() -> str | None:
    """The S3 endpoint botocore would use, refused in one line when it has no scheme (botocore
    would fail later with a traceback)."""
    for name in ("AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL"):
        value = os.environ.get(name)
        if value:
            parsed = urlparse(value)
            if parsed.scheme not in ("http", "https") or not parsed.netloc:
                raise UsageError(
                    f"{name}={value[:80]}: give a URL with its scheme, e.g. "
                    "http://127.0.0.1:9000 or https://s3.example.com"
                )
            return value
    return None


def options() -> dict[str, Any]:
    """s3fs's options. The endpoint is named explicitly (it is what botocore would read) so that
    fsspec's cache of filesystems never answers for an endpoint the environment has left."""
    url = endpoint()
    bounds = network_bounds()
    config = {
        "connect_timeout": bounds["ACTSTORE_S3_CONNECT_TIMEOUT"],
        "read_timeout": bounds["ACTSTORE_S3_READ_TIMEOUT"],
        "retries": {"max_attempts": int(bounds["ACTSTORE_S3_ATTEMPTS"]), "mode": "standard"},
    }
    return {"config_kwargs": config, "client_kwargs": {"endpoint_url": url} if url else {}}


def filesystem(url: str) -> Any:
    """The (cached) synchronous s3fs filesystem for `url`."""
    fs = _s3fs().S3FileSystem(**options())
    fs.retries = 1  # botocore's attempts are the only retries: a dead server fails in bounds
    return fs


def zarr_store(url: str, read_only: bool) -> Any:
    """A zarr store of the objects under `url`."""
    _s3fs()
    from zarr.storage import FsspecStore

    store = FsspecStore.from_url(url, storage_options=options(), read_only=read_only)
    store.fs.retries = 1
    return store


def check_bucket(url: str, option: str = "--arrays-url") -> None:
    """Refuse a bucket name S3 would refuse (upper case, `_`, `!`, …) before any request."""
    bucket = urlparse(url).netloc
    if not BUCKET.match(bucket):
        raise UsageError(
            f"{option} {url[:120]}: {bucket!r} is not a valid bucket name (3-63 lower-case "
            "letters, digits, dots and hyphens); give s3://bucket-name/prefix"
        )


def probe(url: str) -> None:
    """Check, before anything is computed, that the bucket exists and can be listed with the
    credentials at hand."""
    bucket = urlparse(url).netloc
    with errors_as_actstore(url):
        fs = filesystem(url)
        fs.ls(f"s3://{bucket}", refresh=True)


@contextmanager
def errors_as_actstore(url: str) -> Iterator[None]:
    """Turn the S3 client's errors inside the block into one-line ActstoreErrors."""
    try:
        yield
    except ActstoreError:
        raise
    except Exception as exc:
        mapped = object_store_error(exc, url)
        if mapped is None:
            raise
        raise mapped from None


def _chain(exc: BaseException) -> Iterator[BaseException]:
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        yield exc
        exc = exc.__cause__ or exc.__context__


def object_store_error(exc: BaseException, url: str | None = None) -> ActstoreError | None:
    """The one-line error for an object-store failure, or None when `exc` is not one."""
    where = f" ({url})" if url else ""
    for link in _chain(exc):
        name = type(link).__name__
        text = str(link)
        if name == "NoCredentialsError" or "Unable to locate credentials" in text:
            return ActstoreError(
                f"no credentials for the object store{where}: set AWS_ACCESS_KEY_ID and "
                "AWS_SECRET_ACCESS_KEY (or AWS_PROFILE)"
            )
        if name in ("ReadTimeoutError", "ReadTimeout", "TimeoutError", "FSTimeoutError") or (
            "Read timeout on endpoint" in text
        ):
            bounds = network_bounds()
            return ActstoreError(
                f"the object store{where} did not answer within "
                f"{bounds['ACTSTORE_S3_READ_TIMEOUT']:g} s ({int(bounds['ACTSTORE_S3_ATTEMPTS'])} "
                "attempts); check AWS_ENDPOINT_URL and the server, or raise "
                "ACTSTORE_S3_READ_TIMEOUT for a slow one"
            )
        if name in ("EndpointConnectionError", "ClientConnectorError", "ConnectTimeoutError") or (
            "Could not connect to the endpoint" in text
        ):
            return ActstoreError(
                f"cannot reach the object store{where}: {first_line(text, 200)}; check "
                "AWS_ENDPOINT_URL and that the server is running"
            )
        if "NoSuchBucket" in text or "bucket does not exist" in text:
            bucket = urlparse(url).netloc if url else "the bucket"
            return UsageError(
                f"bucket {bucket} does not exist at the object store{where}: create it, or fix "
                "--arrays-url (and AWS_ENDPOINT_URL)"
            )
        if any(code in text for code in DENIED):
            return ActstoreError(
                f"the object store refused access{where}: {first_line(text, 200)}; check "
                "AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY and the bucket's permissions"
            )
        if name == "ModuleNotFoundError" and "s3fs" in text:
            return ActstoreError(NEED_S3FS)
    return None
