"""``python -m bench``: load-test inslytic-fast (or your deployment) and print honest numbers.

Each run starts the server under test fresh (self-hosted mode), starts the load generator in
its own process(es) pinned away from the server, measures a window after a warmup, and records
throughput, latency percentiles, errors, the server's CPU seconds per million events, its peak
RSS and (self-hosted) the time until every accepted event is queryable. ``--compare`` runs the
peers in the same session, interleaved A B C A B C, and reports ratios: a shared machine
drifts, ratios taken side by side in one session mostly don't.
"""

from __future__ import annotations

import argparse
import array
import datetime as dt
import json
import os
import queue
import shlex
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from inslytic_fast.cli.stats import fetch as fetch_metrics
from inslytic_fast.cli.stats_frame import total as fetch_total

from . import chart, loadgen, machine, profile, targets
from .payloads import build_requests

RESULTS_DIR = Path(__file__).resolve().parent / "results"
BENCH_DIR = Path(__file__).resolve().parent
# A generator process needs ~0.3 s to import and connect; this bounds a stuck one.
LOADGEN_READY_TIMEOUT_S = 30.0
RSS_SAMPLE_INTERVAL_S = 0.5
MICRO_TIMEOUT_S = 300.0
# --wait-quiet: the machine counts as quiet below this busy share over a 1 s sample.
QUIET_BUSY_SHARE = 0.15
PERCENTILES = {"p50": 0.50, "p90": 0.90, "p99": 0.99, "p99_9": 0.999}


@dataclass(frozen=True)
class Scenario:
    name: str
    events: int
    connections: int
    # Open loop: a fixed request rate, by default this fraction of the closed-loop maximum the
    # same server reached with the same events per request earlier in the same round.
    open_loop: bool = False
    rate_fraction: float = 0.5
    # Sustained: no warmup, --minutes long, sampled over time (see sustained_figures).
    sustained: bool = False
    # Segment-spec: POST /v1/batch as the Segment SDKs send it (Basic auth, messageIds that
    # are new every request, typed properties, context), answered 200.
    segment: bool = False

    @property
    def label(self) -> str:
        kind = "open loop, " if self.open_loop else "sustained, " if self.sustained else ""
        if self.segment:
            kind = "Segment /v1/batch, " + kind
        unit = "event" if self.events == 1 else "events"
        return f"{kind}{self.events} {unit}/req, {self.connections} conn"


# The target table, one scenario per row.
SCENARIOS = {
    "1": Scenario("1", 1, 64),
    "100": Scenario("100", 100, 32),
    "1000": Scenario("1000", 1000, 8),
    "open": Scenario("open", 1, 64, open_loop=True),
    # Issue 14: what a steady sender gets once the roll has to keep up, minutes on end.
    "sustained-100": Scenario("sustained-100", 100, 32, sustained=True),
    "sustained-1000": Scenario("sustained-1000", 1000, 8, sustained=True),
    # Issue 16: existing SDKs' traffic (analytics-python sends 100 messages a batch at most).
    "segment": Scenario("segment", 100, 32, segment=True),
}
SMOKE_SCENARIOS = {
    "1": Scenario("1", 1, 4),
    "100": Scenario("100", 100, 2),
    "open": Scenario("open", 1, 4, open_loop=True),
    "sustained": Scenario("sustained", 100, 2, sustained=True),
    "segment": Scenario("segment", 100, 2, segment=True),
}
# Sustained runs: a sample of counters, /metrics and the process tree every SAMPLE_S; rates
# over WINDOW_S windows; "sustained" is the median window of the run's second half.
SUSTAINED_SAMPLE_S = 2.0
SUSTAINED_WINDOW_S = 10.0

# Targets from issue 5 (one server core, --durability fsync, generator on another core).
GOAL_REQ_PER_S_1 = 40_000
GOAL_VS_BARE = 0.5
GOAL_EVENTS_PER_S = 300_000
GOAL_OPEN_P99_MS = 5.0
# Issue 14 (one core for server and roller): sustained rate and the whole tree's memory.
GOAL_SUSTAINED_EVENTS_PER_S = 150_000
GOAL_TREE_RSS_MB = 200.0
GOAL_PEAK_RSS_MB = 150.0
GOAL_VS_FASTAPI = 100.0


