"""The server's key map: API key -> project, reloaded when the catalog file changes.

``KeyRing.lookup`` runs once per request and does no I/O; ``reload_if_changed`` runs on the
server's tick and re-reads ``catalog.json`` (see ``catalog``) only when the file changed.
"""

from __future__ import annotations

import hashlib
import logging
import os
import time
import zlib
from collections.abc import Callable
from pathlib import Path

import msgspec

from .catalog import (
    CATALOG_VERSION,
    PROJECT_DECODER,
    RAW_CATALOG_DECODER,
    Catalog,
    CatalogDoc,
    CatalogError,
    ProjectRecord,
    parse_catalog,
    valid_project_name,
)
from .keys import BASE62_PAIRS, BODY_END, BODY_START, KEY_LENGTH, KEY_PREFIX_BYTES, PAIR_RADIX

log = logging.getLogger("inslytic_fast.auth")


class Project:
    """A project as the ingest path sees it. The same instance is kept across catalog reloads
    (its limit updated in place), so holders of a reference see limit changes."""

    __slots__ = ("name", "events_per_minute", "origins")

    def __init__(
        self, name: str, events_per_minute: int | None, origins: frozenset[bytes] | None = None
    ) -> None:
        self.name = name
        # None: the server's default limit (--events-per-minute); 0: unlimited.
        self.events_per_minute = events_per_minute
        # Origin header values allowed to send with this project's keys; None: any.
        self.origins = origins

    def __repr__(self) -> str:
        return f"Project({self.name!r}, events_per_minute={self.events_per_minute!r})"


# A file modified this recently when we read it may be rewritten in place within the same
# timestamp tick (ext4 and tmpfs stamp with the kernel's ~4 ms clock tick; FAT has 2 s), leaving
# (inode, mtime, ctime, size) unchanged. Such a "racily clean" file (git's term and remedy) is
# compared by content on the next ticks until it is older than this.
RACY_WINDOW_NS = 2_000_000_000

_Signature = tuple[int, int, int, int]
_NO_FILE: _Signature = (0, 0, 0, 0)
_UNREAD = object()  # distinct from None, which stands for 'no catalog file'


def _signature(st: os.stat_result) -> _Signature:
    return (st.st_ino, st.st_mtime_ns, st.st_ctime_ns, st.st_size)


