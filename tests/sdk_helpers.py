"""Shared pieces of the real-client tests: a proxy that loses answers, and stored-data checks.

``AnswerLosingProxy`` stands where a load balancer would: it relays each request to the real
server, waits for the server's complete answer, and for the first ``lose`` requests drops the
client's connection instead of relaying it (what a client sees when a proxy or the network
fails after the server stored the batch). The SDK's own retry then resends what is already
stored, which is the case exactly-once exists for.
"""

from __future__ import annotations

import socket
import struct
import threading

from inslytic_fast.storage.query import run_query


def _read_message(sock: socket.socket, buffer: bytearray) -> bytes | None:
    """One HTTP/1.1 message framed by Content-Length (what these SDKs and the server send)."""
    while b"\r\n\r\n" not in buffer:
        chunk = sock.recv(65536)
        if not chunk:
            return None
        buffer += chunk
    head_end = buffer.index(b"\r\n\r\n") + 4
    length = 0
    for line in bytes(buffer[:head_end]).split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            length = int(value)
    while len(buffer) < head_end + length:
        chunk = sock.recv(65536)
        if not chunk:
            return None
        buffer += chunk
    message = bytes(buffer[: head_end + length])
    del buffer[: head_end + length]
    return message


class AnswerLosingProxy:
    def __init__(self, upstream: tuple[str, int], lose: int) -> None:
        self.upstream = upstream
        self.lose = lose
        self.lost = 0
        self.relayed = 0
        self._lock = threading.Lock()
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self._thread = threading.Thread(target=self._accept, daemon=True)
        self._thread.start()

    def close(self) -> None:
        self.listener.close()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(client,), daemon=True).start()

    def _serve(self, client: socket.socket) -> None:
        buffer = bytearray()
        with client:
            while (request := _read_message(client, buffer)) is not None:
                with socket.create_connection(self.upstream, timeout=30) as upstream:
                    upstream.sendall(request)
                    answer = _read_message(upstream, bytearray())
                with self._lock:
                    drop = self.lost < self.lose
                    if drop:
                        self.lost += 1
                    else:
                        self.relayed += 1
                if drop or answer is None:
                    # RST instead of an answer: the client cannot tell whether it was stored.
                    client.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                    return
                client.sendall(answer)


def duplicate_message_ids(data_dir) -> list[tuple]:
    return run_query(
        data_dir,
        "SELECT message_id, count(*) FROM events WHERE message_id IS NOT NULL "
        "GROUP BY message_id HAVING count(*) > 1",
    )[1]


def sdk_test_server(tmp_path_factory, name: str):
    """A module's real server: two workers (a retry may land on either), no rate limit."""
    from .conftest import ServerProcess

    data_dir = tmp_path_factory.mktemp(name) / "data"
    server = ServerProcess(data_dir, "--workers", "2", "--events-per-minute", "0").start()
    yield server
    if server.proc.poll() is None:
        server.kill()


def mapped_rows(data_dir, tag: str) -> dict[str, tuple]:
    """The stored columns the SDK tests check, per message type, for user-<tag>."""
    rows = run_query(
        data_dir,
        "SELECT type, event_name, user_id, group_id, previous_id, page_url, utm_source, "
        "properties_json->>'$.amount', CAST(traits->'$.seats' AS INTEGER), "
        "json_type(traits->'$.beta'), context->>'$.library.name', message_id IS NOT NULL, "
        f"sent_at IS NOT NULL FROM events WHERE user_id = 'user-{tag}' ORDER BY type",
    )[1]
    return {row[0]: row[1:] for row in rows}


def expected_rows(tag: str, library: str) -> dict[str, tuple]:
    """What mapped_rows reads after identify/track/page/group/alias as the SDK tests send them."""
    lib, user = library, f"user-{tag}"
    return {
        "alias": (None, user, None, f"anon-{tag}", None, None, None, None, None, lib, True, True),
        "group": (None, user, f"group-{tag}", None, None, None, None, None, None, lib, True,
                  True),
        "identify": (None, user, None, None, None, None, None, 3, "BOOLEAN", lib, True, True),
        "page": ("Pricing", user, None, None, "https://example.com/pricing", None, None, None,
                 None, lib, True, True),
        "track": ("Order Completed", user, None, None, None, "newsletter", "42.5", None, None,
                  lib, True, True),
    }  # fmt: skip
