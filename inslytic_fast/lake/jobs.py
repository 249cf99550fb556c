"""Lake upkeep, one leader at a time: ``inslytic-fast lake compact`` and ``lake retention``.

Run from cron (or a systemd timer) on any machine that can reach the bucket; a run that finds
another one in charge exits at once. The leader holds a *lease object* in the bucket,
``<prefix>/_leader.json`` (holder, expiry), written with S3 conditional writes: created with
``If-None-Match: *``, renewed and taken over (once expired) with ``If-Match: <its ETag>``, so
of two runs racing for it exactly one wins, with no Redis needed (AWS S3, MinIO, SeaweedFS and
R2 support both conditions). The lease is renewed before every write step and a run stops when
a renewal fails.

Compaction merges a partition's small objects into one, crash-safe at every step, with the
same protocol the roller uses locally (``storage.Roller._compact``):

1. ``lake:intent_written`` -- ``_compactions/<id>.json`` names the inputs and the output key.
2. ``lake:output_written`` -- the merged object (rows sorted by event time), verified.
3. ``lake:inputs_deleted`` -- the inputs go. The intent stays, as the record that those keys
   were merged: an uploader that finds its file's object gone checks it, and never uploads
   rows a second time.

Purges (lake/purges.py): every run first deletes the objects whose rows a lake tombstone
covers entirely, and a compaction leaves covered rows out of its output.

Readers (``lake_listing``) drop the inputs of an intent whose output is present, so a query at
any step sees each row once. A run first finishes what a crashed run left: an intent whose
output exists gets its inputs deleted; one whose output does not is removed (nothing was
merged). Retention deletes objects whose partition date is older than the cutoff; an
interrupted run leaves some of those rows for the next one, never loses others.
"""

from __future__ import annotations

import datetime as dt
import logging
import re
import secrets
import socket
import tempfile
import time
import uuid
from collections.abc import Callable
from pathlib import Path

import orjson

from ..storage.compaction import DEFAULT_COMPACT_MIN_FILES, DEFAULT_COMPACT_SMALL_FILE_BYTES
from ..storage.events_sql import connect_duckdb, sql_string
from .layout import LAKE_EVENTS, LAKE_INTENTS, lake_listing, merged_away, read_intents
from .objectstore import LakeError, ObjectInfo, ObjectStore, UploadMismatch, expected_etag
from .purges import (
    covers_every_row,
    may_hold_covered_rows,
    purged_directories,
    read_lake_purges,
)

log = logging.getLogger("inslytic_fast.lake")

LEASE_KEY = "_leader.json"
LEASE_SECONDS = 300.0
# The roller's local compaction thresholds (storage/compaction.py): small under 32 MiB, at
# least 8 of them.
SMALL_OBJECT_BYTES = DEFAULT_COMPACT_SMALL_FILE_BYTES
MIN_OBJECTS = DEFAULT_COMPACT_MIN_FILES
TARGET_BYTES = 256 * 1024 * 1024
# A partition directory component holding a date: date=2026-02-16 (or any name=YYYY-MM-DD).
_DATE_PART = re.compile(r"(?:^|/)[A-Za-z_]+=(\d{4}-\d{2}-\d{2})(?:/|$)")


class LeaseHeld(LakeError):
    """Another run is the leader; the message says who and until when."""


class Lease:
    """The leader lease object. ``acquire`` or LeaseHeld; ``renew`` before each write."""

    def __init__(self, store: ObjectStore, *, clock: Callable[[], float] = time.time) -> None:
        self.store = store
        self.clock = clock
        self.holder = f"{socket.gethostname()}:{secrets.token_hex(4)}"
        self.etag: str | None = None

    def _body(self, expires: float) -> bytes:
        return orjson.dumps({"holder": self.holder, "expires": expires})

    def acquire(self) -> None:
        now = self.clock()
        etag = self.store.put_if(LEASE_KEY, self._body(now + LEASE_SECONDS), None)
        if etag is None:
            current = self.store.get_with_etag(LEASE_KEY)
            if current is None:
                return self.acquire()  # released meanwhile
            data, their_etag = current
            lease = orjson.loads(data)
            if lease["expires"] > now:
                raise LeaseHeld(
                    f"another lake job ({lease['holder']}) holds the lease until "
                    f"{dt.datetime.fromtimestamp(lease['expires'], dt.UTC):%H:%M:%SZ}"
                )
            etag = self.store.put_if(LEASE_KEY, self._body(now + LEASE_SECONDS), their_etag)
            if etag is None:
                raise LeaseHeld("another lake job took the expired lease first")
        self.etag = etag

    def renew(self) -> None:
        etag = self.store.put_if(LEASE_KEY, self._body(self.clock() + LEASE_SECONDS), self.etag)
        if etag is None:
            raise LeaseHeld("the lease was taken over (this run stalled past its expiry)")
        self.etag = etag

    def release(self) -> None:
        if self.etag is not None:
            self.store.put_if(LEASE_KEY, self._body(0.0), self.etag)
            self.etag = None


