"""Children start with SIGINT blocked (start_child), whatever multiprocessing does first."""

from __future__ import annotations

import operator
import os
import signal
import subprocess
import sys

import pytest

# A fresh interpreter: its first spawn also starts multiprocessing's resource tracker.
PROBE = """
import multiprocessing, signal
from inslytic_fast.runtime.children import start_child

def report(conn):
    conn.send(signal.SIGINT in signal.pthread_sigmask(signal.SIG_BLOCK, []))

if __name__ == "__main__":
    context = multiprocessing.get_context("spawn")
    for _ in range(2):
        parent, child = context.Pipe(duplex=False)
        process = context.Process(target=report, args=(child,))
        start_child(process)
        print(parent.recv())
        process.join()
    print(signal.SIGINT in signal.pthread_sigmask(signal.SIG_BLOCK, []))
"""


def test_every_child_starts_with_sigint_blocked_and_the_parent_keeps_it(tmp_path):
    script = tmp_path / "probe.py"
    script.write_text(PROBE)
    proc = subprocess.run(
        [sys.executable, str(script)], capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stderr
    # The first child too (the resource tracker's start used to unblock SIGINT before it);
    # the parent's own mask is as it was.
    assert proc.stdout.split() == ["True", "True", "False"]


def test_a_job_returns_its_result_from_a_child_that_ignores_sigint():
    from inslytic_fast.runtime.children import run_to_end

    log = ("text", "warning")
    assert run_to_end("t-pid", log, os.getpid) != os.getpid()
    # A terminal's Ctrl-C is the parent's to handle: the job ignores it.
    assert run_to_end("t-sigint", log, signal.getsignal, signal.SIGINT) == signal.SIG_IGN
    assert signal.SIGINT not in signal.pthread_sigmask(signal.SIG_BLOCK, [])  # ours as it was


def test_a_job_that_raises_or_dies_is_a_child_failure():
    from inslytic_fast.runtime.children import ChildFailed, run_to_end

    log = ("text", "warning")
    with pytest.raises(ChildFailed, match="division by zero"):
        run_to_end("t-raise", log, operator.truediv, 1, 0)
    with pytest.raises(ChildFailed, match="exited with code 3"):
        run_to_end("t-die", log, os._exit, 3)
