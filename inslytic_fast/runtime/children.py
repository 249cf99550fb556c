"""Child processes (workers, the roller, one-off DuckDB jobs) leave SIGINT to their parent.

``run_to_end`` runs one job (the dedup rebuild at start, the final roll at stop) in a
short-lived child: DuckDB's import and buffers never stay resident in a serving process,
and leave with the child.
"""

from __future__ import annotations

import multiprocessing
import os
import signal
from collections.abc import Callable
from multiprocessing import resource_tracker
from multiprocessing.connection import Connection
from multiprocessing.process import BaseProcess
from typing import Any, TypeVar

from ..observe.logs import configure as configure_logging
from .process import follow_parent

Result = TypeVar("Result")


class ChildFailed(Exception):
    """A ``run_to_end`` job raised (the message is its error) or died (its exit code)."""


def start_child(process: BaseProcess) -> None:
    """Start a child process with SIGINT blocked; the child calls ``leave_sigint_to_parent``.

    A terminal's Ctrl-C reaches every process of the foreground group. A child interrupted
    mid-start printed a traceback (and the supervisor exited 2), one interrupted mid-drain left
    its log unsealed; the parent stops its children itself (SIGTERM), in the right order. The
    mask survives fork and exec, so the child is immune from its first instruction."""
    # A spawn starts multiprocessing's resource tracker first if it is not running yet, and
    # that start *unblocks* SIGINT when done (bpo-33613's own mask): started here, before our
    # mask, it leaves ours alone (a Ctrl-C test caught the first child unprotected).
    resource_tracker.ensure_running()
    old = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
    try:
        process.start()
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)


def leave_sigint_to_parent() -> None:
    """In a child started by ``start_child``: ignore SIGINT (a pending one is dropped)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})


def run_to_end(
    name: str,
    log: tuple[str, str],
    job: Callable[..., Result],
    *args: Any,
) -> Result:
    """``job(*args)`` in a fresh (spawned) child named ``name``; wait for it and return what it
    returned. ``log`` is (log format, level) for the child's records. Raises ChildFailed if
    the job raised or the child died. The child stops with this process (follow_parent)."""
    context = multiprocessing.get_context("spawn")
    results, sender = context.Pipe(duplex=False)
    process = context.Process(
        target=_job_main, args=(name, log, os.getpid(), sender, job, args), name=name
    )
    start_child(process)
    sender.close()
    try:
        kind, value = results.recv()
    except EOFError:
        process.join()
        raise ChildFailed(f"{name} exited with code {process.exitcode}") from None
    finally:
        results.close()
    process.join()
    if kind == "error":
        raise ChildFailed(value)
    return value


def _job_main(
    name: str,
    log: tuple[str, str],
    parent_pid: int,
    results: Connection,
    job: Callable[..., Any],
    args: tuple[Any, ...],
) -> None:
    leave_sigint_to_parent()
    follow_parent(parent_pid, name)
    log_format, level = log
    configure_logging(log_format, name, level)
    try:
        outcome = ("done", job(*args))
    except Exception as exc:  # the parent decides what a failed job means
        outcome = ("error", f"{type(exc).__name__}: {exc}" if not str(exc) else str(exc))
    results.send(outcome)
    results.close()
