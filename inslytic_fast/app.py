"""Routing: which answer a complete request gets. Plain decisions over a ``Request``."""

from __future__ import annotations

from collections.abc import Callable

import orjson

from .ingest import Ingestor, Responder
from .request import Request
from .responses import PROMETHEUS_CONTENT_TYPE, Responses, error_body

HEALTH_BODY = b'{"status":"ok"}'
READY_BODY = b'{"status":"ready"}'
INGEST_ROUTE = b"/v1/ingest"
NOT_FOUND_BODY = error_body("Not found")
# Browsers cache a preflight for at most 2 h (Chromium) / 24 h (Firefox); 2 h works for both.
CORS_MAX_AGE_SECONDS = 7200
PREFLIGHT_HEADERS = (
    b"Access-Control-Allow-Methods: POST, OPTIONS\r\n"
    b"Access-Control-Allow-Headers: Authorization, Content-Type, Content-Encoding\r\n"
    b"Access-Control-Max-Age: %d\r\n" % CORS_MAX_AGE_SECONDS
)

INGEST_METHODS = b"POST, OPTIONS"
READ_METHODS = b"GET, HEAD"


class App:
    __slots__ = (
        "ingestor",
        "responses",
        "openapi_body",
        "health_headers",
        "metrics_page",
        "readiness",
    )

    def __init__(
        self,
        ingestor: Ingestor,
        responses: Responses,
        openapi: dict,
        *,
        worker_id: str = "w0",
        metrics_page: Callable[[], bytes] = lambda: b"",
        readiness: Callable[[], str | None] = lambda: None,
    ) -> None:
        self.ingestor = ingestor
        self.responses = responses
        self.metrics_page = metrics_page
        self.readiness = readiness
        self.openapi_body = orjson.dumps(openapi)
        # Which worker answered: lets operators and tests see every worker is alive.
        self.health_headers = b"X-Inslytic-Worker: " + worker_id.encode() + b"\r\n"

    def handle(self, req: Request, slot: Responder) -> None:
        path = req.path
        method = req.method
        if path == b"/v1/ingest":
            slot.route = INGEST_ROUTE
            if method == b"POST":
                self.ingestor.submit(req, slot)
            elif method == b"OPTIONS":
                slot.respond(self.responses.no_content(PREFLIGHT_HEADERS, origin=req.origin))
            else:
                slot.respond(self._method_not_allowed(req, INGEST_METHODS))
        elif path == b"/health":
            slot.route = path
            slot.respond(self._read(req, HEALTH_BODY, self.health_headers))
        elif path == b"/ready":
            slot.route = path
            reason = self.readiness()
            if reason is None:
                slot.respond(self._read(req, READY_BODY, self.health_headers))
            elif req.method in (b"GET", b"HEAD"):
                slot.respond(
                    self.responses.render(
                        503,
                        error_body("Not ready", [reason]),
                        b"Retry-After: 1\r\n" + self.health_headers,
                        origin=req.origin,
                        close=not req.keep_alive,
                        head=req.method == b"HEAD",
                    )
                )
            else:
                slot.respond(self._method_not_allowed(req, READ_METHODS))
        elif path == b"/metrics":
            slot.route = path
            if req.method in (b"GET", b"HEAD"):
                slot.respond(
                    self.responses.render(
                        200,
                        self.metrics_page(),
                        origin=req.origin,
                        close=not req.keep_alive,
                        head=req.method == b"HEAD",
                        content_type=PROMETHEUS_CONTENT_TYPE,
                    )
                )
            else:
                slot.respond(self._method_not_allowed(req, READ_METHODS))
        elif path == b"/openapi.json":
            slot.route = path
            slot.respond(self._read(req, self.openapi_body))
        else:
            slot.respond(
                self.responses.render(
                    404, NOT_FOUND_BODY, origin=req.origin, close=not req.keep_alive
                )
            )

    def _read(self, req: Request, body: bytes, extra: bytes = b"") -> bytes:
        if req.method == b"GET" or req.method == b"HEAD":
            return self.responses.render(
                200,
                body,
                extra,
                origin=req.origin,
                close=not req.keep_alive,
                head=req.method == b"HEAD",
            )
        return self._method_not_allowed(req, READ_METHODS)

    def _method_not_allowed(self, req: Request, allow: bytes) -> bytes:
        return self.responses.render(
            405,
            error_body("Method Not Allowed", [f"allowed: {allow.decode()}"]),
            b"Allow: " + allow + b"\r\n",
            origin=req.origin,
            close=not req.keep_alive,
        )
