"""The object-store seam of the lake, and its one implementation on S3's API.

Everything the lake does (upload, read, compact, lease) goes through ``ObjectStore``: keys
relative to the lake's prefix, whole objects, S3's conditional writes. ``S3ObjectStore`` is
that seam on obstore (the Rust object_store crate; pyproject's cluster extra says why this
client), imported only when a lake is configured, so the embedded install never loads it.

Credentials: the standard AWS ways, read by the client (``AWS_ACCESS_KEY_ID`` /
``AWS_SECRET_ACCESS_KEY`` / ``AWS_SESSION_TOKEN``, web identity, ECS and EC2 instance roles),
never from the command line; ``AWS_REGION`` (default us-east-1).
"""

from __future__ import annotations

import asyncio
import hashlib
import os
from collections.abc import Awaitable, Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Protocol, TypeVar
from urllib.parse import urlsplit

if TYPE_CHECKING:
    from obstore import ObjectMeta, PutMode
    from obstore.store import S3Config

# Parts of 8 MiB: S3's minimum is 5 MiB; a 256 MiB compaction output is 32 parts.
MULTIPART_PART_BYTES = 8 * 1024 * 1024
T = TypeVar("T")
# How often a call in flight checks whether its caller stopped waiting (``cancelled``).
CANCEL_POLL_S = 0.05


class LakeError(Exception):
    """The lake cannot be used as configured; the message says what to fix."""


class UploadMismatch(LakeError):
    """The object under a file's name is not that file (size or checksum differ)."""


class CallCancelled(LakeError):
    """A call given up in flight because its caller stopped waiting (a clean stop's deadline)."""


@dataclass(frozen=True, slots=True)
class ObjectInfo:
    key: str
    size: int
    etag: str


class ObjectStore(Protocol):
    """What the lake needs of an object store; keys are relative to the lake's prefix."""

    def head(self, key: str) -> ObjectInfo | None: ...

    def put_file(self, key: str, path: Path, size: int) -> None:
        """One PUT, or a multipart upload for a large file (a lake job's output)."""
        ...

    def put_whole_file(self, key: str, path: Path) -> None:
        """One PUT of the whole file, never multipart: all or nothing, so a PUT cut off (a
        stop, a crash) leaves neither an object nor parts behind."""
        ...

    def put_bytes(self, key: str, data: bytes) -> None: ...

    def get_bytes(self, key: str) -> bytes: ...

    def get_file(self, key: str, path: Path) -> None: ...

    def list(self, prefix: str) -> Iterator[ObjectInfo]: ...

    def delete(self, key: str) -> None: ...

    def put_if(self, key: str, data: bytes, etag: str | None) -> str | None:
        """Write only if the object is absent (``etag`` None) or still has ``etag``; the new
        ETag, or None when the condition failed (S3 If-None-Match / If-Match)."""
        ...

    def get_with_etag(self, key: str) -> tuple[bytes, str] | None: ...


def parse_lake_url(url: str) -> tuple[str, str]:
    """``s3://bucket/prefix`` -> (bucket, prefix without slashes at the ends)."""
    parts = urlsplit(url)
    if parts.scheme != "s3" or not parts.netloc or parts.query or parts.fragment:
        raise LakeError(f"invalid lake URL {url!r}: use s3://BUCKET/PREFIX")
    return parts.netloc, parts.path.strip("/")


def _etag(value: str | None) -> str:
    """S3 quotes ETags; the lake compares them bare."""
    return (value or "").strip('"')


