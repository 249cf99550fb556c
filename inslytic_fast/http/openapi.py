"""The OpenAPI 3.1 document served at GET /openapi.json.

Built from the same ``event_fields``/``EventLimits`` the decoder uses, so the published lengths,
required fields and enums cannot drift from what the server enforces.  It describes what the server
answers, not an ideal: every status a route can produce is listed with the body and headers it
really carries (see app.py, ingest/errors.py, parsing.py).  Two rules cannot be written in JSON
Schema and are stated in descriptions instead: the per-event byte cap and the timestamp's UTC
range.
"""

from __future__ import annotations

from typing import Any

from ..ingest.errors import MAX_IDEMPOTENCY_KEY_LENGTH
from ..ingest.schema import EventLimits
from ..ingest.segment import (
    SEGMENT_ROUTES,
)
from .openapi_components import (
    common_errors,
    component_headers,
    component_responses,
    component_schemas,
    error_response,
    json_content,
    ref,
    segment_message,
    with_rate_limit_headers,
)

OPENAPI_VERSION = "3.1.0"
# Mirrors app.py: browsers cache the preflight this long; the header is always present.
PREFLIGHT_ALLOW_METHODS = "POST, OPTIONS"
PREFLIGHT_ALLOW_HEADERS = (
    "Authorization, Content-Type, Content-Encoding, Idempotency-Key, X-Requested-With"
)
# ingest/body.py decode_body accepts these codings (compared case-insensitively; x-gzip is
# gzip's alias).
# "" is what an empty header means to the server: no coding (identity).
CONTENT_ENCODINGS = ("gzip", "x-gzip", "deflate", "identity", "")

# ingest/admission.py strips the value, then wants 1..MAX_IDEMPOTENCY_KEY_LENGTH printable ASCII.
IDEMPOTENCY_KEY_PATTERN = rf"^[!-~]([ -~]{{0,{MAX_IDEMPOTENCY_KEY_LENGTH - 2}}}[!-~])?$"
ORIGIN_REFUSED = (
    "The request's Origin header names a site outside the server's --cors-origins allowlist; "
    "nothing was stored (enforced by the server: beacons are not subject to CORS)."
)


CONTENT_ENCODING_PARAMETER = {
    "name": "Content-Encoding",
    "in": "header",
    "required": False,
    "description": "Compression of the body (case-insensitive).",
    "schema": {"type": "string", "enum": list(CONTENT_ENCODINGS)},
}


def _ingest_post(max_body_bytes: int) -> dict[str, Any]:
    batch = {"schema": ref("schemas", "Batch")}
    # Copies, not $refs: every ingest response also lists the rate-limit headers.
    shared = component_responses(max_body_bytes)
    responses: dict[str, Any] = {
        "202": {
            "description": "All events stored durably.",
            "content": json_content("Accepted"),
        },
        "400": error_response(
            "Invalid JSON, validation failed, an invalid compressed body, or a malformed HTTP "
            "request. The whole batch is refused; nothing was stored.",
            "ValidationError",
        ),
        "401": error_response(
            "Missing or invalid API key.",
            headers={"WWW-Authenticate": ref("headers", "WWW-Authenticate")},
        ),
        "403": error_response(ORIGIN_REFUSED),
        "408": shared["RequestTimeout"],
        "409": error_response(
            "A request with the same Idempotency-Key is still being stored; nothing was done. "
            "Retry after `Retry-After` seconds to get the first request's answer.",
            headers={"Retry-After": ref("headers", "Retry-After")},
        ),
        "413": error_response(
            f"The body is larger than {max_body_bytes} bytes as sent, or too large once "
            "inflated, or the batch holds more events than the project's whole per-minute "
            "limit: such a batch can never be accepted, so no "
            "`Retry-After` is sent; split it into batches of at most `X-RateLimit-Limit` events.",
        ),
        "415": error_response(
            "Content-Type is not application/json or text/plain, or Content-Encoding is not "
            "gzip, deflate or identity."
        ),
        "429": error_response(
            "Rate limit exceeded: the batch costs one token per event. Nothing was stored.",
            headers={"Retry-After": ref("headers", "Retry-After")},
        ),
        "431": shared["HeadersTooLarge"],
        "500": shared["InternalError"],
        "503": error_response(
            "The commit log cannot take more events right now, or the server is at its "
            "connection limit; nothing was stored and no tokens were spent.",
            headers={"Retry-After": ref("headers", "Retry-After")},
        ),
    }
    for response in responses.values():
        with_rate_limit_headers(response)
    return {
        "operationId": "ingestEvents",
        "summary": "Send a batch of events",
        "description": (
            "Stores 1 to the configured maximum of events. The body is JSON; it may be sent as "
            "`text/plain` (what `navigator.sendBeacon` uses) and may be gzip- or "
            f"deflate-compressed. The body as sent may be at most {max_body_bytes} bytes. "
            "A 202 is sent only after the events are durable. A `text/plain` body (a beacon) "
            "may carry the key as a top-level `writeKey` field instead of the Authorization "
            "header; when both are present they must agree (else 401). A body starting with "
            "gzip's magic bytes is read as gzip without Content-Encoding."
        ),
        "tags": ["ingest"],
        "parameters": [
            CONTENT_ENCODING_PARAMETER,
            {
                "name": "Idempotency-Key",
                "in": "header",
                "required": False,
                "description": (
                    "Makes retries of this batch safe: a request with a key already stored "
                    "for the project (within the dedup window, see the README) stores "
                    "nothing and is answered 202 with the first request's count. The key "
                    "alone identifies the batch; the body is not compared. Kept in the "
                    "`idempotency_key` column."
                ),
                "schema": {"type": "string", "pattern": IDEMPOTENCY_KEY_PATTERN},
            },
        ],
        "requestBody": {
            "required": True,
            "content": {"application/json": batch, "text/plain": batch},
        },
        "responses": responses,
    }


