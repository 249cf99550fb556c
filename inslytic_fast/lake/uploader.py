"""Cluster mode's lake: finished Parquet files leave the node for object storage, exactly once.

``serve --lake s3://bucket/prefix [--s3-endpoint URL]`` runs an uploader beside the roller. It
takes each *finished* file of the local ``events/`` tree (its log segment rolled and gone, no
compaction intent naming it) and stores it as ::

    <prefix>/events/<the file's directory, as in events/>/<node>-<file name>

Names are deterministic (the node id and the roller's own name, which comes from a segment
that exists once), so a retry, a replay after a crash or a second uploader over the same tree
all aim at the same object. Per file, each step named for the crash tests (``_step``):

1. ``upload:start`` -- if the object already exists (an upload that finished before a crash) it
   is verified and kept; if it was compacted away in the lake (an intent names it as an
   input), the local copy is a duplicate of rows already there. Otherwise:
2. ``upload:put`` -- one PUT, or a multipart upload for files over ``MULTIPART_PART_BYTES``.
   An interrupted multipart upload leaves no object (only parts: the bucket's
   AbortIncompleteMultipartUpload lifecycle rule removes them).
3. ``upload:verified`` -- HEAD: size and ETag (the MD5 S3 computes, or for multipart the MD5
   of the parts' MD5s) must be what this node computed from its file. A mismatch keeps the
   local file and is reported (two nodes with one --node-id would do that).
4. ``upload:local_deleted`` -- the local file goes, under the roller's lock (readers pause the
   roller with it, so a reader never loses a file it listed).

Object store down or slow: files wait locally (the node keeps accepting until
``--min-free-bytes`` or ``--max-unrolled-bytes`` trip, then 503 as without a lake), passes
back off from 1 s to 30 s, and uploads resume by themselves. The uploader's view of the local
tree is only "finished files and their paths" (``finished_files``), so a change of the local
layout changes nothing here.

Credentials: the standard AWS ways, read by the object-store client (``AWS_ACCESS_KEY_ID`` /
``AWS_SECRET_ACCESS_KEY`` / ``AWS_SESSION_TOKEN``, web identity, ECS and EC2 instance roles),
never from the command line; ``AWS_REGION`` (default us-east-1).
"""

from __future__ import annotations

import hashlib
import logging
import os
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Protocol
from urllib.parse import urlsplit

import orjson

from ..log.commitlog import LOG_DIRNAME, list_segments
from ..runtime.durable import fsync_dir
from ..runtime.filelock import lock_exclusive
from ..storage.storage import (
    EVENTS_DIRNAME,
    INTENTS_DIRNAME,
    ROLLER_LOCK_NAME,
    partition_dirs,
    source_segment,
)

log = logging.getLogger("inslytic_fast.lake")

LAKE_EVENTS = "events"
LAKE_INTENTS = "_compactions"
# Parts of 8 MiB: S3's minimum is 5 MiB; a 64 MiB segment's Parquet is a handful of parts.
MULTIPART_PART_BYTES = 8 * 1024 * 1024
# Between passes: a finished file waits at most this long when all is well.
UPLOAD_INTERVAL_S = 1.0
MAX_BACKOFF_S = 30.0
# The roller holds its lock for a roll (seconds); a local delete waits this long for it.
LOCAL_DELETE_LOCK_WAIT_S = 10.0
STATUS_FILE = "lake.json"  # in <data_dir>/run/: what /ready and /metrics report


class LakeError(Exception):
    """The lake cannot be used as configured; the message says what to fix."""


class UploadMismatch(LakeError):
    """The object under a file's name is not that file (size or checksum differ)."""


# The object-store seam -----------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ObjectInfo:
    key: str
    size: int
    etag: str


class ObjectStore(Protocol):
    """What the lake needs of an object store; keys are relative to the lake's prefix."""

    def head(self, key: str) -> ObjectInfo | None: ...

    def put_file(self, key: str, path: Path, size: int) -> None: ...

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


