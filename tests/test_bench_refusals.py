"""``python -m bench refusals`` end to end on a real server: it fills the log past a small hard
mark, measures refused and accepted windows and reports both. No timing assertion: a short run
on a shared machine only shows that it works and what it reports."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def test_refusals_reports_refused_and_accepted_windows(tmp_path):
    output = tmp_path / "refusals.json"
    argv = ["--duration", "1", "--connections", "4", "--hard-mark-bytes", str(2 * 1024 * 1024)]
    proc = subprocess.run(
        [sys.executable, "-m", "bench", "refusals", *argv, "--output", str(output)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(output.read_text())
    assert report["command"].startswith("python -m bench refusals --duration 1")
    assert report["fill_statuses"].get("503", 0) >= 1
    refused, accepted = report["refused"], report["accepted"]
    # Past the hard mark every answer is a 503 (a reset before the answer is counted apart).
    assert set(refused["statuses"]) <= {"503"}
    assert refused["statuses"].get("503", 0) + refused["unanswered"] >= 1
    # Once the backlog has rolled below the backpressure mark the same requests are accepted.
    assert set(accepted["statuses"]) == {"202"}
    for window in (refused, accepted):
        assert window["server_cpu_s"] >= 0
        assert window["answers_per_s"] >= 0
    assert "refusal / accepted request" in proc.stdout
