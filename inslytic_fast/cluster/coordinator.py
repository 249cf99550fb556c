"""Cluster mode's coordinator: one Redis (or Valkey) shared by every node, for keys and limits.

``serve --coordinator redis://host:6379/0`` makes the coordinator the home of the project
catalog and of the per-project token buckets (inslytic_fast.limits.globallimit). What lives there:

- ``<ns>catalog`` -- a hash: ``doc`` (the catalog document, the very JSON of catalog.json) and
  ``version`` (incremented by every edit). ``projects ... --coordinator URL`` edits it under a
  lock with a fencing check, so two operators' edits both land or one fails, never half.
- ``<ns>catalog:lock`` -- that lock (SET NX PX, released by compare-and-delete).
- ``<ns>members`` -- a sorted set of live limiters (node/worker -> last heartbeat), whose size
  divides a limit among the nodes while the coordinator is unreachable.
- ``<ns>bucket:<project>`` -- a project's token bucket for the current window.

Every node mirrors the catalog into its own ``<data_dir>/catalog.json`` (a poll of the version
every ``POLL_SECONDS``; the document only when it changed), and serves from that file exactly
as a single node does: a change made on any node's CLI works everywhere within
``POLL_SECONDS`` + the server's 1 s reload tick, and the mirror is the local cache that keeps
known keys working while the coordinator is unreachable (and across a restart meanwhile).

The password, when there is one, comes from ``INSLYTIC_COORDINATOR_PASSWORD`` or the URL; the
URL is shown with its password masked in every log line and error.
"""

from __future__ import annotations

import logging
import os
import secrets
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit, urlunsplit

from ..ingest.catalog import Catalog, CatalogDoc, CatalogError, encode_catalog, parse_catalog

if TYPE_CHECKING:
    import redis

log = logging.getLogger("inslytic_fast.coordinator")

PASSWORD_ENV = "INSLYTIC_COORDINATOR_PASSWORD"
NAMESPACE = "inslytic:"
# Poll of the catalog version and the membership heartbeat. With the server's 1 s reload tick
# a change is served everywhere within ~1.5 s (the issue asks for 2 s).
POLL_SECONDS = 0.5
# A member not heard from for this long no longer counts when a limit is divided among nodes.
MEMBER_TTL_SECONDS = 10.0
# Redis answers in well under a millisecond on a LAN; a call that takes this long is a failure.
# It bounds how long a grant can hold up a serving loop (once per outage: after a failure the
# loop stops calling until the link's thread reaches the coordinator again, see globallimit).
CALL_TIMEOUT_SECONDS = 1.0
# A catalog edit takes milliseconds; the lock's expiry only matters for a CLI killed mid-edit.
EDIT_LOCK_MS = 10_000
EDIT_LOCK_WAIT_SECONDS = 10.0

_RELEASE_LOCK = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""
# Fencing: write only if nobody wrote since we read (a lock that expired under a stalled CLI).
_WRITE_IF_VERSION = """
local current = tonumber(redis.call('HGET', KEYS[1], 'version') or '0')
if current ~= tonumber(ARGV[1]) then return -1 end
redis.call('HSET', KEYS[1], 'doc', ARGV[2], 'version', current + 1)
return current + 1
"""


class CoordinatorError(Exception):
    """The coordinator cannot be reached or used; the message masks any password."""


