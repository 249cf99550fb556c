"""The ingest decision and its carrying-out, without sockets: a real KeyRing and Schema, a
memory commit sink (as PostHog capture's compatibility tests use) and a fake clock."""

from __future__ import annotations

import gzip
import zlib

import orjson
import pytest

from inslytic_fast.http.request import Request
from inslytic_fast.http.responses import Responses
from inslytic_fast.ingest.admission import Admission
from inslytic_fast.ingest.body import decode_body
from inslytic_fast.ingest.errors import IngestError
from inslytic_fast.ingest.keyring import KeyRing
from inslytic_fast.ingest.pipeline import Ingestor
from inslytic_fast.ingest.schema import Schema
from inslytic_fast.limits.ratelimit import RateLimiter
from inslytic_fast.log.writer import LogUnavailable

from .conftest import EXAMPLE_EVENT


class MemorySink:
    """Stands in for the commit log: records appends, completes them when told."""

    def __init__(self) -> None:
        self.appended: list[tuple[str, bytes, int]] = []
        self.waiting = []
        self.refuse: LogUnavailable | None = None
        self.keys: list[bytes | None] = []

    def append(self, project, events_json, count, on_done, idempotency_key=None) -> None:
        if self.refuse is not None:
            raise self.refuse
        self.appended.append((project, events_json, count))
        self.keys.append(idempotency_key)
        self.waiting.append(on_done)

    def complete(self, error: BaseException | None = None) -> None:
        for on_done in self.waiting:
            on_done(error)
        self.waiting.clear()


class Collector:
    def __init__(self) -> None:
        self.data: list[bytes] = []
        self.statuses: list[int] = []

    def respond(self, status: int, data: bytes) -> None:
        self.statuses.append(status)
        self.data.append(data)

    def status(self) -> int:
        """The answer's status, as carried with it; the status line must say the same."""
        assert len(self.data) == 1
        assert self.statuses[0] == int(self.data[0].split(b" ", 2)[1])
        return self.statuses[0]

    def body(self) -> dict:
        return orjson.loads(self.data[0].split(b"\r\n\r\n", 1)[1])

    def header(self, name: str) -> str | None:
        head = self.data[0].split(b"\r\n\r\n", 1)[0].decode()
        for line in head.split("\r\n")[1:]:
            key, _, value = line.partition(":")
            if key.lower() == name.lower():
                return value.strip()
        return None


class Clock:
    def __init__(self) -> None:
        self.now = 500.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def world(tmp_path):
    keyring = KeyRing(tmp_path)
    keyring.load()
    key = keyring.ensure_default_project()
    clock = Clock()
    sink = MemorySink()
    ingestor = Ingestor(
        keyring,
        Schema(),
        RateLimiter(clock),
        sink,
        Responses(),
        default_limit=10,
        max_decompressed_bytes=1_000_000,
    )
    return ingestor, sink, key.encode(), clock


def request(key: bytes | None, body: dict | bytes, **fields) -> Request:
    req = Request()
    req.method = b"POST"
    req.path = b"/v1/ingest"
    req.authorization = b"Bearer " + key if key is not None else None
    req.body = body if isinstance(body, bytes) else orjson.dumps(body)
    for name, value in fields.items():
        setattr(req, name, value)
    return req


def batch(n: int) -> dict:
    return {"events": [EXAMPLE_EVENT] * n}


def refused(decide, *args) -> IngestError:
    """The IngestError a decision raises."""
    with pytest.raises(IngestError) as caught:
        decide(*args)
    return caught.value


def head_and_body(error: IngestError) -> tuple[bytes, dict]:
    """The refusal as the one renderer (Responses.refusal) answers it."""
    head, _, body = Responses().refusal(error).partition(b"\r\n\r\n")
    return head + b"\r\n", orjson.loads(body)


