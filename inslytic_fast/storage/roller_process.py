"""The roller in a process of its own, at a lower CPU priority.

Rolling is DuckDB work (JSON parsing, ZSTD) that takes more CPU per event than serving does. In
a thread it would share the serving loop's GIL, core and memory; in its own niced process the
loop keeps the GIL, the kernel gives serving the CPU first, and DuckDB's buffers never count
against the server's RSS. The roll only has to keep up on average: ``query`` reads the log tail,
so events are queryable the moment they are acknowledged. On a clean stop, the stopping process
rolls what its closed logs sealed (``roll_before_exit``, in a short-lived child), so ``events/``
alone is complete.

DuckDB is loaded by those processes only (``make_roller`` imports the roller): a serving
process that imported it would keep tens of MB more resident (README "Architecture").
"""

from __future__ import annotations

import logging
import math
import os
import signal
import threading
import time
from typing import TYPE_CHECKING

from ..config import Settings
from ..log.format import sealed_segments
from ..observe.logs import configure
from ..runtime.children import ChildFailed, SpawnedChild, leave_sigint_to_parent, run_to_end
from ..runtime.process import follow_parent

if TYPE_CHECKING:
    from .roller import Roller

log = logging.getLogger("inslytic_fast.roller")

ROLLER_NICENESS = 10  # below serving, above idle: it must still keep up over minutes
PARENT_CHECK_S = 1.0  # an orphaned roller (server SIGKILLed) exits within this
STOP_TIMEOUT_S = 30.0  # a roll in progress finishes; its steps are idempotent anyway
# What a clean stop spends rolling the segments the server just sealed (a 64 MiB segment takes
# ~1 s). The systemd unit's TimeoutStopSec=30 and the Dockerfile's --stop-timeout 30 leave
# room for a 10 s drain and this; whatever is left rolls at the next start.
FINAL_ROLL_BUDGET_S = 10.0
# A reader holds the roller lock for one snapshot (milliseconds); a segment whose roll waits
# longer for it is left to the next start.
FINAL_ROLL_LOCK_WAIT_S = 1.0


def make_roller(settings: Settings) -> Roller:
    """The roller as settings configure it (in the roller process, and for the final roll)."""
    # Here, not at the top: this module is imported by every serving process, which must not
    # load DuckDB (see the module docstring); only the roller's own processes call this.
    from .roller import DEFAULT_COMPACT_INTERVAL_S, Roller

    # With a lake, files leave within seconds and the lake compacts its own (`lake compact`);
    # a local compaction racing an upload could send rows up twice.
    return Roller(
        settings.data_dir,
        retention_days=settings.retention_days or None,
        duckdb_threads=settings.roller_threads,
        compact_interval_s=math.inf if settings.lake else DEFAULT_COMPACT_INTERVAL_S,
    )


def roller_main(settings: Settings, parent_pid: int) -> None:
    leave_sigint_to_parent()
    follow_parent(parent_pid, "inslytic-roller")
    configure(settings.log_format, "roller", settings.log_level)
    if settings.roller_cpus:
        # Before the roller starts its thread and DuckDB its pool: sched_setaffinity(0) moves
        # only the calling thread, and threads inherit it from their creator.
        move_to_cpus(settings.roller_cpus)
    try:
        os.nice(ROLLER_NICENESS)
    except OSError:
        pass
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    roller = make_roller(settings)
    roller.start()
    while not stop.wait(PARENT_CHECK_S):
        if os.getppid() != parent_pid:
            log.warning("server process %d is gone; roller exiting", parent_pid)
            break
    roller.stop()


def move_to_cpus(cpus: tuple[int, ...]) -> None:
    """Leave the affinity inherited from the server (roller_cpus). A refusal (a cgroup cpuset
    without these CPUs, a CPU offline) keeps the inherited one: a roller on the serving core is
    slower serving, no roller at all is an unrolled log that fills the disk."""
    wanted = ",".join(map(str, cpus))
    try:
        os.sched_setaffinity(0, cpus)
    except OSError as exc:
        inherited = ",".join(map(str, sorted(os.sched_getaffinity(0))))
        log.error(
            "roller_cpus %s refused by the kernel (%s); the roller stays on CPUs %s",
            wanted,
            exc.strerror or exc,
            inherited,
        )
        return
    # The kernel drops CPUs outside the cgroup's cpuset, and offline ones, without an error:
    # report what it kept.
    got = ",".join(map(str, sorted(os.sched_getaffinity(0))))
    if got == wanted:
        log.info("roller runs on CPUs %s (roller_cpus)", got)
    else:
        log.warning(
            "roller runs on CPUs %s of roller_cpus %s (the kernel left out the others: outside "
            "the cgroup's cpuset, or offline)",
            got,
            wanted,
        )


class RollerProcess:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.process: SpawnedChild | None = None

    def start(self) -> None:
        self.process = SpawnedChild(roller_main, (self.settings, os.getpid()))
        self.process.start()

    def stop(self) -> None:
        """Stop the roller process, then roll what is sealed by now, in a short-lived child.

        Called once the commit logs are closed (and so sealed): after a clean stop every
        acknowledged event is in Parquet, for whoever copies or reads ``events/`` directly.
        The final pass starts here rather than in the roller because a terminal's Ctrl-C (the
        whole process group) can stop the roller before the server has sealed its log.
        """
        process = self.process
        if process is None:
            return
        self.process = None
        if process.is_alive():
            process.terminate()
            process.join(STOP_TIMEOUT_S)
            if process.is_alive():
                log.error("roller did not stop in %.0f s; killing it", STOP_TIMEOUT_S)
                process.kill()
                process.join()
        settings = self.settings
        log_settings = (settings.log_format, settings.log_level)
        try:
            run_to_end("inslytic-roll", log_settings, roll_before_exit, settings)
        except ChildFailed as exc:  # the segments stay in the log, rolled at the next start
            log.error("final roll failed (%s); the next start rolls the rest", exc)

    def ensure_running(self) -> None:
        """Called on the tick: a roller that died (OOM, a DuckDB crash) is started again."""
        process = self.process
        if process is not None and not process.is_alive():
            log.error("roller exited with code %s; starting it again", process.exitcode)
            self.start()


def roll_before_exit(settings: Settings, budget_s: float = FINAL_ROLL_BUDGET_S) -> int:
    """Roll the sealed segments, oldest first, for up to ``budget_s``; return events rolled."""
    roller = make_roller(settings)
    started = time.monotonic()
    rolled = 0
    try:
        left = sealed_segments(roller.log_dir)
        if left:
            rolled = roller.roll_once(
                stop_after=started + budget_s, lock_wait_s=FINAL_ROLL_LOCK_WAIT_S
            )
            left = sealed_segments(roller.log_dir)
    except Exception:  # the segments stay in the log: queryable, and rolled at the next start
        log.exception("final roll failed; the next start rolls the rest")
        return rolled
    finally:
        roller.stop()
    if rolled or left:
        log.info(
            "rolled %d event%s to Parquet before exit in %.1f s%s",
            rolled,
            "" if rolled == 1 else "s",
            time.monotonic() - started,
            f"; {len(left)} log segments left for the next start" if left else "",
        )
    return rolled
