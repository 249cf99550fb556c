"""Shared mutable state of one serving process: open connections and the cached clock."""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .config import Settings
    from .protocol import HttpProtocol


class ServerState:
    __slots__ = ("settings", "connections", "now", "draining")

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.connections: set[HttpProtocol] = set()
        # loop.time(), refreshed by the 1 s tick: timeouts need no clock call per request.
        self.now = time.monotonic()
        self.draining = False
