"""Process lifecycle: open storage, listen, tick once a second, drain on SIGTERM.

Start-up order follows the data: the port is bound, the data dir must be writable, the key
catalog loads, the commit log recovers its tail, the roller catches up in the background, and
only then does the socket accept connections (and a first run create the default project,
whose key would be lost if the start failed after it). Shutdown is
the reverse: stop accepting, finish in-flight requests and their commits, seal the log.
"""

from __future__ import annotations

import asyncio
import dataclasses
import gc
import logging
import os
import signal
import socket
import ssl
import sys
import time

import duckdb
import orjson

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
from ..ingest.dedup import Dedup, DedupTable, rebuild
from ..ingest.dedup import table_path as dedup_table_path
from ..ingest.keyring import KeyRing
from ..ingest.pipeline import Ingestor
from ..ingest.schema import EventLimits, Schema
from ..lake.status import degraded_note, read_status
from ..lake.uploader import start_uploader
from ..limits.globallimit import GlobalRateLimiter
from ..limits.ratelimit import RateLimiter
from ..log.commitlog import CommitLog
from ..observe.logs import RepeatedFailure
from ..observe.metrics import (
    add_snapshots,
    carried_totals,
    merge,
    process_gauges,
    read_snapshots,
    storage_gauges,
    write_snapshot,
)
from ..observe.metrics import render as render_metrics
from ..storage.roller_process import RollerProcess
from .data_dir import DataDirLock, acquire_data_dir, check_data_dir, run_dir, seal_orphan_logs
from .process import loop_factory, worker_index
from .sockets import LISTEN_BACKLOG, bind_socket, tls_context
from .startup import StartupError, announce, startup_failed
from .systemd import listen_socket_from_systemd, notify

log = logging.getLogger("inslytic_fast.server")

TICK_SECONDS = 1.0
DRAIN_IDLE_GRACE_S = 1.0


