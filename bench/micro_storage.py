"""Micro-benchmark of the storage layer alone: durable append+sync, the roller, query of the log.

Usage:  python bench/micro_storage.py [--seconds S] [--producers N] [--batch EVENTS]
                                      [--roll-events N] [--data-dir DIR] [--durability fsync|none]

Prints one JSON line per stage:
  {"bench": "micro_storage", "stage": "append_sync", "events_per_s": ..., "syncs_per_s": ...,
   "events_per_sync": ..., "ack_latency_ms": {"p50": ..., "p99": ...}, ...}
  {"bench": "micro_storage", "stage": "roll", "events_per_s": ..., ...}
  {"bench": "micro_storage", "stage": "query_log_tail", ...}

append_cpu: microseconds of event-loop CPU time per append() (best of 3 x 5,000 calls).
append_sync: N producers on uvloop, each appending a pre-encoded batch and waiting for its
on_done before the next (like N busy HTTP connections); every ack is after fdatasync.
cpu_us_per_event/batch: CPU time of the whole process (loop, sync thread) over the run.
roll: sealed segments -> ZSTD Parquet with the roller's single DuckDB thread, then one
compaction pass over the files that produced (merge + sort by timestamp).
roll_cpu: CPU time of the whole process (all threads) per event rolled, for records of 1, 100
and 1000 events (--roll-shapes); the issue-14 target is <= 2 us/event on one thread. CPU time
rather than wall time, so a busy machine moves it little. Each roll runs in a fresh process
whose peak RSS (VmHWM) is reported: the roller process's peak for that shape.
roll_parts: the same rolls taken apart, CPU us/event of each part in the roller's order (CRC
scan, grouping by partition heads, event lines into memfds, DuckDB's COPY to ZSTD Parquet) and
of compacting 8 rolled files into one; not a default stage (--stages roll_parts).
query_log_tail: a count(*) over events that are all still in the log (the worst case for
query, which parses the log in Python and loads it into DuckDB).

The data directory defaults to a fresh temporary directory on the same disk as the repo's
bench/scratch (the disk is the thing being measured); it is deleted afterwards.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing
import os
import random
import shutil
import statistics
import sys
import tempfile
import time
from multiprocessing.connection import Connection
from pathlib import Path

import orjson

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from bench.machine import machine_info, memory_mb  # noqa: E402
from bench.payloads import make_event  # noqa: E402
from inslytic_fast.log.writer import CommitLog  # noqa: E402
from inslytic_fast.storage import roller as roller_module  # noqa: E402
from inslytic_fast.storage.query import run_query  # noqa: E402
from inslytic_fast.storage.roller import Roller  # noqa: E402

# Distinct batches cycled through, so the log sees varied bytes and Parquet compression is not
# flattered by repetition (256 x 100 events ~ 12 MiB of pre-encoded JSON).
BATCH_VARIANTS = 256


def make_batches(batch_events: int, seed: int) -> list[bytes]:
    rng = random.Random(seed)
    return [
        orjson.dumps([make_event(rng) for _ in range(batch_events)]) for _ in range(BATCH_VARIANTS)
    ]


async def append_sync(data_dir: Path, args, batches: list[bytes]) -> dict:
    log = CommitLog(data_dir, durability=args.durability, worker_id="bench")
    log.open()
    loop = asyncio.get_running_loop()
    log.start(loop)
    latencies: list[float] = []
    deadline = loop.time() + args.seconds
    batch_events = args.batch

    async def producer(n: int) -> None:
        i = n
        while loop.time() < deadline:
            fut = loop.create_future()
            started = time.perf_counter()
            log.append("bench", batches[i % BATCH_VARIANTS], batch_events, fut.set_result)
            error = await fut
            if error is not None:
                raise error
            latencies.append(time.perf_counter() - started)
            i += args.producers

    async def ticker() -> None:
        while loop.time() < deadline:
            await asyncio.sleep(1)
            log.tick()

    stats = log.stats
    started, cpu = time.perf_counter(), time.process_time()
    await asyncio.gather(ticker(), *(producer(n) for n in range(args.producers)))
    elapsed, cpu = time.perf_counter() - started, time.process_time() - cpu
    await log.close()
    latencies.sort()
    mean_event_bytes = statistics.mean(len(b) for b in batches) / batch_events
    return {
        "bench": "micro_storage",
        "stage": "append_sync",
        "durability": args.durability,
        "producers": args.producers,
        "batch_events": batch_events,
        "event_bytes_mean": round(mean_event_bytes),
        "seconds": round(elapsed, 2),
        "events_per_s": round(stats.events / elapsed),
        "cpu_us_per_event": round(cpu / max(stats.events, 1) * 1e6, 3),
        "cpu_us_per_batch": round(cpu / max(stats.acked, 1) * 1e6, 2),
        "mb_per_s": round(stats.bytes / elapsed / 1e6, 1),
        "syncs_per_s": round(stats.syncs / elapsed, 1),
        "events_per_sync": round(stats.events / max(stats.syncs, 1), 1),
        "batches_per_sync": round(stats.acked / max(stats.syncs, 1), 2),
        "ack_latency_ms": {
            "p50": round(latencies[len(latencies) // 2] * 1000, 2),
            "p99": round(latencies[int(len(latencies) * 0.99)] * 1000, 2),
            "max": round(latencies[-1] * 1000, 2),
        },
        "sync_latency_ms_max": round(stats.max_sync_latency_s * 1000, 2),
        "rotations": stats.rotations,
    }


async def append_cpu(data_dir: Path, args, batches: list[bytes]) -> dict:
    """Loop-thread cost of one append (the part that competes with request parsing)."""
    log = CommitLog(data_dir, durability="none", worker_id="cpu", max_unrolled_bytes=1 << 40)
    log.open()
    log.start(asyncio.get_running_loop())
    calls = 5_000

    def ignore(error) -> None:
        return None

    best = float("inf")
    for _ in range(3):
        started = time.thread_time()  # the loop thread's CPU: a busy machine moves it little
        for i in range(calls):
            log.append("bench", batches[i % BATCH_VARIANTS], args.batch, ignore)
        best = min(best, time.thread_time() - started)
        await asyncio.sleep(0)  # let the sync thread drain between rounds
        while log.stats.acked < log.stats.appends:
            await asyncio.sleep(0.01)
    await log.close()
    return {
        "bench": "micro_storage",
        "stage": "append_cpu",
        "batch_events": args.batch,
        "batch_bytes_mean": round(statistics.mean(len(b) for b in batches)),
        "us_per_append": round(best / calls * 1e6, 2),
        "ns_per_event": round(best / calls / args.batch * 1e9, 1),
    }


async def fill_log(
    data_dir: Path, events: int, batch_events: int, batches: list[bytes], in_flight: int = 256
) -> None:
    """Write ``events`` into the log quickly (durability none: this is input for the roller).
    A segment is sealed once a group write takes it past 64 MiB: ``in_flight`` appends at a
    time bound how far past."""
    log = CommitLog(data_dir, durability="none", worker_id="fill")
    log.open()
    log.start(asyncio.get_running_loop())
    pending = []
    for i in range(events // batch_events):
        fut = asyncio.get_running_loop().create_future()
        log.append("bench", batches[i % len(batches)], batch_events, fut.set_result)
        pending.append(fut)
        if len(pending) >= in_flight:
            await asyncio.gather(*pending)
            pending.clear()
    await asyncio.gather(*pending)
    await log.close()


def seal(data_dir: Path, worker_id: str) -> None:
    log = CommitLog(data_dir, worker_id=worker_id)
    log.open()
    log._close_and_seal()  # noqa: SLF001 - an idle log needs no loop to close


def roll(data_dir: Path, args, batches: list[bytes]) -> dict:
    asyncio.run(fill_log(data_dir, args.roll_events, args.batch, batches))
    seal(data_dir, "fill")
    log_bytes = sum(p.stat().st_size for p in (data_dir / "log").glob("fill-*.log"))
    roller = Roller(data_dir)
    started = time.perf_counter()
    converted = roller.roll_once()
    elapsed = time.perf_counter() - started
    parquet_bytes = sum(p.stat().st_size for p in (data_dir / "events").rglob("*.parquet"))
    files_before = len(list((data_dir / "events").rglob("*.parquet")))
    roller.compact_min_files = 2
    started = time.perf_counter()
    compactions = roller.compact_once()
    compact_s = time.perf_counter() - started
    files_after = len(list((data_dir / "events").rglob("*.parquet")))
    roller.stop()
    return {
        "bench": "micro_storage",
        "stage": "roll",
        "duckdb_threads": 1,
        "events": converted,
        "seconds": round(elapsed, 2),
        "events_per_s": round(converted / elapsed),
        "log_mb": round(log_bytes / 1e6, 1),
        "parquet_mb": round(parquet_bytes / 1e6, 1),
        "log_mb_per_s": round(log_bytes / elapsed / 1e6, 1),
        "compaction": {
            "files_before": files_before,
            "files_after": files_after,
            "compactions": compactions,
            "seconds": round(compact_s, 2),
            "events_per_s": round(converted / compact_s) if compactions else None,
        },
    }


def sealed_shape(data_dir: Path, batch_events: int, args) -> Path:
    """A data dir whose log holds ~``args.roll_events`` events in records of ``batch_events``,
    sealed: a roll's input (roll_cpu, roll_parts)."""
    shape_dir = data_dir / f"shape-{batch_events}"
    batches = make_batches_cycled(batch_events, args.seed)
    events = max(batch_events, args.roll_events // batch_events * batch_events)
    # Segments of the default size, as a server writes them (at most ~1 MiB past it).
    in_flight = max(1, (1 << 20) // max(map(len, batches)))
    asyncio.run(fill_log(shape_dir, events, batch_events, batches, in_flight))
    seal(shape_dir, "fill")
    return shape_dir


def roll_cpu(data_dir: Path, args, _batches: list[bytes]) -> dict:
    """CPU microseconds per event of Roller.roll_once, and the rolling process's peak RSS, per
    record shape (events per record). Each roll runs in a fresh process, as the roller does, so
    its peak (VmHWM) is the roll's alone: Python and DuckDB loaded, then the roll's buffers."""
    shapes: dict[str, dict] = {}
    context = multiprocessing.get_context("spawn")
    for batch_events in (int(n) for n in args.roll_shapes.split(",")):
        shape_dir = sealed_shape(data_dir, batch_events, args)
        segment_sizes = [p.stat().st_size for p in (shape_dir / "log").glob("fill-*.log")]
        results, sender = context.Pipe(duplex=False)
        child = context.Process(
            target=roll_in_this_process,
            args=(shape_dir, args.roller_memory_limit, args.roller_set, sender),
        )
        child.start()
        sender.close()
        rolled = results.recv()
        child.join()
        converted = rolled["events"]
        files = list((shape_dir / "events").rglob("*.parquet"))
        shapes[str(batch_events)] = {
            "events": converted,
            "cpu_us_per_event": round(rolled["cpu_s"] / converted * 1e6, 2),
            "wall_us_per_event": round(rolled["wall_s"] / converted * 1e6, 2),
            "log_mb": round(sum(segment_sizes) / 1e6, 1),
            "log_segments": len(segment_sizes),
            "largest_segment_mb": round(max(segment_sizes) / 1e6, 1),
            "parquet_mb": round(sum(f.stat().st_size for f in files) / 1e6, 1),
            "parquet_files": len(files),
            "rss_before_roll_mb": rolled["rss_before_mb"],
            "peak_rss_mb": rolled["peak_rss_mb"],
        }
        shutil.rmtree(shape_dir, ignore_errors=True)
    return {
        "bench": "micro_storage",
        "stage": "roll_cpu",
        "roller_memory_limit": args.roller_memory_limit or roller_module.ROLLER_MEMORY_LIMIT,
        "roller_set": args.roller_set,
        "shapes": shapes,
    }


def roll_in_this_process(
    shape_dir: Path, memory_limit: str | None, settings: list[str], results: Connection
) -> None:
    """roll_cpu's child: one Roller.roll_once, its CPU and wall time, and this process's peak
    RSS. ``memory_limit`` / ``settings`` (DuckDB ``SET`` clauses) try other roller settings."""
    if memory_limit:
        roller_module.ROLLER_MEMORY_LIMIT = memory_limit
    roller = Roller(shape_dir)
    for setting in settings:
        roller._connection().execute(f"SET {setting}")  # noqa: SLF001 - a bench knob
    rss_before = memory_mb(os.getpid())
    cpu, wall = time.process_time(), time.perf_counter()
    converted = roller.roll_once()
    cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
    roller.stop()
    peak = memory_mb(os.getpid())
    results.send(
        {
            "events": converted,
            "cpu_s": cpu,
            "wall_s": wall,
            "rss_before_mb": round(rss_before["rss"], 1) if rss_before else None,
            "peak_rss_mb": round(peak["peak"], 1) if peak else None,
        }
    )


def roll_parts(data_dir: Path, args, _batches: list[bytes]) -> dict:
    """roll_cpu taken apart: CPU microseconds per event of each part of a roll, and of one
    compaction of what it wrote, per record shape. Each shape runs in a fresh process; the
    parts are the roller's own functions, called in its order on the same sealed segments."""
    shapes: dict[str, dict] = {}
    context = multiprocessing.get_context("spawn")
    for batch_events in (int(n) for n in args.roll_shapes.split(",")):
        shape_dir = sealed_shape(data_dir, batch_events, args)
        results, sender = context.Pipe(duplex=False)
        child = context.Process(target=roll_parts_in_this_process, args=(shape_dir, sender))
        child.start()
        sender.close()
        shapes[str(batch_events)] = results.recv()
        child.join()
        shutil.rmtree(shape_dir, ignore_errors=True)
    return {"bench": "micro_storage", "stage": "roll_parts", "shapes": shapes}


def roll_parts_in_this_process(shape_dir: Path, results: Connection) -> None:
    """roll_parts' child. CPU time of this process (DuckDB's one thread included) per part."""
    from inslytic_fast.log.format import scan_segment
    from inslytic_fast.storage.compaction import DEFAULT_COMPACT_MIN_FILES
    from inslytic_fast.storage.events_sql import (
        connect_duckdb,
        copy_events_sql,
        merge_parquet_sql,
    )
    from inslytic_fast.storage.roll_input import (
        group_by_partition,
        longest_event_line,
        map_segment,
        ndjson_in_memory,
        page_releaser,
    )

    con = connect_duckdb(threads=1, memory_limit=roller_module.ROLLER_MEMORY_LIMIT)
    out_dir = shape_dir / "parts"
    out_dir.mkdir()
    cpu = dict.fromkeys(("scan", "group", "event_lines", "copy", "compaction"), 0.0)
    rows = 0
    rolled: list[Path] = []
    for segment in sorted((shape_dir / "log").glob("fill-*.log")):
        data = map_segment(segment)
        release = page_releaser(data)
        started = time.process_time()
        scan = scan_segment(data, release)
        cpu["scan"] += time.process_time() - started
        started = time.process_time()
        groups, _ = group_by_partition(scan.payloads, release)
        cpu["group"] += time.process_time() - started
        for records in groups.values():
            started = time.process_time()
            with ndjson_in_memory(records, out_dir, release) as (paths, _):
                cpu["event_lines"] += time.process_time() - started
                out = out_dir / f"{len(rolled)}.parquet"
                started = time.process_time()
                con.execute(copy_events_sql(paths, out, [], longest_event_line(records)))
                cpu["copy"] += time.process_time() - started
            rolled.append(out)
            rows += con.execute(f"SELECT count(*) FROM '{out}'").fetchone()[0]
    # Compaction merges a partition's rolled files once it holds DEFAULT_COMPACT_MIN_FILES:
    # merge that many (the rolled files again when the roll wrote fewer).
    inputs = [rolled[i % len(rolled)] for i in range(DEFAULT_COMPACT_MIN_FILES)]
    merged_rows = con.execute(
        f"SELECT count(*) FROM read_parquet({[str(p) for p in inputs]})"
    ).fetchone()[0]
    started = time.process_time()
    con.execute(merge_parquet_sql(inputs, out_dir / "merged.parquet"))
    cpu["compaction"] = time.process_time() - started
    per_event = {
        part: round(seconds / (merged_rows if part == "compaction" else rows) * 1e6, 2)
        for part, seconds in cpu.items()
    }
    roll_total = sum(v for part, v in per_event.items() if part != "compaction")
    results.send(
        {
            "events": rows,
            "cpu_us_per_event": per_event,
            "roll_us_per_event": round(roll_total, 2),
            "roll_and_compaction_us_per_event": round(roll_total + per_event["compaction"], 2),
        }
    )


def make_batches_cycled(batch_events: int, seed: int) -> list[bytes]:
    """Distinct batches for one record shape, ~BATCH_VARIANTS x 100 events of variety."""
    rng = random.Random(seed)
    variants = max(1, BATCH_VARIANTS * 100 // batch_events)
    return [orjson.dumps([make_event(rng) for _ in range(batch_events)]) for _ in range(variants)]


def query_log_tail(data_dir: Path, args, batches: list[bytes]) -> dict:
    asyncio.run(fill_log(data_dir, args.roll_events, args.batch, batches))
    started = time.perf_counter()
    _, rows = run_query(data_dir, "SELECT count(*) FROM events")
    elapsed = time.perf_counter() - started
    return {
        "bench": "micro_storage",
        "stage": "query_log_tail",
        "events_in_log": rows[0][0],
        "seconds": round(elapsed, 3),
        "events_per_s": round(rows[0][0] / elapsed),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--producers", type=int, default=8)
    parser.add_argument("--batch", type=int, default=100, help="events per batch")
    parser.add_argument("--roll-events", type=int, default=500_000)
    parser.add_argument("--roll-shapes", default="1,100,1000", help="roll_cpu: events/record")
    parser.add_argument(
        "--roller-memory-limit", help="roll_cpu: DuckDB memory_limit instead of the roller's"
    )
    parser.add_argument(
        "--roller-set",
        action="append",
        default=[],
        metavar="SETTING",
        help="roll_cpu: one more DuckDB setting for the roll, e.g. preserve_insertion_order=false",
    )
    parser.add_argument("--durability", choices=("fsync", "none"), default="fsync")
    parser.add_argument("--data-dir", type=Path, help="default: a temp dir under bench/scratch")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--stages", default="append_cpu,append_sync,roll,query_log_tail")
    args = parser.parse_args()
    import uvloop

    batches = make_batches(args.batch, args.seed)
    scratch_parent = REPO / "bench" / "scratch"
    scratch_parent.mkdir(parents=True, exist_ok=True)
    print(json.dumps({"bench": "micro_storage", "machine": machine_info()}), flush=True)
    for stage in args.stages.split(","):
        base = args.data_dir or Path(tempfile.mkdtemp(dir=scratch_parent))
        data_dir = base / stage
        try:
            if stage == "append_cpu":
                result = uvloop.run(append_cpu(data_dir, args, batches))
            elif stage == "append_sync":
                result = uvloop.run(append_sync(data_dir, args, batches))
            elif stage == "roll":
                result = roll(data_dir, args, batches)
            elif stage == "roll_cpu":
                result = roll_cpu(data_dir, args, batches)
            elif stage == "roll_parts":
                result = roll_parts(data_dir, args, batches)
            elif stage == "query_log_tail":
                result = query_log_tail(data_dir, args, batches)
            else:
                parser.error(f"unknown stage {stage}")
            # Other processes on the machine move these numbers: say how busy it was.
            result["load_avg_1m"] = round(os.getloadavg()[0], 2)
            print(json.dumps(result), flush=True)
        finally:
            shutil.rmtree(data_dir, ignore_errors=True)
            if args.data_dir is None:
                shutil.rmtree(base, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
