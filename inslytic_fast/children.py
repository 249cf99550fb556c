"""Child processes (workers, the roller) leave SIGINT to the process that started them."""

from __future__ import annotations

import signal


def start_child(process) -> None:
    """Start a child process with SIGINT blocked; the child calls ``leave_sigint_to_parent``.

    A terminal's Ctrl-C reaches every process of the foreground group. A child interrupted
    mid-start printed a traceback (and the supervisor exited 2), one interrupted mid-drain left
    its log unsealed; the parent stops its children itself (SIGTERM), in the right order. The
    mask survives fork and exec, so the child is immune from its first instruction."""
    old = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
    try:
        process.start()
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)


def leave_sigint_to_parent() -> None:
    """In a child started by ``start_child``: ignore SIGINT (a pending one is dropped)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})