def test_an_accepted_batch_is_answered_only_after_the_commit(world):
    ingestor, sink, key, _ = world
    out = Collector()
    ingestor.submit(request(key, batch(2)), out)
    assert out.data == [], "no 202 before the log reports the events durable"
    [(project, events_json, count)] = sink.appended
    assert (project, count) == ("default", 2)
    assert [e["eventName"] for e in orjson.loads(events_json)] == ["page_viewed"] * 2
    sink.complete()
    assert out.status() == 202 and out.body() == {"accepted": 2}
    assert out.header("X-RateLimit-Remaining") == "8"


def test_a_failed_commit_is_a_503_and_gives_the_tokens_back(world):
    ingestor, sink, key, _ = world
    out = Collector()
    ingestor.submit(request(key, batch(4)), out)
    sink.complete(OSError(5, "Input/output error"))
    assert out.status() == 503 and out.header("Retry-After") is not None
    again = Collector()
    ingestor.submit(request(key, batch(10)), again)
    sink.complete()
    assert again.status() == 202, "the failed batch's 4 tokens were refunded"


def test_a_refusing_log_is_a_fast_503_with_retry_after(world):
    ingestor, sink, key, _ = world
    sink.refuse = LogUnavailable("disk full", retry_after=7)
    out = Collector()
    ingestor.submit(request(key, batch(1)), out)
    assert out.status() == 503 and out.header("Retry-After") == "7"
    assert "disk full" in out.body()["details"][0]


@pytest.mark.parametrize(
    ("authorization", "error"),
    [
        (None, "Missing API key"),
        (b"Basic abc", "Authorization must use the Bearer scheme"),
        (b"Bearer    ", "Missing API key"),
        (b"Bearer ik_live_unknown", "Invalid API key"),
    ],
)
def test_auth_comes_first(world, authorization, error):
    ingestor, sink, _, _ = world
    req = request(None, b"not even json")
    req.authorization = authorization
    decision = refused(ingestor.admitter.admit, req)
    assert decision.status == 401
    head, body = head_and_body(decision)
    assert error in body["error"]
    assert decision.headers == b"WWW-Authenticate: Bearer\r\n"
    assert b"\r\nWWW-Authenticate: Bearer\r\n" in head


def test_bearer_scheme_is_case_insensitive(world):
    ingestor, _, key, _ = world
    req = request(key, batch(1))
    req.authorization = b"bearer " + key
    assert isinstance(ingestor.admitter.admit(req), Admission)


def test_an_invalid_batch_spends_no_tokens_and_stores_nothing(world):
    ingestor, sink, key, _ = world
    bad = {"events": [EXAMPLE_EVENT] * 5 + [{"eventName": 1}]}
    decision = refused(ingestor.admitter.admit, request(key, bad))
    assert decision.status == 400 and decision.reason == "validation"
    assert head_and_body(decision)[1]["error"] == "Validation failed"
    assert isinstance(ingestor.admitter.admit(request(key, batch(10))), Admission)
    assert sink.appended == []


def test_rate_limit_refuses_the_whole_batch_and_refills_after_the_window(world):
    ingestor, _, key, clock = world
    assert isinstance(ingestor.admitter.admit(request(key, batch(7))), Admission)
    decision = refused(ingestor.admitter.admit, request(key, batch(4)))
    assert decision.status == 429 and decision.retry_after == 60
    head, _ = head_and_body(decision)
    assert b"\r\nRetry-After: 60\r\n" in head
    assert b"\r\nX-RateLimit-Remaining: 3\r\n" in head
    clock.now += 60
    assert isinstance(ingestor.admitter.admit(request(key, batch(10))), Admission)


def test_a_batch_larger_than_the_whole_limit_is_413_without_a_retry_hint(world):
    ingestor, _, key, clock = world
    decision = refused(ingestor.admitter.admit, request(key, batch(11)))
    # 429 means "try later"; this batch would be refused in every window.
    assert decision.status == 413
    head, body = head_and_body(decision)
    assert decision.retry_after is None and b"\r\nRetry-After:" not in head
    detail = body["details"][0]
    assert "limit of 10 events per minute" in detail and "never" in detail
    # Nothing was spent: a batch that fits still has the whole bucket.
    assert isinstance(ingestor.admitter.admit(request(key, batch(10))), Admission)