class S3ObjectStore:
    """``ObjectStore`` on obstore (the Rust object_store crate): see pyproject's cluster extra
    for why this client. Its own retries (3, backoff from 100 ms) cover a blip; the uploader's
    passes back off on longer outages."""

    def __init__(self, url: str, endpoint: str = "") -> None:
        bucket, self.prefix = parse_lake_url(url)
        try:
            import obstore
            from obstore.store import S3Store
        except ImportError:
            raise LakeError(
                "--lake needs the object-store client: pip install 'inslytic-fast[cluster]'"
            ) from None
        self._obstore = obstore
        from obstore.exceptions import NotFoundError

        self._not_found = NotFoundError
        config: dict = {}
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
            meta = self._obstore.head(self.store, key)
        except (self._not_found, FileNotFoundError):
            return None
        return ObjectInfo(key, meta["size"], (meta["e_tag"] or "").strip('"'))

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
            return bytes(self._obstore.get(self.store, key).bytes())
        except self._not_found:
            raise FileNotFoundError(f"lake object {key} is gone") from None

    def get_file(self, key: str, path: Path) -> None:
        try:
            result = self._obstore.get(self.store, key)
        except self._not_found:
            raise FileNotFoundError(f"lake object {key} is gone") from None
        with open(path, "wb") as fh:
            for chunk in result:
                fh.write(chunk)

    def list(self, prefix: str) -> Iterator[ObjectInfo]:
        for batch in self._obstore.list(self.store, prefix, chunk_size=1000):
            for meta in batch:
                yield ObjectInfo(meta["path"], meta["size"], (meta["e_tag"] or "").strip('"'))

    def delete(self, key: str) -> None:
        self._obstore.delete(self.store, key)  # deleting a missing object is not an error

    def put_if(self, key: str, data: bytes, etag: str | None) -> str | None:
        from obstore.exceptions import AlreadyExistsError, PreconditionError

        mode = "create" if etag is None else {"e_tag": f'"{etag}"'}
        try:
            result = self._obstore.put(self.store, key, data, mode=mode, use_multipart=False)
        except (AlreadyExistsError, PreconditionError):
            return None
        return (result["e_tag"] or "").strip('"')

    def get_with_etag(self, key: str) -> tuple[bytes, str] | None:
        try:
            result = self._obstore.get(self.store, key)
        except self._not_found:
            return None
        return bytes(result.bytes()), (result.meta["e_tag"] or "").strip('"')


def expected_etag(path: Path) -> tuple[int, str]:
    """(size, ETag) S3 computes for this file as ``put_file`` sends it."""
    whole = hashlib.md5(usedforsecurity=False)
    parts: list[bytes] = []
    size = 0
    with open(path, "rb") as fh:
        while chunk := fh.read(MULTIPART_PART_BYTES):
            size += len(chunk)
            whole.update(chunk)
            parts.append(hashlib.md5(chunk, usedforsecurity=False).digest())
    if size <= MULTIPART_PART_BYTES:
        return size, whole.hexdigest()
    combined = hashlib.md5(b"".join(parts), usedforsecurity=False).hexdigest()
    return size, f"{combined}-{len(parts)}"


# The local side: which files are finished ----------------------------------------------------


@dataclass(frozen=True, slots=True)
class LocalFile:
    path: Path
    relative: str  # under events/, POSIX separators: the hive path, e.g. project=p/date=d/x
    size: int
    mtime: float


def finished_files(data_dir: Path) -> list[LocalFile]:
    """Parquet files of ``events/`` the roller is done with: their log segment has left the
    log, and no pending compaction intent names them. Oldest first."""
    events_dir = data_dir / EVENTS_DIRNAME
    live = {
        p.name.rsplit(".", 1)[0]
        for segs in list_segments(data_dir / LOG_DIRNAME).values()
        for p in segs
    }
    busy: set[str] = set()
    intents = events_dir / INTENTS_DIRNAME
    if intents.is_dir():
        for entry in os.scandir(intents):
            try:
                intent = orjson.loads(Path(entry.path).read_bytes())
            except (OSError, orjson.JSONDecodeError):
                continue  # being written: its compaction has published nothing yet
            busy.add(f"{intent['partition']}/{intent['output']}")
            busy.update(f"{intent['partition']}/{name}" for name in intent["inputs"])
    out = []
    for partition in partition_dirs(events_dir):
        try:
            entries = list(os.scandir(partition))
        except FileNotFoundError:
            continue  # dropped by retention or a purge meanwhile
        for entry in entries:
            if not entry.name.endswith(".parquet") or source_segment(entry.name) in live:
                continue
            relative = Path(entry.path).relative_to(events_dir).as_posix()
            if relative in busy:
                continue
            try:
                st = entry.stat()
            except FileNotFoundError:
                continue
            out.append(LocalFile(Path(entry.path), relative, st.st_size, st.st_mtime))
    out.sort(key=lambda f: f.mtime)
    return out


def object_key(node: str, relative: str) -> str:
    directory, _, name = relative.rpartition("/")
    return (
        f"{LAKE_EVENTS}/{directory}/{node}-{name}" if directory else f"{LAKE_EVENTS}/{node}-{name}"
    )


def read_intents(store: ObjectStore) -> dict[str, dict]:
    """The lake's compaction intents by key (kept after their merge, as its record)."""
    intents = {}
    for info in store.list(LAKE_INTENTS + "/"):
        try:
            intents[info.key] = orjson.loads(store.get_bytes(info.key))
        except FileNotFoundError:
            continue  # undone by a recovering leader meanwhile
    return intents


