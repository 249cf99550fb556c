"""What the numbers were measured on, and what the server process cost (Linux /proc)."""

from __future__ import annotations

import os
import platform
import socket
import subprocess
import sys
from importlib import metadata
from pathlib import Path

# Packages whose versions decide the numbers: the server's stack and the reference peer's.
VERSIONED_PACKAGES = [
    "inslytic-fast", "uvloop", "httptools", "msgspec", "orjson", "duckdb",
    "fastapi", "uvicorn", "pydantic", "pydantic-core", "starlette",
]  # fmt: skip
CLOCK_TICKS = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
REPO = Path(__file__).resolve().parent.parent


def cpu_seconds(pid: int) -> float | None:
    """utime + stime of a process (all its threads), from /proc/<pid>/stat."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # The command name (field 2) may contain spaces and parentheses: split after the last ")".
    fields = raw[raw.rindex(")") + 2 :].split()
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS


def process_tree(pid: int) -> list[int]:
    """``pid`` and its descendants (supervisor, workers, roller), from /proc children lists."""
    found, queue = [], [pid]
    while queue:
        current = queue.pop()
        found.append(current)
        for task in Path(f"/proc/{current}/task").glob("*"):
            try:
                queue += [int(c) for c in (task / "children").read_text().split()]
            except (OSError, ValueError):
                continue
    return found


def tree_cpu_seconds(pid: int) -> float | None:
    """cpu_seconds summed over the process tree (children that exit mid-window are missed)."""
    total = [cpu_seconds(p) for p in process_tree(pid)]
    known = [t for t in total if t is not None]
    return sum(known) if known else None


# The name the roller process gives itself (prctl PR_SET_NAME,
# inslytic_fast.runtime.process.follow_parent).
ROLLER_COMM = "inslytic-roller"


def roller_cpu_seconds(pid: int) -> float | None:
    """cpu_seconds of the roller process(es) under ``pid``; None if there is none."""
    total = None
    for child in process_tree(pid)[1:]:
        try:
            comm = Path(f"/proc/{child}/comm").read_text().strip()
        except OSError:
            continue
        if comm == ROLLER_COMM:
            seconds = cpu_seconds(child)
            if seconds is not None:
                total = (total or 0.0) + seconds
    return total


def tree_memory_mb(pid: int) -> dict[str, float] | None:
    """memory_mb summed over the process tree (the peak is a sum of per-process peaks)."""
    parts = [m for m in (memory_mb(p) for p in process_tree(pid)) if m]
    if not parts:
        return None
    return {"rss": sum(m["rss"] for m in parts), "peak": sum(m["peak"] for m in parts)}


def process_peaks_mb(pid: int) -> dict[str, float]:
    """Peak RSS (VmHWM, MiB) of each process of the tree, by name (``comm``: the server is
    ``python``, its children ``inslytic-roller``, ``inslytic-w0``, ...; repeated names summed)."""
    peaks: dict[str, float] = {}
    for member in process_tree(pid):
        memory = memory_mb(member)
        try:
            name = Path(f"/proc/{member}/comm").read_text().strip()
        except OSError:
            continue
        if memory:
            peaks[name] = round(peaks.get(name, 0.0) + memory["peak"], 1)
    return peaks


def memory_mb(pid: int) -> dict[str, float] | None:
    """Current (VmRSS) and peak (VmHWM) resident set of a process, in MiB."""
    try:
        lines = Path(f"/proc/{pid}/status").read_text().splitlines()
    except OSError:
        return None
    found = {}
    for line in lines:
        if line.startswith(("VmRSS:", "VmHWM:")):
            name, value = line.split(":", 1)
            found[name] = int(value.split()[0]) / 1024  # kB
    if "VmRSS" not in found:
        return None
    return {"rss": found["VmRSS"], "peak": found.get("VmHWM", found["VmRSS"])}


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def memory_total_mb() -> int | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) // 1024
    except OSError:
        pass
    return None


def package_versions() -> dict[str, str | None]:
    versions = {}
    for name in VERSIONED_PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def git_revision() -> str | None:
    try:
        rev = subprocess.run(
            ["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            timeout=5,
        )
        dirty = subprocess.run(
            ["git", "-C", str(REPO), "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            text=True,
            timeout=5,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    if rev.returncode != 0:
        return None
    return rev.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")


def available_cpus() -> list[int]:
    try:
        return sorted(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return list(range(os.cpu_count() or 1))


def machine_info() -> dict:
    return {
        "hostname": socket.gethostname(),
        "cpu_model": cpu_model(),
        "cpu_count": os.cpu_count(),
        "cpus_available": available_cpus(),
        "memory_total_mb": memory_total_mb(),
        "os": f"{platform.system()} {platform.release()}",
        "python": f"{platform.python_implementation()} {platform.python_version()}",
        "python_executable": sys.executable,
        "packages": package_versions(),
        "git_revision": git_revision(),
    }


def cpu_ticks() -> dict[int, tuple[int, int]]:
    """Per CPU: (busy, total) clock ticks since boot, from /proc/stat; {} off Linux."""
    found = {}
    try:
        lines = Path("/proc/stat").read_text().splitlines()
    except OSError:
        return found
    for line in lines:
        if line.startswith("cpu") and line[3:4].isdigit():
            name, *values = line.split()
            ticks = [int(v) for v in values[:8]]  # user nice system idle iowait irq softirq steal
            idle = ticks[3] + ticks[4]
            found[int(name[3:])] = (sum(ticks) - idle, sum(ticks))
    return found


def busy_share(before: dict, after: dict, cpus: list[int]) -> float | None:
    """Fraction of the given CPUs' time that was busy (anyone's work) between two samples."""
    busy = sum(after[c][0] - before[c][0] for c in cpus if c in before and c in after)
    total = sum(after[c][1] - before[c][1] for c in cpus if c in before and c in after)
    return busy / total if total else None


def load_average() -> float | None:
    try:
        return float(Path("/proc/loadavg").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None