class LakeJobs:
    def __init__(
        self,
        store: ObjectStore,
        *,
        step_hook: Callable[[str], None] | None = None,
        clock: Callable[[], float] = time.time,
        min_objects: int = MIN_OBJECTS,
        small_object_bytes: int = SMALL_OBJECT_BYTES,
        target_bytes: int = TARGET_BYTES,
    ) -> None:
        self.store = store
        self._step_hook = step_hook
        self.clock = clock
        self.min_objects = min_objects
        self.small_object_bytes = small_object_bytes
        self.target_bytes = target_bytes
        self.lease = Lease(store, clock=clock)
        # Hive directory (project=NAME) -> received_before_us of its lake tombstone.
        self._purged: dict[str, int] = {}
        self.purged_objects = 0

    def _step(self, name: str) -> None:
        if self._step_hook is not None:
            self._step_hook(name)

    def run(self, job: Callable[[], int]) -> int:
        self.lease.acquire()
        try:
            self.recover()
            self.apply_purges()
            return job()
        finally:
            self.lease.release()

    # Recovery: finish or undo what a crashed run left

    def recover(self) -> None:
        listing = {info.key for info in self.store.list(LAKE_EVENTS + "/")}
        intents = read_intents(self.store)
        gone = merged_away(intents, listing)
        for key, intent in sorted(intents.items()):
            if intent["output"] in listing or intent["output"] in gone:
                leftovers = [k for k in intent["inputs"] if k in listing]
                if leftovers:
                    self.lease.renew()
                    for input_key in leftovers:
                        self.store.delete(input_key)
                    log.info("lake: finished compaction %s", key)
            else:
                self.lease.renew()
                self.store.delete(key)  # the output never appeared: nothing was merged
                log.info("lake: undid compaction %s (no output)", key)

    # Purges

    def apply_purges(self) -> int:
        """Delete the objects whose every row a lake tombstone covers; return how many."""
        self._purged = purged_directories(read_lake_purges(self.store))
        dropped = 0
        with tempfile.TemporaryDirectory(prefix="inslytic-lake-") as scratch:
            copy = Path(scratch) / "object.parquet"
            for directory, before_us in sorted(self._purged.items()):
                for info in list(self.store.list(f"{LAKE_EVENTS}/{directory}/")):
                    if not may_hold_covered_rows(info.key, before_us):
                        continue
                    try:
                        self.store.get_file(info.key, copy)
                    except FileNotFoundError:
                        continue
                    if covers_every_row(copy, before_us):
                        self.lease.renew()
                        self.store.delete(info.key)
                        dropped += 1
        if dropped:
            log.info("lake: deleted %d purged objects", dropped)
        self.purged_objects += dropped
        return dropped

    # Compaction

    def compact(self) -> int:
        """Merge each partition's small objects; return the number of merges."""
        self._purged = purged_directories(read_lake_purges(self.store))
        listing, _ = lake_listing(self.store)
        by_partition: dict[str, list[ObjectInfo]] = {}
        for info in listing.values():
            partition, _, _ = info.key.rpartition("/")
            by_partition.setdefault(partition, []).append(info)
        done = 0
        for partition, objects in sorted(by_partition.items()):
            inputs = self._inputs(objects)
            if inputs:
                self._merge(partition, inputs)
                done += 1
        return done

    def _inputs(self, objects: list[ObjectInfo]) -> list[ObjectInfo]:
        small = sorted(
            (o for o in objects if o.size < self.small_object_bytes), key=lambda o: o.key
        )
        if len(small) < self.min_objects:
            return []
        chosen: list[ObjectInfo] = []
        total = 0
        for info in small:
            if chosen and total + info.size > self.target_bytes:
                break
            chosen.append(info)
            total += info.size
        return chosen if len(chosen) >= 2 else []

    def _merge(self, partition: str, inputs: list[ObjectInfo]) -> None:
        cid = f"c-{time.time_ns():020d}-{uuid.uuid4().hex[:8]}"
        output = f"{partition}/{cid}.parquet"
        with tempfile.TemporaryDirectory(prefix="inslytic-lake-") as scratch:
            files = []
            for n, info in enumerate(inputs):
                path = Path(scratch) / f"in-{n}.parquet"
                self.store.get_file(info.key, path)
                files.append(path)
            merged = Path(scratch) / "out.parquet"
            # A partition is one project's (events/project=NAME/date=D): its purged rows stay out.
            purged_before_us = self._purged.get(partition.split("/")[1])
            keep = (
                ""
                if purged_before_us is None
                else f"WHERE epoch_us(received_at) > {int(purged_before_us)} "
            )
            con = connect_duckdb()
            try:
                listing = "[" + ", ".join(sql_string(p) for p in files) + "]"
                con.execute(
                    f"COPY (SELECT * FROM read_parquet({listing}, union_by_name=true, "
                    f'hive_partitioning=false) {keep}ORDER BY "timestamp") TO {sql_string(merged)} '
                    "(FORMAT parquet, COMPRESSION zstd)"
                )
            finally:
                con.close()
            intent = {"partition": partition, "inputs": [i.key for i in inputs], "output": output}
            self.lease.renew()
            self.store.put_bytes(f"{LAKE_INTENTS}/{cid}.json", orjson.dumps(intent))
            self._step("lake:intent_written")
            size, etag = expected_etag(merged)
            self.lease.renew()
            self.store.put_file(output, merged, size)
            found = self.store.head(output)
            if found is None or (found.size, found.etag) != (size, etag):
                raise UploadMismatch(f"lake object {output} does not match what was written")
            self._step("lake:output_written")
        self.lease.renew()
        for info in inputs:
            self.store.delete(info.key)
        self._step("lake:inputs_deleted")
        log.info("lake: merged %d objects into %s", len(inputs), output)

    # Retention

    def retention(self, days: int) -> int:
        """Delete objects whose partition date is older than ``days`` ago; return how many."""
        if days < 1:
            raise LakeError("retention needs --days of at least 1")
        cutoff = (dt.datetime.fromtimestamp(self.clock(), dt.UTC) - dt.timedelta(days=days)).date()
        dropped = 0
        for info in list(self.store.list(LAKE_EVENTS + "/")):
            match = _DATE_PART.search(info.key)
            if match is None or dt.date.fromisoformat(match.group(1)) >= cutoff:
                continue
            if dropped % 100 == 0:
                self.lease.renew()
            self.store.delete(info.key)
            dropped += 1
        return dropped
