"""The commit log's format alone (log/format.py): framing, scanning, and recovery of torn or
corrupt segments (real files, no writer)."""

from __future__ import annotations

import random
from pathlib import Path

import orjson

from inslytic_fast.log.format import HEADER_SIZE, frame_record, recover_segment, scan_records


def test_header_size_matches_the_documented_framing():
    payload = b'{"p":"x"}\n'
    framed = frame_record(payload)
    assert len(framed) == HEADER_SIZE + len(payload) == 12 + len(payload)
    assert framed.startswith(b"IFL1")
    assert scan_records(framed) == ([memoryview(payload)], len(framed))


def _segment_with_records(path: Path, count: int) -> list[int]:
    """Write ``count`` framed records; return the end offset of each."""
    ends, data = [], b""
    for i in range(count):
        payload = orjson.dumps({"p": "shop", "r": i, "b": "x", "e": [{"i": i}]}) + b"\n"
        data += frame_record(payload)
        ends.append(len(data))
    path.write_bytes(data)
    return ends


def test_torn_tail_is_cut_at_the_last_complete_record_for_every_offset(tmp_path):
    source = tmp_path / "source.log"
    ends = _segment_with_records(source, 6)
    data = source.read_bytes()
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    victim = data_dir / "w0-00000000000000000001.log"
    # Every byte offset across the last three records, including the exact boundaries.
    for cut in range(ends[2], len(data) + 1):
        victim.write_bytes(data[:cut])
        kept = recover_segment(data_dir, victim)
        expected = max(e for e in [0, *ends] if e <= cut)
        assert kept == expected, cut
        assert victim.read_bytes() == data[:expected]
        assert len(scan_records(victim.read_bytes())[0]) == ends.index(expected) + 1
    # The cut tails were kept, not destroyed.
    assert any((data_dir / "quarantine").iterdir())


def test_random_byte_flips_lose_only_the_damaged_record(tmp_path):
    source = tmp_path / "source.log"
    ends = _segment_with_records(source, 8)
    data = source.read_bytes()
    starts = [0, *ends[:-1]]
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    victim = data_dir / "w0-00000000000000000001.log"
    rng = random.Random(1234)
    for _ in range(150):
        pos = rng.randrange(len(data))
        corrupt = bytearray(data)
        corrupt[pos] ^= rng.randrange(1, 256)
        victim.write_bytes(bytes(corrupt))
        kept = recover_segment(data_dir, victim)
        damaged = max(i for i, s in enumerate(starts) if s <= pos)
        survivors = b"".join(
            data[s:e] for i, (s, e) in enumerate(zip(starts, ends, strict=True)) if i != damaged
        )
        # A flip in the last record is a corrupt tail: exactly the valid prefix remains.
        # Anywhere else, the records after the damage are acknowledged data and survive.
        assert victim.read_bytes() == survivors, pos
        assert kept == len(survivors)
        assert scan_records(victim.read_bytes())[1] == kept
