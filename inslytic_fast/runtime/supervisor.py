"""``serve --workers N``: a supervisor and N worker processes sharing one port.

Each worker is a whole ``Server`` (its own uvloop loop, its own group-commit log ``w<i>``) on
its own SO_REUSEPORT socket, so the kernel spreads connections and no lock sits on the write
path. The supervisor owns what must exist once: the first-run project, the roller (it reads
every worker's sealed segments), the shared rate-limit table, and the workers' lives: it
restarts a worker that dies (with backoff) and on SIGTERM drains them all and exits 0.

Without SO_REUSEPORT the supervisor listens once and the workers inherit that socket.
"""

from __future__ import annotations

import asyncio
import logging
import multiprocessing
import os
import signal
import socket
import sys
import time
from dataclasses import replace
from multiprocessing.connection import Connection, wait
from multiprocessing.process import BaseProcess
from types import FrameType

from ..cluster.coordinator import CoordinatorError, CoordinatorLink, start_cluster_catalog
from ..config import Settings
from ..ingest.catalog import CatalogError
from ..ingest.keyring import KeyRing
from ..lake.uploader import Uploader, start_uploader
from ..limits.sharedlimit import SharedBudget, SharedRateLimiter
from ..observe.logs import configure as configure_logging
from ..storage.roller_process import RollerProcess
from .children import leave_sigint_to_parent, start_child
from .data_dir import (
    DataDirLock,
    acquire_data_dir,
    budget_path,
    check_data_dir,
    clear_run_dir,
    seal_orphan_logs,
)
from .process import follow_parent, loop_factory, worker_ids
from .server import DedupRole, build_server
from .sockets import bind_metrics_socket, bind_socket, port_answers, tls_context
from .startup import StartupError, announce, startup_failed
from .systemd import listen_socket_from_systemd, notify

log = logging.getLogger("inslytic_fast.supervisor")

WORKER_START_DEADLINE_S = 60.0
# Restart backoff: 0.5 s doubling to 30 s; a worker that lived 60 s resets it (systemd-like).
RESTART_BACKOFF_MIN_S = 0.5
RESTART_BACKOFF_MAX_S = 30.0
HEALTHY_RUN_S = 60.0
# On SIGTERM each worker drains within --shutdown-timeout; this is the margin on top.
DRAIN_MARGIN_S = 5.0

HAS_REUSEPORT = hasattr(socket, "SO_REUSEPORT")


def worker_main(
    settings: Settings,
    worker_id: str,
    ready: Connection,
    inherited: socket.socket | None,
    dedup_role: DedupRole = "join",
) -> None:
    """Entry point of a worker process (spawned: nothing is shared but what is passed)."""
    leave_sigint_to_parent()
    parent_pid = os.getppid()
    follow_parent(parent_pid, f"inslytic-{worker_id}")
    configure_logging(settings.log_format, worker_id, settings.log_level)
    limiter = None  # with --coordinator the server builds a cluster-wide one
    if not settings.coordinator:
        limiter = SharedRateLimiter(SharedBudget(budget_path(settings.data_dir)), settings.workers)
    try:
        server = build_server(
            settings,
            worker_id=worker_id,
            limiter=limiter,
            standalone=False,
            dedup_role=dedup_role,
            parent_pid=parent_pid,
        )
        sock = inherited or bind_socket(settings.host, settings.port, reuse_port=True)
        metrics_sock = bind_metrics_socket(settings, shared=True)
    except StartupError as exc:
        ready.send(("error", str(exc)))
        sys.exit(2)
    server.on_ready = lambda: ready.send(("ready", os.getpid()))
    with asyncio.Runner(loop_factory=loop_factory()) as runner:
        runner.run(server.serve(sock, metrics_sock))