def _dir_identity(path: Path) -> tuple[int, int] | None:
    """(device, inode) of a directory, or None if it does not exist."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_dev, st.st_ino


class KeyRing:
    """The server's view of the catalog: key digest -> project, reloaded when the file changes.

    ``lookup`` does no I/O. Expiry is checked against the injected clock at lookup time, but
    only for keys that have an expiry (rotated-out keys in their grace period), so a key is
    refused from the exact moment it expires and non-expiring keys pay nothing for it.
    """

    def __init__(self, data_dir: Path, *, clock: Callable[[], float] = time.time) -> None:
        self._catalog = Catalog(data_dir, clock=clock)
        self._clock = clock
        self._by_digest: dict[bytes, tuple[Project, float | None]] = {}
        # Keys that matched a digest since the catalog was installed: at most one entry per
        # catalog key, emptied by every reload (so a revoked key stops at once).
        self._verified: dict[bytes, tuple[Project, float | None]] = {}
        self._projects: dict[str, Project] = {}
        # Per project, as last installed: its record, key-map entries and JSON text.
        self._installed: dict[str, tuple[ProjectRecord, list, msgspec.Raw | None]] = {}
        self._texts: dict[str, msgspec.Raw] = {}  # set by _parse_changes for _install
        # What the last read saw: the file's stat signature, whether it was racily recent,
        # and its bytes (None: no file). The CLI replaces the file by rename, so the inode
        # alone changes on every CLI write even when two fall in the same mtime tick.
        self._seen_signature: _Signature | None = None
        self._seen_racy = False
        self._seen_data: bytes | None | object = _UNREAD
        self._last_error: str | None = None
        self._data_dir_identity: tuple[int, int] | None = None

    @property
    def catalog_path(self) -> Path:
        return self._catalog.path

    @property
    def projects(self) -> dict[str, Project]:
        return self._projects

    def load(self) -> None:
        """Read the catalog now (a missing file means no projects). Raises CatalogError."""
        signature, racy, data = self._read_bytes()
        doc = CatalogDoc() if data is None else parse_catalog(self._catalog.path, data)
        self._data_dir_identity = _dir_identity(self._catalog.path.parent)
        self._install(doc)
        self._seen_signature, self._seen_racy, self._seen_data = signature, racy, data

    def lookup(
        self,
        api_key: bytes,
        *,
        _pairs=BASE62_PAIRS,
        _crc32=zlib.crc32,
        _sha256=hashlib.sha256,
    ) -> Project | None:
        """The project ``api_key`` (the bytes after "Bearer ") belongs to, or None.

        Runs once per request: a key seen before is one dict probe (~1.0 -> ~0.15 us; the probe
        compares bytes only after a full match of the per-process randomised hash, so it is no
        timing oracle). A new key pays the inlined checksum (globals bound as defaults, ~15%
        faster than calling keys._checksum, measured; keep it in step with it) and SHA-256."""
        entry = self._verified.get(api_key)
        if entry is None:
            if len(api_key) != KEY_LENGTH or api_key[:BODY_START] != KEY_PREFIX_BYTES:
                return None
            high, low = divmod(_crc32(api_key[BODY_START:BODY_END]), PAIR_RADIX)
            top, mid = divmod(high, PAIR_RADIX)
            if _pairs[top] + _pairs[mid] + _pairs[low] != api_key[BODY_END:]:
                return None  # mistyped, truncated or made-up key: no hashing, no map probe
            # Hashing first also makes the dict probe useless as a timing oracle: an attacker
            # cannot steer which digest bytes a guess shares with a real one.
            entry = self._by_digest.get(_sha256(api_key).digest())
            if entry is None:
                return None
            self._verified[bytes(api_key)] = entry
        project, expires_at = entry
        if expires_at is not None and self._clock() >= expires_at:
            return None
        return project

    def reload_if_changed(self) -> bool:
        """Re-read the catalog if the file changed since the last read; True if the key map was
        replaced. A catalog that cannot be read leaves the previous map in force and logs one
        error per distinct bad content; this never raises CatalogError."""
        path = self._catalog.path
        try:
            signature = _signature(os.stat(path))
        except FileNotFoundError:
            if _dir_identity(path.parent) != self._data_dir_identity:
                # The whole data dir is gone (removed, unmounted; perhaps recreated empty by a
                # process that writes into it), not just the catalog: the keys stay valid and
                # the commit log answers 503 until the data dir is back.
                self._log_error_once(f"data dir {path.parent} is gone or was replaced")
                return False
            signature = _NO_FILE
        except OSError as exc:
            self._log_error_once(f"cannot stat catalog {path}: {exc.strerror}")
            return False
        if signature == self._seen_signature and not self._seen_racy:
            return False
        try:
            signature, racy, data = self._read_bytes()
        except CatalogError as exc:
            self._log_error_once(str(exc))
            return False
        self._seen_signature, self._seen_racy = signature, racy
        if data == self._seen_data:
            return False  # same bytes as last time: nothing to install, nothing to log again
        self._seen_data = data
        try:
            doc = CatalogDoc() if data is None else self._parse_changes(path, data)
        except CatalogError as exc:
            self._log_error_once(str(exc))
            return False
        self._last_error = None
        if data is None and self._by_digest:
            log.warning("key catalog %s was removed: every API key is now refused", path)
        before = (len(self._projects), len(self._by_digest))
        self._install(doc)
        after = (len(self._projects), len(self._by_digest))
        # A limit change or a rotation's expiry is routine (scripts may do it all day); a
        # project or key created or removed is worth a line.
        level = logging.INFO if after != before else logging.DEBUG
        log.log(level, "key catalog reloaded: %d projects, %d keys", *after)
        return True

    def ensure_default_project(self) -> str | None:
        """First run: if the data dir has no catalog at all, create project ``default`` and
        return its plaintext key. Once a catalog exists -- even one whose projects were all
        deleted, `default` included -- return None: the file is the record that this data dir
        was set up, so a deleted `default` is never resurrected. (Removing catalog.json by hand
        is the way to start over.)"""
        catalog = self._catalog
        if catalog.exists():
            return None
        with catalog._locked():
            if catalog.exists():  # another process created it while we waited for the lock
                return None
            key = catalog._create_default_project()
        self.load()
        return key

    # Internals ---------------------------------------------------------------------------

    def _log_error_once(self, message: str) -> None:
        """Log a reload failure once, not once a second for as long as it lasts."""
        if message != self._last_error:
            self._last_error = message
            log.error("%s; still serving the %d keys loaded before", message, len(self._by_digest))

    def _read_bytes(self) -> tuple[_Signature, bool, bytes | None]:
        path = self._catalog.path
        try:
            # fstat the descriptor we read from, so the signature belongs to these very bytes.
            with open(path, "rb") as fh:
                st = os.fstat(fh.fileno())
                data = fh.read()
        except FileNotFoundError:
            return _NO_FILE, False, None
        except OSError as exc:
            raise CatalogError(f"cannot read catalog {path}: {exc.strerror}") from None
        # The injected clock is wall-clock time, like file timestamps.
        changed_ns = max(st.st_mtime_ns, st.st_ctime_ns)
        racy = self._clock() * 1e9 - changed_ns < RACY_WINDOW_NS
        return _signature(st), racy, data

    def _parse_changes(self, path: Path, data: bytes) -> CatalogDoc:
        """``_parse_catalog``, decoding only the projects whose JSON text changed since the
        last install (the others were validated then); anything odd takes the full path."""
        try:
            raw = RAW_CATALOG_DECODER.decode(data)
            if raw.version != CATALOG_VERSION:
                raise msgspec.DecodeError
            previous = self._installed
            projects: dict[str, ProjectRecord] = {}
            texts: dict[str, msgspec.Raw] = {}
            for name, text in raw.projects.items():
                seen = previous.get(name)
                if seen is not None and seen[2] == text:
                    projects[name] = seen[0]
                elif valid_project_name(name):
                    projects[name] = PROJECT_DECODER.decode(text)
                else:
                    raise msgspec.DecodeError
                texts[name] = text
        except msgspec.DecodeError:
            return parse_catalog(path, data)  # the full path says what is wrong
        digests = [key.sha256 for record in projects.values() for key in record.keys]
        if len(set(digests)) != len(digests):
            return parse_catalog(path, data)
        self._texts = texts
        return CatalogDoc(version=raw.version, projects=projects)

    def _install(self, doc: CatalogDoc) -> None:
        projects: dict[str, Project] = {}
        by_digest: dict[bytes, tuple[Project, float | None]] = {}
        # Entries of a project whose record is unchanged are reused: a reload at 2,000
        # projects then converts one project's keys, not every digest and expiry.
        previous = self._installed
        installed: dict[str, tuple[ProjectRecord, list, msgspec.Raw | None]] = {}
        for name, record in doc.projects.items():
            project = self._projects.get(name)
            origins = (
                None if record.origins is None else frozenset(o.encode() for o in record.origins)
            )
            if project is None:
                project = Project(name, record.events_per_minute, origins)
            else:
                project.events_per_minute = record.events_per_minute
                project.origins = origins
            projects[name] = project
            seen = previous.get(name)
            if seen is not None and seen[0] == record:
                entries = seen[1]
            else:
                entries = [
                    (
                        bytes.fromhex(key.sha256),
                        None if key.expires is None else key.expires.timestamp(),
                    )
                    for key in record.keys
                ]
            installed[name] = (record, entries, self._texts.get(name))
            for digest, expires in entries:
                by_digest[digest] = (project, expires)
        # No await in between: a request sees the old maps or the new ones.
        self._by_digest = by_digest
        self._verified = {}
        self._projects = projects
        self._installed = installed
        self._texts = {}