def _ingest_options() -> dict[str, Any]:
    def fixed(value: str) -> dict[str, Any]:
        return {"required": True, "schema": {"type": "string", "const": value}}

    return {
        "operationId": "ingestPreflight",
        "summary": "CORS preflight",
        "tags": ["ingest"],
        "security": [],
        "responses": {
            "204": {
                "description": "Preflight accepted; no body.",
                "headers": {
                    "Access-Control-Allow-Methods": fixed(PREFLIGHT_ALLOW_METHODS),
                    "Access-Control-Allow-Headers": fixed(PREFLIGHT_ALLOW_HEADERS),
                    "Access-Control-Max-Age": {"required": True, "schema": {"type": "integer"}},
                    "Access-Control-Allow-Origin": {
                        "description": "`*`, or the request's Origin when it is allowed.",
                        "schema": {"type": "string"},
                    },
                },
            },
            **common_errors(),
        },
    }


def _read_operation(
    operation_id: str, summary: str, content: dict[str, Any], *, head: bool
) -> dict[str, Any]:
    ok: dict[str, Any] = {"description": "OK"}
    if not head:  # HEAD answers the same headers with no body
        ok["content"] = content
    if operation_id == "health":
        ok["headers"] = {
            "X-Inslytic-Worker": {
                "description": "Which worker process answered.",
                "schema": {"type": "string"},
            }
        }
    return {
        "operationId": operation_id + ("Head" if head else ""),
        "summary": summary,
        "tags": ["service"],
        "security": [],
        "responses": {"200": ok, **common_errors()},
    }


