"""bench/: the smoke run end to end (real server, bare peer, real generator), plus its parts.

No timing assertions: the numbers depend on the machine. What is asserted is that the tool
works and that its report carries every field the README and issue 5 promise.
"""

from __future__ import annotations

import array
import asyncio
import gzip
import json
import os
import subprocess
import sys
import xml.dom.minidom
from pathlib import Path

import orjson
import pytest

from bench import loadgen, machine, payloads
from bench.run import (
    build_parser,
    foreign_share,
    percentiles_ms,
    pinning_text,
    plan_pinning,
    resolve_args,
    serve_args,
    server_side_latency,
    summarize,
)
from bench.targets import _first_int
from inslytic_fast.cli.stats_frame import Scrape, parse_metrics

REPO = Path(__file__).resolve().parent.parent
SMOKE_TIMEOUT_S = 120

RUN_FIELDS = {
    "target", "scenario", "label", "round", "events_per_request", "connections", "pipeline",
    "loop", "rate_req_per_s", "gzip", "window_s", "requests_per_s", "events_per_s", "latency_ms",
    "ok_202", "non_202", "errors", "unanswered", "drained", "server_cpu_s", "server_cpu_util",
    "server_cpu_s_per_1m_events", "roller_cpu_s", "roller_cpu_s_per_1m_events", "server_latency_ms",
    "server_peak_rss_mb", "server_rss_mb_samples",
    "server_rss_growth_mb", "events_accepted_total", "queryable_s", "queryable_count", "loadgen",
    "problems", "valid",
}  # fmt: skip
MACHINE_FIELDS = {"cpu_model", "cpu_count", "python", "packages", "os", "hostname"}


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    output = tmp_path_factory.mktemp("bench") / "smoke.json"
    proc = subprocess.run(
        [sys.executable, "-m", "bench", "--smoke", "--output", str(output)],
        capture_output=True,
        text=True,
        timeout=SMOKE_TIMEOUT_S,
        cwd=REPO,
    )
    return proc, output


def test_smoke_run_succeeds_against_server_and_bare_peer(smoke):
    proc, output = smoke
    assert proc.returncode == 0, proc.stderr
    report = json.loads(output.read_text())
    assert report["valid"] is True
    ran = {(r["target"], r["scenario"]) for r in report["runs"]}
    assert ran == {
        (target, scenario)
        for target in ("inslytic-fast", "bare-httptools")
        for scenario in ("1", "100", "open")
    } | {("inslytic-fast", "segment")}  # the peers speak /v1/ingest only
    # The Markdown table is what people paste: one row per (scenario, server).
    table_rows = [line for line in proc.stdout.splitlines() if line.startswith("| ")]
    assert len(table_rows) == 1 + len(ran)


def test_smoke_report_has_every_field(smoke):
    _, output = smoke
    report = json.loads(output.read_text())
    assert {
        "date",
        "command",
        "machine",
        "pinning",
        "settings",
        "runs",
        "summary",
        "goals",
        "aborted",
    } <= set(report)
    assert report["command"].startswith("python -m bench --smoke")
    assert MACHINE_FIELDS <= set(report["machine"])
    assert report["machine"]["packages"]["inslytic-fast"]
    assert {"applied", "server_cpus", "loadgen_cpus", "reason", "roller_cpus"} <= set(
        report["pinning"]
    )
    assert report["pinning"]["roller_cpus"] == []  # by default it shares the server's CPU
    for run in report["runs"]:
        assert RUN_FIELDS <= set(run), RUN_FIELDS - set(run)
        assert set(run["latency_ms"]) == {"p50", "p90", "p99", "p99_9", "max"}
        assert run["errors"] == 0 and run["non_202"] == {} and run["problems"] == []
        # On a loaded machine a 0.6 s smoke window may close before the first answer (the
        # bench then counts any 202 of the run): the server still accepted events.
        assert run["ok_202"] > 0 or (run["events_accepted_total"] or 0) > 0
        # Self-hosted: the runner knows the server's pid, so cost figures are present.
        assert run["server_cpu_s_per_1m_events"] is not None
        assert run["server_peak_rss_mb"] > 0
    for run in report["runs"]:
        if run["target"] == "inslytic-fast":
            assert run["queryable_s"] is not None
            assert run["queryable_count"] >= run["events_accepted_total"] > 0
            # Measured apart from serving; a smoke window may end before the roller has
            # named itself (test_the_roller_is_found_by_its_name covers the lookup).
            assert run["roller_cpu_s"] is None or run["roller_cpu_s"] >= 0
            # The server's own histogram over the window (its /metrics, read before and after).
            served = run["server_latency_ms"]
            assert served["requests"] > 0  # its window is the runner's, not the generator's
            assert 0 <= served["share_within_5ms"] <= 1
        else:
            assert run["roller_cpu_s"] is None
            assert run["server_latency_ms"] is None  # the peers have no /metrics
    open_runs = [r for r in report["runs"] if r["scenario"] == "open"]
    assert all(r["loop"] == "open" and r["rate_req_per_s"] for r in open_runs)


