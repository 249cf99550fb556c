"""Storage faults a real server must survive: a disk that fills up mid-run, and bit rot in old
(sealed, not yet rolled) log segments.

Beyond tests/test_log_refusals.py (EIO/ENOSPC by monkeypatched fsync), test_log_format.py
(torn tails, flips in one file) and tests/test_storage.py (faults at each roll step): here the
faults hit a running server process through the real file system, and the audit is a query of
what it stored.
"""

from __future__ import annotations

import os
import random
import re
import shutil
import signal
import socket
import subprocess
import threading
import time
from pathlib import Path

import orjson
import pytest

from inslytic_fast.log.format import HEADER_SIZE, list_segments, scan_segment
from inslytic_fast.storage.query import run_query

from .adversarial_helpers import ROLL_DEADLINE_S, TICK_DEADLINE_S, batch_body, poll_until
from .conftest import EXAMPLE_EVENT, ServerProcess
from .storage_helpers import RollerLock

MiB = 1024 * 1024
DISK_BYTES = 20 * MiB


def names_stored(data_dir: Path, like: str) -> dict[str, int]:
    _, rows = run_query(
        data_dir,
        "SELECT event_name, count(*) FROM events WHERE event_name LIKE ? GROUP BY 1",
        [like],
    )
    return dict(rows)


# -- A disk that fills up ------------------------------------------------------------------


@pytest.fixture
def small_disk(tmp_path):
    """A 20 MiB tmpfs: writes past it fail with ENOSPC at once (no delayed allocation)."""
    mount_point = tmp_path / "disk"
    mount_point.mkdir()
    result = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={DISK_BYTES}", "tmpfs", str(mount_point)],
        capture_output=True,
        text=True,
    )
    if result.returncode != 0:
        pytest.skip(f"cannot mount a size-capped tmpfs here (needs root/CAP_SYS_ADMIN): "
                    f"{result.stderr.strip()}")  # fmt: skip
    yield mount_point
    subprocess.run(["umount", "-l", str(mount_point)], check=False)


class Ballast:
    """Another tenant of the disk: fills it to the last byte, then gives the space back."""

    def __init__(self, directory: Path) -> None:
        self.path = directory / "ballast"

    def fill(self, leave: int = 0) -> None:
        fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        block = bytes(64 * 1024)
        try:
            while self.free() > leave + len(block):
                os.write(fd, block)
            while leave == 0:
                os.write(fd, b"\0" * 512)  # the last partial blocks
        except OSError:
            pass  # ENOSPC: full
        finally:
            os.close(fd)

    def free(self) -> int:
        st = os.statvfs(self.path.parent)
        return st.f_bavail * st.f_frsize

    def remove(self) -> None:
        self.path.unlink()


class Sender(threading.Thread):
    """Sends 10-event batches with unique names on one keep-alive connection until stopped;
    records each batch's names under the status it got."""

    def __init__(self, server: ServerProcess, tag: str, stop: threading.Event) -> None:
        super().__init__(daemon=True)
        self.server, self.tag, self.stop = server, tag, stop
        self.by_status: dict[int, list[str]] = {}
        self.retry_after: set[str] = set()
        self.details: set[str] = set()
        self.errors: list[BaseException] = []

    def run(self) -> None:
        try:
            self._send_until_stopped()
        except Exception as exc:  # noqa: BLE001 - the test asserts there was none
            self.errors.append(exc)

    def _send_until_stopped(self) -> None:
        conn = self.server.connection()
        seq = 0
        while not self.stop.is_set():
            names = [f"{self.tag}-{seq}-{j}" for j in range(10)]
            seq += 1
            conn.request(
                "POST",
                "/v1/ingest",
                body=batch_body(names),
                headers={"Authorization": f"Bearer {self.server.first_run_key}"},
            )
            resp = conn.getresponse()
            body = resp.read()
            self.by_status.setdefault(resp.status, []).extend(names)
            if resp.status == 503:
                self.retry_after.add(resp.getheader("Retry-After"))
                self.details.update(orjson.loads(body).get("details", []))
                time.sleep(0.02)
        conn.close()

    def count(self, status: int) -> int:
        return len(self.by_status.get(status, []))