def _segment_post(message_type: str | None, limits: EventLimits, max_body_bytes: int) -> dict:
    if message_type is None:
        body = {
            "type": "object",
            "required": ["batch"],
            "properties": {
                "batch": {
                    "type": "array",
                    "minItems": 1,
                    "maxItems": limits.max_events,
                    "items": ref("schemas", "SegmentMessage"),
                },
                "sentAt": {"type": ["string", "null"], "format": "date-time"},
            },
            "description": "May carry the write key as `writeKey` instead of a header.",
            "additionalProperties": True,
        }
    else:
        body = segment_message(message_type, limits)
    shared = component_responses(max_body_bytes)
    responses: dict[str, Any] = {
        "200": {
            "description": (
                "Stored durably (or already stored: retried messageIds store nothing)."
            ),
            "content": json_content("SegmentSuccess"),
        },
        "400": error_response(
            "Invalid JSON or a message the Segment spec does not allow; nothing was stored.",
            "ValidationError",
        ),
        "401": error_response(
            "Missing or invalid write key, or a body writeKey that disagrees with the header.",
            headers={"WWW-Authenticate": ref("headers", "WWW-Authenticate")},
        ),
        "403": error_response(ORIGIN_REFUSED),
        "408": shared["RequestTimeout"],
        "413": error_response(
            f"The body is larger than {max_body_bytes} bytes as sent or too large once "
            "inflated, or it holds more messages than the project's whole per-minute limit."
        ),
        "415": error_response(
            "Content-Type is not application/json or text/plain, or Content-Encoding is not "
            "gzip, deflate or identity."
        ),
        "429": error_response(
            "Rate limit exceeded: one token per new message. Nothing was stored.",
            headers={"Retry-After": ref("headers", "Retry-After")},
        ),
        "431": shared["HeadersTooLarge"],
        "500": shared["InternalError"],
        "503": error_response(
            "Nothing was stored: the commit log cannot take more now, the server is at its "
            "connection limit, or a message of this batch is still being stored by an "
            "earlier attempt. Retry after `Retry-After` seconds.",
            headers={"Retry-After": ref("headers", "Retry-After")},
        ),
    }
    for response in responses.values():
        with_rate_limit_headers(response)
    kind = message_type or "batch"
    return {
        "operationId": f"segment{kind.title()}",
        "summary": f"Segment-spec {kind}" + (" (what the Segment SDKs send)" if not message_type
                                             else ""),
        "description": (
            "Segment's HTTP tracking API, as the Segment, RudderStack and Jitsu SDKs speak it. "
            "The write key is the project's key: HTTP Basic user name (empty password), "
            "Bearer, or `writeKey` in the body. Answered 200 once durable. The body may be "
            "`text/plain` and gzip (with Content-Encoding, or recognised by its magic bytes). "
            "The short paths analytics.js uses (`/v1/b`, `/v1/t`, `/v1/i`, `/v1/p`, `/v1/s`, "
            "`/v1/g`, `/v1/a`) are served the same way as the long ones."
        ),
        "tags": ["segment"],
        "security": [{"basicAuth": []}, {"bearerAuth": []}],
        "parameters": [CONTENT_ENCODING_PARAMETER],
        "requestBody": {
            "required": True,
            "content": {"application/json": {"schema": body}, "text/plain": {"schema": body}},
        },
        "responses": responses,
    }  # fmt: skip


def _segment_paths(limits: EventLimits, max_body_bytes: int) -> dict[str, Any]:
    paths = {}
    for route, message_type in SEGMENT_ROUTES.items():
        kind = (message_type or "batch").title()
        preflight = {**_ingest_options(), "operationId": f"segment{kind}Preflight",
                     "tags": ["segment"]}  # fmt: skip
        paths[route.decode()] = {
            "post": _segment_post(message_type, limits, max_body_bytes),
            "options": preflight,
        }
    return paths


def build_openapi(limits: EventLimits, *, max_body_bytes: int, server_version: str) -> dict:
    """The OpenAPI 3.1 document for a server running with these limits."""
    health = {"application/json": {"schema": ref("schemas", "Health")}}
    document = {
        "application/json": {"schema": {"type": "object", "description": "This OpenAPI document."}}
    }
    return {
        "openapi": OPENAPI_VERSION,
        "info": {
            "title": "Inslytic Ingestion API",
            "version": server_version,
            "description": (
                "Self-hosted event ingestion (inslytic-fast). Every response body is JSON. "
                'Unknown paths answer 404 `{"error": "Not found"}`; a method a path does not '
                "accept answers 405 with an `Allow` header."
            ),
        },
        "servers": [{"url": "/"}],
        "tags": [
            {"name": "ingest", "description": "Event ingestion"},
            {"name": "segment", "description": "Segment-spec intake for existing SDKs"},
            {"name": "service", "description": "Health and discovery"},
        ],
        "security": [{"bearerAuth": []}],
        "paths": {
            "/v1/ingest": {
                "post": _ingest_post(max_body_bytes),
                "options": _ingest_options(),
            },
            **_segment_paths(limits, max_body_bytes),
            "/health": {
                "get": _read_operation("health", "Liveness check", health, head=False),
                "head": _read_operation("health", "Liveness check", health, head=True),
            },
            "/openapi.json": {
                "get": _read_operation("openapi", "This document", document, head=False),
                "head": _read_operation("openapi", "This document", document, head=True),
            },
        },
        "components": {
            "securitySchemes": {
                "bearerAuth": {
                    "type": "http",
                    "scheme": "bearer",
                    "description": "The project API key: `Authorization: Bearer <key>`.",
                },
                "basicAuth": {
                    "type": "http",
                    "scheme": "basic",
                    "description": "Segment SDKs: the project key as user name, no password.",
                },
            },
            "schemas": component_schemas(limits),
            "headers": component_headers(),
            "responses": component_responses(max_body_bytes),
        },
    }