def masked(url: str) -> str:
    """The URL with its password (if any) replaced by ``***``: safe for logs and errors."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = parts.netloc.rsplit("@", 1)[1]
    user = parts.username or ""
    return urlunsplit(parts._replace(netloc=f"{user}:***@{netloc}"))


def check_url(url: str) -> str:
    parts = urlsplit(url)
    if parts.scheme not in ("redis", "rediss", "unix") or not (parts.hostname or parts.path):
        raise CoordinatorError(
            f"invalid coordinator URL {masked(url)!r}: use redis://HOST:PORT/DB (rediss:// for TLS)"
        )
    return url


def connect(url: str, *, timeout: float = CALL_TIMEOUT_SECONDS) -> redis.Redis:
    """A client for ``url`` (no I/O yet). Needs the ``cluster`` extra."""
    check_url(url)
    try:
        import redis
    except ImportError:
        raise CoordinatorError(
            "--coordinator needs the Redis client: pip install 'inslytic-fast[cluster]'"
        ) from None
    kwargs: dict[str, Any] = {
        "socket_timeout": timeout,
        "socket_connect_timeout": timeout,
        # A failed call is reported at once; the caller decides when to try again.
        "retry_on_timeout": False,
        "health_check_interval": 0,
    }
    password = os.environ.get(PASSWORD_ENV)
    if password:
        kwargs["password"] = password
    return redis.Redis.from_url(url, **kwargs)


def redis_errors() -> tuple[type[BaseException], ...]:
    import redis

    return (redis.RedisError, OSError)


def no_script_error() -> type[BaseException]:
    """What EVALSHA raises when the coordinator does not have the script (restarted)."""
    import redis

    return redis.exceptions.NoScriptError


class CoordinatorCatalog(Catalog):
    """The catalog kept in the coordinator: ``Catalog``'s edits with Redis as the store.

    Same operations, same document, same validation as the file; only where it is read from,
    how an edit is serialised (a lock with an expiry, plus a version check at write time so an
    edit whose lock expired cannot overwrite a newer one) and where it is written differ."""

    def __init__(self, url: str, data_dir: Path, *, clock: Callable[[], float] = time.time):
        super().__init__(data_dir, clock=clock)
        self.url = url
        self.client = connect(url, timeout=2.0)
        self.key = NAMESPACE + "catalog"
        self._read_version = 0
        self.label = f"coordinator catalog at {masked(url)}"

    @property
    def location(self) -> str:
        return self.label

    def _call(self, fn, *args):
        try:
            return fn(*args)
        except redis_errors() as exc:
            raise CatalogError(f"{self.label}: {exc}") from None

    def read_raw(self) -> tuple[int, bytes | None]:
        version, data = self._call(self.client.hmget, self.key, "version", "doc")
        return int(version or 0), data

    def exists(self) -> bool:
        return self.read_raw()[1] is not None

    def read(self) -> CatalogDoc:
        version, data = self.read_raw()
        self._read_version = version
        return CatalogDoc() if data is None else parse_catalog(self.label, data)

    def _take_lock(self, lock_key: str, token: str) -> bool:
        return bool(self.client.set(lock_key, token, px=EDIT_LOCK_MS, nx=True))

    @contextmanager
    def _locked(self) -> Iterator[None]:
        lock_key = self.key + ":lock"
        token = secrets.token_hex(16)
        deadline = time.monotonic() + EDIT_LOCK_WAIT_SECONDS
        while not self._call(self._take_lock, lock_key, token):
            if time.monotonic() > deadline:
                raise CatalogError(
                    f"{self.label}: the edit lock is still held after "
                    f"{EDIT_LOCK_WAIT_SECONDS:g} s; is another inslytic-fast command stuck?"
                )
            time.sleep(0.01)
        try:
            yield
        finally:
            try:
                self.client.eval(_RELEASE_LOCK, 1, lock_key, token)
            except redis_errors():
                pass  # it expires by itself

    def _write(self, doc: CatalogDoc) -> None:
        data = encode_catalog(doc)
        written = self._call(
            self.client.eval, _WRITE_IF_VERSION, 1, self.key, self._read_version, data
        )
        if written == -1:
            raise CatalogError(
                f"{self.label}: changed by another command during this edit; nothing was "
                "written, run the command again"
            )
        self._read_version = written

    def bootstrap(self, local: Catalog) -> str | None:
        """First node of a cluster: seed the coordinator with this node's catalog if it has
        one (a single node joining a cluster keeps its projects and keys), else create the
        ``default`` project and return its plaintext key. A coordinator that already holds a
        catalog is left as it is. Raises CatalogError if the coordinator is unreachable."""
        with self._locked():
            if self.read_raw()[1] is not None:
                if local.exists():
                    lost = sorted(set(local.read().projects) - set(self.read().projects))
                    if lost:
                        log.warning(
                            "projects %s of %s are not in the cluster's catalog: the mirror "
                            "replaces this node's catalog and their keys stop working here "
                            "(create them with `projects create --coordinator`)",
                            ", ".join(lost),
                            local.path,
                        )
                return None
            self._read_version = 0
            if local.exists():
                self._write(local.read())
                log.info("coordinator catalog seeded from %s", local.path)
                return None
            return self._create_default_project()


class CoordinatorLink:
    """A node's connection to the coordinator and its health, watched by a background thread.

    The thread polls every ``POLL_SECONDS`` (membership heartbeat, plus whatever the pollers
    registered, e.g. the catalog mirror); ``up`` is what the serving loop reads before it
    spends a round trip. An outage and its end are logged once each."""

    def __init__(
        self, url: str, member: str | None, *, timeout: float = CALL_TIMEOUT_SECONDS
    ) -> None:
        """``member``: this limiter's name in the membership set (None: not a limiter)."""
        self.url = url
        self.member = member
        self.client = connect(url, timeout=timeout)
        self.up = False
        self.members = 1
        self.down_since: float | None = time.time()
        self.errors = 0
        self.pollers: list[Callable[[redis.Redis], None]] = []
        # Called by ``stop`` first: what else talks to the coordinator (cluster.dedup's thread).
        self.stoppers: list[Callable[[], None]] = []
        self._last_error: str | None = None
        self._outage_logged = False
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._errors = redis_errors()

    def start(self) -> None:
        self.poll_once()
        self._thread = threading.Thread(target=self._run, name="inslytic-coordinator", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        for stopper in self.stoppers:
            stopper()
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        if self.member is not None:
            try:
                self.client.zrem(NAMESPACE + "members", self.member)
            except self._errors:
                pass

    def _run(self) -> None:
        while not self._stop.wait(POLL_SECONDS):
            self.poll_once()

    def poll_once(self) -> None:
        members_key = NAMESPACE + "members"
        try:
            now = time.time()
            pipe = self.client.pipeline(transaction=False)
            if self.member is not None:
                pipe.zadd(members_key, {self.member: now})
            pipe.zremrangebyscore(members_key, "-inf", now - MEMBER_TTL_SECONDS)
            pipe.zcard(members_key)
            self.members = max(1, int(pipe.execute()[-1]))
        except self._errors as exc:
            self.failed(exc)
            return
        self.recovered()
        try:
            for poller in self.pollers:
                poller(self.client)
        except self._errors as exc:
            self.failed(exc)
        except CatalogError as exc:
            # Reached, but the catalog there is unusable: keep serving the mirror, say why.
            self._log_error_once(str(exc))

    def failed(self, exc: BaseException) -> None:
        """A call to the coordinator failed (from the thread or a serving loop)."""
        self.errors += 1
        if self.up or self.down_since is None:
            self.down_since = time.time()
        self.up = False
        if not self._outage_logged:  # once per outage, however it fails meanwhile
            self._outage_logged = True
            log.error(
                "coordinator %s unreachable (%s: %s); serving known keys from the local "
                "catalog and limiting each project to this worker's lease plus 1/%d of its "
                "limit per window until it is back",
                masked(self.url),
                type(exc).__name__,
                exc,
                self.members,
            )

    def recovered(self) -> None:
        if not self.up:
            if self._outage_logged:
                log.warning(
                    "coordinator %s reachable again after %.1f s",
                    masked(self.url),
                    time.time() - (self.down_since or time.time()),
                )
            self.up = True
            self.down_since = None
            self._outage_logged = False
            self._last_error = None

    def _log_error_once(self, message: str) -> None:
        if message != self._last_error:
            self._last_error = message
            log.error("%s", message)

    def note(self) -> str | None:
        """Why this node runs degraded, or None."""
        if self.up:
            return None
        since = self.down_since or time.time()
        return (
            f"coordinator unreachable for {time.time() - since:.0f} s: serving known keys, "
            f"each project limited to 1/{self.members} of its limit on this worker, "
            "retries deduplicated on this node only"
        )


class CatalogMirror:
    """Copies the coordinator's catalog into ``<data_dir>/catalog.json`` when it changes.

    Runs on the link's thread. The file is replaced atomically under the local catalog lock,
    and the server's KeyRing reloads it on its next tick, exactly as after a local CLI edit."""

    def __init__(self, url: str, data_dir: Path) -> None:
        self.local = Catalog(data_dir)
        self.key = NAMESPACE + "catalog"
        self.label = f"coordinator catalog at {masked(url)}"
        self.version: int | None = None

    def __call__(self, client: redis.Redis) -> None:
        version = int(client.hget(self.key, "version") or 0)
        if version == self.version:
            return
        raw_version, raw_doc = client.hmget(self.key, "version", "doc")
        version = int(raw_version or 0)
        if raw_doc is None:
            self.version = version  # no catalog there yet (bootstrap runs at start)
            return
        # bytes: connect() never asks the client to decode replies (the typing allows both).
        data = raw_doc if isinstance(raw_doc, bytes) else raw_doc.encode()
        parse_catalog(self.label, data)  # never install a document we could not serve
        with self.local._locked():
            self.local._replace_atomically(data)
        self.version = version
        log.info("catalog version %d mirrored from the coordinator", version)


def start_cluster_catalog(
    url: str, data_dir: Path, member: str | None
) -> tuple[CoordinatorLink, str | None]:
    """What a node (the standalone server or the supervisor) does at start with --coordinator:
    bootstrap the coordinator's catalog if it has none, mirror it now, and keep mirroring.

    Coordinator unreachable at start: the node starts on its local catalog (the last mirror),
    logs it, and catches up when the coordinator answers. Returns the link and the first-run
    key when this start created the ``default`` project."""
    first_run_key = None
    try:
        first_run_key = CoordinatorCatalog(url, data_dir).bootstrap(Catalog(data_dir))
    except CatalogError as exc:
        log.error("%s; starting on the local catalog", exc)
    link = CoordinatorLink(url, member)
    link.pollers.append(CatalogMirror(url, data_dir))
    link.start()
    return link, first_run_key
