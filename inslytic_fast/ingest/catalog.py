"""Projects and their keys' digests on disk: ``<data_dir>/catalog.json``, what the CLI edits.

``<data_dir>/catalog.json`` (mode 0600) holds, per project, only the SHA-256 digest of each key,
its display prefix, created/expires timestamps, and the project's rate limit. The plaintext key
exists only in the output of ``projects create`` / ``rotate-key`` and in the requests clients
send; it is never written to disk, logged, or put into an exception message.

Writers (the CLI, and the server's first-run ``default`` project) serialise on an exclusive
``flock`` of ``<data_dir>/catalog.lock`` around read-modify-write and replace the file
atomically (temp file in the same directory, fsync, rename, fsync of the directory), so two
commands run at once both land and a reader never sees half a file. Readers take no lock.

A catalog that cannot be parsed raises ``CatalogError`` naming the file; nothing ever resets or
rewrites a catalog it could not read. The running server keeps its last good key map in that
case (see ``KeyRing.reload_if_changed``).
"""

from __future__ import annotations

import math
import os
import re
import secrets
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated

import msgspec

from ..runtime.durable import write_file_durably
from ..runtime.filelock import lock_exclusive
from .keys import (
    DISPLAY_PREFIX_LENGTH,
    KEY_PREFIX,
    display_prefix,
    generate_key,
    key_digest,
    key_is_well_formed,
    shown,
)

CATALOG_FILE = "catalog.json"
LOCK_FILE = "catalog.lock"
CATALOG_VERSION = 1
CATALOG_MODE = 0o600  # digests are not secrets, but who may ingest where is nobody else's business

# Project names become partition directory names `project=<name>`; keep them path-safe.
PROJECT_NAME_RE = re.compile(r"[A-Za-z0-9_-]{1,64}")
# A hive partition value that reads back as NULL (any case); DuckDB's writer escaped it as
# `%5F_...`, so a purge looked in the wrong directory. Refused for new projects.
HIVE_NULL_PARTITION = "__hive_default_partition__"
DEFAULT_PROJECT = "default"
# How long a deleted project's keys may still be accepted somewhere: a server notices a catalog
# change at its 1 s tick (a cluster node's mirror adds the coordinator's 0.5 s poll), and a
# busy loop or a slow worker can be late by a few seconds more. Until then a new project of
# the same name could be handed an event sent with an old key, so the name is not reused.
DELETED_KEYS_ACCEPTED_FOR_S = 5.0

# A catalog write takes milliseconds; a lock held this long belongs to a stuck process.
LOCK_TIMEOUT_SECONDS = 10.0
_LOCK_POLL_SECONDS = 0.005


def valid_project_name(name: str) -> bool:
    # A key is itself a valid-looking name; refusing the key prefix in names means a key
    # pasted where a name goes is refused and never echoed back as "no project named ...".
    return PROJECT_NAME_RE.fullmatch(name) is not None and KEY_PREFIX not in name


NAME_RULE = f"1-64 letters, digits, '-' or '_', not containing {KEY_PREFIX!r}"


# Errors ------------------------------------------------------------------------------------


class CatalogError(Exception):
    """The catalog file cannot be read or used; the message names the file and what is wrong."""


class ProjectError(Exception):
    """An operator request the catalog cannot satisfy (duplicate name, unknown project, ...)."""


# On-disk format ----------------------------------------------------------------------------

_UtcTime = Annotated[datetime, msgspec.Meta(tz=True)]
_Digest = Annotated[str, msgspec.Meta(pattern="^[0-9a-f]{64}$")]


class KeyRecord(msgspec.Struct, omit_defaults=True):
    prefix: str
    sha256: _Digest
    created: _UtcTime
    expires: _UtcTime | None = None

    def expired(self, now: float) -> bool:
        return self.expires is not None and self.expires.timestamp() <= now


class ProjectRecord(msgspec.Struct):
    created: _UtcTime
    # None: the server's --events-per-minute; 0: unlimited.
    events_per_minute: Annotated[int, msgspec.Meta(ge=0)] | None = None
    keys: list[KeyRecord] = msgspec.field(default_factory=list)
    # Sites whose pages may send with this project's keys (an Origin header outside the list
    # gets 403); None: any site --cors-origins allows. See `projects set-origins`.
    origins: list[str] | None = None

    def active_keys(self, now: float) -> list[KeyRecord]:
        return [k for k in self.keys if not k.expired(now)]


