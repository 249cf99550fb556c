"""One serving process: built whole, then listen, tick once a second, drain on SIGTERM.

Start-up order follows the data: the port is bound, then ``build_server`` checks the data dir
is writable, loads the key catalog, recovers the commit log's tail and builds the app on them;
``Server.serve`` starts the log and the roller (it catches up in the background) and only then
accepts connections (and a first run creates the default project, whose key would be lost if
the start failed after it). Shutdown is the reverse: stop accepting, finish in-flight requests
and their commits, seal the log.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import os
import signal
import socket
import ssl
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal, TextIO

from .. import __version__
from ..cluster.coordinator import CoordinatorError, CoordinatorLink, start_cluster_catalog
from ..cluster.dedup import ClusterDedup
from ..config import Settings
from ..http.app import App
from ..http.openapi import build_openapi
from ..http.protocol import HttpProtocol
from ..http.responses import Responses
from ..http.state import ServerState
from ..ingest.catalog import CatalogError
from ..ingest.dedup import Dedup, DedupTable, rebuild_at
from ..ingest.dedup import table_path as dedup_table_path
from ..ingest.keyring import KeyRing
from ..ingest.pipeline import Ingestor
from ..ingest.schema import EventLimits, Schema
from ..lake.uploader import Uploader, start_uploader
from ..limits.globallimit import GlobalRateLimiter
from ..limits.interface import Limiter
from ..limits.ratelimit import RateLimiter
from ..log.writer import CommitLog
from ..observe.logs import RepeatedFailure
from ..storage.roller_process import RollerProcess
from .children import ChildFailed, run_to_end
from .data_dir import DataDirLock, acquire_data_dir, check_data_dir, run_dir, seal_orphan_logs
from .process import loop_factory, worker_index
from .sockets import LISTEN_BACKLOG, bind_metrics_socket, bind_socket, tls_context
from .startup import StartupError, announce, startup_failed
from .status import ServingStatus, carried_metrics
from .systemd import listen_socket_from_systemd, notify

log = logging.getLogger("inslytic_fast.server")

TICK_SECONDS = 1.0
DRAIN_IDLE_GRACE_S = 1.0

# The shared dedup table: "create" it (and rebuild it from the data), "join" the one a sibling
# created, or "rejoin" after a crash (rebuild, release the dead one's claims).
DedupRole = Literal["create", "join", "rejoin"]


def build_server(
    settings: Settings,
    *,
    worker_id: str = "w0",
    limiter: Limiter | None = None,
    standalone: bool = True,
    dedup_role: DedupRole = "create",
    parent_pid: int | None = None,
    out: TextIO | None = None,
) -> Server:
    """Open storage and build every part of one serving process, in the data's order.

    Alone (``standalone``) it locks the data dir and will run the roller; as a worker the
    supervisor does both and hands in a shared ``limiter``. The listening socket is the
    caller's: bound before (alone) or after (a worker) this; the first-run project is created
    by ``Server.serve`` once the port is bound.
    """
    check_data_dir(settings.data_dir)
    tls = tls_context(settings)
    data_dir_lock = None
    carried = None
    if standalone:
        data_dir_lock = acquire_data_dir(settings.data_dir)
        seal_orphan_logs(settings.data_dir, {worker_id})
    else:
        carried = carried_metrics(settings.data_dir, worker_id)
    keyring = KeyRing(settings.data_dir)
    coordinator = None
    first_run_key = None
    try:
        if settings.coordinator:
            coordinator, first_run_key = join_cluster(settings, worker_id, standalone)
            limiter = GlobalRateLimiter(coordinator)
        keyring.load()
    except CatalogError as exc:
        raise StartupError(str(exc)) from None
    if limiter is None:
        limiter = RateLimiter()
    commitlog = open_commitlog(settings, worker_id)
    table = open_dedup(settings, worker_id, dedup_role)
    dedup: Dedup = table
    if coordinator is not None:  # retries that land on another node too
        dedup = ClusterDedup(table, coordinator, f"{settings.node}/{worker_id}")
    state = ServerState(settings)
    responses = Responses(settings.cors_origins)
    limits = EventLimits()
    ingestor = Ingestor(
        keyring,
        Schema(limits),
        limiter,
        commitlog,
        responses,
        default_limit=settings.events_per_minute,
        max_decompressed_bytes=settings.max_decompressed_bytes,
        metrics=state.metrics,
        dedup=dedup,
        dedup_owner=worker_index(worker_id),
    )
    openapi = build_openapi(
        limits, max_body_bytes=settings.max_body_bytes, server_version=__version__
    )
    status = ServingStatus(
        settings,
        worker_id=worker_id,
        standalone=standalone,
        state=state,
        commitlog=commitlog,
        dedup=dedup,
        limiter=limiter,
        coordinator=coordinator,
        carried=carried,
    )

    def app(**listener: bool) -> App:
        return App(
            ingestor,
            responses,
            openapi,
            worker_id=worker_id,
            metrics_page=status.metrics_page,
            readiness=status.readiness,
            degraded=status.degraded,
            metrics_token=settings.metrics_token,
            **listener,
        )

    return Server(
        settings=settings,
        worker_id=worker_id,
        standalone=standalone,
        state=state,
        responses=responses,
        keyring=keyring,
        limiter=limiter,
        commitlog=commitlog,
        status=status,
        app=app(serves_metrics=not settings.metrics_port),
        metrics_app=app(serves_api=False) if settings.metrics_port else None,
        tls=tls,
        roller=RollerProcess(settings) if standalone else None,
        coordinator=coordinator,
        data_dir_lock=data_dir_lock,
        first_run_key=first_run_key,
        parent_pid=parent_pid,
        out=out or sys.stdout,
    )


def join_cluster(
    settings: Settings, worker_id: str, standalone: bool
) -> tuple[CoordinatorLink, str | None]:
    """--coordinator: the catalog comes from the coordinator (mirrored into catalog.json, by
    the supervisor when there are workers) and the rate limits are cluster-wide. Alone, this
    process also makes a new cluster's first project: its key comes back to be shown."""
    member = f"{settings.node}/{worker_id}"
    try:
        if standalone:
            return start_cluster_catalog(settings.coordinator, settings.data_dir, member)
        link = CoordinatorLink(settings.coordinator, member)
        link.start()
    except CoordinatorError as exc:
        raise StartupError(str(exc)) from None
    return link, None


