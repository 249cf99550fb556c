"""``python -m bench cluster``: one node against two, sharing a real lake and coordinator.

A real Valkey and a real SeaweedFS (started as the cluster tests start them,
tests/cluster_servers.py), then, per round, one node and two nodes (own data dirs and ports,
the same ``--lake`` and ``--coordinator``, each pinned to its own CPU), and the closed-loop
generator (bench/loadgen.py) split evenly across the nodes for the same window. Reported per
configuration: accepted events/s in total and per node, each node's CPU per event (its
process tree: serving, rolling, uploading), the upload lag (age of the oldest file waiting,
sampled each second), PUTs per second, and the coordinator's commands per second (Valkey's
own count) with the token grants among them.

Where the generator runs is part of the result: with a CPU left over after the nodes it is
pinned there (as ``python -m bench`` does); otherwise (two nodes on a 2-vCPU VM) it is
spread over the nodes' CPUs, and so are Valkey and SeaweedFS, so the two-node rate is what
the CPUs had left. CPU per event is the figure that reads the same either way.
"""

from __future__ import annotations

import argparse
import json
import os
import queue
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from tests.cluster_servers import S3_CREDENTIALS, SeaweedProcess, ValkeyProcess

from . import machine, targets

RESULTS_DIR = Path(__file__).resolve().parent / "results"
BENCH_DIR = Path(__file__).resolve().parent
READY_TIMEOUT_S = 30.0
SAMPLE_INTERVAL_S = 1.0
# A limit far above what the nodes reach: admission takes the global-limit path (grants from
# the coordinator, as a production project would) without ever refusing.
BENCH_LIMIT_PER_MINUTE = 600_000_000


@dataclass
class Placement:
    node_cpus: list[int]
    loadgen_cpus: list[int]  # empty: not pinned
    note: str


def plan_placement(nodes: int, cpus: list[int]) -> Placement:
    """Each node on its own CPU; the generator on the CPUs left, or spread if none is."""
    if len(cpus) > nodes:
        return Placement(cpus[:nodes], cpus[nodes:], "generator pinned to the CPUs left over")
    return Placement(
        [cpus[i % len(cpus)] for i in range(nodes)],
        [],
        "no free CPU: generator, Valkey and SeaweedFS spread over the nodes' CPUs",
    )


def metrics(node: targets.Running) -> dict[str, float]:
    """The unlabelled samples of a node's /metrics page."""
    url = f"http://{node.host}:{node.port}/metrics"
    with urllib.request.urlopen(url, timeout=10) as response:
        body = response.read().decode()
    out: dict[str, float] = {}
    for line in body.splitlines():
        if line and not line.startswith("#") and "{" not in line:
            name, _, value = line.partition(" ")
            out[name] = float(value)
    return out


def valkey_commands(valkey: ValkeyProcess) -> dict[str, int]:
    """Calls per command Valkey has served since it started (INFO commandstats)."""
    import redis  # the cluster extra; the bench of a cluster needs it anyway

    client = redis.Redis.from_url(valkey.url)
    try:
        stats = client.info("commandstats")
    finally:
        client.close()
    return {name.removeprefix("cmdstat_"): int(s["calls"]) for name, s in stats.items()}


def create_project(coordinator: str) -> str:
    proc = subprocess.run(
        [sys.executable, "-m", "inslytic_fast", "projects", "create", targets.BENCH_PROJECT,
         "--events-per-minute", str(BENCH_LIMIT_PER_MINUTE), "--coordinator", coordinator],
        capture_output=True, text=True, timeout=60, check=True,
    )  # fmt: skip
    return proc.stdout.strip().splitlines()[-1].strip()