class CatalogDoc(msgspec.Struct):
    version: int = CATALOG_VERSION
    projects: dict[str, ProjectRecord] = msgspec.field(default_factory=dict)
    # Recently deleted project names -> when (see DELETED_KEYS_ACCEPTED_FOR_S). Added in the
    # same format version: a catalog without it loads, and older releases ignore it.
    deleted: dict[str, _UtcTime] = msgspec.field(default_factory=dict)


def _utc(timestamp: float) -> datetime:
    return datetime.fromtimestamp(timestamp, UTC)


_HANDS_OFF = "the file was left untouched: fix it or restore it from a backup"


# Typed in one pass: half the CPU of decode-then-convert (6 vs 11 ms at 2,000 projects), and
# a worker's loop waits for it on every catalog change.
_catalog_decoder = msgspec.json.Decoder(CatalogDoc)


class _FormatVersion(msgspec.Struct):
    version: int  # required here, unlike in CatalogDoc (which new documents get it from)


_version_decoder = msgspec.json.Decoder(_FormatVersion)


class RawCatalog(msgspec.Struct):
    """The catalog with each project left as its JSON text: a reload decodes only those whose
    text changed (one of 2,000 after a set-limit: ~4x less CPU on the worker's loop)."""

    version: int
    projects: dict[str, msgspec.Raw] = {}


RAW_CATALOG_DECODER = msgspec.json.Decoder(RawCatalog)
PROJECT_DECODER = msgspec.json.Decoder(ProjectRecord)


def parse_catalog(path: Path | str, data: bytes) -> CatalogDoc:
    try:
        if _version_decoder.decode(data).version != CATALOG_VERSION:
            raise msgspec.DecodeError
        doc = _catalog_decoder.decode(data)
    except msgspec.DecodeError:
        doc = _parse_catalog_explaining(path, data)  # says what is wrong
    seen: set[str] = set()
    for name, project in doc.projects.items():
        if not valid_project_name(name):
            raise CatalogError(f"catalog {path}: invalid project name {shown(name)}; {_HANDS_OFF}")
        for key in project.keys:
            if key.sha256 in seen:
                raise CatalogError(f"catalog {path}: a key digest appears twice; {_HANDS_OFF}")
            seen.add(key.sha256)
    return doc


def _parse_catalog_explaining(path: Path | str, data: bytes) -> CatalogDoc:
    try:
        raw = msgspec.json.decode(data)
    except msgspec.DecodeError as exc:
        raise CatalogError(f"catalog {path} is not valid JSON ({exc}); {_HANDS_OFF}") from None
    if not isinstance(raw, dict) or "version" not in raw:
        raise CatalogError(f"catalog {path} has no format version; {_HANDS_OFF}")
    if raw["version"] != CATALOG_VERSION:
        raise CatalogError(
            f"catalog {path} has format version {raw['version']!r}, this inslytic-fast reads "
            f"version {CATALOG_VERSION} (written by a newer release?); {_HANDS_OFF}"
        )
    try:
        return msgspec.convert(raw, CatalogDoc)
    except msgspec.ValidationError as exc:
        raise CatalogError(f"catalog {path} is invalid: {exc}; {_HANDS_OFF}") from None


_encoder = msgspec.json.Encoder()


def encode_catalog(doc: CatalogDoc) -> bytes:
    """The file's bytes: indented, so an operator can read and diff it."""
    return msgspec.json.format(_encoder.encode(doc), indent=2) + b"\n"


# The catalog: what the CLI edits -----------------------------------------------------------


