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
from ..ingest.schema import DEVICE_TYPES, MAX_ERROR_DETAILS, EventLimits, FieldSpec, event_fields
from ..ingest.segment import (
    MAX_FUTURE_S,
    MAX_PAST_S,
    MESSAGE_TYPES,
    SEGMENT_ROUTES,
    SKEW_TOLERANCE_S,
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

_REF = "#/components/{}/{}"
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


def _ref(section: str, name: str) -> dict[str, str]:
    return {"$ref": _REF.format(section, name)}


def _event_property(spec: FieldSpec, limits: EventLimits) -> dict[str, Any]:
    nullable = not spec.required  # the decoder accepts null for every optional field
    if spec.kind == "string":
        schema: dict[str, Any] = {"type": ["string", "null"] if nullable else "string"}
        if spec.min_length:
            schema["minLength"] = spec.min_length
        schema["maxLength"] = spec.max_length
    elif spec.kind == "timestamp":
        schema = {
            "type": "string",
            "format": "date-time",
            "description": (
                "RFC 3339 date-time with `Z` or a numeric offset (a timestamp without one is "
                "rejected); up to 9 fractional digits, rounded to microseconds; stored in UTC. "
                "The UTC instant must fall in years 1-9999; leap seconds (`:60`) are rejected. "
                "Also accepted beyond RFC 3339: a space instead of `T`, and `+hhmm` offsets."
            ),
            "examples": ["2026-02-16T10:30:00.000Z"],
        }
    elif spec.kind == "boolean":
        schema = {"type": "boolean"}
    elif spec.kind == "device_type":
        schema = {"type": ["string", "null"], "enum": [*DEVICE_TYPES, None]}
    else:  # properties
        schema = {
            "type": ["object", "null"],
            "maxProperties": limits.max_properties,
            "propertyNames": {"maxLength": limits.max_property_key_length},
            "additionalProperties": {
                "type": "string",
                "maxLength": limits.max_property_value_length,
            },
            "default": {},
        }
    schema.setdefault("description", spec.description)
    return schema


def _event_schema(limits: EventLimits) -> dict[str, Any]:
    fields = event_fields(limits)
    return {
        "type": "object",
        "description": (
            "One event. Unknown fields are accepted and ignored. Lengths count Unicode code "
            f"points. The event's JSON text, as sent, may be at most {limits.max_event_bytes} "
            "bytes (a rule JSON Schema cannot express; a larger event gets 400)."
        ),
        "required": [spec.name for spec in fields if spec.required],
        "properties": {spec.name: _event_property(spec, limits) for spec in fields},
        "additionalProperties": True,
        "x-inslytic-max-event-bytes": limits.max_event_bytes,
    }


def _error_body(min_details: int = 0) -> dict[str, Any]:
    """``{"error": ..., "details": [...]}``, the body of every 4xx and 503."""
    details: dict[str, Any] = {"type": "array", "items": {"type": "string"}}
    if min_details:
        details["minItems"] = min_details
    details["maxItems"] = MAX_ERROR_DETAILS
    return {
        "required": ["error"],
        "properties": {"error": {"type": "string"}, "details": details},
        "additionalProperties": False,
    }


def _schemas(limits: EventLimits) -> dict[str, Any]:
    return {
        "Event": _event_schema(limits),
        "Batch": {
            "type": "object",
            "description": "Other top-level fields are accepted and ignored.",
            "required": ["events"],
            "properties": {
                "events": {
                    "type": "array",
                    "minItems": 1,
                    "maxItems": limits.max_events,
                    "items": _ref("schemas", "Event"),
                }
            },
            "additionalProperties": True,
        },
        "Accepted": {
            "type": "object",
            "required": ["accepted"],
            "properties": {
                "accepted": {
                    "type": "integer",
                    "minimum": 1,
                    "maximum": limits.max_events,
                    "description": "Number of events stored durably.",
                }
            },
            "additionalProperties": False,
        },
        "Error": {
            "type": "object",
            **_error_body(),
        },
        "ValidationError": {
            "type": "object",
            "description": (
                "`error` is `Invalid JSON` (details say where) or `Validation failed` (one line "
                "per problem, e.g. `Event 0: eventName is required`; event indices are 0-based). "
                f"At most {MAX_ERROR_DETAILS} details: beyond that the last line reads "
                "`... and N more problems`."
            ),
            **_error_body(min_details=1),
            "examples": [
                {
                    "error": "Validation failed",
                    "details": ["Event 0: eventName is required", "Event 0: timestamp is required"],
                }
            ],
        },
        "SegmentMessage": _segment_message(None, limits),
        "SegmentSuccess": {
            "type": "object",
            "required": ["success"],
            "properties": {"success": {"const": True}},
            "additionalProperties": False,
        },
        "Health": {
            "type": "object",
            "required": ["status"],
            "properties": {"status": {"const": "ok"}},
            "additionalProperties": False,
        },
    }


def _integer_header(description: str, *, required: bool = False) -> dict[str, Any]:
    return {"description": description, "required": required, "schema": {"type": "integer"}}


def _headers() -> dict[str, Any]:
    return {
        "X-RateLimit-Limit": _integer_header(
            "Events per minute allowed for the project. Sent on 202 and 429 when the project "
            "has a rate limit; absent for unlimited projects and for requests refused earlier."
        ),
        "X-RateLimit-Remaining": _integer_header(
            "Tokens (events) left in the project's bucket after this request."
        ),
        "X-RateLimit-Reset": _integer_header("Seconds until the bucket refills."),
        "Retry-After": _integer_header("Seconds to wait before retrying.", required=True),
        "WWW-Authenticate": {
            "description": "Always `Bearer`.",
            "required": True,
            "schema": {"type": "string", "const": "Bearer"},
        },
        "Allow": {
            "description": "The methods the path accepts.",
            "required": True,
            "schema": {"type": "string"},
        },
    }


def _json(schema_name: str) -> dict[str, Any]:
    return {"application/json": {"schema": _ref("schemas", schema_name)}}


def _error(
    description: str, schema: str = "Error", headers: dict[str, Any] | None = None
) -> dict[str, Any]:
    response: dict[str, Any] = {"description": description, "content": _json(schema)}
    if headers:
        response["headers"] = headers
    return response


def _responses(max_body_bytes: int) -> dict[str, Any]:
    header = _ref
    return {
        "BadRequest": _error(
            "Malformed HTTP request (e.g. a bad Content-Length or chunked framing).",
        ),
        "NotFound": _error('No such path: `{"error": "Not found"}`.'),
        "MethodNotAllowed": _error(
            "The path does not accept this method.", headers={"Allow": header("headers", "Allow")}
        ),
        "RequestTimeout": _error("Headers or body did not arrive in time; the connection closes."),
        "PayloadTooLarge": _error(
            f"The body as sent is larger than {max_body_bytes} bytes, or it inflates beyond "
            "the server's decompressed-body limit."
        ),
        "HeadersTooLarge": _error("Request headers are too large."),
        "InternalError": _error("Unexpected server error; nothing was stored."),
        "ServiceUnavailable": _error(
            "The server is at its connection limit or draining, or the commit log cannot take "
            "more events right now; nothing was stored and no tokens were spent.",
            headers={"Retry-After": header("headers", "Retry-After")},
        ),
    }


def _with_rate_limit_headers(response: dict[str, Any]) -> dict[str, Any]:
    headers = response.setdefault("headers", {})
    for name in ("X-RateLimit-Limit", "X-RateLimit-Remaining", "X-RateLimit-Reset"):
        headers[name] = _ref("headers", name)
    return response


def _common_errors() -> dict[str, Any]:
    """Statuses the HTTP layer can answer on any route."""
    return {
        "400": _ref("responses", "BadRequest"),
        "408": _ref("responses", "RequestTimeout"),
        "413": _ref("responses", "PayloadTooLarge"),
        "431": _ref("responses", "HeadersTooLarge"),
        "500": _ref("responses", "InternalError"),
        "503": _ref("responses", "ServiceUnavailable"),
    }


def _ingest_post(max_body_bytes: int) -> dict[str, Any]:
    batch = {"schema": _ref("schemas", "Batch")}
    # Copies, not $refs: every ingest response also lists the rate-limit headers.
    shared = _responses(max_body_bytes)
    responses: dict[str, Any] = {
        "202": {
            "description": "All events stored durably.",
            "content": _json("Accepted"),
        },
        "400": _error(
            "Invalid JSON, validation failed, an invalid compressed body, or a malformed HTTP "
            "request. The whole batch is refused; nothing was stored.",
            "ValidationError",
        ),
        "401": _error(
            "Missing or invalid API key.",
            headers={"WWW-Authenticate": _ref("headers", "WWW-Authenticate")},
        ),
        "403": _error(ORIGIN_REFUSED),
        "408": shared["RequestTimeout"],
        "409": _error(
            "A request with the same Idempotency-Key is still being stored; nothing was done. "
            "Retry after `Retry-After` seconds to get the first request's answer.",
            headers={"Retry-After": _ref("headers", "Retry-After")},
        ),
        "413": _error(
            f"The body is larger than {max_body_bytes} bytes as sent, or too large once "
            "inflated, or the batch holds more events than the project's whole per-minute "
            "limit: such a batch can never be accepted, so no "
            "`Retry-After` is sent; split it into batches of at most `X-RateLimit-Limit` events.",
        ),
        "415": _error(
            "Content-Type is not application/json or text/plain, or Content-Encoding is not "
            "gzip, deflate or identity."
        ),
        "429": _error(
            "Rate limit exceeded: the batch costs one token per event. Nothing was stored.",
            headers={"Retry-After": _ref("headers", "Retry-After")},
        ),
        "431": shared["HeadersTooLarge"],
        "500": shared["InternalError"],
        "503": _error(
            "The commit log cannot take more events right now, or the server is at its "
            "connection limit; nothing was stored and no tokens were spent.",
            headers={"Retry-After": _ref("headers", "Retry-After")},
        ),
    }
    for response in responses.values():
        _with_rate_limit_headers(response)
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
            **_common_errors(),
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
        "responses": {"200": ok, **_common_errors()},
    }


