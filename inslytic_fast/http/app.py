"""Routing: which answer a complete request gets. Plain decisions over a ``Request``."""

from __future__ import annotations

import hmac
from collections.abc import Callable
from typing import TYPE_CHECKING

import orjson

from ..ingest.pipeline import Ingestor
from ..ingest.segment import SEGMENT_PATHS
from ..observe.metrics import INGEST_ROUTE
from .request import Request
from .responses import JSON_CONTENT_TYPE, PROMETHEUS_CONTENT_TYPE, Responses, error_body

if TYPE_CHECKING:
    from .protocol import ResponseSlot

HEALTH_BODY = b'{"status":"ok"}'
READY_BODY = b'{"status":"ready"}'
NOT_FOUND_BODY = error_body("Not found")
# Browsers cache a preflight for at most 2 h (Chromium) / 24 h (Firefox); 2 h works for both.
CORS_MAX_AGE_SECONDS = 7200
PREFLIGHT_HEADERS = (
    b"Access-Control-Allow-Methods: POST, OPTIONS\r\n"
    # What browser SDKs send: Segment's analytics.js and PostHog set Content-Type (and some
    # Content-Encoding); fetch() callers add Authorization and Idempotency-Key.
    b"Access-Control-Allow-Headers: Authorization, Content-Type, Content-Encoding, "
    b"Idempotency-Key, X-Requested-With\r\n"
    b"Access-Control-Max-Age: %d\r\n" % CORS_MAX_AGE_SECONDS
)

INGEST_METHODS = b"POST, OPTIONS"
READ_METHODS = b"GET, HEAD"
READ_ROUTES = frozenset((b"/health", b"/ready", b"/metrics", b"/openapi.json"))
METRICS_ROUTE = b"/metrics"
METRICS_CHALLENGE = b'WWW-Authenticate: Bearer realm="metrics"\r\n'


