"""systemd integration without libsystemd: readiness (sd_notify) and socket activation.

``Type=notify``: the service is "started" when the server can serve, not when the process
exists; a datagram to the socket named in NOTIFY_SOCKET says so (sd_notify(3): READY=1, and
STOPPING=1 when the drain begins). Socket activation (systemd.socket(5), sd_listen_fds(3)):
systemd binds the port and passes the listening socket as fd 3, with LISTEN_PID and LISTEN_FDS
naming this process and the count.
"""

from __future__ import annotations

import os
import socket

SD_LISTEN_FDS_START = 3  # <systemd/sd-daemon.h>


def notify(state: str) -> bool:
    """Send ``state`` (e.g. ``"READY=1"``) to the service manager; False when there is none.
    A failure to send is not an error for the server: the manager only learns less."""
    address = os.environ.get("NOTIFY_SOCKET")
    if not address:
        return False
    if address.startswith("@"):  # an abstract socket
        address = "\0" + address[1:]
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.connect(address)
            sock.sendall(state.encode())
    except OSError:
        return False
    return True


def listen_socket_from_systemd() -> socket.socket | None:
    """The listening socket systemd passed (socket activation), or None. The variables are
    removed so that child processes do not take them for their own."""
    if os.environ.get("LISTEN_PID") != str(os.getpid()):
        return None
    try:
        count = int(os.environ.get("LISTEN_FDS", "0"))
    except ValueError:
        count = 0
    for name in ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"):
        os.environ.pop(name, None)
    if count < 1:
        return None
    sock = socket.socket(fileno=SD_LISTEN_FDS_START)
    sock.setblocking(False)
    return sock
