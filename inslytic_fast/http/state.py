"""Shared mutable state of one serving process: open connections and the cached clock."""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

from ..observe.metrics import Metrics
from .forwarded import TrustedProxies

if TYPE_CHECKING:
    from ..config import Settings
    from .protocol import HttpProtocol


class ServerState:
    __slots__ = (
        "settings",
        "connections",
        "now",
        "draining",
        "ready",
        "metrics",
        "trusted_proxies",
    )

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.connections: set[HttpProtocol] = set()
        # loop.time(), refreshed by the 1 s tick: timeouts need no clock call per request.
        self.now = time.monotonic()
        self.draining = False
        self.ready = False  # /ready: set once listening, cleared when draining starts
        self.metrics = Metrics()
        # Whose X-Forwarded-For names the client in the access log (config checked it parses).
        self.trusted_proxies = TrustedProxies(settings.trusted_proxies)