def _segment_id(description: str, max_length: int = 256) -> dict[str, Any]:
    return {
        "description": description,
        "anyOf": [
            {"type": "string", "maxLength": max_length},
            {"type": "number"},
            {"type": "null"},
        ],
    }


def _segment_message(message_type: str | None, limits: EventLimits) -> dict[str, Any]:
    """One Segment-spec message; ``message_type`` None: a /v1/batch item (type required)."""
    timestamp = {"type": ["string", "null"], "format": "date-time"}
    json_object = {"type": ["object", "null"]}
    name = {"type": ["string", "null"], "maxLength": 200}
    properties: dict[str, Any] = {
        "type": {"type": "string", "enum": list(MESSAGE_TYPES)}
        if message_type is None
        else {"type": ["string", "null"], "description": "Ignored: the path says the type."},
        "event": name,
        "name": name,
        "userId": _segment_id("Stored as user_id (a number as its decimal text)."),
        "anonymousId": _segment_id("Stored as anonymous_id."),
        "messageId": {"type": ["string", "null"], "maxLength": 256,
                      "description": "The dedup key: a retry with the same id stores nothing."},
        "groupId": _segment_id("group: stored as group_id."),
        "previousId": _segment_id("alias: stored as previous_id."),
        "timestamp": {**timestamp, "description": (
            "When it happened, by the client's clock; without a zone it is UTC. Corrected by "
            f"(received - sentAt) when that exceeds {SKEW_TOLERANCE_S:g} s; replaced by the "
            f"receive time if more than {MAX_FUTURE_S / 3600:g} h ahead or "
            f"{MAX_PAST_S / 86400:g} days behind it (the original is kept)."
        )},
        "sentAt": timestamp,
        "properties": json_object,
        "traits": json_object,
        "context": json_object,
        "integrations": json_object,
    }  # fmt: skip
    one_of_ids = [
        {"required": [field], "properties": {field: {"not": {"type": "null"}}}}
        for field in ("userId", "anonymousId")
    ]
    rules: list[dict[str, Any]] = [{"anyOf": one_of_ids}]
    needs: dict[str, tuple[str, dict[str, Any]]] = {
        "track": ("event", {"type": "string", "minLength": 1, "maxLength": 200}),
        "group": ("groupId", {"not": {"type": "null"}}),
        "alias": ("previousId", {"not": {"type": "null"}}),
    }
    for kind, (field, field_schema) in needs.items():
        requirement = {"required": [field], "properties": {field: field_schema}}
        if message_type is None:
            rules.append({"if": {"properties": {"type": {"const": kind}}, "required": ["type"]},
                          "then": requirement})  # fmt: skip
        elif message_type == kind:
            rules.append(requirement)
    schema: dict[str, Any] = {
        "type": "object",
        "properties": properties,
        "allOf": rules,
        "additionalProperties": True,
    }
    if message_type is None:
        schema["required"] = ["type"]
    else:
        schema["description"] = (
            "May carry the write key as `writeKey` instead of the Authorization header."
        )
    return schema


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
                    "items": _ref("schemas", "SegmentMessage"),
                },
                "sentAt": {"type": ["string", "null"], "format": "date-time"},
            },
            "description": "May carry the write key as `writeKey` instead of a header.",
            "additionalProperties": True,
        }
    else:
        body = _segment_message(message_type, limits)
    shared = _responses(max_body_bytes)
    responses: dict[str, Any] = {
        "200": {
            "description": (
                "Stored durably (or already stored: retried messageIds store nothing)."
            ),
            "content": _json("SegmentSuccess"),
        },
        "400": _error(
            "Invalid JSON or a message the Segment spec does not allow; nothing was stored.",
            "ValidationError",
        ),
        "401": _error(
            "Missing or invalid write key, or a body writeKey that disagrees with the header.",
            headers={"WWW-Authenticate": _ref("headers", "WWW-Authenticate")},
        ),
        "403": _error(ORIGIN_REFUSED),
        "408": shared["RequestTimeout"],
        "413": _error(
            f"The body is larger than {max_body_bytes} bytes as sent or too large once "
            "inflated, or it holds more messages than the project's whole per-minute limit."
        ),
        "415": _error(
            "Content-Type is not application/json or text/plain, or Content-Encoding is not "
            "gzip, deflate or identity."
        ),
        "429": _error(
            "Rate limit exceeded: one token per new message. Nothing was stored.",
            headers={"Retry-After": _ref("headers", "Retry-After")},
        ),
        "431": shared["HeadersTooLarge"],
        "500": shared["InternalError"],
        "503": _error(
            "Nothing was stored: the commit log cannot take more now, the server is at its "
            "connection limit, or a message of this batch is still being stored by an "
            "earlier attempt. Retry after `Retry-After` seconds.",
            headers={"Retry-After": _ref("headers", "Retry-After")},
        ),
    }
    for response in responses.values():
        _with_rate_limit_headers(response)
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
    health = {"application/json": {"schema": _ref("schemas", "Health")}}
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
            "schemas": _schemas(limits),
            "headers": _headers(),
            "responses": _responses(max_body_bytes),
        },
    }