def test_smoke_summary_pairs_ratios_against_inslytic(smoke):
    _, output = smoke
    report = json.loads(output.read_text())
    ours = {
        r["scenario"]: r["server_cpu_s_per_1m_events"]
        for r in report["runs"]
        if r["target"] == "inslytic-fast"
    }
    our_rates = {
        r["scenario"]: r["events_per_s"] for r in report["runs"] if r["target"] == "inslytic-fast"
    }
    for row in report["summary"]:
        # CPU is read in 10 ms ticks: a tiny smoke window may show 0 s, and then no ratio.
        both_measured = ours[row["scenario"]] and row["server_cpu_s_per_1m_events"]
        assert (row["cpu_cost_ratio"] is not None) == bool(both_measured)
        # A loaded machine may close a smoke window before the first answer: no rate, no ratio.
        both_rated = our_rates[row["scenario"]] and row["events_per_s"]
        if row["scenario"] == "open":
            # Each server runs at its own offered rate there: no throughput ratio.
            assert row["inslytic_ratio"] is None
        elif not both_rated:
            assert row["inslytic_ratio"] is None
        elif row["target"] == "inslytic-fast":
            assert row["inslytic_ratio"] == 1.0
        else:
            assert row["inslytic_ratio"] > 0


def test_sustained_smoke_samples_the_tree_and_the_backlog_and_draws_a_chart(tmp_path):
    output = tmp_path / "sustained.json"
    argv = ["--smoke", "--scenarios", "sustained", "--targets", "inslytic-fast"]
    proc = subprocess.run(
        [sys.executable, "-m", "bench", *argv, "--output", str(output)],
        capture_output=True,
        text=True,
        timeout=SMOKE_TIMEOUT_S,
        cwd=REPO,
    )
    assert proc.returncode == 0, proc.stderr
    report = json.loads(output.read_text())
    (run,) = report["runs"]
    figures = run["sustained"]
    # Samples start at the load's start (later on a loaded machine) and go forward in time.
    times = [point["t"] for point in figures["timeline"]]
    assert len(times) >= 2 and 0 <= times[0] and times == sorted(times)
    last = figures["timeline"][-1]
    assert last["accepted_events"] > 0 and last["pending_bytes"] is not None
    # The whole tree: server and roller (no timing assertion: a smoke run only shows it works).
    assert last["tree_rss_mb"] > 0 and figures["tree_peak_rss_mb"] >= last["tree_rss_mb"]
    # And each process's own peak: the server and its roller at least.
    peaks = figures["process_peak_rss_mb"]
    assert peaks["inslytic-roller"] > 0 and peaks["python"] > 0
    # Present, whatever their values: a loaded CI machine may accept nothing in a window.
    assert figures["burst_events_per_s"] is not None
    assert figures["sustained_events_per_s"] is not None
    assert figures["serving_us_per_event"] is not None
    assert "sustained events/s" in proc.stdout
    chart = output.with_name("sustained-sustained.svg")
    svg = xml.dom.minidom.parse(str(chart)).documentElement
    assert svg.tagName == "svg" and len(svg.getElementsByTagName("polyline")) == 2


def test_the_roller_on_the_server_core_is_not_other_load():
    # 10 s on one core, fully busy: the server used 4 s and its roller 5 s of it.
    assert foreign_share(1.0, 4.0, 5.0, 10.0, 1) == 0.1
    assert foreign_share(1.0, 4.0, None, 10.0, 1) == 0.6  # roller elsewhere: not on this core


def test_help_lists_modes():
    proc = subprocess.run(
        [sys.executable, "-m", "bench", "--help"], capture_output=True, text=True, cwd=REPO
    )
    assert proc.returncode == 0
    for flag in ("--url", "--key", "--compare", "--loadgen-procs", "--rate", "--gzip", "--smoke"):
        assert flag in proc.stdout