class Worker:
    __slots__ = ("worker_id", "process", "started_at", "backoff", "restart_at", "conn")

    def __init__(self, worker_id: str) -> None:
        self.worker_id = worker_id
        self.process: BaseProcess | None = None
        self.started_at = 0.0
        self.backoff = RESTART_BACKOFF_MIN_S
        self.restart_at: float | None = None
        self.conn: Connection | None = None


class Supervisor:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.context = multiprocessing.get_context("spawn")
        self.workers = [Worker(w) for w in worker_ids(settings.workers)]
        self.listen_sock: socket.socket | None = None
        self.stopping = False
        self.data_dir_lock: DataDirLock | None = None
        self.coordinator: CoordinatorLink | None = None  # --coordinator: mirrors the catalog
        self.uploader: Uploader | None = None  # with --lake: ships finished Parquet files

    def run(self) -> int:
        settings = self.settings
        # From the start: a Ctrl-C while workers are still starting is a clean stop too.
        wake_r, wake_w = os.pipe()
        os.set_blocking(wake_w, False)
        signal.set_wakeup_fd(wake_w)
        for signum in (signal.SIGTERM, signal.SIGINT):
            signal.signal(signum, self._on_signal)
        try:
            check_data_dir(settings.data_dir)
            self.data_dir_lock = acquire_data_dir(settings.data_dir)
            keyring = KeyRing(settings.data_dir)
            keyring.load()
            reservation = self._reserve_port()
            tls_context(settings)  # a bad certificate fails here, before the first-run key
            # Created once the port is ours; undone below if a worker cannot start, so a
            # failed first start never leaves a project whose key nobody was shown.
            if settings.coordinator:
                # The workers serve the mirror this keeps up to date; they hold the limits.
                self.coordinator, first_run_key = start_cluster_catalog(
                    settings.coordinator, settings.data_dir, None
                )
                keyring.load()
            else:
                first_run_key = keyring.ensure_default_project()
        except (CatalogError, StartupError, CoordinatorError) as exc:
            return startup_failed(settings, str(exc))
        host, port = reservation.getsockname()[:2]
        self.settings = settings = replace(settings, port=port)
        seal_orphan_logs(settings.data_dir, set(worker_ids(settings.workers)))
        clear_run_dir(settings.data_dir)
        SharedBudget(budget_path(settings.data_dir), create=True).close()
        roller = RollerProcess(settings)
        roller.start()
        if settings.lake:
            self.uploader = start_uploader(settings)
        try:
            for worker in self.workers:
                if self.stopping:
                    return 0
                error = self._start(worker, wait_ready=True)
                if error:
                    return startup_failed(settings, f"worker {worker.worker_id}: {error}")
            if self.stopping:
                return 0
            announce(settings, host, port, first_run_key, sys.stdout)
            notify(f"READY=1\nSTATUS=serving on port {port} with {settings.workers} workers")
            first_run_key = None
            self._monitor(wake_r, roller)
            notify("STOPPING=1")
        finally:
            self._stop_all()
            if first_run_key is not None and not settings.coordinator:
                # Never shown: undo the first run's project (a cluster's stays in the
                # coordinator; `projects rotate-key default --coordinator` issues a new key).
                keyring.catalog_path.unlink(missing_ok=True)
            roller.stop()
            reservation.close()
            if self.coordinator is not None:
                self.coordinator.stop()
            if self.uploader is not None:
                self.uploader.stop()
        return 0

    def _reserve_port(self) -> socket.socket:
        """Bind (not listen) with SO_REUSEPORT: the port is ours and known (also for --port 0),
        but only the workers' listening sockets receive connections."""
        settings = self.settings
        activated = listen_socket_from_systemd()
        if activated is not None:  # systemd holds the port: the workers share its socket
            self.listen_sock = activated
            return activated
        if not HAS_REUSEPORT:
            self.listen_sock = bind_socket(settings.host, settings.port)
            return self.listen_sock
        sock = bind_socket(settings.host, settings.port, reuse_port=True, listen=False)
        # bind() succeeds next to another SO_REUSEPORT listener (say, a second server of ours
        # on another data dir) and the kernel would split traffic between the two.
        for port in (settings.port, settings.metrics_port):
            if port and port_answers(settings.host, port):
                sock.close()
                raise StartupError(
                    f"cannot listen on {settings.host}:{port}: address already in use"
                )
        return sock

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        self.stopping = True

    def _start(self, worker: Worker, *, wait_ready: bool = False) -> str | None:
        # The first worker creates the dedup table (rebuilt from the data) before the others
        # start; a restarted worker rebuilds it and releases its predecessor's claims.
        if worker.process is not None or worker.started_at:
            role = "rejoin"
        else:
            role = "create" if worker is self.workers[0] else "join"
        parent_conn, child_conn = self.context.Pipe(duplex=False)
        process = self.context.Process(
            target=worker_main,
            args=(self.settings, worker.worker_id, child_conn, self.listen_sock, role),
            name=f"inslytic-fast-{worker.worker_id}",
        )
        start_child(process)
        child_conn.close()
        worker.process = process
        worker.conn = parent_conn
        worker.started_at = time.monotonic()
        worker.restart_at = None
        if not wait_ready:
            return None
        deadline = time.monotonic() + WORKER_START_DEADLINE_S
        while time.monotonic() < deadline and not self.stopping:
            if parent_conn.poll(0.1):
                try:
                    kind, detail = parent_conn.recv()
                except EOFError:
                    return f"exited with code {process.exitcode} before it was ready"
                return None if kind == "ready" else str(detail)
            if not process.is_alive():
                return f"exited with code {process.exitcode} before it was ready"
        return "did not become ready in time" if not self.stopping else None

    def _monitor(self, wake_fd: int, roller: RollerProcess) -> None:
        while not self.stopping:
            roller.ensure_running()
            now = time.monotonic()
            timeout = None
            for worker in self.workers:
                if worker.restart_at is not None:
                    if worker.restart_at <= now:
                        log.warning("restarting worker %s", worker.worker_id)
                        self._start(worker)
                    else:
                        wait_s = worker.restart_at - now
                        timeout = wait_s if timeout is None else min(timeout, wait_s)
            sentinels = {
                w.process.sentinel: (w, w.process)
                for w in self.workers
                if w.process is not None and w.restart_at is None
            }
            # Wake at least once a second to look after the roller.
            ready = wait([*sentinels, wake_fd], 1.0 if timeout is None else min(timeout, 1.0))
            if wake_fd in ready:
                try:
                    os.read(wake_fd, 512)
                except BlockingIOError:
                    pass
            for sentinel, (worker, process) in sentinels.items():
                if sentinel in ready and not self.stopping:
                    self._schedule_restart(worker, process)

    def _schedule_restart(self, worker: Worker, process: BaseProcess) -> None:
        process.join(0)
        lived = time.monotonic() - worker.started_at
        if lived >= HEALTHY_RUN_S:
            worker.backoff = RESTART_BACKOFF_MIN_S
        log.error(
            "worker %s (pid %s) exited with code %s after %.1f s; restarting in %.1f s",
            worker.worker_id,
            process.pid,
            process.exitcode,
            lived,
            worker.backoff,
        )
        worker.restart_at = time.monotonic() + worker.backoff
        worker.backoff = min(RESTART_BACKOFF_MAX_S, worker.backoff * 2)
        worker.process = None

    def _stop_all(self) -> None:
        running = [
            w.process for w in self.workers if w.process is not None and w.process.is_alive()
        ]
        for process in running:
            if process.pid is None:  # never started: nothing to stop
                continue
            try:
                os.kill(process.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + self.settings.shutdown_timeout + DRAIN_MARGIN_S
        for process in running:
            process.join(max(0.0, deadline - time.monotonic()))
            if process.is_alive():
                log.error("worker pid %s did not drain in time; killing it", process.pid)
                process.kill()
                process.join()
        for worker in self.workers:
            worker.process = None