# Command line


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m bench",
        description="Benchmark inslytic-fast: self-hosted (default; starts a fresh server per "
        "run on a temp data dir with an unlimited project and tears it down) or against your "
        "deployment (--url/--key). Prints a Markdown table and writes a JSON report.",
        epilog="Scenarios: 1 (1 event/request, 64 connections), 100 (100 events, 32 conn), "
        "1000 (1000 events, 8 conn), open (1 event/request at a fixed rate, by default half "
        "the closed-loop max of scenario 1; latency counted from the intended send time), "
        "sustained-100 and sustained-1000 (--minutes of closed-loop load with no warmup: "
        "burst, sustained rate, refusals, log backlog and tree RSS over time, and a chart).",
    )
    where = parser.add_argument_group("what to benchmark")
    where.add_argument("--url", help="your deployment, e.g. http://10.0.0.5:8080 (plain HTTP)")
    where.add_argument("--key", help="API key of a project on --url (give it an unlimited rate)")
    where.add_argument(
        "--metrics-token",
        default=os.environ.get("INSLYTIC_METRICS_TOKEN", ""),
        help="with --url: the server's --metrics-token, for the server-side latency figures "
        "(default: $INSLYTIC_METRICS_TOKEN)",
    )
    where.add_argument(
        "--server-pid",
        type=int,
        help="with --url on this machine: the server's pid, for CPU and RSS figures",
    )
    where.add_argument(
        "--compare",
        action="store_true",
        help=f"also run the peers ({targets.BARE}, {targets.FASTAPI}) interleaved and print ratios",
    )
    where.add_argument(
        "--targets",
        help="comma list of servers to run, from "
        f"{','.join(targets.SELF_HOSTED)} (default: {targets.INSLYTIC}; --compare: all)",
    )
    where.add_argument("--durability", choices=["fsync", "none"], default="fsync")
    where.add_argument(
        "--server-arg",
        action="append",
        default=[],
        metavar="ARG",
        help="extra argument for `inslytic-fast serve` (repeatable)",
    )
    load = parser.add_argument_group("load")
    load.add_argument(
        "--scenarios", default="1,100,1000,open", help="comma list (default: %(default)s)"
    )
    load.add_argument("--duration", type=float, default=10.0, help="measured seconds per run")
    load.add_argument(
        "--minutes", type=float, default=10.0, help="length of each sustained-* run (default 10)"
    )
    load.add_argument("--warmup", type=float, default=2.0, help="unmeasured seconds first")
    load.add_argument("--connections", type=int, help="override every scenario's connections")
    load.add_argument(
        "--pipeline", type=int, default=1, help="requests in flight per connection (default 1)"
    )
    load.add_argument("--rate", type=float, help="open-loop requests/s (default: half max)")
    load.add_argument("--gzip", action="store_true", help="gzip request bodies")
    load.add_argument("--seed", type=int, default=1, help="payload seed (default 1)")
    load.add_argument("--rounds", type=int, help="repeat every scenario (default 1; --compare: 3)")
    load.add_argument(
        "--loadgen-procs",
        type=int,
        default=1,
        help="generator processes when one core cannot drive the server",
    )
    load.add_argument("--no-pin", action="store_true", help="do not pin server and generator")
    load.add_argument(
        "--roller-cpu",
        type=int,
        metavar="N",
        help="run inslytic-fast's roller process on CPU N (serve --roller-cpus N), e.g. the "
        "generator's, as a pinned deployment would keep it off the serving core. Default: it "
        "shares the server's CPU, as the issue's one-core targets assume (no goals with it)",
    )
    load.add_argument(
        "--workers",
        type=int,
        default=1,
        help="inslytic-fast serve --workers N (default 1: the one-core targets). With N > 1 the "
        "server may use every CPU (it shares them with the generator; the report says so) and "
        "CPU seconds and RSS are summed over supervisor, workers and roller",
    )
    load.add_argument(
        "--spin",
        action="store_true",
        help="the generator polls without sleeping, so its CPU never idles (on VMs, waking an "
        "idle vCPU can take milliseconds); costs that CPU entirely",
    )
    load.add_argument(
        "--wait-quiet",
        type=float,
        default=0.0,
        metavar="SECONDS",
        help="on a shared machine: before each run wait up to SECONDS for the CPUs to be "
        f"mostly idle (< {QUIET_BUSY_SHARE * 100:.0f}%% busy); the report records what it found",
    )
    out = parser.add_argument_group("report")
    out.add_argument(
        "--allow-errors",
        action="store_true",
        help="keep runs with errors or non-202 answers valid (e.g. testing a rate limit)",
    )
    out.add_argument("--no-queryable", action="store_true", help="skip time-until-queryable")
    out.add_argument("--queryable-timeout", type=float, default=120.0)
    out.add_argument("--micro", action="store_true", help="also run bench/micro_*.py")
    out.add_argument(
        "--profile",
        metavar="PY_SPY",
        help="path to a py-spy binary: sample the server during each measured window; raw "
        "stacks go next to the JSON report, the top functions into it",
    )
    out.add_argument(
        "--output",
        type=Path,
        help="JSON report path (default: bench/results/<date>-<host>.json)",
    )
    out.add_argument(
        "--render",
        type=Path,
        metavar="JSON",
        help="re-summarize a saved JSON report (rewrites its summary) and print its table",
    )
    out.add_argument(
        "--smoke",
        action="store_true",
        help="a few seconds end to end against inslytic-fast and the bare peer (CI)",
    )
    return parser


def resolve_args(args: argparse.Namespace, parser: argparse.ArgumentParser) -> None:
    if bool(args.url) != bool(args.key):
        parser.error("--url and --key go together")
    if args.url and (args.compare or args.targets):
        parser.error("--url measures your deployment; --compare/--targets are self-hosted")
    args.sustained_s = args.minutes * 60
    if args.smoke:
        args.duration, args.warmup = min(args.duration, 0.6), min(args.warmup, 0.2)
        args.sustained_s = min(args.sustained_s, 4.0)
        args.queryable_timeout = min(args.queryable_timeout, 20.0)
        if args.rate is None:
            args.rate = 100.0
        if args.targets is None and not args.url:
            args.targets = f"{targets.INSLYTIC},{targets.BARE}"
        if args.scenarios == parser.get_default("scenarios"):
            # The sustained smoke is a run of its own (--scenarios sustained): seconds more.
            args.scenarios = ",".join(n for n, sc in SMOKE_SCENARIOS.items() if not sc.sustained)
    catalog = SMOKE_SCENARIOS if args.smoke else SCENARIOS
    names = [n.strip() for n in args.scenarios.split(",") if n.strip()]
    unknown = [n for n in names if n not in catalog]
    if unknown or not names:
        parser.error(f"unknown scenario(s) {unknown}; choose from {','.join(catalog)}")
    scenarios = [catalog[n] for n in names]
    if args.connections:
        scenarios = [
            Scenario(s.name, s.events, args.connections, s.open_loop, s.rate_fraction, s.sustained)
            for s in scenarios
        ]
    args.scenario_list = scenarios
    if args.url:
        args.target_list = [targets.EXTERNAL]
    elif args.targets:
        args.target_list = [t.strip() for t in args.targets.split(",") if t.strip()]
        bad = [t for t in args.target_list if t not in targets.SELF_HOSTED]
        if bad:
            parser.error(f"unknown target(s) {bad}; choose from {','.join(targets.SELF_HOSTED)}")
    elif args.compare:
        args.target_list = list(targets.SELF_HOSTED)
    else:
        args.target_list = [targets.INSLYTIC]
    if args.rounds is None:
        args.rounds = 3 if args.compare else 1
    if min(args.rounds, args.loadgen_procs, args.pipeline) < 1 or args.duration <= 0:
        parser.error("--rounds, --loadgen-procs and --pipeline are >= 1; --duration > 0")
    if args.roller_cpu is not None:
        if targets.INSLYTIC not in args.target_list:
            parser.error(f"--roller-cpu places the roller of a self-hosted {targets.INSLYTIC}")
        cpus = machine.available_cpus()
        if args.roller_cpu not in cpus:
            parser.error(f"--roller-cpu {args.roller_cpu}: this run may use CPUs {cpus}")


def plan_pinning(args: argparse.Namespace) -> dict:
    pinning = _split_cpus(args)
    # Empty: the roller inherits the server's affinity (with --no-pin too, where it has none).
    pinning["roller_cpus"] = [] if args.roller_cpu is None else [args.roller_cpu]
    return pinning


def _split_cpus(args: argparse.Namespace) -> dict:
    cpus = machine.available_cpus()
    if args.no_pin:
        return {"applied": False, "reason": "--no-pin", "server_cpus": [], "loadgen_cpus": []}
    if len(cpus) < 2:
        return {
            "applied": False,
            "reason": f"only {len(cpus)} CPU available",
            "server_cpus": [],
            "loadgen_cpus": [],
        }
    if args.url and not args.server_pid:
        return {"applied": True, "server_cpus": [], "loadgen_cpus": cpus, "reason": "remote"}
    if args.workers > 1:
        return {
            "applied": False,
            "reason": f"--workers {args.workers}: server and generator share all {len(cpus)} CPUs",
            "server_cpus": [],
            "loadgen_cpus": [],
        }
    return {"applied": True, "server_cpus": cpus[:1], "loadgen_cpus": cpus[1:], "reason": ""}


# One measured run


