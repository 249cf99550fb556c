"""Schemathesis against the served /openapi.json: every operation, every default check.

The checks include negative-data rejection (a body the schema forbids must get a 4xx),
positive-data acceptance (a body it allows must not), ignored auth (the same request without
or with a wrong key must get 401), status/header/content-type/schema conformance of every
response, and no 5xx. Examples are bounded so the run stays well under a minute; the slow
variant tries many more (``INSLYTIC_SCHEMATHESIS_EXAMPLES``, default 1000 per operation).
"""

from __future__ import annotations

import os
import re
from datetime import UTC, datetime

import pytest
import schemathesis
from hypothesis import HealthCheck, assume, given, settings
from hypothesis.errors import Unsatisfiable
from schemathesis import GenerationMode

from inslytic_fast.ingest.segment import SEGMENT_ROUTES

from .conftest import ServerProcess

CI_EXAMPLES = 200
# The six single-message Segment routes and the Segment preflights share their schemas and code
# with POST /v1/batch and OPTIONS /v1/ingest, which get CI_EXAMPLES: a few each keeps the
# default run short (the slow variant gives every operation its full count).
CI_REPEATED_SHAPE_EXAMPLES = 25
SLOW_EXAMPLES = int(os.environ.get("INSLYTIC_SCHEMATHESIS_EXAMPLES", "1000"))


@pytest.fixture(scope="module")
def live_server(tmp_path_factory):
    data_dir = tmp_path_factory.mktemp("schemathesis") / "data"
    # No rate limit: a 429 is documented, but it would hide what the fuzzer is after.
    server = ServerProcess(data_dir, "--workers", "1", "--events-per-minute", "0").start()
    yield server
    if server.proc.poll() is None:
        server.kill()


def timestamps_of(body) -> list[str]:
    """Every timestamp of a /v1/ingest, /v1/batch or single Segment message body."""
    if not isinstance(body, dict):
        return []
    items = [body]
    for key in ("events", "batch"):
        if isinstance(body.get(key), list):
            items += [item for item in body[key] if isinstance(item, dict)]
    return [
        item[name]
        for item in items
        for name in ("timestamp", "sentAt")
        if isinstance(item.get(name), str)
    ]


def outside_documented_range(timestamp: str) -> bool:
    """The two rules the document states in words because JSON Schema cannot: the UTC instant
    must fall in years 1-9999 and leap seconds (:60) are refused. A generator that only knows
    `format: date-time` may produce either; the server's 400 is then the documented answer."""
    if re.match(r"^\d{4}-\d\d-\d\d[Tt ]\d\d:\d\d:60", timestamp):
        return True
    normalised = re.sub(r"[zZ]$", "+00:00", timestamp.replace("t", "T", 1))
    try:
        moment = datetime.fromisoformat(normalised)
    except ValueError:
        return False  # not ours to excuse: let the check judge it
    try:
        moment.astimezone(UTC)
    except OverflowError:
        return True
    return False


@pytest.fixture(scope="module")
def api_schema(live_server):
    return schemathesis.openapi.from_url(f"{live_server.url}/openapi.json")


def repeats_a_shape(label: str) -> bool:
    method, path = label.split(" ", 1)
    segment = path.encode() in SEGMENT_ROUTES
    return segment and (method == "OPTIONS" or path != "/v1/batch")


def fuzz_operations(
    api_schema, live_server, mode: GenerationMode, examples: int, repeated: int | None = None
) -> dict:
    """Run every operation's strategy through every default check; return failures by label.

    The schemathesis pytest plugin does not load under pytest 9 (its lazy fixture reads a
    removed ``Function._nodeid``), so this drives the same Case API from hypothesis directly.
    """
    headers = {"Authorization": f"Bearer {live_server.first_run_key}"}
    failures: dict[str, str] = {}
    tried = 0
    labels = []
    for result in api_schema.get_all_operations():
        operation = result.ok()
        labels.append(operation.label)

        @given(case=operation.as_strategy(generation_mode=mode))
        @settings(
            max_examples=repeated if repeated and repeats_a_shape(operation.label) else examples,
            deadline=None,
            derandomize=True,
            database=None,
            suppress_health_check=list(HealthCheck),
        )
        def check(case):
            nonlocal tried
            tried += 1
            encoding = (case.headers or {}).get("Content-Encoding")
            if mode is GenerationMode.POSITIVE and encoding not in (None, "identity"):
                # The document lists Content-Encoding as a plain header parameter, so a
                # generator pairs "gzip" with an uncompressed body; the server rightly says 400.
                case.headers["Content-Encoding"] = "identity"
            if mode is GenerationMode.POSITIVE:
                assume(not any(map(outside_documented_range, timestamps_of(case.body))))
            case.call_and_validate(headers=headers)

        try:
            check()
        except Unsatisfiable:
            # Nothing to negate: an operation without parameters or body (GET /health) has
            # no schema-invalid request to make.
            assert mode is GenerationMode.NEGATIVE, operation.label
        except (Exception, BaseExceptionGroup) as exc:  # noqa: BLE001 - asserted below
            failures[operation.label] = str(exc)[:3000]
    print(f"schemathesis {mode.value}: {tried} cases over {', '.join(labels)}")
    return failures


@pytest.mark.parametrize("mode", [GenerationMode.POSITIVE, GenerationMode.NEGATIVE])
def test_every_operation_conforms_to_the_served_openapi(api_schema, live_server, mode):
    failures = fuzz_operations(api_schema, live_server, mode, CI_EXAMPLES,
                               CI_REPEATED_SHAPE_EXAMPLES)  # fmt: skip
    assert not failures, "\n\n".join(f"{label}:\n{text}" for label, text in failures.items())


@pytest.mark.slow
@pytest.mark.parametrize("mode", [GenerationMode.POSITIVE, GenerationMode.NEGATIVE])
def test_every_operation_conforms_many_examples(api_schema, live_server, mode):
    failures = fuzz_operations(api_schema, live_server, mode, SLOW_EXAMPLES)
    assert not failures, "\n\n".join(f"{label}:\n{text}" for label, text in failures.items())


def test_every_content_encoding_the_server_accepts_is_in_the_document(api_schema, live_server):
    [parameter] = [
        p
        for p in api_schema.raw_schema["paths"]["/v1/ingest"]["post"]["parameters"]
        if p["name"] == "Content-Encoding"
    ]
    documented = {value.lower() for value in parameter["schema"]["enum"]}
    accepted = set()
    for encoding in ["", " ", "identity", "IDENTITY", "gzip", "x-gzip", "deflate", "br", "zstd"]:
        status, _, _ = live_server.request(
            "POST",
            "/v1/ingest",
            b'{"events":[]}',  # 400 once decoded: the coding itself was accepted
            headers={"Content-Encoding": encoding},
            key=live_server.first_run_key,
        )
        if status != 415:
            accepted.add(encoding.strip().lower())
    assert accepted <= documented