class App:
    __slots__ = (
        "ingestor",
        "responses",
        "openapi_body",
        "health_headers",
        "metrics_page",
        "readiness",
        "degraded",
        "ingest_route",
        "segment_routes",
        "read_routes",
        "metrics_authorization",
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
        degraded: Callable[[], str | None] = lambda: None,
        serves_api: bool = True,
        serves_metrics: bool = True,
        metrics_token: str = "",
    ) -> None:
        self.ingestor = ingestor
        self.responses = responses
        self.metrics_page = metrics_page
        self.readiness = readiness
        self.degraded = degraded
        # The main port serves the API and, unless --metrics-port moves it, /metrics; the
        # metrics port serves /metrics alone. Routes it does not serve are not found.
        self.ingest_route = INGEST_ROUTE if serves_api else None
        self.segment_routes = SEGMENT_PATHS if serves_api else {}
        routes = READ_ROUTES if serves_api else frozenset((METRICS_ROUTE,))
        self.read_routes = routes if serves_metrics else routes - {METRICS_ROUTE}
        self.metrics_authorization = b"Bearer " + metrics_token.encode() if metrics_token else None
        self.openapi_body = orjson.dumps(openapi)
        # Which worker answered: lets operators and tests see every worker is alive.
        self.health_headers = b"X-Inslytic-Worker: " + worker_id.encode() + b"\r\n"

    def handle(self, req: Request, slot: ResponseSlot) -> None:
        path = req.path
        method = req.method
        if path == self.ingest_route:
            slot.route = INGEST_ROUTE
            if method == b"POST":
                self.ingestor.submit(req, slot)
            elif method == b"OPTIONS":
                slot.respond(204, self.responses.no_content(PREFLIGHT_HEADERS, origin=req.origin))
            else:
                slot.respond(405, self._method_not_allowed(req, INGEST_METHODS))
        elif path in self.segment_routes:
            slot.route = path
            if method == b"POST":
                self.ingestor.submit(req, slot, path)
            elif method == b"OPTIONS":
                slot.respond(204, self.responses.no_content(PREFLIGHT_HEADERS, origin=req.origin))
            else:
                slot.respond(405, self._method_not_allowed(req, INGEST_METHODS))
        elif path in self.read_routes:
            slot.route = path
            if method == b"GET" or method == b"HEAD":
                self._read(req, path, slot)
            else:
                slot.respond(405, self._method_not_allowed(req, READ_METHODS))
        else:
            slot.respond(
                404,
                self.responses.render(
                    404, NOT_FOUND_BODY, origin=req.origin, close=not req.keep_alive
                ),
            )

    def refuse_before_body(self, req: Request) -> tuple[bytes, int, bytes] | None:
        """(route, status, response) for a request refused on its headers alone, before its
        body is invited (``Expect: 100-continue``); None to invite it. The response closes."""
        if req.path != self.ingest_route or req.method != b"POST":
            return None
        error = self.ingestor.admitter.refuse_before_body(req)
        if error is None:
            return None
        return INGEST_ROUTE, error.status, self.ingestor.refusal(error, req, close=True)

    def refuse_on_headers(
        self, req: Request, keeps_connection: Callable[[], bool]
    ) -> tuple[bytes, int, bytes] | None:
        """(route, status, response) for an ingest or Segment request the log cannot take
        whatever its body (overload past the hard mark, disk short, shutting down); None
        otherwise. Asked of every request on its headers; the body is never parsed: the
        response closes the connection unless ``keeps_connection()``, asked only then, says
        the body is dropped on it."""
        if not self._stores(req):
            return None
        refusal = self.ingestor.refuse_on_headers(req, keeps_connection)
        return None if refusal is None else (req.path, *refusal)

    def backpressure(self, req: Request) -> float:
        """Seconds to hold a complete request (and stop reading its connection) before
        handling it: ingest and Segment intake while the roll is behind past the backpressure
        mark, else 0."""
        if not self._stores(req):
            return 0.0
        return self.ingestor.commitlog.backpressure_delay()

    def _stores(self, req: Request) -> bool:
        """A request that would write to the log: /v1/ingest or a Segment route, POST."""
        path = req.path
        return req.method == b"POST" and (path == self.ingest_route or path in self.segment_routes)

    def _read(self, req: Request, path: bytes, slot: ResponseSlot) -> None:
        """GET/HEAD of a read-only route; the page is built only once the method is known good."""
        status, extra, content_type = 200, b"", JSON_CONTENT_TYPE
        if path == b"/health":
            body, extra = HEALTH_BODY, self.health_headers
        elif path == b"/ready":
            reason = self.readiness()
            if reason is None:
                body, extra = READY_BODY, self.health_headers
                note = self.degraded()
                if note is not None:
                    # Still worth traffic (a balancer should keep it), but say what is wrong.
                    body = orjson.dumps({"status": "ready", "degraded": [note]})
            else:
                status = 503
                body = error_body("Not ready", [reason])
                extra = b"Retry-After: 1\r\n" + self.health_headers
        elif path == METRICS_ROUTE:
            expected = self.metrics_authorization
            if expected is not None and not hmac.compare_digest(req.authorization or b"", expected):
                status, extra = 401, METRICS_CHALLENGE
                body = error_body(
                    "Unauthorized", ["/metrics needs 'Authorization: Bearer <metrics token>'"]
                )
            else:
                body, content_type = self.metrics_page(), PROMETHEUS_CONTENT_TYPE
        else:
            body = self.openapi_body
        response = self.responses.render(
            status,
            body,
            extra,
            origin=req.origin,
            close=not req.keep_alive,
            head=req.method == b"HEAD",
            content_type=content_type,
        )
        slot.respond(status, response)

    def _method_not_allowed(self, req: Request, allow: bytes) -> bytes:
        return self.responses.render(
            405,
            error_body("Method Not Allowed", [f"allowed: {allow.decode()}"]),
            b"Allow: " + allow + b"\r\n",
            origin=req.origin,
            close=not req.keep_alive,
        )