class Catalog:
    """Read and edit ``<data_dir>/catalog.json``; every edit is locked and atomic."""

    def __init__(self, data_dir: Path, *, clock: Callable[[], float] = time.time) -> None:
        self.data_dir = Path(data_dir)
        self.path = self.data_dir / CATALOG_FILE
        self.lock_path = self.data_dir / LOCK_FILE
        self._clock = clock

    @property
    def location(self) -> str:
        """Where the catalog lives, for messages."""
        return str(self.data_dir)

    def exists(self) -> bool:
        return self.path.exists()

    def read(self) -> CatalogDoc:
        """The current catalog; a missing file is an empty catalog."""
        try:
            data = self.path.read_bytes()
        except FileNotFoundError:
            return CatalogDoc()
        except OSError as exc:
            raise CatalogError(f"cannot read catalog {self.path}: {exc.strerror}") from None
        return parse_catalog(self.path, data)

    @contextmanager
    def _locked(self) -> Iterator[None]:
        try:
            self.data_dir.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.lock_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, CATALOG_MODE)
        except OSError as exc:
            where = exc.filename or self.lock_path
            raise CatalogError(f"cannot lock catalog: {where}: {exc.strerror}") from None
        try:
            if not lock_exclusive(fd, LOCK_TIMEOUT_SECONDS, _LOCK_POLL_SECONDS):
                raise CatalogError(
                    f"catalog lock {self.lock_path} is still held after "
                    f"{LOCK_TIMEOUT_SECONDS:g} s; is another inslytic-fast command stuck?"
                )
            yield
        finally:
            os.close(fd)  # closing the descriptor releases the flock

    @contextmanager
    def edit(self) -> Iterator[CatalogDoc]:
        """Lock, read, let the caller change the document, write it back if no exception."""
        with self._locked():
            doc = self.read()
            yield doc
            now = self._clock()
            for project in doc.projects.values():
                # Expired keys can never work again; dropping them keeps the file tidy.
                project.keys = project.active_keys(now)
            doc.deleted = {
                name: moment
                for name, moment in doc.deleted.items()
                if now < moment.timestamp() + DELETED_KEYS_ACCEPTED_FOR_S
            }
            self._write(doc)

    def _write(self, doc: CatalogDoc) -> None:
        try:
            self._replace_atomically(encode_catalog(doc))
        except OSError as exc:
            raise CatalogError(f"cannot write catalog {self.path}: {exc.strerror}") from None

    def _replace_atomically(self, data: bytes) -> None:
        # Anything matching the temp pattern is left over from a writer killed mid-write: we
        # hold the lock, so no live writer owns one.
        for stale in self.data_dir.glob(f".{CATALOG_FILE}.*.tmp"):
            stale.unlink(missing_ok=True)
        tmp = self.data_dir / f".{CATALOG_FILE}.{os.getpid()}.{secrets.token_hex(4)}.tmp"
        write_file_durably(self.path, data, tmp=tmp, mode=CATALOG_MODE)

    # Operations used by the CLI (and ensure_default_project) ---------------------------------

    def _new_key(self, doc: CatalogDoc, now: float) -> tuple[str, KeyRecord]:
        existing = {k.sha256 for p in doc.projects.values() for k in p.keys}
        while True:  # a collision of 190 random bits will not happen; the loop costs nothing
            key = generate_key()
            digest = key_digest(key.encode()).hex()
            if digest not in existing:
                return key, KeyRecord(prefix=display_prefix(key), sha256=digest, created=_utc(now))

    def _create_default_project(self) -> str:
        """First run: write a catalog holding only project ``default``; return its plaintext
        key. The caller holds the lock and has seen no catalog."""
        now = self._clock()
        doc = CatalogDoc()
        key, record = self._new_key(doc, now)
        doc.projects[DEFAULT_PROJECT] = ProjectRecord(created=_utc(now), keys=[record])
        self._write(doc)
        return key

    def create_project(self, name: str, events_per_minute: int | None = None) -> str:
        """Add a project with one key; returns the plaintext key (shown once, never stored)."""
        _check_name(name)
        if name.lower() == HIVE_NULL_PARTITION:
            raise ProjectError(
                f"project name {name!r} is the marker hive partitioning reads as NULL; "
                "choose another name"
            )
        with self.edit() as doc:
            clash = next((n for n in doc.projects if n.lower() == name.lower()), None)
            if clash == name:
                raise ProjectError(f"project {name!r} already exists")
            if clash is not None:
                # Partition directories `project=<name>` would collide on case-insensitive
                # filesystems (macOS, Windows shares).
                raise ProjectError(f"project {clash!r} already exists (names ignore case)")
            now = self._clock()
            _refuse_while_old_keys_may_work(doc, name, now)
            key, record = self._new_key(doc, now)
            doc.projects[name] = ProjectRecord(
                created=_utc(now), events_per_minute=events_per_minute, keys=[record]
            )
        return key

    def set_limit(self, name: str, events_per_minute: int | None) -> None:
        with self.edit() as doc:
            _project(doc, name).events_per_minute = events_per_minute

    def set_origins(self, name: str, origins: list[str] | None) -> None:
        with self.edit() as doc:
            _project(doc, name).origins = origins

    def rotate_key(self, name: str, keep_old_for: float | None) -> tuple[str, list[KeyRecord]]:
        """Issue a new key; the project's other keys stop working ``keep_old_for`` seconds from
        now (0: at once; None: left as they are, for ``revoke_keys`` once the new key is safe
        with the user). Keys already due to expire sooner keep their earlier expiry.
        Returns the plaintext new key and the old keys as they now stand (empty if revoked)."""
        with self.edit() as doc:
            project = _project(doc, name)
            now = self._clock()
            if keep_old_for is None:
                pass
            elif keep_old_for <= 0:
                project.keys = []
            else:
                deadline = _utc(now + keep_old_for)
                for old in project.keys:
                    if old.expires is None or old.expires > deadline:
                        old.expires = deadline
            key, record = self._new_key(doc, now)
            project.keys.append(record)
            old_keys = [k for k in project.keys if k is not record and not k.expired(now)]
        return key, old_keys

    def revoke_key(self, name: str, key_or_prefix: str) -> tuple[KeyRecord, int]:
        """Remove one key at once, named by its display prefix (or the whole key, for the
        leaked-key case). Returns the revoked record and how many active keys remain."""
        with self.edit() as doc:
            project = _project(doc, name)
            now = self._clock()
            active = project.active_keys(now)
            raw = key_or_prefix.encode()
            if key_is_well_formed(raw):
                digest = key_digest(raw).hex()
                matches = [k for k in active if k.sha256 == digest]
                what = "the given key"
            else:
                prefix = (
                    key_or_prefix
                    if key_or_prefix.startswith(KEY_PREFIX)
                    else (KEY_PREFIX + key_or_prefix)
                )
                matches = [k for k in active if k.prefix == prefix]
                # Echo only what is no longer than a display prefix: never part of a secret.
                what = f"prefix {prefix[:DISPLAY_PREFIX_LENGTH]!r}"
                if len(prefix) != DISPLAY_PREFIX_LENGTH:
                    what += (
                        f" (give the {DISPLAY_PREFIX_LENGTH}-character prefix `projects list`"
                        " shows, or the whole key)"
                    )
            if not matches:
                raise ProjectError(f"project {name!r} has no active key with {what}")
            if len(matches) > 1:
                raise ProjectError(
                    f"{len(matches)} keys of project {name!r} share {what}; revoke by the whole "
                    f"key, or rotate-key --keep-old-for 0 to replace all of them"
                )
            project.keys.remove(matches[0])
            remaining = len(project.active_keys(now))
        return matches[0], remaining

    def revoke_keys(self, name: str, keys: list[KeyRecord]) -> None:
        """Remove these keys of the project at once (those already gone are skipped)."""
        doomed = {k.sha256 for k in keys}
        with self.edit() as doc:
            project = _project(doc, name)
            project.keys = [k for k in project.keys if k.sha256 not in doomed]

    def delete_project(self, name: str) -> float:
        """Delete the project; returns when its name may be created again (a Unix time)."""
        with self.edit() as doc:
            _project(doc, name)
            del doc.projects[name]
            now = self._clock()
            doc.deleted[name] = _utc(now)
        return now + DELETED_KEYS_ACCEPTED_FOR_S


