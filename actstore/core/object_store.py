"""Arrays in object storage (S3 and S3-compatible servers), through s3fs.

Endpoint and credentials come from the standard AWS environment (AWS_ENDPOINT_URL,
AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_DEFAULT_REGION, AWS_PROFILE, …), read by botocore as
for any AWS tool. Timeouts and retries are kept short so that an unreachable endpoint fails in
seconds, and `object_store_error` turns what the S3 client raises (no bucket, no credentials,
access denied, no connection) into one line naming the problem and the fix.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any
from urllib.parse import urlparse

from actstore.core.errors import ActstoreError, UsageError
from actstore.core.extras import FIX, PURPOSE, check_engine

# botocore's client settings: fail fast on a dead endpoint, retry throttling a few times.
CLIENT_CONFIG = {
    "connect_timeout": 5,
    "read_timeout": 60,
    "retries": {"max_attempts": 3, "mode": "standard"},
}
DENIED = ("AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch", "403 Forbidden")
NEED_S3FS = f"{PURPOSE['s3']}, and s3fs is not installed; {FIX.format(extra='s3')}"


def _s3fs() -> Any:
    check_engine("s3")
    import s3fs

    return s3fs


def options() -> dict[str, Any]:
    """s3fs's options. The endpoint is named explicitly (it is what botocore would read) so that
    fsspec's cache of filesystems never answers for an endpoint the environment has left."""
    endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
    client = {"endpoint_url": endpoint} if endpoint else {}
    return {"config_kwargs": CLIENT_CONFIG, "client_kwargs": client}


def filesystem(url: str) -> Any:
    """The (cached) synchronous s3fs filesystem for `url`."""
    return _s3fs().S3FileSystem(**options())


def zarr_store(url: str, read_only: bool) -> Any:
    """A zarr store of the objects under `url`."""
    _s3fs()
    from zarr.storage import FsspecStore

    return FsspecStore.from_url(url, storage_options=options(), read_only=read_only)


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
        if name in ("EndpointConnectionError", "ClientConnectorError", "ConnectTimeoutError") or (
            "Could not connect to the endpoint" in text
        ):
            return ActstoreError(
                f"cannot reach the object store{where}: {_first(text)}; check AWS_ENDPOINT_URL "
                "and that the server is running"
            )
        if "NoSuchBucket" in text or "bucket does not exist" in text:
            bucket = urlparse(url).netloc if url else "the bucket"
            return UsageError(
                f"bucket {bucket} does not exist at the object store{where}: create it, or fix "
                "--arrays-url (and AWS_ENDPOINT_URL)"
            )
        if any(code in text for code in DENIED):
            return ActstoreError(
                f"the object store refused access{where}: {_first(text)}; check "
                "AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY and the bucket's permissions"
            )
        if name == "ModuleNotFoundError" and "s3fs" in text:
            return ActstoreError(NEED_S3FS)
    return None


def _first(text: str) -> str:
    line = text.strip().splitlines()[0] if text.strip() else "no detail"
    return line[:200]
