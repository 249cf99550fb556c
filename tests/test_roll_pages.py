"""A roll reads its segment through a read-only map, three times over (scan, partition heads,
event lines). Each pass drops the pages it has read every SCAN_RELEASE_BYTES, so the roller
never holds a whole 64 MiB segment resident on top of DuckDB's buffers (issue 14's tree-RSS
budget). Resident pages of one mapping are a kernel fact (/proc/self/smaps), not a timing.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

from inslytic_fast.log.format import SCAN_RELEASE_BYTES, scan_segment, sealed_segments
from inslytic_fast.storage.roll_input import (
    group_by_partition,
    map_segment,
    ndjson_in_memory,
    page_releaser,
)

from .storage_helpers import make_events, open_log

MiB = 1024 * 1024
SEGMENT_BYTES = 4 * SCAN_RELEASE_BYTES
# The pages a pass may still hold: one stretch between releases, and the pages the kernel
# maps around the last fault (fault-around, 64 KiB by default).
ALLOWED_RESIDENT = SCAN_RELEASE_BYTES + 1 * MiB


async def fill_segment(data_dir: Path) -> None:
    """One sealed segment of SEGMENT_BYTES, records of 100 events (~40 KiB each)."""
    log = open_log(data_dir, durability="none", segment_max_bytes=SEGMENT_BYTES)
    loop = asyncio.get_running_loop()
    batch = make_events("pages", 100)
    written = 0
    while written < SEGMENT_BYTES:
        done = loop.create_future()
        log.append("shop", batch, 100, done.set_result)
        assert await done is None
        written += len(batch)
    await log.close()


def resident_bytes_of(path: Path) -> int:
    """Resident bytes of this process's mappings of ``path`` (smaps' Rss lines)."""
    resident = 0
    current = None
    with open("/proc/self/smaps") as smaps:
        for line in smaps:
            fields = line.split()
            if not fields[0].endswith(":"):  # a mapping's header line
                current = fields[5] if len(fields) > 5 else None
            elif fields[0] == "Rss:" and current == str(path):
                resident += int(fields[1]) * 1024
    return resident


def test_each_pass_over_a_mapped_segment_leaves_at_most_one_stretch_resident(tmp_path):
    asyncio.run(fill_segment(tmp_path))
    segment = sealed_segments(tmp_path / "log")[0]  # the full one
    assert segment.stat().st_size >= SEGMENT_BYTES - 1 * MiB
    data = map_segment(segment)
    release_pages = page_releaser(data)
    assert release_pages is not None

    # Without releases a pass holds the whole segment: what the test would see without them.
    everything = scan_segment(data)
    assert resident_bytes_of(segment) > 3 * SCAN_RELEASE_BYTES
    release_pages()
    assert resident_bytes_of(segment) == 0

    scan = scan_segment(data, release_pages)
    assert len(scan.payloads) == len(everything.payloads) and not scan.damaged
    assert resident_bytes_of(segment) <= ALLOWED_RESIDENT

    release_pages()
    groups, headless = group_by_partition(scan.payloads, release_pages)
    assert not headless and [len(lines) for lines in groups.values()] == [len(scan.payloads)]
    assert resident_bytes_of(segment) <= ALLOWED_RESIDENT

    release_pages()
    [records] = groups.values()
    with ndjson_in_memory(records, tmp_path, release_pages) as (paths, unreadable):
        assert not unreadable and len(paths) >= 3
        assert resident_bytes_of(segment) <= ALLOWED_RESIDENT
        # The event lines are whole all the same: 100 per record.
        lines = sum(Path(p).read_bytes().count(b"\n") for p in paths)
        assert lines == 100 * len(records)