@pytest.mark.parametrize(
    "min_free", ["0", "4194304"], ids=["writes-hit-ENOSPC", "refused-below-min-free"]
)
def test_disk_full_mid_run_gives_503_never_a_false_202_and_recovers_by_itself(small_disk, min_free):
    data_dir = small_disk / "data"
    server = ServerProcess(
        data_dir, "--workers", "1", "--events-per-minute", "0", "--min-free-bytes", min_free
    ).start()
    ballast = Ballast(small_disk)
    senders: list[Sender] = []
    try:
        stop = threading.Event()
        senders = [Sender(server, f"full{n}", stop) for n in range(4)]
        for sender in senders:
            sender.start()
        poll_until(lambda: sum(s.count(202) for s in senders) >= 400, TICK_DEADLINE_S)

        ballast.fill(leave=0 if min_free == "0" else 1 * MiB)
        poll_until(lambda: sum(s.count(503) for s in senders) >= 200, TICK_DEADLINE_S)
        if min_free != "0":
            # Below --min-free-bytes the server says so on /ready (by the next 1 s tick) and
            # refuses before writing.
            poll_until(lambda: server.request("GET", "/ready")[0] == 503, TICK_DEADLINE_S)
            poll_until(
                lambda: any("not enough free space" in d for d in senders[0].details),
                TICK_DEADLINE_S,
            )
        accepted_while_full = sum(s.count(202) for s in senders)

        ballast.remove()
        # No manual step: the log repairs itself and the 1 s tick sees the space again.
        poll_until(
            lambda: sum(s.count(202) for s in senders) >= accepted_while_full + 400,
            TICK_DEADLINE_S,
        )
        stop.set()
        for sender in senders:
            sender.join(15)
        assert not [s.errors for s in senders if s.errors]
        assert server.request("GET", "/ready")[0] == 200
        assert server.stop(signal.SIGTERM) == 0
    finally:
        if server.proc.poll() is None:
            server.kill()

    acked = [n for s in senders for n in s.by_status.get(202, [])]
    refused = [n for s in senders for n in s.by_status.get(503, [])]
    assert set(sum((list(s.by_status) for s in senders), [])) <= {202, 503}
    assert {r for s in senders for r in s.retry_after} <= {"30", "5", "1"}
    assert any("disk full" in d for s in senders for d in s.details), senders[0].details
    stored = names_stored(data_dir, "full%")
    missing = [n for n in acked if stored.get(n) != 1]
    assert not missing, f"{len(missing)} acknowledged events missing or doubled: {missing[:5]}"
    leaked = [n for n in refused if n in stored]
    assert not leaked, f"{len(leaked)} events of 503'd batches stored: {leaked[:5]}"
    print(
        f"disk full (min-free {min_free}): {len(acked)} events acked and all found, "
        f"{len(refused)} refused with 503 and none stored"
    )


# -- Bit rot in sealed segments ------------------------------------------------------------


def ingest_batches(server: ServerProcess, key: str, tag: str, count: int) -> list[list[str]]:
    batches = []
    for i in range(count):
        names = [f"{tag}-{i}-{j}" for j in range(3)]
        status, _, body = server.request("POST", "/v1/ingest", batch_body(names), key=key)
        assert status == 202, body
        batches.append(names)
    return batches


FLIP_SEEDS = [1, 2, 3]