def merged_away(intents: dict[str, dict], present: set[str]) -> set[str]:
    """Keys whose rows live in another object: inputs of an intent whose output is present,
    or was itself merged further (a small output can be the input of a later compaction)."""
    gone: set[str] = set()
    changed = True
    while changed:
        changed = False
        for intent in intents.values():
            if intent["output"] in present or intent["output"] in gone:
                before = len(gone)
                gone.update(intent["inputs"])
                changed |= len(gone) != before
    return gone


def lake_listing(store: ObjectStore) -> tuple[dict[str, ObjectInfo], set[str]]:
    """The lake's event objects a reader should use, and every key compacted away.

    Intents are read after the listing (as query.py does locally): an output seen in the
    listing was written after its intent, and the intent outlives the inputs it names, so an
    input still listed beside its output is dropped rather than read twice."""
    listing = {info.key: info for info in store.list(LAKE_EVENTS + "/")}
    gone = merged_away(read_intents(store), set(listing))
    for key in gone:
        listing.pop(key, None)
    return listing, gone


class LakeView:
    """``query``/``export --lake``: the lake plus this node's local data not yet in it.

    Called with a local snapshot (query.take_snapshot, taken first), it drops the local files
    that are already in the lake under this node's name (uploaded, or uploaded and compacted)
    and adds the lake's objects, downloaded into ``cache_dir`` (kept between runs, keyed by
    object name; objects never change under a name, so a cached copy of the right size is
    the object). Another node's files that are not uploaded yet are not seen."""

    def __init__(self, store: ObjectStore, node: str, data_dir: Path, cache_dir: Path) -> None:
        self.store = store
        self.node = node
        self.events_dir = Path(data_dir) / EVENTS_DIRNAME
        self.cache_dir = Path(cache_dir)

    def __call__(self, snapshot) -> None:
        try:
            self._extend(snapshot)
        except (FileNotFoundError, LakeError):
            raise  # FileNotFoundError: an object went meanwhile; the query retries
        except Exception as exc:  # the client's own errors: unreachable, denied, ...
            raise LakeError(f"cannot read the lake: {type(exc).__name__}: {exc}") from None

    def _extend(self, snapshot) -> None:
        listing, gone = lake_listing(self.store)
        local = []
        for path in snapshot.parquet_files:
            key = object_key(self.node, path.relative_to(self.events_dir).as_posix())
            if key not in listing and key not in gone:
                local.append(path)
        snapshot.parquet_files = local + [self._cached(info) for info in listing.values()]
        self._prune(listing)

    def _cached(self, info: ObjectInfo) -> Path:
        path = self.cache_dir / info.key
        try:
            if path.stat().st_size == info.size:
                return path
        except FileNotFoundError:
            pass
        path.parent.mkdir(parents=True, exist_ok=True)
        partial = path.with_name(f".{path.name}.{os.getpid()}.part")
        self.store.get_file(info.key, partial)
        os.replace(partial, path)
        return path

    def _prune(self, listing: dict[str, ObjectInfo]) -> None:
        """Cached objects the lake no longer has (compacted, retention) leave the cache."""
        root = self.cache_dir / LAKE_EVENTS
        for directory, _, names in os.walk(root):
            for name in names:
                path = Path(directory) / name
                if path.relative_to(self.cache_dir).as_posix() not in listing:
                    path.unlink(missing_ok=True)


def default_cache_dir(lake_url: str) -> Path:
    bucket, prefix = parse_lake_url(lake_url)
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return base / "inslytic-fast" / "lake" / bucket / prefix


# The uploader ---------------------------------------------------------------------------------