def test_url_without_key_is_a_usage_error():
    proc = subprocess.run(
        [sys.executable, "-m", "bench", "--url", "http://127.0.0.1:1"],
        capture_output=True,
        text=True,
        cwd=REPO,
    )
    assert proc.returncode == 2
    assert "--url and --key go together" in proc.stderr


def bench_args(*argv: str):
    parser = build_parser()
    args = parser.parse_args(list(argv))
    resolve_args(args, parser)
    return args


def test_roller_cpu_reaches_the_server_and_the_reports_pinning():
    cpus = machine.available_cpus()
    args = bench_args("--roller-cpu", str(cpus[-1]))
    assert serve_args(args)[-2:] == ["--roller-cpus", str(cpus[-1])]
    pinning = plan_pinning(args)
    assert pinning["roller_cpus"] == [cpus[-1]]
    if pinning["applied"]:
        assert pinning_text(pinning, self_hosted=True) == (
            f"server on CPU {pinning['server_cpus']}, its roller on CPU [{cpus[-1]}], "
            f"load generator on CPU {pinning['loadgen_cpus']}"
        )
    else:
        assert pinning_text(pinning, self_hosted=True).endswith(f"; roller on CPU [{cpus[-1]}]")

    default = bench_args("--workers", "2")
    assert "--roller-cpus" not in serve_args(default)
    assert plan_pinning(default)["roller_cpus"] == []