class Progress:
    """One live status line on stderr (a terminal), or nothing (logs, CI)."""

    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled
        self.width = 0

    def show(self, text: str) -> None:
        if self.enabled:
            sys.stderr.write("\r" + text.ljust(self.width))
            sys.stderr.flush()
            self.width = len(text)

    def done(self, text: str) -> None:
        if self.enabled:
            sys.stderr.write("\r" + " " * self.width + "\r")
        sys.stderr.write(text + "\n")
        sys.stderr.flush()
        self.width = 0


def _reader(proc: subprocess.Popen, index: int, lines: queue.Queue) -> None:
    for raw in proc.stdout:
        lines.put((index, raw))
    lines.put((index, None))


def percentiles_ms(latencies: array.array) -> dict[str, float | None]:
    if not latencies:
        return {name: None for name in [*PERCENTILES, "max"]}
    ordered = sorted(latencies)
    last = len(ordered) - 1
    found = {name: round(ordered[min(last, int(q * len(ordered)))] * 1e3, 3) for name, q in
             PERCENTILES.items()}  # fmt: skip
    found["max"] = round(ordered[-1] * 1e3, 3)
    return found


def wait_until_quiet(limit_s: float) -> dict:
    """Wait (up to limit_s) for all CPUs to be mostly idle; return what the last sample saw."""
    cpus = machine.available_cpus()
    deadline = time.monotonic() + limit_s
    while True:
        before = machine.cpu_ticks()
        time.sleep(1.0)
        share = machine.busy_share(before, machine.cpu_ticks(), cpus)
        quiet = share is not None and share < QUIET_BUSY_SHARE
        if quiet or time.monotonic() >= deadline:
            return {"busy_share_before_run": round(share or 0.0, 3), "quiet": quiet}


def serve_args(args: argparse.Namespace) -> list[str]:
    """What a self-hosted inslytic-fast gets after --port/--data-dir/--durability."""
    extra = [*args.server_arg, "--workers", str(args.workers)]
    if args.roller_cpu is not None:
        extra += ["--roller-cpus", str(args.roller_cpu)]
    return extra


def run_once(
    args: argparse.Namespace,
    pinning: dict,
    target: str,
    scenario: Scenario,
    round_no: int,
    rate: float | None,
    progress: Progress,
) -> dict:
    server_cpus = set(pinning["server_cpus"]) or None
    quiet = wait_until_quiet(args.wait_quiet) if args.wait_quiet > 0 else None
    if target == targets.EXTERNAL:
        server = targets.external(args.url, args.key, args.server_pid)
    else:
        server = targets.start_target(target, server_cpus, args.durability, serve_args(args))
    scratch = Path(tempfile.mkdtemp(prefix="bench-loadgen-"))
    procs: list[subprocess.Popen] = []
    try:
        result = _measure(args, pinning, server, scenario, round_no, rate, progress, scratch, procs)
        result["machine_before_run"] = quiet
        return result
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        for path in scratch.iterdir():
            path.unlink()
        scratch.rmdir()
        if target != targets.EXTERNAL:
            server.stop()