class S3ObjectStore:
    """``ObjectStore`` on obstore. Its own retries (3, backoff from 100 ms) cover a blip; the
    uploader's passes back off on longer outages.

    ``cancelled``: polled while a call of the uploader's (``head``, ``put_whole_file``,
    ``list``, ``get_bytes``) is in flight; once it holds, the call is dropped (its request
    with it) and raises ``CallCancelled``, so a stopping uploader's thread ends when told
    instead of waiting out the client's timeouts."""

    def __init__(
        self, url: str, endpoint: str = "", *, cancelled: Callable[[], bool] | None = None
    ) -> None:
        self._cancelled = cancelled
        bucket, self.prefix = parse_lake_url(url)
        try:  # an optional dependency: only a node or command with --lake needs it
            import obstore
            from obstore.exceptions import AlreadyExistsError, NotFoundError, PreconditionError
            from obstore.store import S3Store
        except ImportError:
            raise LakeError(
                "--lake needs the object-store client: pip install 'inslytic-fast[cluster]'"
            ) from None
        self._obstore = obstore
        self._not_found = NotFoundError
        self._condition_failed = (AlreadyExistsError, PreconditionError)
        config: S3Config = {}
        if endpoint:
            parts = urlsplit(endpoint)
            if parts.scheme not in ("http", "https") or not parts.netloc:
                raise LakeError(f"invalid --s3-endpoint {endpoint!r}: use http(s)://HOST:PORT")
            config["endpoint"] = endpoint
            # MinIO, SeaweedFS, Ceph: bucket in the path, not in the host name.
            config["virtual_hosted_style_request"] = False
        if not os.environ.get("AWS_REGION") and not os.environ.get("AWS_DEFAULT_REGION"):
            config["region"] = "us-east-1"
        self.store = S3Store(
            bucket,
            prefix=self.prefix or None,
            config=config,
            client_options={
                "allow_http": endpoint.startswith("http://"),
                "connect_timeout": timedelta(seconds=5),
                "timeout": timedelta(seconds=120),
            },
            retry_config={
                "max_retries": 3,
                "retry_timeout": timedelta(seconds=30),
                "backoff": {"init_backoff": timedelta(milliseconds=100), "base": 2.0},
            },
        )

    def head(self, key: str) -> ObjectInfo | None:
        try:
            if self._cancelled is None:
                meta = self._obstore.head(self.store, key)
            else:
                meta = self._until_cancelled(lambda: self._obstore.head_async(self.store, key))
        except (self._not_found, FileNotFoundError):
            return None
        return ObjectInfo(key, meta["size"], _etag(meta["e_tag"]))

    def put_whole_file(self, key: str, path: Path) -> None:
        # obstore cannot abort a multipart upload it was interrupted in (its parts would stay
        # until the bucket's lifecycle rule); one PUT of a node's rolled file (a 64 MiB
        # segment's Parquet at most) is atomic instead, at the cost of holding it in memory
        # (once: obstore reads the path itself, no Python copy).
        if self._cancelled is None:
            self._obstore.put(self.store, key, path, use_multipart=False)
        else:
            self._until_cancelled(
                lambda: self._obstore.put_async(self.store, key, path, use_multipart=False)
            )

    def _until_cancelled(self, call: Callable[[], Awaitable[T]]) -> T:
        return asyncio.run(self._polled(call))

    async def _polled(self, call: Callable[[], Awaitable[T]]) -> T:
        assert self._cancelled is not None
        task = asyncio.ensure_future(call())
        while not task.done():
            if self._cancelled():
                task.cancel()  # drops obstore's future, and so its request
                raise CallCancelled("the caller stopped waiting for the object store")
            await asyncio.wait({task}, timeout=CANCEL_POLL_S)
        return task.result()

    def put_file(self, key: str, path: Path, size: int) -> None:
        with open(path, "rb") as fh:
            self._obstore.put(
                self.store,
                key,
                fh,
                use_multipart=size > MULTIPART_PART_BYTES,
                chunk_size=MULTIPART_PART_BYTES,
                max_concurrency=4,
            )

    def put_bytes(self, key: str, data: bytes) -> None:
        self._obstore.put(self.store, key, data, use_multipart=False)

    def get_bytes(self, key: str) -> bytes:
        try:
            if self._cancelled is None:
                return bytes(self._obstore.get(self.store, key).bytes())
            return bytes(self._until_cancelled(lambda: self._get_bytes_async(key)))
        except self._not_found:
            raise FileNotFoundError(f"lake object {key} is gone") from None

    async def _get_bytes_async(self, key: str) -> bytes:
        result = await self._obstore.get_async(self.store, key)
        return bytes(await result.bytes_async())

    def get_file(self, key: str, path: Path) -> None:
        try:
            result = self._obstore.get(self.store, key)
        except self._not_found:
            raise FileNotFoundError(f"lake object {key} is gone") from None
        with open(path, "wb") as fh:
            for chunk in result:
                fh.write(chunk)

    def list(self, prefix: str) -> Iterator[ObjectInfo]:
        stream = self._obstore.list(self.store, prefix, chunk_size=1000)
        batches: Iterable[Sequence[ObjectMeta]] = stream
        if self._cancelled is not None:  # the whole listing at once, so a stop can drop it
            batches = [self._until_cancelled(stream.collect_async)]
        for batch in batches:
            for meta in batch:
                yield ObjectInfo(meta["path"], meta["size"], _etag(meta["e_tag"]))

    def delete(self, key: str) -> None:
        self._obstore.delete(self.store, key)  # deleting a missing object is not an error

    def put_if(self, key: str, data: bytes, etag: str | None) -> str | None:
        mode: PutMode = "create" if etag is None else {"e_tag": f'"{etag}"'}
        try:
            result = self._obstore.put(self.store, key, data, mode=mode, use_multipart=False)
        except self._condition_failed:
            return None
        return _etag(result["e_tag"])

    def get_with_etag(self, key: str) -> tuple[bytes, str] | None:
        try:
            result = self._obstore.get(self.store, key)
        except (self._not_found, FileNotFoundError):  # either, as in head()
            return None
        return bytes(result.bytes()), _etag(result.meta["e_tag"])


def expected_etag(path: Path) -> tuple[int, str]:
    """(size, ETag) S3 computes for this file as ``put_file`` sends it."""
    size, whole, multipart = file_etags(path)
    return size, multipart or whole


def file_etags(path: Path) -> tuple[int, str, str | None]:
    """(size, ETag of one PUT, ETag of ``put_file``'s multipart upload or None for a file of
    one part): the MD5, and the MD5 of the parts' MD5s with the part count."""
    whole = hashlib.md5(usedforsecurity=False)
    parts: list[bytes] = []
    size = 0
    with open(path, "rb") as fh:
        while chunk := fh.read(MULTIPART_PART_BYTES):
            size += len(chunk)
            whole.update(chunk)
            parts.append(hashlib.md5(chunk, usedforsecurity=False).digest())
    if size <= MULTIPART_PART_BYTES:
        return size, whole.hexdigest(), None
    combined = hashlib.md5(b"".join(parts), usedforsecurity=False).hexdigest()
    return size, whole.hexdigest(), f"{combined}-{len(parts)}"
