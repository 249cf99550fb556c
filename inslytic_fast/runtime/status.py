"""What one serving process reports: /metrics (summed over the workers) and /ready's answer."""

from __future__ import annotations

import dataclasses
import logging
import time
from pathlib import Path
from typing import Any

import orjson

from ..cluster.coordinator import CoordinatorLink
from ..config import Settings
from ..http.state import ServerState
from ..ingest.dedup import Dedup
from ..lake.status import degraded_note, read_status
from ..limits.interface import Limiter
from ..log.writer import CommitLog
from ..observe.exposition import render as render_metrics
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
from .data_dir import run_dir

log = logging.getLogger("inslytic_fast.server")


def snapshot_name(worker_id: str) -> str:
    """A worker's published counters in the run dir, read by the other workers' scrapes."""
    return f"metrics-{worker_id}.json"


def carried_metrics(data_dir: Path, worker_id: str) -> dict[str, Any] | None:
    """A restarted worker adds its predecessor's last published counters to its own, so the
    sum over workers does not drop when a worker dies and comes back."""
    path = run_dir(data_dir) / snapshot_name(worker_id)
    try:
        return carried_totals(orjson.loads(path.read_bytes()))
    except FileNotFoundError:
        return None
    except (OSError, orjson.JSONDecodeError) as exc:
        log.error("cannot read %s; this worker's counters restart at 0: %s", path, exc)
        return None


class ServingStatus:
    """The /metrics page, /ready's refusal and its degraded note, for one serving process."""

    def __init__(
        self,
        settings: Settings,
        *,
        worker_id: str,
        standalone: bool,
        state: ServerState,
        commitlog: CommitLog,
        dedup: Dedup,
        limiter: Limiter,
        coordinator: CoordinatorLink | None,
        carried: dict[str, Any] | None,
    ) -> None:
        self.settings = settings
        self.worker_id = worker_id
        self.standalone = standalone
        self.state = state
        self.commitlog = commitlog
        self.dedup = dedup
        self.limiter = limiter
        self.coordinator = coordinator
        self.carried = carried  # a restarted worker's predecessor's counters
        self._snapshot_failure = RepeatedFailure(log, "the metrics snapshot")

    def snapshot(self) -> dict[str, Any]:
        state = self.state
        snapshot = state.metrics.snapshot()
        log_stats = dataclasses.asdict(self.commitlog.stats)
        snapshot["log"] = log_stats
        snapshot["commit_latency"] = self.commitlog.sync_latency.snapshot()
        snapshot["dedup"] = self.dedup.counters()
        gauges = {"open_connections": len(state.connections)}
        if self.coordinator is not None:
            counters = self.limiter.stats()
            gauges["coordinator_up"] = counters.pop("coordinator_up")
            snapshot["coordinator"] = counters  # counters: carried across a worker restart
        if self.carried is not None:
            add_snapshots(snapshot, self.carried)
        snapshot["gauges"] = gauges
        snapshot["process"] = process_gauges(
            self.worker_id, len(state.connections), log_stats["last_sync_latency_s"]
        )
        return snapshot

    def metrics_page(self) -> bytes:
        """The sum over workers, never lower than an earlier scrape's (Prometheus reads a drop
        as a counter reset): this worker first publishes its live counters, so a later scrape
        answered by another worker reads them at least this high."""
        snapshot = self.snapshot()
        snapshots = [snapshot]
        data_dir = self.settings.data_dir
        if not self.standalone:
            self.publish(snapshot)
            snapshots += read_snapshots(run_dir(data_dir), snapshot_name(self.worker_id))
        storage = storage_gauges(data_dir)
        storage["dedup"] = self.dedup.gauges()  # the table every worker shares: not summed
        if self.settings.lake:
            storage["lake"] = read_status(data_dir) or {}
        return render_metrics(merge(snapshots), storage)

    def publish(self, snapshot: dict[str, Any]) -> None:
        """Write this worker's counters where the other workers' scrapes read them."""
        path = run_dir(self.settings.data_dir) / snapshot_name(self.worker_id)
        try:
            write_snapshot(path, snapshot)
        except OSError as exc:
            self._snapshot_failure.failed("cannot write the metrics snapshot: %s", exc)
        else:
            self._snapshot_failure.succeeded()

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