def start_node(
    index: int, cpu: int, key: str, valkey: ValkeyProcess, seaweed: SeaweedProcess, prefix: str
) -> targets.Running:
    workdir = Path(tempfile.mkdtemp(prefix=f"inslytic-cluster-bench-n{index}-"))
    data_dir = workdir / "data"
    cmd = [
        sys.executable, "-m", "inslytic_fast", "serve", "--port", "0",
        "--data-dir", str(data_dir), "--durability", "fsync", "--workers", "1",
        "--node-id", f"n{index}", "--coordinator", valkey.url,
        "--lake", f"s3://{seaweed.bucket}/{prefix}", "--s3-endpoint", seaweed.endpoint,
    ]  # fmt: skip
    node = targets.spawn_and_wait(f"node{index}", cmd, workdir, {cpu}, key)
    node.data_dir = data_dir
    deadline = time.monotonic() + READY_TIMEOUT_S
    while metrics(node).get("inslytic_coordinator_up") != 1:
        if time.monotonic() > deadline:
            node.stop()
            raise targets.TargetError(f"node{index} never reached the coordinator")
        time.sleep(0.1)
    return node


def tree_cpu(node: targets.Running) -> float | None:
    """The node's CPU seconds: server, roller, uploader (its whole process tree)."""
    return machine.tree_cpu_seconds(node.pid) if node.pid else None


def side_cpu(server: ValkeyProcess | SeaweedProcess) -> float | None:
    return machine.cpu_seconds(server.proc.pid) if server.proc else None


def _reader(proc: subprocess.Popen, index: int, lines: queue.Queue) -> None:
    assert proc.stdout is not None  # Popen(stdout=PIPE)
    for line in proc.stdout:
        lines.put((index, line))
    lines.put((index, None))


