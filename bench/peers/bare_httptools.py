"""The ceiling: uvloop + httptools answering every request with a canned 202, body unread.

It parses requests (it must, to find where the next keep-alive request starts) but never looks
at a body byte, authenticates nothing and stores nothing. Whatever it reaches on one core is the
most any Python server on this loop and parser can do; inslytic-fast is measured against it.

    python -m bench.peers.bare_httptools [--port 0]

Prints ``bare-httptools listening on http://127.0.0.1:PORT`` on stderr, like inslytic-fast.
"""

from __future__ import annotations

import argparse
import asyncio
import signal
import socket
import sys

import httptools
import uvloop

ACCEPTED = (
    b"HTTP/1.1 202 Accepted\r\n"
    b"content-type: application/json\r\n"
    b"content-length: 14\r\n"
    b"\r\n"
    b'{"accepted":1}'
)
BAD_REQUEST = b"HTTP/1.1 400 Bad Request\r\ncontent-length: 0\r\nconnection: close\r\n\r\n"


class CannedProtocol(asyncio.Protocol):
    __slots__ = ("transport", "parser")

    def connection_made(self, transport) -> None:
        self.transport = transport
        self.parser = httptools.HttpRequestParser(self)

    def data_received(self, data: bytes) -> None:
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError:
            self.transport.write(BAD_REQUEST)
            self.transport.close()

    # Parser callback: the only one defined, so httptools skips URL, header and body callbacks.
    def on_message_complete(self) -> None:
        self.transport.write(ACCEPTED)


async def serve(port: int) -> None:
    loop = asyncio.get_running_loop()
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", port))
    server = await loop.create_server(CannedProtocol, sock=sock, backlog=1024)
    print(
        f"bare-httptools listening on http://127.0.0.1:{sock.getsockname()[1]}",
        file=sys.stderr,
        flush=True,
    )
    stop = loop.create_future()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set_result, None)
    await stop
    server.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, default=0)
    args = parser.parse_args(argv)
    uvloop.run(serve(args.port))
    return 0


if __name__ == "__main__":
    sys.exit(main())