def _check_name(name: str) -> None:
    if not valid_project_name(name):
        raise ProjectError(f"invalid project name {shown(name)}: use {NAME_RULE}")


def _reusable_from(doc: CatalogDoc, name: str) -> float | None:
    """When a project named ``name`` (any case) may be created again, as a Unix time, if a
    project of that name was deleted too recently for its keys to be dead everywhere."""
    moments = [m.timestamp() for n, m in doc.deleted.items() if n.lower() == name.lower()]
    return max(moments) + DELETED_KEYS_ACCEPTED_FOR_S if moments else None


def _refuse_while_old_keys_may_work(doc: CatalogDoc, name: str, now: float) -> None:
    reusable = _reusable_from(doc, name)
    if reusable is not None and now < reusable:
        when = _utc(reusable).strftime("%H:%M:%SZ")
        raise ProjectError(
            f"project {name!r} was deleted moments ago and a running server may still accept "
            f"its old keys; the name can be reused from {when} (in "
            f"{math.ceil(reusable - now)} s), so an event sent with an old key never reaches "
            f"the new project"
        )


def _project(doc: CatalogDoc, name: str) -> ProjectRecord:
    project = doc.projects.get(name)
    if project is None:
        raise ProjectError(f"no project named {shown(name)}")
    return project
