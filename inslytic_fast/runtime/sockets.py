"""The listening side: sockets (shared by workers with SO_REUSEPORT) and TLS."""

from __future__ import annotations

import errno
import socket
import ssl

from ..config import Settings
from .startup import StartupError

LISTEN_BACKLOG = 2048  # nginx and uvicorn default; SOMAXCONN caps it anyway


def bind_socket(
    host: str, port: int, *, reuse_port: bool = False, listen: bool = True
) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if reuse_port:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        if exc.errno == errno.EADDRINUSE:
            raise StartupError(f"cannot listen on {host}:{port}: address already in use") from None
        raise StartupError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from None
    if listen:
        sock.listen(LISTEN_BACKLOG)
    sock.setblocking(False)
    return sock


def bind_metrics_socket(settings: Settings, *, shared: bool) -> socket.socket | None:
    """The --metrics-port socket (``shared`` by the workers, like the main port), or None."""
    if not settings.metrics_port:
        return None
    return bind_socket(settings.host, settings.metrics_port, reuse_port=shared)


def port_answers(host: str, port: int) -> bool:
    """Something accepts connections there (bind() alone does not tell, under SO_REUSEPORT)."""
    try:
        with socket.create_connection((host, port), timeout=0.5):
            return True
    except OSError:
        return False


def tls_context(settings: Settings) -> ssl.SSLContext | None:
    """HTTPS for boxes without a proxy in front; HTTP/1.1 only (no ALPN h2)."""
    if not settings.tls_cert:
        return None
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        context.load_cert_chain(settings.tls_cert, settings.tls_key)
    except (OSError, ssl.SSLError) as exc:
        raise StartupError(
            f"cannot load TLS certificate {settings.tls_cert} / key {settings.tls_key}: {exc}"
        ) from None
    context.set_alpn_protocols(["http/1.1"])
    return context