def open_commitlog(settings: Settings, worker_id: str) -> CommitLog:
    """This process's own log, its tail recovered."""
    commitlog = CommitLog(
        settings.data_dir,
        durability=settings.durability,
        worker_id=worker_id,
        min_free_bytes=settings.min_free_bytes,
        max_unrolled_bytes=settings.max_unrolled_bytes,
    )
    try:
        commitlog.open()
    except OSError as exc:
        raise StartupError(f"cannot open the commit log: {exc}") from None
    return commitlog


def open_dedup(settings: Settings, worker_id: str, role: DedupRole) -> DedupTable:
    """After the commit log is open (its tail recovered): the rebuild reads it.

    The rebuild queries the log tail and Parquet with DuckDB, so it runs in a child process
    that marks the keys in the same mapped table and exits: DuckDB's import and buffers never
    stay in a serving process. It is awaited here, before any connection is accepted, so
    no retry is answered before its key is marked (as when the rebuild ran in this process)."""
    path = dedup_table_path(run_dir(settings.data_dir))
    try:
        table = DedupTable(path, create=role == "create", slots=settings.dedup_slots)
        if role != "join":
            log_settings = (settings.log_format, settings.log_level)
            run_to_end("inslytic-dedup", log_settings, rebuild_at, path, settings.data_dir)
        if role == "rejoin":
            released = table.release_owner(worker_index(worker_id))
            log.info("dedup: released %d claims of the previous %s", released, worker_id)
    except (OSError, ValueError, ChildFailed) as exc:
        raise StartupError(f"cannot open the dedup table {path}: {exc}") from None
    return table