def test_the_pinning_sentence_says_where_the_roller_ran():
    pinned = {"applied": True, "reason": "", "server_cpus": [0], "loadgen_cpus": [1]}
    # Saved before roller_cpus was recorded: the roller inherited the server's pin.
    assert pinning_text(pinned, self_hosted=True) == (
        "server on CPU [0] with its roller, load generator on CPU [1]"
    )
    assert pinning_text({**pinned, "roller_cpus": []}, self_hosted=True) == (
        "server on CPU [0] with its roller, load generator on CPU [1]"
    )
    assert pinning_text({**pinned, "roller_cpus": [1]}, self_hosted=True) == (
        "server on CPU [0], its roller on CPU [1], load generator on CPU [1]"
    )
    remote = {"applied": True, "reason": "remote", "server_cpus": [], "loadgen_cpus": [0, 1]}
    assert (
        pinning_text(remote, self_hosted=False) == "server on CPU [], load generator on CPU [0, 1]"
    )
    unpinned = {"applied": False, "reason": "--no-pin", "server_cpus": [], "loadgen_cpus": []}
    assert pinning_text({**unpinned, "roller_cpus": [1]}, self_hosted=True) == (
        "not pinned (--no-pin); roller on CPU [1]"
    )


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--roller-cpu", "65536"], "--roller-cpu 65536: this run may use CPUs"),
        (["--roller-cpu", "0", "--targets", "bare-httptools"], "--roller-cpu places the roller"),
        (["--roller-cpu", "0", "--url", "http://127.0.0.1:1", "--key", "k"], "places the roller"),
    ],
)
def test_roller_cpu_usage_errors(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        bench_args(*argv)
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


# Parts


def test_payloads_are_seeded_realistic_and_valid_json():
    first, event_bytes = payloads.build_requests("127.0.0.1", 8080, "ik_x", 100, seed=7)
    again, _ = payloads.build_requests("127.0.0.1", 8080, "ik_x", 100, seed=7)
    other, _ = payloads.build_requests("127.0.0.1", 8080, "ik_x", 100, seed=8)
    assert first == again and first != other
    assert 300 <= event_bytes <= 600
    head, body = first[0].split(b"\r\n\r\n", 1)
    assert f"Content-Length: {len(body)}".encode() in head
    assert b"Authorization: Bearer ik_x" in head
    events = orjson.loads(body)["events"]
    assert len(events) == 100
    assert len({e["eventName"] for e in events}) > 3
    required = {"eventName", "timestamp", "anonymousId", "sessionId", "consentGiven"}
    assert all(required <= set(e) for e in events)


def test_gzip_requests_carry_an_inflatable_body():
    (request, *_), _ = payloads.build_requests("h", 1, "k", 10, seed=1, use_gzip=True, variants=1)
    head, body = request.split(b"\r\n\r\n", 1)
    assert b"Content-Encoding: gzip" in head
    assert len(orjson.loads(gzip.decompress(body))["events"]) == 10


def test_retry_after_values():
    head = b"HTTP/1.1 503 Service Unavailable\r\nRetry-After: 7\r\nContent-Length: 2"
    assert loadgen.retry_after_seconds(head) == 7.0
    assert loadgen.retry_after_seconds(head.replace(b"Retry-After", b"retry-after")) == 7.0
    assert loadgen.retry_after_seconds(b"HTTP/1.1 503 x\r\nContent-Length: 2") == 1.0
    dated = b"HTTP/1.1 429 x\r\nRetry-After: Wed, 21 Oct 2026 07:28:00 GMT"
    assert loadgen.retry_after_seconds(dated) == 1.0


def test_the_generator_honours_retry_after_like_an_sdk(tmp_path):
    """Against a server that answers every request 503 + Retry-After: 1, each connection sends
    about once a second instead of as fast as the server answers."""
    answer = (
        b"HTTP/1.1 503 Service Unavailable\r\nRetry-After: 1\r\n"
        b"Content-Type: application/json\r\nContent-Length: 2\r\n\r\n{}"
    )

    class Overloaded(asyncio.Protocol):
        def connection_made(self, transport):
            self.transport = transport

        def data_received(self, data):
            for _ in range(data.count(b"\r\n\r\n")):  # bodies here never contain one
                self.transport.write(answer)

    async def main():
        server = await asyncio.get_running_loop().create_server(Overloaded, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        spec = {
            "host": "127.0.0.1", "port": port, "key": "k", "connections": 2, "pipeline": 1,
            "rate": None, "warmup": 0, "duration": 1.5, "latency_path": str(tmp_path / "lat"),
        }  # fmt: skip
        requests, _ = payloads.build_requests("127.0.0.1", port, "k", 1, seed=1, use_gzip=False)
        try:
            return await loadgen.Generator(spec, requests).run()
        finally:
            server.close()

    result = asyncio.run(asyncio.wait_for(main(), 30))
    # Two connections, answered at once, then 1 s apart: ~2 requests each in 1.5 s.
    assert 2 <= result["total_requests"] <= 8
    assert result["total_ok"] == 0 and result["statuses"].get("503", 0) >= 2


def test_percentiles_from_latencies():
    latencies = array.array("d", [i / 1000 for i in range(1, 1001)])  # 1..1000 ms
    found = percentiles_ms(latencies)
    assert found["p50"] == 501.0 and found["p99"] == 991.0 and found["max"] == 1000.0
    assert percentiles_ms(array.array("d"))["p99"] is None


def test_summary_ratio_is_paired_per_round():
    def run(target, round_no, events_per_s):
        return {
            "scenario": "1", "target": target, "round": round_no, "valid": True,
            "requests_per_s": events_per_s, "events_per_s": events_per_s,
            "latency_ms": {"p50": 1.0, "p90": 1.0, "p99": 1.0, "p99_9": 1.0, "max": 1.0},
            "rate_req_per_s": None, "server_cpu_s_per_1m_events": 1.0, "server_peak_rss_mb": 1.0,
            "queryable_s": None, "non_202": {}, "errors": 0,
        }  # fmt: skip

    from bench.run import SCENARIOS

    runs = [run("inslytic-fast", 1, 100.0), run("fastapi-ref", 1, 1.0)]
    runs += [run("inslytic-fast", 2, 50.0), run("fastapi-ref", 2, 1.0)]
    rows = summarize(runs, [SCENARIOS["1"]], ["inslytic-fast", "fastapi-ref"])
    peer = next(r for r in rows if r["target"] == "fastapi-ref")
    assert peer["inslytic_ratio"] == 75.0  # median of 100x and 50x


def test_query_count_parsing_accepts_common_json_shapes():
    assert _first_int(b'[{"n": 42}]') == 42
    assert _first_int(b'{"columns": ["n"], "rows": [[42]]}') == 42
    assert _first_int(b'{"n": 42}\n') == 42
    assert _first_int(b"not json") is None


def test_proc_figures_for_this_process():
    assert machine.cpu_seconds(os.getpid()) > 0
    memory = machine.memory_mb(os.getpid())
    assert memory["peak"] >= memory["rss"] > 0
    assert machine.cpu_seconds(2**22 + 12345) is None


def run_micro_script(name: str, *args: str) -> dict:
    """Run bench/<name>.py as the runner does and return the one JSON line it must print."""
    proc = subprocess.run(
        [sys.executable, f"bench/{name}.py", *args],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stderr
    (line,) = proc.stdout.strip().splitlines()
    result = json.loads(line)
    assert result["bench"] == name
    return result


def test_micro_ratelimit_prints_one_json_line():
    result = run_micro_script("micro_ratelimit", "--min-time", "0.01")
    assert result["check_ns"] > 0 and result["check_and_headers_ns"] > 0


@pytest.mark.parametrize("extra", [[], ["--durability", "fsync", "--events", "10"]])
def test_micro_hotpath_serves_real_requests_and_prints_one_json_line(extra):
    result = run_micro_script("micro_hotpath", "--windows", "1", "--connections", "4", *extra)
    assert set(result["statuses"]) == {"202"} and result["statuses"]["202"] >= 4
    assert 0 < result["us_per_request_best"] <= result["us_per_request_median"]


def test_profile_summary_from_collapsed_stacks():
    from bench.profile import summarize as summarize_profile

    collapsed = (
        "run (a/server.py:10);handle (a/protocol.py:20);decode (a/schema.py:5) 30\n"
        "run (a/server.py:10);handle (a/protocol.py:21) 10\n"
    )
    found = summarize_profile(collapsed)
    assert found["samples"] == 40
    assert found["self"][0] == ["decode (a/schema.py)", 75.0]
    assert ["handle (a/protocol.py)", 100.0] in found["inclusive"]


def test_a_server_that_fails_to_start_aborts_with_a_report(tmp_path):
    output = tmp_path / "aborted.json"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "bench",
            "--smoke",
            "--targets",
            "inslytic-fast",
            "--scenarios",
            "1",
            "--server-arg=--no-such-flag",
            "--output",
            str(output),
        ],  # fmt: skip
        capture_output=True,
        text=True,
        timeout=SMOKE_TIMEOUT_S,
        cwd=REPO,
    )
    assert proc.returncode == 1
    assert "did not start" in proc.stderr
    report = json.loads(output.read_text())
    assert report["aborted"] and report["valid"] is False and report["runs"] == []


def test_the_roller_is_found_by_its_name_and_its_cpu_measured():
    # A child that names itself as the roller does (prctl PR_SET_NAME) and burns some CPU.
    code = (
        "import ctypes, sys, time\n"
        "ctypes.CDLL(None).prctl(15, b'inslytic-roller', 0, 0, 0)\n"
        "end = time.process_time() + 0.3\n"
        "while time.process_time() < end: pass\n"
        "print('named', flush=True)\n"
        "sys.stdin.readline()\n"
    )
    child = subprocess.Popen(
        [sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    try:
        assert child.stdout.readline().strip() == "named"
        assert machine.roller_cpu_seconds(os.getpid()) >= 0.25
        assert machine.roller_cpu_seconds(child.pid) is None  # only descendants count
    finally:
        child.stdin.close()
        child.wait(timeout=10)


def test_server_side_latency_is_read_from_two_scrapes_of_the_histogram():
    def scrape(counts: list[int]) -> Scrape:
        edges = ["0.001", "0.005", "0.025", "+Inf"]
        lines = [
            f'inslytic_http_request_duration_seconds_bucket{{le="{edge}"}} {n}'
            for edge, n in zip(edges, counts, strict=True)
        ]
        return Scrape(0.0, parse_metrics("\n".join(lines)))

    # In the window: 900 answered within 1 ms, 95 more within 5 ms, 4 within 25 ms, 1 later.
    before, after = scrape([100, 100, 100, 100]), scrape([1000, 1095, 1099, 1100])
    got = server_side_latency(before, after)
    assert got == {
        "p50_le": 1.0,
        "p99_le": 5.0,
        "p99_9_le": 25.0,
        "share_within_5ms": 0.995,
        "requests": 1000,
    }
    assert server_side_latency(None, after) is None
    assert server_side_latency(after, after) is None  # nothing answered in between


def test_segment_requests_are_what_the_server_decodes_with_fresh_ids_per_request():
    from bench.loadgen import Generator
    from inslytic_fast.ingest.segment import SegmentCodec

    requests, _ = payloads.build_requests("127.0.0.1", 1, "ik_k", 5, seed=1, segment=True)
    head, body = requests[0].split(b"\r\n\r\n", 1)
    assert head.startswith(b"POST /v1/batch ") and b"Authorization: Basic " in head
    assert len(SegmentCodec().decode(body, None).messages) == 5
    gen = Generator({"segment": True, "ok_status": 200}, requests)
    first, second = (gen.with_new_message_ids(requests[0], 0) for _ in range(2))
    ids = [
        [m.message_id for m in SegmentCodec().decode(r.split(b"\r\n\r\n", 1)[1], None).messages]
        for r in (first, second)
    ]
    assert len(set(ids[0]) | set(ids[1])) == 10  # no id repeats across requests
