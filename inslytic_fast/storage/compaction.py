"""Compaction: a partition's small rolled files merged into fewer, larger ones.

Exactly once for readers: the output is staged and fsynced, then an intent naming inputs and
output is written durably, and only then is the output published and the inputs deleted.
Readers drop the inputs of an intent whose output exists (query.py), and after a crash
``finish_compactions`` completes an intent whose output was published or forgets one whose
output never was (its staged output is wiped with the staging directory).

Compaction only touches files whose segment has left the log: a file of a live segment is
mid-roll, and readers ignore it. The caller holds the roller lock.
"""

from __future__ import annotations

import os
import time
import uuid
from collections.abc import Callable
from pathlib import Path

import duckdb
import orjson

from ..runtime.durable import (
    fsync_dir,
    fsync_file,
    make_dirs_durable,
    rename_durably,
    write_file_durably,
)
from .events_sql import merge_parquet_sql
from .layout import (
    COMPACTED_PREFIX,
    INTENTS_DIRNAME,
    STAGING_DIRNAME,
    CompactionIntent,
    source_segment,
)

# Files under 32 MiB count as small; a partition is compacted once it holds 8 of them, into
# outputs of at most ~256 MiB (a few hundred MiB per file is what Spark/Trino guides recommend
# for scan efficiency).
DEFAULT_COMPACT_SMALL_FILE_BYTES = 32 * 1024 * 1024
DEFAULT_COMPACT_MIN_FILES = 8
DEFAULT_COMPACT_TARGET_BYTES = 256 * 1024 * 1024


def choose_inputs(
    partition: Path,
    live_segments: set[str],
    *,
    small_file_bytes: int,
    min_files: int,
    target_bytes: int,
) -> list[str]:
    """The files of ``partition`` to merge now, by name (empty: nothing worth merging)."""
    # Two tiers, merged apart: rolled files with rolled files, compaction outputs with
    # compaction outputs. Merging an output again with every few new rolled files rewrote
    # each event ~small_file_bytes / (rolled file size) times (~8x under sustained load,
    # where compaction then held the core for tens of seconds); tiered, twice at most.
    rolled: list[tuple[str, int]] = []
    compacted: list[tuple[str, int]] = []
    for entry in os.scandir(partition):
        if not entry.name.endswith(".parquet"):
            continue
        # A file whose segment is still in the log is mid-roll: readers ignore it.
        if source_segment(entry.name) in live_segments:
            continue
        size = entry.stat().st_size
        if size < small_file_bytes:
            tier = compacted if entry.name.startswith(COMPACTED_PREFIX) else rolled
            tier.append((entry.name, size))
    small = rolled if len(rolled) >= min_files else compacted
    if len(small) < min_files:
        return []
    small.sort()
    chosen: list[str] = []
    total = 0
    for name, size in small:
        if chosen and total + size > target_bytes:
            break
        chosen.append(name)
        total += size
    return chosen if len(chosen) >= 2 else []


def compact_partition(
    con: duckdb.DuckDBPyConnection,
    events_dir: Path,
    partition: Path,
    inputs: list[str],
    step: Callable[[str], None],
) -> None:
    """Merge ``inputs`` of ``partition`` into one file; ``step`` names each durable step."""
    intents_dir = events_dir / INTENTS_DIRNAME
    # Named after the wall clock *after* the inputs were chosen: a reader that began before
    # this instant knows the compaction could not have taken a segment it read from the log
    # (see query.take_snapshot).
    cid = f"{COMPACTED_PREFIX}{time.time_ns():020d}-{uuid.uuid4().hex[:8]}"
    output_name = cid + ".parquet"
    staged = events_dir / STAGING_DIRNAME / output_name
    con.execute(merge_parquet_sql([partition / name for name in inputs], staged))
    fsync_file(staged)
    step("compact:written")
    make_dirs_durable(intents_dir)
    intent: CompactionIntent = {
        "partition": partition.relative_to(events_dir).as_posix(),
        "output": output_name,
        "inputs": inputs,
    }
    intent_path = intents_dir / (cid + ".json")
    write_file_durably(intent_path, orjson.dumps(intent))
    step("compact:intent_written")
    rename_durably(staged, partition / output_name)
    step("compact:published")
    for name in inputs:
        os.unlink(partition / name)
    fsync_dir(partition)
    step("compact:inputs_deleted")
    os.unlink(intent_path)
    fsync_dir(intents_dir)


def finish_compactions(events_dir: Path) -> None:
    """Finish or undo every compaction a crash interrupted. Idempotent."""
    intents_dir = events_dir / INTENTS_DIRNAME
    if not intents_dir.exists():
        return
    for entry in sorted(os.scandir(intents_dir), key=lambda e: e.name):
        if not entry.name.endswith(".json"):
            os.unlink(entry.path)  # an intent that never became durable: nothing happened
            continue
        intent: CompactionIntent = orjson.loads(Path(entry.path).read_bytes())
        _finish_compaction(events_dir, intent, Path(entry.path))


def _finish_compaction(events_dir: Path, intent: CompactionIntent, intent_path: Path) -> None:
    partition = events_dir / intent["partition"]
    output = partition / intent["output"]
    if output.exists():
        removed = False
        for name in intent["inputs"]:
            try:
                os.unlink(partition / name)
                removed = True
            except FileNotFoundError:
                pass
        if removed:
            fsync_dir(partition)
    # Output never published: inputs are intact and the staged output is wiped with staging.
    os.unlink(intent_path)
    fsync_dir(intent_path.parent)
