"""Process lifecycle: open storage, listen, tick once a second, drain on SIGTERM.

Start-up order follows the data: the data dir must be writable, the key catalog loads (and
the first run creates the default project), the commit log recovers its tail, the roller
catches up in the background, and only then does the socket accept connections. Shutdown is
the reverse: stop accepting, finish in-flight requests and their commits, seal the log.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import os
import resource
import signal
import socket
import sys
from pathlib import Path

from . import __version__
from .app import App
from .auth import CatalogError, KeyRing
from .commitlog import CommitLog
from .config import Settings
from .ingest import Ingestor
from .openapi import build_openapi
from .protocol import IDLE, HttpProtocol
from .ratelimit import RateLimiter
from .responses import Responses
from .schema import EventLimits, Schema
from .state import ServerState
from .storage import Roller

log = logging.getLogger("inslytic_fast.server")

TICK_SECONDS = 1.0
LISTEN_BACKLOG = 2048  # nginx and uvicorn default; SOMAXCONN caps it anyway


class StartupError(Exception):
    """A condition the operator must fix before the server can start (exit code 2)."""


def check_data_dir(data_dir: Path) -> None:
    try:
        data_dir.mkdir(parents=True, exist_ok=True)
        probe = data_dir / f".write-probe-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as exc:
        reason = exc.strerror or str(exc)
        raise StartupError(f"data dir {data_dir} is not writable: {reason}") from None


def raise_open_file_limit(wanted: int) -> None:
    """Each connection is a file descriptor; lift the soft limit toward the hard one."""
    try:
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        target = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
        if soft != resource.RLIM_INFINITY and soft < target:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    except (ValueError, OSError):
        pass


def bind_socket(host: str, port: int, *, reuse_port: bool = False) -> socket.socket:
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
    sock.listen(LISTEN_BACKLOG)
    sock.setblocking(False)
    return sock


class Server:
    """One serving process: storage, the app, a listening socket, the tick."""

    def __init__(self, settings: Settings, *, out=None) -> None:
        self.settings = settings
        self.out = out or sys.stdout
        self.state = ServerState(settings)
        self.responses = Responses(settings.cors_origins)
        self.keyring: KeyRing | None = None
        self.commitlog: CommitLog | None = None
        self.roller: Roller | None = None
        self.app: App | None = None
        self.first_run_key: str | None = None
        self._tick_handle: asyncio.TimerHandle | None = None
        self._stop: asyncio.Event | None = None

    # Start-up, in the data's order

    def open_storage(self) -> None:
        settings = self.settings
        check_data_dir(settings.data_dir)
        keyring = KeyRing(settings.data_dir)
        try:
            keyring.load()
            self.first_run_key = keyring.ensure_default_project()
        except CatalogError as exc:
            raise StartupError(str(exc)) from None
        commitlog = CommitLog(settings.data_dir, durability=settings.durability)
        try:
            commitlog.open()
        except OSError as exc:
            raise StartupError(f"cannot open the commit log: {exc}") from None
        self.keyring = keyring
        self.commitlog = commitlog
        self.roller = Roller(settings.data_dir, retention_days=settings.retention_days or None)
        limits = EventLimits()
        ingestor = Ingestor(
            keyring,
            Schema(limits),
            RateLimiter(),
            commitlog,
            self.responses,
            default_limit=settings.events_per_minute,
            max_decompressed_bytes=settings.max_decompressed_bytes,
        )
        openapi = build_openapi(
            limits, max_body_bytes=settings.max_body_bytes, server_version=__version__
        )
        self.app = App(ingestor, self.responses, openapi)

    async def serve(self, sock: socket.socket | None = None) -> None:
        loop = asyncio.get_running_loop()
        settings = self.settings
        if sock is None:
            sock = bind_socket(settings.host, settings.port)
        self._stop = asyncio.Event()
        self.commitlog.start(loop)
        self.roller.start()
        self.state.now = loop.time()
        app, state = self.app, self.state
        server = await loop.create_server(
            lambda: HttpProtocol(app, state), sock=sock, backlog=LISTEN_BACKLOG
        )
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, self._stop.set)
        self._tick_handle = loop.call_later(TICK_SECONDS, self._tick, loop)
        host, port = sock.getsockname()[:2]
        self._announce(host, port)
        try:
            await self._stop.wait()
        finally:
            for signum in (signal.SIGTERM, signal.SIGINT):
                loop.remove_signal_handler(signum)
            await self._shutdown(server, loop)

    def request_stop(self) -> None:
        if self._stop is not None:
            self._stop.set()

    def _announce(self, host: str, port: int) -> None:
        settings = self.settings
        durability = settings.durability
        if durability == "none":
            durability = "none (BENCHMARK ONLY: acknowledged events can be lost on a crash)"
        print(
            f"inslytic-fast {__version__} listening on http://{host}:{port} "
            f"data dir {settings.data_dir.resolve()} durability {durability} pid {os.getpid()}",
            file=sys.stderr,
            flush=True,
        )
        key = self.first_run_key
        if key is not None:
            self.first_run_key = None
            url_host = "127.0.0.1" if host in ("0.0.0.0", "::") else host
            print(
                'First run: created project "default". Its API key is shown only this once:\n'
                f"  {key}\n"
                "Try it:\n"
                f"  curl -i -X POST http://{url_host}:{port}/v1/ingest "
                f'-H "Authorization: Bearer {key}" -H "Content-Type: application/json" '
                '-d \'{"events":[{"eventName":"page_viewed",'
                '"timestamp":"2026-02-16T10:30:00.000Z","anonymousId":"anon-123",'
                '"sessionId":"sess-456","consentGiven":true}]}\'',
                file=self.out,
                flush=True,
            )

    def _tick(self, loop: asyncio.AbstractEventLoop) -> None:
        self._tick_handle = loop.call_later(TICK_SECONDS, self._tick, loop)
        now = loop.time()
        self.state.now = now
        self.responses.tick()
        try:
            for conn in list(self.state.connections):
                conn.check_timeouts(now)
            self.keyring.reload_if_changed()
            self.commitlog.tick()
        except Exception:
            log.exception("error in the 1 s tick")

    async def _shutdown(self, server: asyncio.AbstractServer, loop) -> None:
        state = self.state
        state.draining = True
        server.close()  # stop accepting
        deadline = loop.time() + self.settings.shutdown_timeout
        while loop.time() < deadline:
            for conn in list(state.connections):
                if not conn.pending and conn.phase == IDLE:  # idle: nothing owed, nothing arriving
                    if conn.transport is not None:
                        conn.transport.close()
            if not state.connections:
                break
            await asyncio.sleep(0.05)
        for conn in list(state.connections):
            if conn.transport is not None:
                conn.transport.abort()
        if self._tick_handle is not None:
            self._tick_handle.cancel()
        await self.commitlog.close()
        self.roller.stop()
        log.info("stopped")


def run(settings: Settings) -> int:
    """Serve until SIGTERM/SIGINT. Returns the process exit code."""
    raise_open_file_limit(settings.max_connections + 256)
    server = Server(settings)
    try:
        server.open_storage()
        sock = bind_socket(settings.host, settings.port)
    except StartupError as exc:
        print(f"inslytic-fast: error: {exc}", file=sys.stderr)
        return 2
    try:
        import uvloop

        loop_factory = uvloop.new_event_loop
    except ImportError:  # pragma: no cover - uvloop is a dependency except on Windows
        loop_factory = None
    with asyncio.Runner(loop_factory=loop_factory) as runner:
        runner.run(server.serve(sock))
    return 0