class Server:
    """One serving process: storage, the app, a listening socket, the tick.

    Alone (``--workers 1``) it also runs the roller and creates the first-run project; as one of
    several workers the supervisor does both and hands in a shared rate limiter.
    """

    def __init__(
        self,
        settings: Settings,
        *,
        worker_id: str = "w0",
        limiter: RateLimiter | None = None,
        standalone: bool = True,
        dedup_role: str = "create",
        out=None,
    ) -> None:
        self.settings = settings
        self.worker_id = worker_id
        self.limiter = limiter if limiter is not None else RateLimiter()
        self.standalone = standalone
        # The shared dedup table: "create" it (and rebuild it from the data), "join" the one a
        # sibling created, or "rejoin" after a crash (rebuild, release the dead one's claims).
        self.dedup_role = dedup_role
        self.dedup: Dedup | None = None
        self.out = out or sys.stdout
        self.state = ServerState(settings)
        self.responses = Responses(settings.cors_origins)
        self.keyring: KeyRing | None = None
        self.commitlog: CommitLog | None = None
        self.roller: RollerProcess | None = None
        self._tick_failure = RepeatedFailure(log, "the 1 s tick")
        self._snapshot_failure = RepeatedFailure(log, "the metrics snapshot")
        self.carried_metrics: dict | None = None  # a restarted worker's predecessor's counters
        self.app: App | None = None
        self.metrics_app: App | None = None  # with --metrics-port: /metrics on its own socket
        self.first_run_key: str | None = None
        self.data_dir_lock: DataDirLock | None = None
        self.parent_pid: int | None = None  # a worker stops when its supervisor is gone
        self.tls: ssl.SSLContext | None = None
        self.on_ready = None
        self.coordinator = None  # a CoordinatorLink with --coordinator
        self.uploader = None  # a lake.Uploader with --lake (in the supervisor with workers)
        self._tick_handle: asyncio.TimerHandle | None = None
        self._stop: asyncio.Event | None = None

    # Start-up, in the data's order

    def open_storage(self) -> None:
        settings = self.settings
        check_data_dir(settings.data_dir)
        self.tls = tls_context(settings)
        if self.standalone:
            self.data_dir_lock = acquire_data_dir(settings.data_dir)
            seal_orphan_logs(settings.data_dir, {self.worker_id})
        else:
            self._carry_predecessor_metrics()
        keyring = KeyRing(settings.data_dir)
        try:
            if settings.coordinator:
                self._join_cluster()
            keyring.load()
        except CatalogError as exc:
            raise StartupError(str(exc)) from None
        commitlog = CommitLog(
            settings.data_dir,
            durability=settings.durability,
            worker_id=self.worker_id,
            min_free_bytes=settings.min_free_bytes,
            max_unrolled_bytes=settings.max_unrolled_bytes,
        )
        try:
            commitlog.open()
        except OSError as exc:
            raise StartupError(f"cannot open the commit log: {exc}") from None
        self.keyring = keyring
        self.commitlog = commitlog
        self.dedup = self._open_dedup()
        if self.coordinator is not None:  # retries that land on another node too
            member = f"{settings.node}/{self.worker_id}"
            self.dedup = ClusterDedup(self.dedup, self.coordinator, member)
        if self.standalone:
            self.roller = RollerProcess(settings)
        limits = EventLimits()
        ingestor = Ingestor(
            keyring,
            Schema(limits),
            self.limiter,
            commitlog,
            self.responses,
            default_limit=settings.events_per_minute,
            max_decompressed_bytes=settings.max_decompressed_bytes,
            metrics=self.state.metrics,
            dedup=self.dedup,
            dedup_owner=worker_index(self.worker_id),
        )
        openapi = build_openapi(
            limits, max_body_bytes=settings.max_body_bytes, server_version=__version__
        )

        def app(**listener: bool) -> App:
            return App(
                ingestor,
                self.responses,
                openapi,
                worker_id=self.worker_id,
                metrics_page=self.metrics_page,
                readiness=self.readiness,
                degraded=self.degraded,
                metrics_token=settings.metrics_token,
                **listener,
            )

        self.app = app(serves_metrics=not settings.metrics_port)
        if settings.metrics_port:
            self.metrics_app = app(serves_api=False)

    def _join_cluster(self) -> None:
        """--coordinator: the catalog comes from the coordinator (mirrored into catalog.json,
        by the supervisor when there are workers) and the rate limits are cluster-wide."""
        settings = self.settings
        member = f"{settings.node}/{self.worker_id}"
        try:
            if self.standalone:
                link, self.first_run_key = start_cluster_catalog(
                    settings.coordinator, settings.data_dir, member
                )
            else:
                link = CoordinatorLink(settings.coordinator, member)
                link.start()
        except CoordinatorError as exc:
            raise StartupError(str(exc)) from None
        self.coordinator = link
        self.limiter = GlobalRateLimiter(link)

    def _open_dedup(self) -> DedupTable:
        """After the commit log is open (its tail recovered): the rebuild reads it."""
        path = dedup_table_path(run_dir(self.settings.data_dir))
        try:
            table = DedupTable(
                path, create=self.dedup_role == "create", slots=self.settings.dedup_slots
            )
            if self.dedup_role != "join":
                rebuild(table, self.settings.data_dir)
            if self.dedup_role == "rejoin":
                released = table.release_owner(worker_index(self.worker_id))
                log.info("dedup: released %d claims of the previous %s", released,
                         self.worker_id)  # fmt: skip
        except (OSError, ValueError, duckdb.Error) as exc:
            raise StartupError(f"cannot open the dedup table {path}: {exc}") from None
        return table

    def bind_metrics_socket(self) -> socket.socket | None:
        """The --metrics-port socket (shared by the workers, like the main port), or None."""
        settings = self.settings
        if not settings.metrics_port:
            return None
        return bind_socket(settings.host, settings.metrics_port, reuse_port=not self.standalone)

    async def serve(
        self, sock: socket.socket | None = None, metrics_sock: socket.socket | None = None
    ) -> None:
        loop = asyncio.get_running_loop()
        settings = self.settings
        if sock is None:
            sock = bind_socket(settings.host, settings.port)
        if metrics_sock is None:
            metrics_sock = self.bind_metrics_socket()
        self._stop = asyncio.Event()
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
        if metrics_sock is not None:
            metrics_app = self.metrics_app
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
            if not settings.coordinator:  # a cluster's first project is made in _join_cluster
                self.first_run_key = self.keyring.ensure_default_project()
            announce(settings, host, port, self.first_run_key, self.out)
            notify(f"READY=1\nSTATUS=serving on port {port}")
            self.first_run_key = None
        # What exists now (modules, the app, decoders, the catalog) lives as long as the process.
        # Frozen, it is skipped by the collector's full passes, which walked ~30,000 objects and
        # stopped the loop for 10-39 ms once every 10-30 s under load (a gc.callbacks probe).
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
        if self._stop is not None:
            self._stop.set()

    # Operability

    def metrics_snapshot(self) -> dict:
        snapshot = self.state.metrics.snapshot()
        log_stats = dataclasses.asdict(self.commitlog.stats)
        snapshot["log"] = log_stats
        snapshot["commit_latency"] = self.commitlog.sync_latency.snapshot()
        snapshot["dedup"] = self.dedup.counters()
        if self.carried_metrics is not None:
            add_snapshots(snapshot, self.carried_metrics)
        gauges = {"open_connections": len(self.state.connections)}
        if self.coordinator is not None:
            gauges.update(self.limiter.stats())
        snapshot["gauges"] = gauges
        snapshot["process"] = process_gauges(
            self.worker_id, len(self.state.connections), log_stats["last_sync_latency_s"]
        )
        return snapshot

    def metrics_page(self) -> bytes:
        """The sum over workers, never lower than an earlier scrape's (Prometheus reads a drop
        as a counter reset): this worker first publishes its live counters, so a later scrape
        answered by another worker reads them at least this high."""
        snapshot = self.metrics_snapshot()
        snapshots = [snapshot]
        if not self.standalone:
            self._publish_snapshot(snapshot)
            snapshots += read_snapshots(run_dir(self.settings.data_dir), self._snapshot_name())
        storage = storage_gauges(self.settings.data_dir)
        storage["dedup"] = self.dedup.gauges()  # the table every worker shares: not summed
        if self.settings.lake:
            storage["lake"] = read_status(self.settings.data_dir) or {}
        return render_metrics(merge(snapshots), storage)

    def _publish_snapshot(self, snapshot: dict) -> None:
        try:
            write_snapshot(run_dir(self.settings.data_dir) / self._snapshot_name(), snapshot)
        except OSError as exc:
            self._snapshot_failure.failed("cannot write the metrics snapshot: %s", exc)
        else:
            self._snapshot_failure.succeeded()

    def _carry_predecessor_metrics(self) -> None:
        """A restarted worker adds its predecessor's last published counters to its own, so
        the sum over workers does not drop when a worker dies and comes back."""
        path = run_dir(self.settings.data_dir) / self._snapshot_name()
        try:
            self.carried_metrics = carried_totals(orjson.loads(path.read_bytes()))
        except FileNotFoundError:
            return
        except (OSError, orjson.JSONDecodeError) as exc:
            log.error("cannot read %s; this worker's counters restart at 0: %s", path, exc)

    def _snapshot_name(self) -> str:
        return f"metrics-{self.worker_id}.json"

    def readiness(self) -> str | None:
        """None when this process should get traffic; otherwise why not (for /ready)."""
        state = self.state
        if state.draining:
            return "shutting down"
        if not state.ready:
            return "starting"
        return self.commitlog.refusal()

    def degraded(self) -> str | None:
        """Serving, but not as configured (for /ready's body); None when all is well."""
        notes = []
        if self.coordinator is not None:
            notes.append(self.coordinator.note())
        if self.settings.lake:
            notes.append(degraded_note(read_status(self.settings.data_dir), time.time()))
        return "; ".join(n for n in notes if n) or None

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
                self._publish_snapshot(self.metrics_snapshot())
        except Exception:
            self._tick_failure.failed("error in the 1 s tick", exc_info=True)
        else:
            self._tick_failure.succeeded()

    async def _shutdown(self, servers: list[asyncio.AbstractServer], loop) -> None:
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
    server = Server(settings)
    try:
        sock = listen_socket_from_systemd() or bind_socket(settings.host, settings.port)
        metrics_sock = server.bind_metrics_socket()
        server.open_storage()
    except StartupError as exc:
        return startup_failed(settings, str(exc))
    with asyncio.Runner(loop_factory=loop_factory()) as runner:
        runner.run(server.serve(sock, metrics_sock))
    return 0