class Uploader:
    """Ships finished files to the lake. ``upload_once`` is one pass; ``start`` runs passes on a
    thread with backoff. Counters and the pending backlog go to ``<data_dir>/run/lake.json``."""

    def __init__(
        self,
        store: ObjectStore,
        data_dir: Path,
        node: str,
        *,
        step_hook: Callable[[str], None] | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.store = store
        self.data_dir = Path(data_dir)
        self.node = node
        self._step_hook = step_hook
        self._clock = clock
        self.uploaded_files = 0
        self.uploaded_bytes = 0
        self.errors = 0
        self.last_error: str | None = None
        self.failing_since: float | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._compacted: set[str] | None = None

    def _step(self, name: str) -> None:
        if self._step_hook is not None:
            self._step_hook(name)

    # One pass

    def upload_once(self) -> int:
        """Upload every finished file; return how many left the node. Raises on the first
        failure (the pass is retried; files already done stay done)."""
        self._compacted = None  # read lazily, once per pass, only if an object is missing
        done = 0
        for local in finished_files(self.data_dir):
            if self._stop.is_set():
                break
            if self._ship(local):
                done += 1
        return done

    def _ship(self, local: LocalFile) -> bool:
        key = object_key(self.node, local.relative)
        self._step("upload:start")
        try:
            size, etag = expected_etag(local.path)
        except FileNotFoundError:
            return False  # dropped by retention or a purge since the listing
        found = self.store.head(key)
        if found is None:
            if self._compacted is None:
                self._compacted = lake_listing(self.store)[1]
            if key in self._compacted:
                # Uploaded before, then merged by a lake compaction: its rows are there.
                log.info("lake: %s was uploaded and compacted before; dropping the copy", key)
            else:
                self.store.put_file(key, local.path, size)
                self._step("upload:put")
                found = self.store.head(key)
                self._check(key, found, size, etag)
                self.uploaded_files += 1
                self.uploaded_bytes += size
        else:
            self._check(key, found, size, etag)
        self._step("upload:verified")
        if not self._delete_local(local.path):
            return False
        self._step("upload:local_deleted")
        return True

    def _check(self, key: str, found: ObjectInfo | None, size: int, etag: str) -> None:
        if found is None:
            raise UploadMismatch(f"lake object {key} is missing right after its upload")
        if found.size != size or found.etag != etag:
            raise UploadMismatch(
                f"lake object {key} is not this node's file (size {found.size} vs {size}, "
                f"ETag {found.etag} vs {etag}); the local copy is kept. Does another node use "
                f"--node-id {self.node!r}?"
            )

    def _delete_local(self, path: Path) -> bool:
        """Under the roller's lock: a reader that paused the roller keeps its files."""
        events_dir = self.data_dir / EVENTS_DIRNAME
        fd = os.open(events_dir / ROLLER_LOCK_NAME, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            if not lock_exclusive(fd, LOCAL_DELETE_LOCK_WAIT_S):
                return False  # next pass; the object is verified, so this is cheap
            try:
                os.unlink(path)
            except FileNotFoundError:
                return True
            fsync_dir(path.parent)
            return True
        finally:
            os.close(fd)

    # Status for /ready and /metrics

    def status(self) -> dict:
        pending = finished_files(self.data_dir)
        now = self._clock()
        return {
            "node": self.node,  # query --lake on this data dir matches files by it
            "pending_files": len(pending),
            "pending_bytes": sum(f.size for f in pending),
            "lag_seconds": max(0.0, now - pending[0].mtime) if pending else 0.0,
            "uploaded_files": self.uploaded_files,
            "uploaded_bytes": self.uploaded_bytes,
            "errors": self.errors,
            "failing_since": self.failing_since,
            "last_error": self.last_error,
        }

    def write_status(self) -> None:
        from ..observe.metrics import write_snapshot
        from ..runtime.server import run_dir

        directory = run_dir(self.data_dir)
        directory.mkdir(parents=True, exist_ok=True)
        write_snapshot(directory / STATUS_FILE, self.status())

    # The thread

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="inslytic-lake", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)

    def _run(self) -> None:
        failures = 0
        while not self._stop.is_set():
            try:
                self.upload_once()
            except Exception as exc:  # the store, the network, a mismatch: retry later
                failures += 1
                self.errors += 1
                message = f"{type(exc).__name__}: {exc}"
                if self.failing_since is None:
                    self.failing_since = self._clock()
                if failures == 1 or message != self.last_error:
                    log.error("lake: upload pass failed (%s); files wait locally", message)
                self.last_error = message
            else:
                if failures:
                    log.warning("lake: uploads resumed after %d failed passes", failures)
                failures = 0
                self.failing_since = None
                self.last_error = None
            try:
                self.write_status()
            except OSError:
                pass
            delay = UPLOAD_INTERVAL_S * 2**failures if failures else UPLOAD_INTERVAL_S
            self._stop.wait(min(delay, MAX_BACKOFF_S))


def start_uploader(settings) -> Uploader:
    """The node's uploader thread (``serve --lake``), started; ``stop()`` it on the way out."""
    uploader = Uploader(
        S3ObjectStore(settings.lake, settings.s3_endpoint), settings.data_dir, settings.node
    )
    uploader.start()
    return uploader


def read_status(data_dir: Path) -> dict | None:
    from ..runtime.server import run_dir

    try:
        return orjson.loads((run_dir(data_dir) / STATUS_FILE).read_bytes())
    except (OSError, orjson.JSONDecodeError):
        return None


def degraded_note(status: dict | None, now: float) -> str | None:
    if not status or status.get("failing_since") is None:
        return None
    return (
        f"lake uploads failing for {now - status['failing_since']:.0f} s "
        f"({status['pending_files']} files, {status['pending_bytes']} bytes wait locally): "
        f"{status['last_error']}"
    )