def test_project_limit_overrides_the_default_and_zero_is_unlimited(world):
    ingestor, _, key, _ = world
    ingestor.admitter.keyring.projects["default"].events_per_minute = 0
    decision = ingestor.admitter.admit(request(key, batch(500)))
    assert isinstance(decision, Admission) and decision.limit_headers == b""


@pytest.mark.parametrize(
    ("encoding", "compress"),
    [
        (b"gzip", gzip.compress),
        (b"deflate", zlib.compress),
        (b"identity", lambda b: b),
    ],
)
def test_content_encodings(world, encoding, compress):
    ingestor, _, key, _ = world
    req = request(key, compress(orjson.dumps(batch(1))), content_encoding=encoding)
    assert isinstance(ingestor.admitter.admit(req), Admission)


def test_decompression_stops_at_the_cap_and_reports_corrupt_streams():
    bomb = gzip.compress(b"a" * 5_000_000)
    assert refused(decode_body, bomb, b"gzip", 1000).status == 413
    assert refused(decode_body, b"junk", b"gzip", 1000).status == 400
    assert refused(decode_body, gzip.compress(b"x" * 100)[:-10], b"gzip", 1000).status == 400
    assert refused(decode_body, b"{}", b"br", 1000).status == 415


@pytest.mark.parametrize(
    ("content_type", "ok"),
    [
        (None, True),
        (b"application/json", True),
        (b"Application/JSON; charset=utf-8", True),
        (b"text/plain;charset=UTF-8", True),
        (b"application/x-www-form-urlencoded", False),
    ],
)
def test_media_types(world, content_type, ok):
    ingestor, _, key, _ = world
    req = request(key, batch(1), content_type=content_type)
    if ok:
        assert isinstance(ingestor.admitter.admit(req), Admission)
    else:
        assert refused(ingestor.admitter.admit, req).status == 415


def test_a_cached_202_is_the_rendered_one_and_follows_the_date(monkeypatch):
    responses = Responses()
    assert responses.accepted(3) == responses.render(202, b'{"accepted":3}')
    assert responses.accepted(3) is responses.accepted(3)
    new_date = "Thu, 01 Jan 2026 00:00:00 GMT"
    monkeypatch.setattr("inslytic_fast.http.responses.formatdate", lambda usegmt: new_date)
    responses.tick()
    assert b"Date: " + new_date.encode() + b"\r\n" in responses.accepted(3)
    assert responses.accepted(3) == responses.render(202, b'{"accepted":3}')
    limits = b"X-RateLimit-Limit: 10\r\n"
    assert limits in responses.accepted(3, limits)
    assert b"Connection: close" in responses.accepted(3, close=True)
    only_one = Responses(("https://app.example",))
    allowed = only_one.accepted(1, origin=b"https://app.example")
    assert b"Access-Control-Allow-Origin: https://app.example" in allowed
    assert b"Access-Control-Allow-Origin" not in only_one.accepted(1, origin=b"https://evil")


def test_refuse_before_body_decides_auth_media_type_and_an_empty_bucket_spending_nothing(world):
    ingestor, _, key, _ = world
    refuse_before_body = ingestor.admitter.refuse_before_body
    assert refuse_before_body(request(key, b"")) is None
    assert refuse_before_body(request(b"ik_live_wrong", b"")).status == 401
    assert refuse_before_body(request(key, b"", content_type=b"text/csv")).status == 415
    # The checks spent no token: the whole bucket is still there for a body ...
    assert isinstance(ingestor.admitter.admit(request(key, batch(10))), Admission)
    # ... and once it is empty, no body is invited until it refills.
    refusal = ingestor.admitter.refuse_before_body(request(key, b""))
    assert refusal.status == 429 and b"\r\nRetry-After: " in head_and_body(refusal)[0]
