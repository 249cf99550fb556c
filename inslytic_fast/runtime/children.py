"""Child processes (workers, the roller, one-off DuckDB jobs) leave SIGINT to their parent.

``run_to_end`` runs one job (the dedup rebuild at start, the final roll at stop, the lake
uploader's purge check) in a short-lived child: DuckDB's import and buffers never stay
resident in a serving process, and leave with the child.

The roller and those jobs are ``SpawnedChild`` interpreters rather than multiprocessing's
spawn: that starts its resource tracker first, an interpreter of its own (~13 MB resident)
that lives as long as the server, for semaphores and shared memory nothing here makes. Only
the supervisor's workers, which are handed sockets and pipes through multiprocessing's
reduction, are multiprocessing processes.
"""

from __future__ import annotations

import contextlib
import os
import pickle
import signal
import subprocess
import sys
from collections.abc import Callable, Iterator
from multiprocessing import resource_tracker
from multiprocessing.process import BaseProcess
from typing import Any, TypeVar

from ..observe.logs import configure as configure_logging
from .process import follow_parent

Result = TypeVar("Result")

# What a SpawnedChild's interpreter runs: the parent's sys.path first (so it imports what the
# parent imported, installed or not), then the pickled call. Kept to builtins: nothing of
# this package can be imported before sys.path is set.
_BOOTSTRAP = (
    "import os, pickle, sys\n"
    "with os.fdopen(int(sys.argv[1]), 'rb') as call:\n"
    "    sys.path[:] = pickle.load(call)\n"
    "    target, args = pickle.load(call)\n"
    "target(*args)\n"
)


class ChildFailed(Exception):
    """A ``run_to_end`` job raised (the message is its error) or died (its exit code)."""


class SpawnedChild:
    """``target(*args)`` in a fresh interpreter (``python -c``), started with SIGINT blocked
    like every child here (``target`` calls ``leave_sigint_to_parent``; see start_child). The
    subset of multiprocessing.Process that the roller and run_to_end use."""

    def __init__(
        self, target: Callable[..., Any], args: tuple[Any, ...], pass_fds: tuple[int, ...] = ()
    ) -> None:
        self._call = pickle.dumps((target, args))
        self._pass_fds = pass_fds
        self._popen: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        call_r, call_w = os.pipe()
        try:
            with sigint_blocked():
                self._popen = subprocess.Popen(
                    [sys.executable, "-c", _BOOTSTRAP, str(call_r)],
                    pass_fds=(call_r, *self._pass_fds),
                    stdin=subprocess.DEVNULL,
                )
        finally:
            os.close(call_r)
        # The call is written after the start: a pipe holds 64 KiB, a call can be larger.
        with os.fdopen(call_w, "wb") as call:
            pickle.dump(sys.path, call)
            call.write(self._call)

    @property
    def pid(self) -> int | None:
        return None if self._popen is None else self._popen.pid

    @property
    def exitcode(self) -> int | None:
        return None if self._popen is None else self._popen.poll()

    def is_alive(self) -> bool:
        return self._popen is not None and self._popen.poll() is None

    def join(self, timeout: float | None = None) -> None:
        if self._popen is not None:
            try:
                self._popen.wait(timeout)
            except subprocess.TimeoutExpired:
                pass

    def terminate(self) -> None:
        if self.is_alive():
            assert self._popen is not None
            self._popen.terminate()

    def kill(self) -> None:
        if self.is_alive():
            assert self._popen is not None
            self._popen.kill()


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
    with sigint_blocked():
        process.start()


@contextlib.contextmanager
def sigint_blocked() -> Iterator[None]:
    """SIGINT blocked in this thread meanwhile: a child started here inherits the mask (it
    survives fork and exec) until it calls ``leave_sigint_to_parent``."""
    old = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
    try:
        yield
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
    """``job(*args)`` in a fresh child named ``name``; wait for it and return what it
    returned. ``log`` is (log format, level) for the child's records. Raises ChildFailed if
    the job raised or the child died. The child stops with this process (follow_parent)."""
    results_r, results_w = os.pipe()
    try:
        process = SpawnedChild(
            _job_main, (name, log, os.getpid(), results_w, job, args), pass_fds=(results_w,)
        )
        process.start()
    finally:
        os.close(results_w)  # the child holds its own copy: EOF once it is gone
    with os.fdopen(results_r, "rb") as results:
        outcome = results.read()
    process.join()
    if not outcome:
        raise ChildFailed(f"{name} exited with code {process.exitcode}")
    kind, value = pickle.loads(outcome)
    if kind == "error":
        raise ChildFailed(value)
    return value


def _job_main(
    name: str,
    log: tuple[str, str],
    parent_pid: int,
    results_fd: int,
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
    with os.fdopen(results_fd, "wb") as results:
        pickle.dump(outcome, results)