def generators(
    nodes: list[targets.Running], args: argparse.Namespace, cpus: list[int], scratch: Path
) -> tuple[list[subprocess.Popen], queue.Queue]:
    """One closed-loop generator process per node, the connections split evenly."""
    procs: list[subprocess.Popen] = []
    lines: queue.Queue = queue.Queue()
    for index, node in enumerate(nodes):
        spec = {
            "host": node.host, "port": node.port, "key": node.key,
            "route": "/v1/batch (Segment)" if args.segment else "/v1/ingest",
        "valkey_appendfsync": args.appendfsync,
        "events_per_request": args.events, "seed": 1000 + index,
            "segment": args.segment, "ok_status": 200 if args.segment else 202,
            "connections": max(1, args.connections // len(nodes)), "pipeline": 1,
            "warmup": args.warmup, "duration": args.duration, "start_at": "stdin",
            "latency_path": str(scratch / f"latency-{index}.bin"),
            "cpus": [cpus[index % len(cpus)]] if cpus else None,
        }  # fmt: skip
        proc = subprocess.Popen(
            [sys.executable, "-m", "bench.loadgen", json.dumps(spec)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, cwd=BENCH_DIR.parent, text=True,
        )  # fmt: skip
        procs.append(proc)
        threading.Thread(target=_reader, args=(proc, index, lines), daemon=True).start()
    ready = 0
    deadline = time.monotonic() + READY_TIMEOUT_S
    while ready < len(procs):
        index, raw = lines.get(timeout=max(0.01, deadline - time.monotonic()))
        if raw is None:
            raise RuntimeError(f"load generator {index} exited before connecting")
        ready += bool(json.loads(raw).get("ready"))
    return procs, lines


def measure(
    count: int, round_no: int, args: argparse.Namespace, valkey: ValkeyProcess,
    seaweed: SeaweedProcess,
) -> dict:  # fmt: skip
    placement = plan_placement(count, machine.available_cpus())
    import redis

    client = redis.Redis.from_url(valkey.url)
    client.flushdb()  # a fresh catalog and fresh buckets per run
    client.close()
    key = create_project(valkey.url)
    prefix = f"bench-{count}n-r{round_no}-{int(time.time())}"
    nodes: list[targets.Running] = []
    procs: list[subprocess.Popen] = []
    scratch = Path(tempfile.mkdtemp(prefix="bench-cluster-"))
    try:
        for index, cpu in enumerate(placement.node_cpus):
            nodes.append(start_node(index, cpu, key, valkey, seaweed, prefix))
        procs, lines = generators(nodes, args, placement.loadgen_cpus, scratch)
        start_at = time.time() + 0.05
        for proc in procs:
            assert proc.stdin is not None  # Popen(stdin=PIPE)
            proc.stdin.write(f"{start_at!r}\n")
            proc.stdin.flush()
        window_start = start_at + args.warmup
        window_end = window_start + args.duration
        while time.time() < window_start:
            time.sleep(0.01)
        load = machine.load_average()
        ticks_before = machine.cpu_ticks()
        before = [metrics(n) for n in nodes]
        cpu_before = [tree_cpu(n) for n in nodes]
        side_before = [side_cpu(p) for p in (valkey, seaweed)]
        commands_before = valkey_commands(valkey)
        lag_samples: list[list[float]] = [[] for _ in nodes]
        while time.time() < window_end:
            for samples, node in zip(lag_samples, nodes, strict=True):
                samples.append(metrics(node).get("inslytic_lake_lag_seconds", 0.0))
            time.sleep(min(SAMPLE_INTERVAL_S, max(0.0, window_end - time.time())))
        window = time.time() - window_start
        ticks_after = machine.cpu_ticks()
        cpu_after = [tree_cpu(n) for n in nodes]
        side_after = [side_cpu(p) for p in (valkey, seaweed)]
        commands_after = valkey_commands(valkey)
        # Less the bench's own INFO call (one before the window is counted in this one).
        commands = {
            name: n - commands_before.get(name, 0) - (name == "info")
            for name, n in commands_after.items()
            if n - commands_before.get(name, 0) - (name == "info") > 0
        }
        after = [metrics(n) for n in nodes]
        results: dict[int, dict] = {}
        finished = 0
        while finished < len(procs):
            index, raw = lines.get(timeout=120)
            if raw is None:
                finished += 1
            elif "result" in (message := json.loads(raw)):
                results[index] = message["result"]
        per_node = []
        for i in range(len(nodes)):
            part = results[i]
            events = part["ok"] * args.events
            cpu_s = (cpu_after[i] or 0.0) - (cpu_before[i] or 0.0)  # None: the node is gone
            delta = {k: after[i].get(k, 0.0) - before[i].get(k, 0.0) for k in after[i]}
            per_node.append({
                "cpu": placement.node_cpus[i],
                "events_per_s": round(events / part["window_s"], 1),
                "non_202": part["statuses"], "errors": part["errors"],
                "cpu_s": round(cpu_s, 3),
                "cpu_util": round(cpu_s / window, 3),
                "cpu_us_per_event": round(cpu_s / events * 1e6, 2) if events else None,
                "upload_lag_s_max": max(lag_samples[i], default=None),
                "upload_lag_s_median": (
                    statistics.median(lag_samples[i]) if lag_samples[i] else None
                ),
                "puts_per_s": round(delta.get("inslytic_lake_uploaded_files_total", 0) / window, 2),
                "fsyncs_per_s": round(delta.get("inslytic_log_syncs_total", 0) / window, 1),
                # Not rolled yet when the window closed: CPU the window's events cost later.
                "log_pending_mb_at_end": round(
                    after[i].get("inslytic_log_pending_bytes", 0.0) / 1e6, 1
                ),
                "bytes_in_per_event": (
                    round(delta.get("inslytic_received_bytes_total", 0) / events, 1)
                    if events else None
                ),
                "lake_bytes_per_event": (
                    round(delta.get("inslytic_lake_uploaded_bytes_total", 0) / events, 1)
                    if events else None
                ),
                "grants_per_s": round(
                    delta.get("inslytic_coordinator_grants_total", 0) / window, 2
                ),
                "loadgen_cpu_util": part["loadgen_cpu_util"],
            })  # fmt: skip
        side = [
            round(b - a, 3) if a is not None and b is not None else None
            for a, b in zip(side_before, side_after, strict=True)
        ]
        return {
            "nodes": count, "round": round_no, "window_s": round(window, 3),
            "placement": placement.__dict__, "load_average_1m_at_start": load,
            # Everything that ran (this bench and anything else): 1.0 = every CPU busy.
            "busy_share_all_cpus": machine.busy_share(
                ticks_before, ticks_after, machine.available_cpus()
            ),
            "events_per_s": round(sum(n["events_per_s"] for n in per_node), 1),
            "per_node": per_node,
            "coordinator_commands_per_s": round(sum(commands.values()) / window, 1),
            "coordinator_commands_by_name_per_s": {
                name: round(n / window, 2) for name, n in sorted(commands.items())
            },
            "valkey_cpu_s": side[0], "seaweedfs_cpu_s": side[1],
        }  # fmt: skip
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        for node in nodes:
            node.stop()
        for path in scratch.iterdir():
            path.unlink()
        scratch.rmdir()


def summarize(runs: list[dict]) -> list[dict]:
    """Per node count: the median run by total events/s, and every run's rate."""
    out = []
    for count in sorted({r["nodes"] for r in runs}):
        mine = sorted((r for r in runs if r["nodes"] == count), key=lambda r: r["events_per_s"])
        median = mine[len(mine) // 2]
        cpu = [n["cpu_us_per_event"] for n in median["per_node"]]
        out.append({
            "nodes": count,
            "events_per_s_median": median["events_per_s"],
            "events_per_s_runs": [r["events_per_s"] for r in mine],
            "cpu_us_per_event_per_node": cpu,
            "cpu_util_per_node": [n["cpu_util"] for n in median["per_node"]],
            "upload_lag_s_max": max(n["upload_lag_s_max"] or 0 for n in median["per_node"]),
            "puts_per_s": sum(n["puts_per_s"] for n in median["per_node"]),
            "coordinator_commands_per_s": median["coordinator_commands_per_s"],
            "load_average_1m": [r["load_average_1m_at_start"] for r in mine],
            "placement": median["placement"]["note"],
        })  # fmt: skip
    return out


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m bench cluster", description=__doc__)
    parser.add_argument("--nodes", default="1,2", help="node counts to run, e.g. 1,2")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds")
    parser.add_argument("--duration", type=float, default=10.0, help="window, seconds")
    parser.add_argument("--warmup", type=float, default=2.0, help="before the window, seconds")
    parser.add_argument("--events", type=int, default=100, help="events per request")
    parser.add_argument("--connections", type=int, default=32, help="in total, split")
    parser.add_argument(
        "--appendfsync",
        default="everysec",
        choices=("everysec", "always"),
        help="Valkey's AOF policy (everysec, as the README advises for a coordinator)",
    )
    parser.add_argument(
        "--segment",
        action="store_true",
        help="Segment /v1/batch with fresh messageIds: each request claims its ids in the "
        "coordinator (the cross-node dedup calls)",
    )
    parser.add_argument("--output", type=Path, help="JSON report (default: bench/results/)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    counts = [int(c) for c in args.nodes.split(",")]
    os.environ.update(S3_CREDENTIALS)  # the nodes inherit them: the standard AWS way
    work = Path(tempfile.mkdtemp(prefix="bench-cluster-servers-"))
    valkey = ValkeyProcess(work / "valkey", appendfsync=args.appendfsync).start()
    seaweed = SeaweedProcess(work / "seaweed").start()
    runs = []
    try:
        for round_no in range(1, args.rounds + 1):
            for count in counts:
                run = measure(count, round_no, args, valkey, seaweed)
                runs.append(run)
                print(
                    f"[round {round_no}] {count} node(s): {run['events_per_s']:,.0f} events/s, "
                    f"CPU/event {[n['cpu_us_per_event'] for n in run['per_node']]} us, "
                    f"coordinator {run['coordinator_commands_per_s']:.0f} commands/s",
                    file=sys.stderr,
                )
    finally:
        valkey.kill()
        seaweed.kill()
        shutil.rmtree(work, ignore_errors=True)
    report = {
        "scenario": "cluster",
        "command": " ".join(["python -m bench cluster", *(argv or [])]),
        "route": "/v1/batch (Segment)" if args.segment else "/v1/ingest",
        "valkey_appendfsync": args.appendfsync,
        "events_per_request": args.events,
        "connections": args.connections,
        "window_s": args.duration,
        "machine": machine.machine_info(),
        "summary": summarize(runs),
        "runs": runs,
    }
    output = args.output or RESULTS_DIR / time.strftime("%Y-%m-%d-vm-cluster.json", time.gmtime())
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(report, indent=2) + "\n")
    for row in report["summary"]:
        print(json.dumps(row))
    print(f"report: {output}", file=sys.stderr)
    return 0
