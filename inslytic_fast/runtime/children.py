"""Child processes (workers, the roller) leave SIGINT to the process that started them."""

from __future__ import annotations

import signal
from multiprocessing import resource_tracker


def start_child(process) -> None:
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