@dataclass(kw_only=True, eq=False)
class Server:
    """One serving process: storage, the app, a listening socket, the tick. Built whole by
    ``build_server``; optional parts are None only where the feature is off."""

    settings: Settings
    worker_id: str
    standalone: bool  # alone (--workers 1), not one of a supervisor's workers
    state: ServerState
    responses: Responses
    keyring: KeyRing
    limiter: Limiter
    commitlog: CommitLog
    status: ServingStatus
    app: App
    metrics_app: App | None  # with --metrics-port: /metrics on its own socket
    tls: ssl.SSLContext | None
    roller: RollerProcess | None  # alone; with workers the supervisor runs it
    coordinator: CoordinatorLink | None  # with --coordinator
    data_dir_lock: DataDirLock | None  # alone; with workers the supervisor holds it
    first_run_key: str | None  # a new cluster's first project's key, until it is shown
    parent_pid: int | None  # a worker stops when its supervisor is gone
    out: TextIO
    on_ready: Callable[[], None] | None = None
    uploader: Uploader | None = field(default=None, init=False)  # alone with --lake
    _stop: asyncio.Event = field(default_factory=asyncio.Event, init=False)
    _tick_handle: asyncio.TimerHandle | None = field(default=None, init=False)  # while serving
    _tick_failure: RepeatedFailure = field(
        default_factory=lambda: RepeatedFailure(log, "the 1 s tick"), init=False
    )

    async def serve(
        self, sock: socket.socket | None = None, metrics_sock: socket.socket | None = None
    ) -> None:
        loop = asyncio.get_running_loop()
        settings = self.settings
        if sock is None:
            sock = bind_socket(settings.host, settings.port)
        if metrics_sock is None:
            metrics_sock = bind_metrics_socket(settings, shared=not self.standalone)
        self.commitlog.start(loop)
        if self.roller is not None:
            self.roller.start()
        if self.standalone and settings.lake:
            self.uploader = start_uploader(settings)
        self.state.now = loop.time()
        app, state = self.app, self.state
        server = await loop.create_server(
            lambda: HttpProtocol(app, state),
            sock=sock,
            backlog=LISTEN_BACKLOG,
            ssl=self.tls,
        )
        servers = [server]
        metrics_app = self.metrics_app
        if metrics_sock is not None and metrics_app is not None:  # both with --metrics-port
            servers.append(
                await loop.create_server(
                    lambda: HttpProtocol(metrics_app, state),
                    sock=metrics_sock,
                    backlog=LISTEN_BACKLOG,
                    ssl=self.tls,
                )
            )
        # A worker leaves SIGINT to its supervisor (start_child), which stops it with SIGTERM.
        stop_signals = (signal.SIGTERM, signal.SIGINT) if self.standalone else (signal.SIGTERM,)
        for signum in stop_signals:
            loop.add_signal_handler(signum, self._stop.set)
        self._tick_handle = loop.call_later(TICK_SECONDS, self._tick, loop)
        host, port = sock.getsockname()[:2]
        if self.standalone:
            # Only now that the port is ours: a start that fails earlier (port in use) must not
            # have created the project whose key it never got to show.
            if not settings.coordinator:  # a cluster's first project is made in join_cluster
                self.first_run_key = self.keyring.ensure_default_project()
            announce(settings, host, port, self.first_run_key, self.out)
            notify(f"READY=1\nSTATUS=serving on port {port}")
            self.first_run_key = None
        # What exists now (modules, the app, decoders, the catalog) lives as long as the process.
        # Frozen, it is skipped by the collector's full passes, which otherwise walk all of it
        # and stall the loop under load.
        gc.collect()
        gc.freeze()
        self.state.ready = True
        if self.on_ready is not None:
            self.on_ready()
        try:
            await self._stop.wait()
        finally:
            # A later SIGTERM must not cut the drain short: after a terminal's Ctrl-C reached
            # every process of the group, the supervisor's SIGTERM follows (its default action
            # killed workers with their log unsealed). A second Ctrl-C still interrupts.
            if self.standalone:
                loop.remove_signal_handler(signal.SIGINT)
            await self._shutdown(servers, loop)

    def request_stop(self) -> None:
        self._stop.set()

    def _tick(self, loop: asyncio.AbstractEventLoop) -> None:
        self._tick_handle = loop.call_later(TICK_SECONDS, self._tick, loop)
        now = loop.time()
        self.state.now = now
        self.responses.tick()
        try:
            for conn in list(self.state.connections):
                conn.check_timeouts(now)
            if self.keyring.reload_if_changed():
                self.limiter.forget(set(self.keyring.projects))
            self.limiter.tick()
            self.commitlog.tick()
            if self.roller is not None:
                self.roller.ensure_running()
            if self.parent_pid is not None and os.getppid() != self.parent_pid:
                log.error("supervisor %d is gone; draining and exiting", self.parent_pid)
                self.request_stop()
            if not self.standalone:
                self.status.publish(self.status.snapshot())
        except Exception:
            self._tick_failure.failed("error in the 1 s tick", exc_info=True)
        else:
            self._tick_failure.succeeded()

    async def _shutdown(
        self, servers: list[asyncio.Server], loop: asyncio.AbstractEventLoop
    ) -> None:
        if self.standalone:
            notify("STOPPING=1")
        state = self.state
        state.draining = True
        state.ready = False
        for server in servers:
            server.close()  # stop accepting
        log.info(
            "draining: %d connections, up to %.0f s",
            len(state.connections),
            self.settings.shutdown_timeout,
        )
        started = loop.time()
        deadline = started + self.settings.shutdown_timeout
        while loop.time() < deadline:
            # Idle keep-alive connections get a moment: a balancer's health probe on one
            # learns "not ready" (503, Connection: close) instead of a reset.
            if loop.time() - started >= DRAIN_IDLE_GRACE_S:
                for conn in list(state.connections):
                    conn.shutdown()
            if not state.connections:
                break
            await asyncio.sleep(0.05)
        for conn in list(state.connections):
            conn.shutdown(abort=True)
        if self._tick_handle is not None:
            self._tick_handle.cancel()
        await self.commitlog.close()
        if self.roller is not None:
            self.roller.stop()
        if self.coordinator is not None:
            self.coordinator.stop()
        if self.uploader is not None:
            self.uploader.stop()


def serve_alone(settings: Settings) -> int:
    """``--workers 1``: this process serves until SIGTERM/SIGINT. Returns the exit code."""
    try:
        sock = listen_socket_from_systemd() or bind_socket(settings.host, settings.port)
        metrics_sock = bind_metrics_socket(settings, shared=False)
        server = build_server(settings)
    except StartupError as exc:
        return startup_failed(settings, str(exc))
    with asyncio.Runner(loop_factory=loop_factory()) as runner:
        runner.run(server.serve(sock, metrics_sock))
    return 0