@pytest.mark.parametrize("seed", FLIP_SEEDS)
def test_bit_flips_in_a_sealed_segment_are_reported_quarantined_and_lose_only_that_record(
    make_server, tmp_path, seed
):
    rng = random.Random(seed)
    data_dir = tmp_path / "rot"
    server = make_server("--workers", "1", "--events-per-minute", "0", data_dir=data_dir)
    key = server.first_run_key
    old = ingest_batches(server, key, "old", 12)  # one record per request
    lock = RollerLock(data_dir)
    try:
        # The clean stop seals the old segment; neither its final roll nor the restarted
        # roller can take it while the lock is held.
        assert server.stop() == 0
        server.start()
        new = ingest_batches(server, key, "new", 4)
        [segment] = [p for p in list_segments(data_dir / "log")["w0"][:-1] if p.stat().st_size]
        data = bytearray(segment.read_bytes())
        records = scan_segment(bytes(data)).records
        assert len(records) == len(old)
        # Flip one bit in each of 3 records apart from each other: in the header (magic,
        # length, checksum) or the payload.
        damaged = sorted(rng.sample(range(0, len(records), 2), 3))
        for index in damaged:
            start, end = records[index]
            where = rng.choice([0, 4, 8, HEADER_SIZE + rng.randrange(end - start - HEADER_SIZE)])
            data[start + where + rng.randrange(4 if where < HEADER_SIZE else 1)] ^= (
                1 << rng.randrange(8)
            )
        segment.write_bytes(bytes(data))
        intact = [n for i, b in enumerate(old) if i not in damaged for n in b]
        lost = [n for i in damaged for n in old[i]]
        expected = {n: 1 for n in intact + [n for b in new for n in b]}

        # Readers skip the damaged records and keep everything around them, before the roll...
        assert names_stored(data_dir, "%") == expected
        lock.release()
        lock = None
        poll_until(lambda: not segment.exists(), ROLL_DEADLINE_S)  # rolled
    finally:
        if lock is not None:
            lock.release()
    # ...and after it: reported, quarantined, the rest rolled exactly once.
    assert names_stored(data_dir, "%") == expected
    quarantined = b"".join(p.read_bytes() for p in (data_dir / "quarantine").iterdir())
    for index in damaged:
        assert bytes(data[records[index][0] + HEADER_SIZE : records[index][1]]) in quarantined
    errors = [line for line in server.stderr().splitlines() if "corrupt bytes" in line]
    assert len(errors) == len(damaged), server.stderr()[-2000:]
    assert server.stop() == 0
    server.start()  # a restart changes nothing
    assert names_stored(data_dir, "%") == expected
    assert not set(lost) & set(names_stored(data_dir, "%"))


@pytest.mark.parametrize("workers", ["1", "2"])
def test_a_data_dir_that_disappears_gives_503_and_not_ready_then_recovers(make_server, workers):
    server = make_server("--workers", workers, "--events-per-minute", "0")
    key = server.first_run_key
    assert server.ingest([{**EXAMPLE_EVENT, "eventName": "before"}], key)[0] == 202
    moved = server.data_dir.with_name(server.data_dir.name + "-moved")
    os.rename(server.data_dir, moved)  # removed or unmounted, as far as the server can tell

    def refused_by_every_worker():
        # New connections spread over the workers; each notices on its own 1 s tick.
        answers = [
            server.ingest([{**EXAMPLE_EVENT, "eventName": "during"}], key) for _ in range(10)
        ]
        return answers if all(status != 202 for status, _, _ in answers) else None

    # Then 503 + Retry-After: not 401 (the key catalog is gone with the dir), and no 202 for
    # events written to a file nobody would read.
    for status, headers, body in poll_until(refused_by_every_worker, timeout=30):
        assert status == 503 and int(headers["retry-after"]) >= 1, body

    def not_ready():
        # /ready is answered by whichever worker takes the connection, and the 10 refusals
        # above may all have come from one of them: wait for the other's tick as well.
        status, _, body = server.request("GET", "/ready")
        return body if status == 503 else None

    assert b"storage unavailable" in poll_until(not_ready, timeout=30)

    def put_back():
        # The roller may have made an empty data dir at the old path meanwhile.
        shutil.rmtree(server.data_dir, ignore_errors=True)
        try:
            os.rename(moved, server.data_dir)
        except OSError:
            return False
        return True

    poll_until(put_back, timeout=30)

    def accepted_by_every_worker():  # each worker notices on its own tick, as above
        answers = [server.ingest([{**EXAMPLE_EVENT, "eventName": "after"}], key) for _ in range(10)]
        return all(status == 202 for status, _, _ in answers)

    poll_until(accepted_by_every_worker, timeout=30)
    poll_until(lambda: server.request("GET", "/ready")[0] == 200, timeout=30)


# A disk that stays full --------------------------------------------------------------------

FAILED_SYNCS = 5


