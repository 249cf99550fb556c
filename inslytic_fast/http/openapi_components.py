"""The reusable parts of the OpenAPI document (openapi.py): ``$ref`` helpers and the
components every operation points at, the event and error schemas, the response headers and
the responses the HTTP layer can give on any route."""

from __future__ import annotations

from typing import Any

from ..ingest.schema import DEVICE_TYPES, MAX_ERROR_DETAILS, EventLimits, FieldSpec, event_fields
from ..ingest.segment import MAX_FUTURE_S, MAX_PAST_S, MESSAGE_TYPES, SKEW_TOLERANCE_S

_REF = "#/components/{}/{}"


def ref(section: str, name: str) -> dict[str, str]:
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


def component_schemas(limits: EventLimits) -> dict[str, Any]:
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
                    "items": ref("schemas", "Event"),
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
        "SegmentMessage": segment_message(None, limits),
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


def component_headers() -> dict[str, Any]:
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


def json_content(schema_name: str) -> dict[str, Any]:
    return {"application/json": {"schema": ref("schemas", schema_name)}}


def error_response(
    description: str, schema: str = "Error", headers: dict[str, Any] | None = None
) -> dict[str, Any]:
    response: dict[str, Any] = {"description": description, "content": json_content(schema)}
    if headers:
        response["headers"] = headers
    return response


def component_responses(max_body_bytes: int) -> dict[str, Any]:
    header = ref
    return {
        "BadRequest": error_response(
            "Malformed HTTP request (e.g. a bad Content-Length or chunked framing).",
        ),
        "NotFound": error_response('No such path: `{"error": "Not found"}`.'),
        "MethodNotAllowed": error_response(
            "The path does not accept this method.", headers={"Allow": header("headers", "Allow")}
        ),
        "RequestTimeout": error_response(
            "Headers or body did not arrive in time; the connection closes."
        ),
        "PayloadTooLarge": error_response(
            f"The body as sent is larger than {max_body_bytes} bytes, or it inflates beyond "
            "the server's decompressed-body limit."
        ),
        "HeadersTooLarge": error_response("Request headers are too large."),
        "InternalError": error_response("Unexpected server error; nothing was stored."),
        "ServiceUnavailable": error_response(
            "The server is at its connection limit or draining, or the commit log cannot take "
            "more events right now; nothing was stored and no tokens were spent.",
            headers={"Retry-After": header("headers", "Retry-After")},
        ),
    }


def with_rate_limit_headers(response: dict[str, Any]) -> dict[str, Any]:
    headers = response.setdefault("headers", {})
    for name in ("X-RateLimit-Limit", "X-RateLimit-Remaining", "X-RateLimit-Reset"):
        headers[name] = ref("headers", name)
    return response


def common_errors() -> dict[str, Any]:
    """Statuses the HTTP layer can answer on any route."""
    return {
        "400": ref("responses", "BadRequest"),
        "408": ref("responses", "RequestTimeout"),
        "413": ref("responses", "PayloadTooLarge"),
        "431": ref("responses", "HeadersTooLarge"),
        "500": ref("responses", "InternalError"),
        "503": ref("responses", "ServiceUnavailable"),
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


def segment_message(message_type: str | None, limits: EventLimits) -> dict[str, Any]:
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
