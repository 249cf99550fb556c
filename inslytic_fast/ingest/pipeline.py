"""POST /v1/ingest and the Segment routes, carried out: decide, commit, answer.

``Ingestor.submit`` asks the ``Admitter`` (admission.py) for a decision, hands admitted events
to the commit sink and answers 202 (200 on the Segment routes) only once the sink reports them
durable; a refusal (an ``IngestError``, raised by any step of the decision or mapped from the
log's ``LogUnavailable``) is counted and rendered by ``Responses.refusal``. Tests drive it with
a memory sink through the ``CommitSink`` seam. On a node of a cluster, a request with ids
first waits (parked, not blocking the loop) for the coordinator to confirm its claims
(``ClaimPending``, ``Dedup.confirm``).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Protocol

from ..http.request import Request
from ..http.responses import Responses
from ..limits.interface import Limiter
from ..log.writer import LogUnavailable
from ..observe.metrics import Metrics
from . import errors
from .admission import Admission, Admitter, ClaimPending, Duplicate
from .errors import IngestError
from .schema import Schema
from .segment import SEGMENT_PATHS, SegmentCodec

if TYPE_CHECKING:
    from .dedup import Claims, Dedup
    from .keyring import KeyRing

log = logging.getLogger("inslytic_fast.ingest")

SEGMENT_SUCCESS = b'{"success":true}'

# What the commit log is called back with once a batch is durable (None) or not (why not).
OnCommitted = Callable[[BaseException | None], None]


class CommitSink(Protocol):
    """What the ingest pipeline needs of the commit log (log/writer.py ``CommitLog``);
    tests pass a memory sink."""

    def append(
        self,
        project: str,
        events_json: bytes,
        count: int,
        on_done: OnCommitted,
        idempotency_key: bytes | None = None,
    ) -> None:
        """Take a batch and call ``on_done`` once it is durable or failed; raise
        ``LogUnavailable`` at once when the log takes no appends now."""

    def unavailable(self) -> LogUnavailable | None:
        """What ``append`` would raise right now, or None; counts nothing."""

    def backpressure_delay(self) -> float:
        """Seconds to hold an ingest request before handling it (0: none)."""


class Responder(Protocol):
    """Where an answer goes (the connection's ResponseSlot): its status, and its bytes."""

    def respond(self, status: int, data: bytes) -> None: ...


class Ingestor:
    """Carries decisions out: the admitter decides, the commit sink stores, the answer goes
    to the responder."""

    __slots__ = ("admitter", "commitlog", "responses", "metrics", "dedup")

    def __init__(
        self,
        keyring: KeyRing,
        schema: Schema,
        limiter: Limiter,
        commitlog: CommitSink,
        responses: Responses,
        *,
        default_limit: int,
        max_decompressed_bytes: int,
        metrics: Metrics | None = None,
        segment: SegmentCodec | None = None,
        dedup: Dedup | None = None,
        dedup_owner: int = 0,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.admitter = Admitter(
            keyring,
            schema,
            limiter,
            responses.origin_allowed,
            default_limit=default_limit,
            max_decompressed_bytes=max_decompressed_bytes,
            segment=segment,
            dedup=dedup,
            dedup_owner=dedup_owner,
            clock=clock,
        )
        self.commitlog = commitlog
        self.responses = responses
        self.metrics = metrics if metrics is not None else Metrics()
        self.dedup = dedup  # the admitter claims; a commit settles or releases the claims

    def refusal(self, error: IngestError, req: Request, *, close: bool) -> bytes:
        """Count a refusal and render its response."""
        self.metrics.rejected(error.reason, error.events)
        return self.responses.refusal(error, origin=req.origin, close=close)

    def submit(
        self, req: Request, responder: Responder, segment_route: bytes | None = None
    ) -> None:
        try:
            if segment_route is None:
                decision = self.admitter.admit(req)
            else:
                decision = self.admitter.admit_segment(req, SEGMENT_PATHS[segment_route])
        except IngestError as error:
            responder.respond(error.status, self.refusal(error, req, close=not req.keep_alive))
            return
        if type(decision) is ClaimPending:
            self._park(decision, req, responder)
            return
        self._carry_out(decision, req, responder)

    def _park(self, pending: ClaimPending, req: Request, responder: Responder) -> None:
        """A request whose ids the cluster must confirm: no Task, a callback. The dedup's
        thread asks the coordinator (with every claim queued meanwhile) and calls back on the
        loop, which goes on serving other requests meanwhile."""

        def resume(statuses: list[int], claimed: Claims) -> None:
            try:
                decision = pending.finish(statuses, claimed)
            except IngestError as error:
                responder.respond(error.status, self.refusal(error, req, close=not req.keep_alive))
                return
            self._carry_out(decision, req, responder)

        assert self.dedup is not None  # only a coordinated dedup makes a ClaimPending
        if not self.dedup.confirm(pending.keys, pending.statuses, pending.claimed, resume):
            resume(pending.statuses, pending.claimed)

    def _carry_out(
        self, decision: Admission | Duplicate, req: Request, responder: Responder
    ) -> None:
        """Answer a duplicate at once; hand admitted events to the commit sink."""
        responses = self.responses
        dedup = self.dedup
        origin, close = req.origin, not req.keep_alive
        if type(decision) is Duplicate:
            responder.respond(202, responses.accepted(decision.count, origin=origin, close=close))
            return
        if not decision.count:  # every message was a retry of one already stored
            responder.respond(
                200, responses.render(200, SEGMENT_SUCCESS, origin=origin, close=close)
            )
            return

        def on_done(failure: BaseException | None) -> None:
            if failure is None:
                if decision.claimed and dedup is not None:
                    dedup.settle(decision.claimed, decision.count)
                self.metrics.accepted(decision.project, decision.count)
                if decision.segment:
                    responder.respond(
                        200,
                        responses.render(
                            200, SEGMENT_SUCCESS, decision.limit_headers, origin=origin, close=close
                        ),
                    )
                else:
                    responder.respond(
                        202,
                        responses.accepted(
                            decision.count, decision.limit_headers, origin=origin, close=close
                        ),
                    )
            else:
                responder.respond(503, self._not_stored(decision, failure, origin, close))

        try:
            self.commitlog.append(
                decision.project,
                decision.events_json,
                decision.count,
                on_done,
                decision.idempotency_key,
            )
        except LogUnavailable as exc:
            responder.respond(503, self._not_stored(decision, exc, origin, close))

    def refuse_on_headers(
        self, req: Request, keeps_connection: Callable[[], bool]
    ) -> tuple[int, bytes] | None:
        """503 + Retry-After when the log could store no batch right now, whatever the body
        holds: decided on the headers, so an overloaded server never parses a body only to
        refuse it; with Connection: close unless ``keeps_connection()``. None when the log
        takes appends."""
        refused = self.commitlog.unavailable()
        if refused is None:
            return None
        error = errors.unavailable(refused, refused.retry_after)
        return error.status, self.refusal(error, req, close=not keeps_connection())

    def _not_stored(
        self, decision: Admission, failure: BaseException, origin: bytes | None, close: bool
    ) -> bytes:
        """503 + Retry-After: the events were not stored, so their tokens and dedup claims go
        back (the client's retry must be stored)."""
        if decision.claimed and self.dedup is not None:
            self.dedup.release(decision.claimed)
        if decision.bucket is not None:
            decision.bucket.refund(decision.count, decision.window)
        if isinstance(failure, LogUnavailable):
            retry_after = failure.retry_after
        else:
            log.error("commit failed, answering 503: %s", failure)
            retry_after = errors.RETRY_AFTER_UNCLASSIFIED
        error = errors.unavailable(failure, retry_after, decision.count)
        self.metrics.rejected(error.reason, error.events)
        return self.responses.refusal(error, origin=origin, close=close)