@pytest.mark.skipif(shutil.which("strace") is None, reason="needs strace")
def test_a_disk_that_stays_full_logs_once_and_leaves_no_empty_segments(tmp_path):
    """fdatasync fails with ENOSPC 5 times, then works. Before: each failed write logged an
    ERROR and a 'sound again' WARNING and left an empty segment behind, back to back (~230
    pairs a second on a really full disk); now one line when it starts and one when it ends,
    at most one failing write per tick, and the empty segment is reused."""
    server = ServerProcess(
        tmp_path / "data",
        "--workers", "1", "--events-per-minute", "0",
        wrapper=(
            "strace", "-f", "-qq", "-o", "/dev/null", "-e", "trace=fdatasync",
            "-e", f"inject=fdatasync:error=ENOSPC:when=1..{FAILED_SYNCS}",
        ),
    ).start()  # fmt: skip
    try:
        key = server.first_run_key
        statuses = []

        def accepted_again() -> bool:
            status, _, _ = server.request("POST", "/v1/ingest", batch_body(["full"]), key=key)
            statuses.append(status)
            return status == 202

        poll_until(accepted_again, 60, interval=0.01)
        assert set(statuses[:-1]) == {503}
        log_dir = server.data_dir / "log"
        segments = [p for segs in list_segments(log_dir).values() for p in segs]
        empty = [p.name for p in segments if p.stat().st_size == 0]
        stderr = server.stderr()
    finally:
        server.kill()
    failures = stderr.count("write/sync failed")
    print(f"{len(statuses) - 1} refused, {failures} failure lines, {len(segments)} segments")
    assert failures == 1, stderr
    assert stderr.count("working again") == 1, stderr
    assert "sound again" not in stderr
    assert not empty, f"empty segments left behind: {empty}"


# -- Overload ------------------------------------------------------------------------------


def test_past_the_hard_mark_ingest_is_refused_on_its_headers_alone(make_server, tmp_path):
    data_dir = tmp_path / "data"
    lock = RollerLock(data_dir)  # the roller cannot take anything: the backlog only grows
    try:
        server = make_server(
            "--workers", "1", "--events-per-minute", "0", "--max-unrolled-bytes", "100000",
            data_dir=data_dir,
        )  # fmt: skip
        key = server.first_run_key
        big = [{**EXAMPLE_EVENT, "eventName": f"fill-{i}"} for i in range(100)]

        def refused():
            status, headers, _ = server.ingest(big, key)
            return headers if status == 503 else None

        assert int(poll_until(refused, timeout=30)["retry-after"]) >= 1

        # A client announcing a body gets its 503 without sending a byte of it: the server
        # decides on the headers (it would otherwise wait for the body for 30 s). A body of up
        # to 1 MiB is then dropped on the open connection; a longer one is refused with close.
        def announce(sock: socket.socket, length: int) -> bytes:
            sock.sendall(
                b"POST /v1/ingest HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer "
                + key.encode()
                + b"\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n" % length
            )
            answer = b""
            while b"\r\n\r\n" not in answer:
                chunk = sock.recv(65536)
                assert chunk, f"closed without an answer: {answer!r}"
                answer += chunk
            head, _, body = answer.partition(b"\r\n\r\n")
            head = head.lower()
            assert head.startswith(b"http/1.1 503 ") and b"\r\nretry-after: " in head
            length = int(re.search(rb"\r\ncontent-length: (\d+)", head)[1])
            while len(body) < length:  # the whole answer: the next one starts after it
                chunk = sock.recv(65536)
                assert chunk, f"closed in the middle of an answer: {answer!r}"
                body += chunk
            return head

        with socket.create_connection((server.host, server.port), timeout=20) as sock:
            assert b"\r\nconnection: close" not in announce(sock, 1_000_000)
            sock.sendall(b"[" * 1_000_000)  # dropped unparsed: the connection reads on
            assert b"\r\nconnection: close" not in announce(sock, 100)
        with socket.create_connection((server.host, server.port), timeout=20) as sock:
            assert b"\r\nconnection: close" in announce(sock, 4_000_000)
    finally:
        lock.release()
