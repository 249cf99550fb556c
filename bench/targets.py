"""The servers a benchmark can point at: inslytic-fast started here, the peers, or a given URL.

Every self-started server gets a fresh temp data dir per run (so peak RSS and "time until
queryable" belong to that run alone), is pinned to the server CPUs when pinning is on, and
announces its port on stderr as ``... listening on http://HOST:PORT``.
"""

from __future__ import annotations

import os
import re
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

import orjson

STARTUP_TIMEOUT_S = 30.0
STOP_TIMEOUT_S = 20.0
LISTENING_RE = re.compile(r"listening on http://([\w.\-\[\]:]+?):(\d+)")
KEY_LINE_RE = re.compile(r"^\s+(ik_\S+)\s*$", re.M)
BENCH_PROJECT = "bench"

INSLYTIC = "inslytic-fast"
BARE = "bare-httptools"
FASTAPI = "fastapi-ref"
EXTERNAL = "external"
SELF_HOSTED = (INSLYTIC, BARE, FASTAPI)


class TargetError(Exception):
    """A server under test could not be started or provisioned."""


@dataclass
class Running:
    name: str
    host: str
    port: int
    key: str
    pid: int | None = None
    data_dir: Path | None = None
    proc: subprocess.Popen | None = None
    workdir: Path | None = None
    command: list[str] = field(default_factory=list)

    def stop(self) -> int | None:
        code = None
        if self.proc is not None:
            if self.proc.poll() is None:
                self.proc.send_signal(signal.SIGTERM)
            try:
                code = self.proc.wait(timeout=STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                code = self.proc.wait()
        if self.workdir is not None:
            shutil.rmtree(self.workdir, ignore_errors=True)
        return code

    def stderr_tail(self) -> str:
        if self.workdir is None:
            return ""
        try:
            return (self.workdir / "stderr.log").read_text(errors="replace")[-2000:]
        except OSError:
            return ""


def _pin(cpus: set[int] | None):
    if not cpus:
        return None

    def apply() -> None:
        os.sched_setaffinity(0, cpus)

    return apply


def _python_module(module: str, *args: str) -> list[str]:
    return [sys.executable, "-m", module, *args]


def spawn_and_wait(
    name: str, cmd: list[str], workdir: Path, cpus: set[int] | None, key: str
) -> Running:
    stdout_path, stderr_path = workdir / "stdout.log", workdir / "stderr.log"
    with open(stdout_path, "wb") as out, open(stderr_path, "wb") as err:
        proc = subprocess.Popen(
            cmd, stdout=out, stderr=err, stdin=subprocess.DEVNULL, preexec_fn=_pin(cpus)
        )
    deadline = time.monotonic() + STARTUP_TIMEOUT_S
    while time.monotonic() < deadline:
        match = LISTENING_RE.search(stderr_path.read_text(errors="replace"))
        if match:
            if not key:
                found = KEY_LINE_RE.search(stdout_path.read_text(errors="replace"))
                key = found.group(1) if found else ""
            return Running(
                name, match.group(1), int(match.group(2)), key, proc.pid, None, proc, workdir, cmd
            )
        if proc.poll() is not None:
            break
        time.sleep(0.02)
    if proc.poll() is None:
        proc.kill()
        proc.wait()
    tail = stderr_path.read_text(errors="replace")[-1500:]
    shutil.rmtree(workdir, ignore_errors=True)
    raise TargetError(f"{name} did not start ({' '.join(cmd)}): {tail.strip()}")


def start_inslytic(
    cpus: set[int] | None, durability: str, extra_args: list[str] | None = None
) -> Running:
    """A fresh inslytic-fast with one unlimited-rate project on a temp data dir."""
    workdir = Path(tempfile.mkdtemp(prefix="inslytic-bench-"))
    data_dir = workdir / "data"
    create = subprocess.run(
        _python_module(
            "inslytic_fast",
            "projects",
            "create",
            BENCH_PROJECT,
            "--events-per-minute",
            "unlimited",
            "--data-dir",
            str(data_dir),
        ),  # fmt: skip
        capture_output=True,
        text=True,
        timeout=60,
    )
    key = ""
    serve_args = ["serve", "--port", "0", "--data-dir", str(data_dir), "--durability", durability]
    if create.returncode == 0 and create.stdout.strip():
        key = create.stdout.strip().splitlines()[-1].strip()
    else:
        # Without the projects command, the default project on a fresh data dir with the
        # server-wide default set to unlimited is equivalent.
        serve_args += ["--events-per-minute", "0"]
    cmd = _python_module("inslytic_fast", *serve_args, *(extra_args or []))
    running = spawn_and_wait(INSLYTIC, cmd, workdir, cpus, key)
    running.data_dir = data_dir
    if not running.key:
        running.stop()
        raise TargetError("inslytic-fast started but printed no API key")
    return running


def start_peer(name: str, cpus: set[int] | None) -> Running:
    workdir = Path(tempfile.mkdtemp(prefix=f"{name}-bench-"))
    key = "bench_" + secrets.token_hex(16)
    if name == BARE:
        cmd = _python_module("bench.peers.bare_httptools", "--port", "0")
    elif name == FASTAPI:
        cmd = _python_module(
            "bench.peers.fastapi_ref", "--port", "0", "--data-dir", str(workdir / "data"),
            "--key", key,
        )  # fmt: skip
    else:
        raise TargetError(f"unknown peer {name!r}")
    return spawn_and_wait(name, cmd, workdir, cpus, key)


def start_target(
    name: str, cpus: set[int] | None, durability: str, extra_args: list[str] | None = None
) -> Running:
    if name == INSLYTIC:
        return start_inslytic(cpus, durability, extra_args)
    return start_peer(name, cpus)


def external(url: str, key: str, pid: int | None) -> Running:
    parts = urlsplit(url)
    if parts.scheme != "http" or not parts.hostname:
        raise TargetError(f"--url must be http://HOST:PORT (no TLS in the generator): {url!r}")
    return Running(EXTERNAL, parts.hostname, parts.port or 80, key, pid)


def count_events(data_dir: Path) -> int | None:
    """Events queryable right now, through the CLI a user would use; None if it failed."""
    proc = subprocess.run(
        _python_module(
            "inslytic_fast",
            "query",
            "SELECT count(*) AS n FROM events",
            "--data-dir",
            str(data_dir),
            "--format",
            "json",
        ),  # fmt: skip
        capture_output=True,
        timeout=60,
    )
    if proc.returncode != 0:
        return None
    return _first_int(proc.stdout)


def _first_int(raw: bytes) -> int | None:
    """The single number in a one-row, one-column JSON result, whatever its exact shape."""
    try:
        value = orjson.loads(raw)
    except orjson.JSONDecodeError:
        # NDJSON: take the first line.
        try:
            value = orjson.loads(raw.splitlines()[0])
        except (IndexError, orjson.JSONDecodeError):
            return None
    while isinstance(value, list | dict):
        if isinstance(value, dict):
            value = value.get("rows", value.get("data", next(iter(value.values()), None)))
        else:
            value = value[0] if value else None
    return int(value) if isinstance(value, int | float) else None


def wait_queryable(
    data_dir: Path, expected: int, timeout: float
) -> tuple[float | None, int | None]:
    """Seconds until ``expected`` events are queryable (None on timeout), and the last count."""
    start = time.monotonic()
    last = None
    while time.monotonic() - start < timeout:
        last = count_events(data_dir)
        if last is not None and last >= expected:
            return time.monotonic() - start, last
        time.sleep(0.05)
    return None, last