def _measure(args, pinning, server, scenario, round_no, rate, progress, scratch, procs) -> dict:
    several = args.workers > 1 and server.name == targets.INSLYTIC
    cpu_of = machine.tree_cpu_seconds if several else machine.cpu_seconds
    warmup, duration = args.warmup, args.duration
    if scenario.sustained:
        warmup, duration = 0.0, args.sustained_s
    # The roller is a process of its own: its CPU is measured apart (and, with several
    # workers, taken out of the tree's) so "serving" and "rolling" are both on the record.
    roller_of = machine.roller_cpu_seconds if server.name == targets.INSLYTIC else None

    # inslytic-fast's own request histogram, read before and after the window: how long the
    # server took, as against how long the client waited (queueing on busy connections).
    def scrape():
        if server.name not in (targets.INSLYTIC, targets.EXTERNAL):
            return None  # the peers have no /metrics
        url = f"http://{server.host}:{server.port}/metrics"
        return fetch_metrics(url, token=args.metrics_token)[0]

    # Sustained runs report the whole tree (server, workers, roller): that is what a box needs.
    memory_of = machine.tree_memory_mb if several or scenario.sustained else machine.memory_mb
    count = args.loadgen_procs
    loadgen_cpus = pinning["loadgen_cpus"] if pinning["applied"] else []
    lines: queue.Queue = queue.Queue()
    for index in range(count):
        # Split connections and rate evenly; the first processes take any remainder.
        conns = scenario.connections // count + (index < scenario.connections % count)
        spec = {
            "host": server.host,
            "port": server.port,
            "key": server.key,
            "events_per_request": scenario.events,
            "gzip": args.gzip,
            "segment": scenario.segment,
            "ok_status": 200 if scenario.segment else 202,
            "seed": args.seed + index,
            "connections": max(1, conns),
            "pipeline": args.pipeline,
            "spin": args.spin,
            "rate": rate / count if rate else None,
            "warmup": warmup,
            "duration": duration,
            "start_at": "stdin",
            "latency_path": str(scratch / f"latency-{index}.bin"),
            "cpus": [loadgen_cpus[index % len(loadgen_cpus)]] if loadgen_cpus else None,
        }
        proc = subprocess.Popen(
            [sys.executable, "-m", "bench.loadgen", json.dumps(spec)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            cwd=BENCH_DIR.parent,
            text=True,
        )
        procs.append(proc)
        threading.Thread(target=_reader, args=(proc, index, lines), daemon=True).start()

    ready = 0
    deadline = time.monotonic() + LOADGEN_READY_TIMEOUT_S
    while ready < count:
        try:
            index, raw = lines.get(timeout=max(0.01, deadline - time.monotonic()))
        except queue.Empty:
            raise RuntimeError("load generator did not connect in time") from None
        if raw is None:
            raise RuntimeError(f"load generator {index} exited: could not connect to {server}")
        if json.loads(raw).get("ready"):
            ready += 1
    start_at = time.time() + 0.05
    for proc in procs:
        proc.stdin.write(f"{start_at!r}\n")
        proc.stdin.flush()

    window_start = start_at + warmup
    window_end = window_start + duration
    timeline: list[dict] = []
    next_sample = start_at
    sampled_end = False
    total_ok: dict[int, int] = {}
    refused: dict[int, int] = {}
    cpu_start = cpu_end = roller_start = roller_end = None
    scrape_start = scrape_end = None
    rss_samples: list[float] = []
    results: dict[int, dict] = {}
    finished = 0
    next_rss = window_start
    recent: dict[int, int] = {}
    title = f"[round {round_no}] {server.name:<14} {scenario.label}"
    ticks_start = ticks_end = load_start = None
    profiler = None
    profile_path = scratch / "profile.txt"
    while finished < count:
        now = time.time()
        # cpu_ticks() is never None (an empty dict off Linux): these run once each.
        if ticks_start is None and now >= window_start:
            ticks_start = machine.cpu_ticks()
            load_start = machine.load_average()
            scrape_start = scrape()
        if ticks_end is None and now >= window_end:
            ticks_end = machine.cpu_ticks()
            scrape_end = scrape()
        if server.pid and cpu_start is None and now >= window_start:
            cpu_start = cpu_of(server.pid)
            roller_start = roller_of(server.pid) if roller_of else None
            if args.profile:
                profiler = profile.start(args.profile, server.pid, duration, profile_path)
        if server.pid and cpu_end is None and now >= window_end:
            cpu_end = cpu_of(server.pid)
            roller_end = roller_of(server.pid) if roller_of else None
        if server.pid and window_start <= now <= window_end and now >= next_rss:
            memory = memory_of(server.pid)
            if memory:
                rss_samples.append(round(memory["rss"], 1))
            next_rss = now + RSS_SAMPLE_INTERVAL_S
        if scenario.sustained and now >= next_sample and not sampled_end:
            timeline.append(
                sustained_sample(
                    now - start_at, server, scenario, total_ok, refused, scrape, memory_of
                )
            )
            next_sample = now + SUSTAINED_SAMPLE_S
            if now >= window_end:
                sampled_end = True
            elif next_sample > window_end:
                next_sample = window_end  # so the last sample closes the window
        try:
            index, raw = lines.get(timeout=0.05)
        except queue.Empty:
            continue
        if raw is None:
            finished += 1
            continue
        message = json.loads(raw)
        if "result" in message:
            results[index] = message["result"]
        elif "progress" in message:
            tick = message["progress"]
            total_ok[index] = tick.get("total_ok", 0)
            refused[index] = tick["non_202"]
            recent[index] = tick["responses"]
            per_s = sum(recent.values())
            progress.show(
                f"{title}  {tick['elapsed_s']:.0f}/{tick['of_s']:.0f} s  {per_s:,} req/s  "
                f"{per_s * scenario.events:,} ev/s  non-202 {tick['non_202']}  "
                f"errors {tick['errors']}"
            )
    if len(results) != count:
        raise RuntimeError(f"{count - len(results)} load generator process(es) failed")
    finished_at = time.monotonic()

    memory = memory_of(server.pid) if server.pid else None
    process_peaks = machine.process_peaks_mb(server.pid) if server.pid else {}
    profile_summary = None
    if profiler is not None:
        try:
            _, stderr = profiler.communicate(timeout=args.duration + 30)
        except subprocess.TimeoutExpired:
            profiler.kill()
            _, stderr = profiler.communicate()
        if profile_path.exists():
            collapsed = profile_path.read_text(errors="replace")
            profile_summary = profile.summarize(collapsed)
            keep = args.profile_dir / f"{server.name}-{scenario.name}-r{round_no}.collapsed.txt"
            keep.parent.mkdir(parents=True, exist_ok=True)
            keep.write_text(collapsed)
            profile_summary["raw"] = str(keep)
        else:
            profile_summary = {"error": stderr.decode(errors="replace")[-500:]}
    latencies = array.array("d")
    for index in range(count):
        with open(scratch / f"latency-{index}.bin", "rb") as source:
            latencies.frombytes(source.read())
    parts = list(results.values())
    window = max(p["window_s"] for p in parts)
    ok = sum(p["ok"] for p in parts)
    statuses: dict[str, int] = {}
    for part in parts:
        for status, n in part["statuses"].items():
            statuses[status] = statuses.get(status, 0) + n
    errors = sum(p["errors"] for p in parts)
    unanswered = sum(p["unanswered"] for p in parts)
    total_events_accepted = sum(p["total_ok"] for p in parts) * scenario.events
    events_per_s = ok * scenario.events / window
    server_cpu = cpu_end - cpu_start if cpu_start is not None and cpu_end is not None else None
    roller_cpu = None
    # Not found at the start: the roller was still starting (it names itself once imported),
    # so all it has used is the window's. Less at the end than at the start: it was restarted.
    if roller_end is not None and roller_end >= (roller_start or 0.0):
        roller_cpu = roller_end - (roller_start or 0.0)
        if several and server_cpu is not None:
            server_cpu -= roller_cpu

    queryable_s = queryable_count = None
    # A sustained run ends with whatever backlog it built; its figures say how much, and
    # counting it all through `query` could take longer than the run.
    wants_queryable = not args.no_queryable and not scenario.sustained
    if server.name == targets.INSLYTIC and wants_queryable and server.data_dir:
        waited = time.monotonic() - finished_at
        queryable_s, queryable_count = targets.wait_queryable(
            server.data_dir, total_events_accepted, args.queryable_timeout
        )
        if queryable_s is not None:
            queryable_s = round(queryable_s + waited, 2)

    # Who else used the CPUs in the window: on a shared machine this explains the numbers.
    all_cpus = machine.available_cpus()
    server_core = pinning["server_cpus"] if pinning["applied"] and server.pid else []
    contention = {
        "load_average_1m_at_start": load_start,
        "busy_share_all_cpus": None,
        "busy_share_server_cpus": None,
        "foreign_share_server_cpus": None,
    }
    if ticks_start and ticks_end:
        contention["busy_share_all_cpus"] = _round(
            machine.busy_share(ticks_start, ticks_end, all_cpus)
        )
        if server_core and server_cpu is not None:
            busy = machine.busy_share(ticks_start, ticks_end, server_core)
            if busy is not None:
                contention["busy_share_server_cpus"] = round(busy, 3)
                roller_here = None if pinning.get("roller_cpus") else roller_cpu
                contention["foreign_share_server_cpus"] = foreign_share(
                    busy, server_cpu, roller_here, window, len(server_core)
                )
    quarter = max(1, len(rss_samples) // 4)
    result = {
        "target": server.name,
        "scenario": scenario.name,
        "label": scenario.label,
        "round": round_no,
        "events_per_request": scenario.events,
        "connections": scenario.connections,
        "pipeline": args.pipeline,
        "loop": "open" if rate else "closed",
        "rate_req_per_s": round(rate, 1) if rate else None,
        "gzip": args.gzip,
        "window_s": round(window, 3),
        "requests_per_s": round(ok / window, 1),
        "events_per_s": round(events_per_s, 1),
        "latency_ms": percentiles_ms(latencies),
        "ok_202": ok,
        "non_202": statuses,
        "errors": errors,
        "unanswered": unanswered,
        "drained": all(p["drained"] for p in parts),
        "server_pid_known": bool(server.pid),
        "server_cpu_s": round(server_cpu, 3) if server_cpu is not None else None,
        "server_cpu_util": round(server_cpu / window, 3) if server_cpu is not None else None,
        "server_cpu_s_per_1m_events": (
            round(server_cpu / (ok * scenario.events) * 1e6, 2)
            if server_cpu is not None and ok
            else None
        ),
        "server_latency_ms": server_side_latency(
            scrape_start, scrape_end, "/v1/batch" if scenario.segment else "/v1/ingest"
        ),
        "roller_cpu_s": round(roller_cpu, 3) if roller_cpu is not None else None,
        "roller_cpu_s_per_1m_events": (
            round(roller_cpu / (ok * scenario.events) * 1e6, 2)
            if roller_cpu is not None and ok
            else None
        ),
        "server_peak_rss_mb": round(memory["peak"], 1) if memory else None,
        "server_rss_mb_samples": rss_samples,
        "server_rss_growth_mb": (
            round(
                statistics.mean(rss_samples[-quarter:]) - statistics.mean(rss_samples[:quarter]), 1
            )
            if rss_samples
            else None
        ),
        "events_accepted_total": total_events_accepted,
        "sustained": (
            sustained_figures(
                timeline, duration, server_cpu, roller_cpu, ok * scenario.events, process_peaks
            )
            if scenario.sustained
            else None
        ),
        "queryable_s": queryable_s,
        "queryable_count": queryable_count,
        "profile": profile_summary,
        "contention": contention,
        "loadgen": {
            "procs": count,
            "cpu_util": [p["loadgen_cpu_util"] for p in parts],
            "send_lag_p99_ms": [p["send_lag_p99_ms"] for p in parts],
            "open_loop_backlog_at_end": sum(p["open_loop_backlog_at_end"] for p in parts),
        },
    }
    problems = []
    # A smoke run shows the path works, not a rate: on a loaded machine its 0.6 s window may
    # close before the first answer, so any 202 of the run counts there.
    if not ok and not (args.smoke and total_events_accepted):
        problems.append("no 202 answers")
    if statuses and not scenario.sustained:  # refusals are one of a sustained run's figures
        problems.append(f"non-202 answers {statuses}")
    if errors:
        problems.append(f"{errors} connection errors")
    if not result["drained"]:
        problems.append(
            f"{unanswered} requests unanswered {loadgen.DRAIN_TIMEOUT_S:g} s after the window"
        )
    if queryable_s is None and server.name == targets.INSLYTIC and wants_queryable:
        problems.append(f"not all events queryable (last count {queryable_count})")
    result["problems"] = problems
    result["valid"] = not problems or (args.allow_errors and ok > 0)
    return result


def foreign_share(
    busy: float, server_cpu: float, roller_cpu: float | None, window: float, cores: int
) -> float:
    """Busy share of the server's cores that was neither the server's own nor its roller's
    (``roller_cpu``: None when the roller runs elsewhere)."""
    own = server_cpu + (roller_cpu or 0.0)
    return round(max(0.0, busy - own / (window * cores)), 3)


def _round(value: float | None, digits: int = 3) -> float | None:
    return None if value is None else round(value, digits)


def sustained_sample(at, server, scenario, total_ok, refused, scrape, memory_of) -> dict:
    """One point of a sustained run's timeline: cumulative counts, backlog, memory, CPU."""
    metrics = scrape()
    memory = memory_of(server.pid) if server.pid else None
    roller = machine.roller_cpu_seconds(server.pid) if server.pid else None
    return {
        "t": round(at, 2),
        "accepted_events": sum(total_ok.values()) * scenario.events,
        "refused": sum(refused.values()),
        "pending_bytes": (
            fetch_total(metrics.samples, "inslytic_log_pending_bytes") if metrics else None
        ),
        "tree_rss_mb": round(memory["rss"], 1) if memory else None,
        "server_cpu_s": _round(machine.tree_cpu_seconds(server.pid)) if server.pid else None,
        "roller_cpu_s": _round(roller),
    }


def _interpolate(timeline: list[dict], key: str, at: float) -> float:
    previous = timeline[0]
    for point in timeline:
        if point["t"] >= at:
            span = point["t"] - previous["t"]
            share = (at - previous["t"]) / span if span > 0 else 1.0
            return previous[key] + (point[key] - previous[key]) * share
        previous = point
    return previous[key]


def window_rates(timeline: list[dict], window: float) -> list[tuple[float, float]]:
    """(window end s, accepted events/s in the window) for consecutive windows."""
    if len(timeline) < 2:
        return []
    rates = []
    end = window
    while end <= timeline[-1]["t"] + 1e-6:
        accepted = _interpolate(timeline, "accepted_events", end) - _interpolate(
            timeline, "accepted_events", end - window
        )
        rates.append((round(end, 1), round(accepted / window, 1)))
        end += window
    return rates


def sustained_figures(
    timeline, duration, server_cpu, roller_cpu, events, process_peaks=None
) -> dict:
    """Burst (first window), sustained (median window of the second half) and the rest.
    ``tree_peak_rss_mb`` is the largest sampled sum over the tree; ``process_peak_rss_mb``
    each process's own peak (VmHWM) at the end, whose sum bounds the tree's from above."""
    window = SUSTAINED_WINDOW_S if duration >= 4 * SUSTAINED_WINDOW_S else max(1.0, duration / 4)
    rates = window_rates(timeline, window)
    second_half = [rate for end, rate in rates if end - window >= duration / 2]
    pending = [p["pending_bytes"] for p in timeline if p["pending_bytes"] is not None]
    rss = [p["tree_rss_mb"] for p in timeline if p["tree_rss_mb"] is not None]
    return {
        "window_s": window,
        "burst_events_per_s": rates[0][1] if rates else None,
        "sustained_events_per_s": statistics.median(second_half) if second_half else None,
        "refused": timeline[-1]["refused"] if timeline else None,
        "pending_mb_max": round(max(pending) / 2**20, 1) if pending else None,
        "pending_mb_end": round(pending[-1] / 2**20, 1) if pending else None,
        "tree_peak_rss_mb": max(rss) if rss else None,
        "process_peak_rss_mb": process_peaks or {},
        "serving_us_per_event": _round(server_cpu / events * 1e6, 2)
        if server_cpu is not None and events
        else None,
        "rolling_us_per_event": _round(roller_cpu / events * 1e6, 2)
        if roller_cpu is not None and events
        else None,
        "windows": rates,
        "timeline": timeline,
    }


def write_sustained_charts(runs: list[dict], output: Path) -> list[Path]:
    """One SVG per sustained scenario beside the JSON report: a line per server (and round)."""
    written = []
    for name in dict.fromkeys(r["scenario"] for r in runs if r.get("sustained")):
        mine = [r for r in runs if r["scenario"] == name and r.get("sustained")]
        several_rounds = len({r["round"] for r in mine}) > 1
        rates, pending = [], []
        for run in mine:
            label = run["target"] + (f" r{run['round']}" if several_rounds else "")
            figures = run["sustained"]
            rates.append((label, figures["windows"]))
            points = [
                (p["t"], p["pending_bytes"])
                for p in figures["timeline"]
                if p["pending_bytes"] is not None
            ]
            if points:
                pending.append((label, points))
        title = f"{mine[0]['label']}: accepted events/s and log backlog over time"
        path = output.with_name(f"{output.stem}-{name}.svg")
        path.write_text(chart.sustained_svg(title, rates, pending))
        written.append(path)
    return written


# Reports


SERVER_LATENCY_METRIC = "inslytic_http_request_duration_seconds_bucket"


def server_side_latency(before, after, route: str = "/v1/ingest") -> dict | None:
    """Percentile upper bounds (bucket edges, ms) of the requests the server answered between
    two scrapes of its /metrics, and the share answered within 5 ms; None without both.

    Only the scenario's route's histogram (a server from before the route label had one for
    all, which counts as /v1/ingest's).
    With several workers the other workers' counts are up to one tick (1 s) old."""
    if before is None or after is None:
        return None
    counts = {}
    for (name, labels), value in after.samples.items():
        if name == SERVER_LATENCY_METRIC and dict(labels).get("route", "/v1/ingest") == route:
            edge = dict(labels)["le"]
            counts[edge] = value - before.samples.get((name, labels), 0.0)
    total = counts.get("+Inf", 0.0)
    if total <= 0:
        return None
    edges = sorted((float(e), n) for e, n in counts.items())  # cumulative, by edge
    out = {}
    for key, q in (("p50_le", 0.5), ("p99_le", 0.99), ("p99_9_le", 0.999)):
        edge = next(e for e, n in edges if n >= q * total)
        out[key] = None if edge == float("inf") else round(edge * 1000, 3)
    out["share_within_5ms"] = round(counts.get("0.005", 0.0) / total, 4)
    out["requests"] = int(total)
    return out


def _total_cpu_per_1m(run: dict) -> float | None:
    """Serving plus rolling CPU seconds per 1M events (peers have no roller)."""
    serving = run["server_cpu_s_per_1m_events"]
    if serving is None:
        return None
    return serving + (run.get("roller_cpu_s_per_1m_events") or 0.0)


def median_of(runs: list[dict], *path: str) -> float | None:
    values = []
    for run in runs:
        value = run
        for key in path:
            value = value.get(key) if isinstance(value, dict) else None
        if value is not None:
            values.append(value)
    return statistics.median(values) if values else None


SUSTAINED_KEYS = (
    "burst_events_per_s",
    "sustained_events_per_s",
    "refused",
    "pending_mb_max",
    "pending_mb_end",
    "tree_peak_rss_mb",
    "serving_us_per_event",
    "rolling_us_per_event",
)


def summarize(runs: list[dict], scenarios: list[Scenario], target_list: list[str]) -> list[dict]:
    """Per scenario and server: medians over rounds, and paired per-round ratios."""
    rows = []
    for scenario in scenarios:
        by_target = {
            t: [r for r in runs if r["scenario"] == scenario.name and r["target"] == t]
            for t in target_list
        }
        ours = {r["round"]: r for r in by_target.get(targets.INSLYTIC, [])}
        for target, mine in by_target.items():
            if not mine:
                continue
            # Open loop: every server runs at its own offered rate, so a ratio says nothing;
            # nor does one with a window that closed before its first answer (a smoke run on a
            # loaded machine).
            ratios = [
                ours[r["round"]]["events_per_s"] / r["events_per_s"]
                for r in mine
                if r["round"] in ours
                and r["events_per_s"]
                and ours[r["round"]]["events_per_s"]
                and not scenario.open_loop
            ]
            # CPU seconds per event is what contention on a shared machine distorts least. Ours
            # includes the roller's: a peer's figure is all the work it does for an event.
            cpu_ratios = [
                _total_cpu_per_1m(r) / _total_cpu_per_1m(ours[r["round"]])
                for r in mine
                if r["round"] in ours
                and _total_cpu_per_1m(r)
                and _total_cpu_per_1m(ours[r["round"]])
            ]
            rows.append(
                {
                    "scenario": scenario.name,
                    "label": scenario.label,
                    "target": target,
                    "rounds": len(mine),
                    "valid": all(r["valid"] for r in mine),
                    "requests_per_s": median_of(mine, "requests_per_s"),
                    "events_per_s": median_of(mine, "events_per_s"),
                    "latency_ms": {
                        name: median_of(mine, "latency_ms", name) for name in [*PERCENTILES, "max"]
                    },
                    "rate_req_per_s": median_of(mine, "rate_req_per_s"),
                    "server_cpu_s_per_1m_events": median_of(mine, "server_cpu_s_per_1m_events"),
                    "roller_cpu_s_per_1m_events": median_of(mine, "roller_cpu_s_per_1m_events"),
                    "server_p99_le_ms": median_of(mine, "server_latency_ms", "p99_le"),
                    "server_peak_rss_mb": max(
                        (r["server_peak_rss_mb"] for r in mine if r["server_peak_rss_mb"]),
                        default=None,
                    ),
                    "queryable_s": median_of(mine, "queryable_s"),
                    "non_202": sum(sum(r["non_202"].values()) for r in mine),
                    "errors": sum(r["errors"] for r in mine),
                    "inslytic_ratio": round(statistics.median(ratios), 3) if ratios else None,
                    "inslytic_ratio_per_round": [round(r, 3) for r in ratios],
                    "cpu_cost_ratio": (
                        round(statistics.median(cpu_ratios), 3) if cpu_ratios else None
                    ),
                    "foreign_share_server_cpus": median_of(
                        mine, "contention", "foreign_share_server_cpus"
                    ),
                    "busy_share_all_cpus": median_of(mine, "contention", "busy_share_all_cpus"),
                    "sustained": (
                        {key: median_of(mine, "sustained", key) for key in SUSTAINED_KEYS}
                        if scenario.sustained
                        else None
                    ),
                }
            )
    return rows


def evaluate_goals(summary: list[dict], durability: str) -> list[dict]:
    """The issue's targets, checked against the medians of this session."""
    ours = {row["scenario"]: row for row in summary if row["target"] == targets.INSLYTIC}
    peers = {(row["scenario"], row["target"]): row for row in summary}
    goals = []

    def add(scenario: str, what: str, measured, goal: float, higher_is_better: bool = True):
        if measured is None:
            return
        met = measured >= goal if higher_is_better else measured <= goal
        goals.append(
            {"scenario": scenario, "goal": what, "measured": measured, "target": goal, "met": met}
        )

    if "1" in ours:
        add("1", "req/s, 1 event/request", ours["1"]["requests_per_s"], GOAL_REQ_PER_S_1)
        bare = peers.get(("1", targets.BARE))
        if bare:
            add("1", "x bare-httptools req/s", bare["inslytic_ratio"], GOAL_VS_BARE)
            # On a shared core throughput flatters whoever needs less CPU per request; the
            # CPU-cost ratio is the figure a dedicated core would converge to.
            add("1", "x bare-httptools, by CPU per request", bare["cpu_cost_ratio"], GOAL_VS_BARE)
    for name in ("100", "1000"):
        if name in ours:
            add(name, "events/s", ours[name]["events_per_s"], GOAL_EVENTS_PER_S)
    if "1000" in ours:
        add("1000", "peak RSS MB", ours["1000"]["server_peak_rss_mb"], GOAL_PEAK_RSS_MB, False)
    if "open" in ours:
        add("open", "p99 ms at half max rate", ours["open"]["latency_ms"]["p99"], GOAL_OPEN_P99_MS,
            False)  # fmt: skip
    for name in ours:
        if name == "open" or ours[name].get("sustained"):
            continue  # offered load / a timeline, not a throughput to compare: see summarize()
        fastapi = peers.get((name, targets.FASTAPI))
        if fastapi:
            add(name, "x fastapi-ref events/s", fastapi["inslytic_ratio"], GOAL_VS_FASTAPI)
    for name, row in ours.items():
        figures = row.get("sustained")
        if figures:
            sustained = figures["sustained_events_per_s"]
            add(name, "sustained events/s", sustained, GOAL_SUSTAINED_EVENTS_PER_S)
            add(name, "tree peak RSS MB", figures["tree_peak_rss_mb"], GOAL_TREE_RSS_MB, False)
    for goal in goals:
        goal["durability"] = durability
    return goals


def _fmt(value, digits: int = 0) -> str:
    if value is None:
        return "-"
    if isinstance(value, float) and digits:
        return f"{value:,.{digits}f}"
    return f"{value:,.0f}"


def _pct(value) -> str:
    return "-" if value is None else f"{100 * value:.0f}%"


def _ratio(value) -> str:
    if value is None:
        return "-"
    return f"{value:,.0f}x" if value >= 10 else f"{value:.2f}"


def pinning_text(pin: dict, self_hosted: bool) -> str:
    """The report's pinning sentence. Reports saved before roller_cpus was recorded had the
    roller on the server's CPU (it inherited the pin)."""
    roller_cpus = pin.get("roller_cpus") or []
    if not pin["applied"]:
        text = f"not pinned ({pin['reason']})"
        return f"{text}; roller on CPU {roller_cpus}" if roller_cpus else text
    roller = ""
    if self_hosted:  # with --url, where the deployment's roller runs is not the runner's doing
        roller = f", its roller on CPU {roller_cpus}" if roller_cpus else " with its roller"
    return (
        f"server on CPU {pin['server_cpus']}{roller}, load generator on CPU {pin['loadgen_cpus']}"
    )


def _sustained_text(runs: list[dict]) -> str:
    windows = [r["window_s"] for r in runs if r.get("sustained")]
    return f"; sustained runs of {max(windows):.0f} s, no warmup" if windows else ""


def markdown(report: dict) -> str:
    info = report["machine"]
    pin_text = pinning_text(report["pinning"], report["settings"]["mode"] == "self-hosted")
    lines = [
        f"### inslytic-fast benchmark, {report['date']}",
        "",
        f"- Machine: {info['cpu_model']}, {info['cpu_count']} CPUs, "
        f"{info['memory_total_mb']} MiB, {info['os']}, {info['python']}",
        f"- Pinning: {pin_text}; durability {report['settings']['durability']}; "
        f"{report['settings']['rounds']} round(s) of {report['settings']['duration_s']:g} s "
        f"(+{report['settings']['warmup_s']:g} s warmup), interleaved; medians shown"
        + _sustained_text(report["runs"]),
        f"- Command: `{report['command']}`",
        "",
    ]
    sustained_rows = [row for row in report["summary"] if row.get("sustained")]
    if sustained_rows:
        lines += [
            "| sustained scenario | server | sustained events/s (median 10 s window, 2nd half) | "
            "burst events/s (first window) | refused requests | log pending max / end MiB | "
            "tree peak RSS MB | CPU us/event serving + rolling |",
            "|---|---|--:|--:|--:|--:|--:|--:|",
        ]
        for row in sustained_rows:
            f = row["sustained"]
            lines.append(
                f"| {row['label']} | {row['target']}{'' if row['valid'] else ' (INVALID)'} | "
                f"{_fmt(f['sustained_events_per_s'])} | {_fmt(f['burst_events_per_s'])} | "
                f"{_fmt(f['refused'])} | {_fmt(f['pending_mb_max'], 1)} / "
                f"{_fmt(f['pending_mb_end'], 1)} | {_fmt(f['tree_peak_rss_mb'], 1)} | "
                f"{_fmt(f['serving_us_per_event'], 2)} + {_fmt(f['rolling_us_per_event'], 2)} |"
            )
        lines.append("")
    lines += [
        "| scenario | server | req/s | events/s | inslytic-fast ÷ this | CPU per event, "
        "this ÷ inslytic-fast | p50 ms | p90 ms | "
        "p99 ms | p99.9 ms | CPU s / 1M events | roller CPU s / 1M events | peak RSS MB | "
        "queryable after s | non-202 / errors | other load on server CPU |",
        "|---|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|",
    ]
    for row in report["summary"]:
        if row.get("sustained"):
            continue
        lat = row["latency_ms"]
        label = row["label"]
        if row["rate_req_per_s"]:
            label += f" @ {row['rate_req_per_s']:,.0f} req/s"
        lines.append(
            f"| {label} | {row['target']}{'' if row['valid'] else ' (INVALID)'} | "
            f"{_fmt(row['requests_per_s'])} | {_fmt(row['events_per_s'])} | "
            f"{_ratio(row['inslytic_ratio'])} | {_ratio(row['cpu_cost_ratio'])} | "
            f"{_fmt(lat['p50'], 2)} | {_fmt(lat['p90'], 2)} | "
            f"{_fmt(lat['p99'], 2)} | {_fmt(lat['p99_9'], 2)} | "
            f"{_fmt(row['server_cpu_s_per_1m_events'], 1)} | "
            f"{_fmt(row.get('roller_cpu_s_per_1m_events'), 1)} | "
            f"{_fmt(row['server_peak_rss_mb'], 1)} | {_fmt(row['queryable_s'], 2)} | "
            f"{row['non_202']} / {row['errors']} | {_pct(row['foreign_share_server_cpus'])} |"
        )
    if report["goals"]:
        lines += ["", "| goal (issues 5, 14) | measured | target | met |", "|---|--:|--:|:-:|"]
        for goal in report["goals"]:
            sign = ">=" if "RSS" not in goal["goal"] and "p99" not in goal["goal"] else "<="
            lines.append(
                f"| {goal['scenario']}: {goal['goal']} | {goal['measured']:,.2f} | "
                f"{sign} {goal['target']:,g} | {'yes' if goal['met'] else 'no'} |"
            )
    for run in report["runs"]:
        if run.get("profile") and run["profile"].get("samples"):
            title = f"py-spy, {run['target']}, {run['label']}, round {run['round']}"
            lines += ["", "```", profile.as_text(run["profile"], title), "```"]
    for micro in report.get("micro", []):
        lines.append(f"\nmicro: `{json.dumps(micro)}`")
    return "\n".join(lines)


def run_micro() -> list[dict]:
    """Each bench/micro_*.py in a fresh interpreter, collecting the JSON lines it prints."""
    found = []
    for path in sorted(BENCH_DIR.glob("micro_*.py")):
        proc = subprocess.run(
            [sys.executable, str(path)],
            capture_output=True,
            text=True,
            timeout=MICRO_TIMEOUT_S,
            cwd=BENCH_DIR.parent,
        )
        # One JSON line per figure (some benchmarks print one per stage); other lines are prose.
        results = []
        for line in proc.stdout.splitlines():
            try:
                value = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(value, dict):
                results.append(value)
        if proc.returncode != 0 or not results:
            results.append({"bench": path.stem, "error": (proc.stderr or proc.stdout)[-500:]})
        found.extend(results)
    return found


def render(path: Path) -> int:
    """Recompute summary and goals of a saved report from its runs; print the table."""
    report = json.loads(path.read_text())
    scenarios: dict[str, Scenario] = {}
    for run in report["runs"]:
        scenarios.setdefault(
            run["scenario"],
            Scenario(
                run["scenario"], run["events_per_request"], run["connections"],
                open_loop=run["loop"] == "open", sustained=bool(run.get("sustained")),
            ),
        )  # fmt: skip
    report["summary"] = summarize(
        report["runs"], list(scenarios.values()), report["settings"]["targets"]
    )
    if report["goals"]:
        report["goals"] = evaluate_goals(report["summary"], report["settings"]["durability"])
    path.write_text(json.dumps(report, indent=1) + "\n")
    print(markdown(report))
    return 0


def default_output(smoke: bool) -> Path:
    if smoke:
        return Path(tempfile.gettempdir()) / f"inslytic-bench-smoke-{os.getpid()}.json"
    host = socket.gethostname().split(".")[0] or "host"
    return RESULTS_DIR / f"{dt.date.today().isoformat()}-{host}.json"


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    raw_argv = sys.argv[1:] if argv is None else argv
    args = parser.parse_args(raw_argv)
    if args.render:
        return render(args.render)
    resolve_args(args, parser)
    pinning = plan_pinning(args)
    if pinning["applied"]:
        # The runner itself only samples /proc, but it must not do so on the server's core.
        os.sched_setaffinity(0, set(pinning["loadgen_cpus"]))
    progress = Progress(sys.stderr.isatty())
    output = args.output or default_output(args.smoke)
    args.profile_dir = output.with_name(output.stem + "-profiles")
    sample = build_requests("127.0.0.1", 1, "k", args.scenario_list[0].events, seed=args.seed)
    runs: list[dict] = []
    max_rate: dict[tuple[str, int], float] = {}
    try:
        for round_no in range(1, args.rounds + 1):
            for scenario in args.scenario_list:
                for target in args.target_list:
                    if scenario.segment and target != targets.INSLYTIC:
                        continue  # the peers speak /v1/ingest only
                    rate = None
                    if scenario.open_loop:
                        rate = args.rate
                        if rate is None:
                            found = max_rate.get((target, scenario.events))
                            if found is None:
                                parser.error(
                                    "scenario 'open' needs --rate, or a closed-loop scenario "
                                    "with the same events per request earlier in the run"
                                )
                            rate = found * scenario.rate_fraction
                    result = run_once(args, pinning, target, scenario, round_no, rate, progress)
                    if not scenario.open_loop:
                        max_rate[(target, scenario.events)] = result["requests_per_s"]
                    runs.append(result)
                    lat = result["latency_ms"]
                    progress.done(
                        f"[round {round_no}] {target:<14} {scenario.label:<42} "
                        f"{result['requests_per_s']:>10,.0f} req/s {result['events_per_s']:>11,.0f}"
                        f" ev/s  p99 {_fmt(lat['p99'], 2)} ms  CPU/1M ev "
                        f"{_fmt(result['server_cpu_s_per_1m_events'], 1)} s"
                        + (
                            f" + roller {_fmt(result['roller_cpu_s_per_1m_events'], 1)} s"
                            if result["roller_cpu_s_per_1m_events"] is not None
                            else ""
                        )
                        + (
                            f"  server p99 <= {result['server_latency_ms']['p99_le']} ms"
                            if result["server_latency_ms"]
                            else ""
                        )
                        + "  RSS "
                        f"{_fmt(result['server_peak_rss_mb'], 1)} MB"
                        + (
                            f"  queryable {result['queryable_s']} s"
                            if result["queryable_s"]
                            else ""
                        )
                        + ("" if result["valid"] else f"  INVALID: {'; '.join(result['problems'])}")
                    )
    except (targets.TargetError, RuntimeError) as exc:
        # Keep what was measured: a long session should not be lost to its last run.
        aborted = str(exc)
        print(f"bench: error: {exc}", file=sys.stderr)
    else:
        aborted = None

    summary = summarize(runs, args.scenario_list, args.target_list)
    report = {
        "date": dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "command": shlex.join(["python", "-m", "bench", *raw_argv]),
        "machine": machine.machine_info(),
        "pinning": pinning,
        "settings": {
            "spin": args.spin,
            "wait_quiet_s": args.wait_quiet,
            "mode": "url" if args.url else "self-hosted",
            "url": args.url,
            "targets": args.target_list,
            "scenarios": [s.name for s in args.scenario_list],
            "durability": args.durability if not args.url else None,
            "server_args": args.server_arg,
            "workers": args.workers,
            "duration_s": args.duration,
            "sustained_s": args.sustained_s,
            "warmup_s": args.warmup,
            "rounds": args.rounds,
            "pipeline": args.pipeline,
            "gzip": args.gzip,
            "seed": args.seed,
            "loadgen_procs": args.loadgen_procs,
            "event_bytes_mean": sample[1],
            "allow_errors": args.allow_errors,
        },
        "runs": runs,
        "summary": summary,
        # The goals are about the standard scenarios, plain JSON, on a self-hosted server whose
        # one core does all its work (the roller's too).
        "goals": []
        if args.url or args.smoke or args.gzip or args.roller_cpu is not None
        else evaluate_goals(summary, args.durability),
        "micro": run_micro() if args.micro else [],
        "aborted": aborted,
        "valid": all(r["valid"] for r in runs) and not aborted and bool(runs),
    }
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(report, indent=1) + "\n")
    for chart_path in write_sustained_charts(runs, output):
        print(f"chart: {chart_path}", file=sys.stderr)
    print(markdown(report))
    print(f"\nJSON report: {output}", file=sys.stderr)
    if aborted:
        print(f"bench: aborted after {len(runs)} run(s); the report keeps them", file=sys.stderr)
        return 1
    if not report["valid"]:
        print(
            "bench: some runs are INVALID (errors or non-202 answers); see above", file=sys.stderr
        )
        return 1
    return 0
