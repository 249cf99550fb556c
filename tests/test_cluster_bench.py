"""bench/cluster.py: the cluster scenario end to end (real Valkey, SeaweedFS, nodes and
generator), and where it places each process. No timing assertions: the figures depend on
the machine; what is asserted is that the run works and its report carries each figure the
README's Cluster table is made of."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from bench.cluster import plan_placement

REPO = Path(__file__).resolve().parent.parent
SMOKE_TIMEOUT_S = 240

pytest.importorskip("redis")
pytest.importorskip("obstore")

NODE_FIELDS = {
    "cpu", "events_per_s", "non_202", "errors", "cpu_s", "cpu_util", "cpu_us_per_event",
    "upload_lag_s_max", "upload_lag_s_median", "puts_per_s", "grants_per_s", "loadgen_cpu_util",
    "fsyncs_per_s", "bytes_in_per_event", "lake_bytes_per_event", "log_pending_mb_at_end",
}  # fmt: skip
SUMMARY_FIELDS = {
    "nodes", "events_per_s_median", "events_per_s_runs", "cpu_us_per_event_per_node",
    "cpu_util_per_node",
    "upload_lag_s_max", "puts_per_s", "coordinator_commands_per_s", "load_average_1m",
    "placement",
}  # fmt: skip


def test_each_node_gets_a_cpu_and_the_generator_what_is_left_or_shares():
    two_cpus = plan_placement(1, [0, 1])
    assert (two_cpus.node_cpus, two_cpus.loadgen_cpus) == ([0], [1])
    crowded = plan_placement(2, [0, 1])
    assert (crowded.node_cpus, crowded.loadgen_cpus) == ([0, 1], [])
    assert "spread" in crowded.note
    roomy = plan_placement(2, [0, 1, 2, 3])
    assert (roomy.node_cpus, roomy.loadgen_cpus) == ([0, 1], [2, 3])


@pytest.mark.slow
def test_the_cluster_scenario_runs_one_and_two_nodes_and_reports_each_figure(tmp_path):
    output = tmp_path / "cluster.json"
    proc = subprocess.run(
        [sys.executable, "-m", "bench", "cluster", "--rounds", "1", "--duration", "1",
         "--warmup", "0.5", "--connections", "4", "--output", str(output)],
        capture_output=True, text=True, timeout=SMOKE_TIMEOUT_S, cwd=REPO,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(output.read_text())
    assert [row["nodes"] for row in report["summary"]] == [1, 2]
    for row in report["summary"]:
        assert set(row) == SUMMARY_FIELDS
        assert row["events_per_s_median"] > 0
    for run in report["runs"]:
        assert len(run["per_node"]) == run["nodes"]
        for node in run["per_node"]:
            assert set(node) == NODE_FIELDS
            assert node["events_per_s"] > 0 and node["errors"] == 0 and not node["non_202"]
        assert run["coordinator_commands_per_s"] > 0  # the catalog polls at least
