"""Tests for inslytic_fast.http.openapi: a valid OpenAPI 3.1 document matching the server."""

from __future__ import annotations

import json
import re

import orjson
import pytest

from inslytic_fast.http import app
from inslytic_fast.http.openapi import CONTENT_ENCODINGS, build_openapi
from inslytic_fast.ingest import body as ingest_body
from inslytic_fast.ingest.errors import MAX_IDEMPOTENCY_KEY_LENGTH
from inslytic_fast.ingest.schema import DEVICE_TYPES, MAX_ERROR_DETAILS, EventLimits, event_fields
from inslytic_fast.ingest.segment import SEGMENT_ROUTES

MAX_BODY_BYTES = 5 * 1024 * 1024
LIMITS = EventLimits()
DOC = build_openapi(LIMITS, max_body_bytes=MAX_BODY_BYTES, server_version="1.2.3")
INGEST = DOC["paths"]["/v1/ingest"]["post"]
EVENT = DOC["components"]["schemas"]["Event"]
HTTP_METHODS = {"get", "put", "post", "delete", "options", "head", "patch", "trace"}


def resolve(ref: str, document: dict = DOC):
    assert ref.startswith("#/"), ref
    node = document
    for part in ref[2:].split("/"):
        node = node[part.replace("~1", "/").replace("~0", "~")]
    return node


def deref(node, document: dict = DOC):
    while isinstance(node, dict) and "$ref" in node:
        node = resolve(node["$ref"], document)
    return node


def walk(node, path=()):
    yield path, node
    if isinstance(node, dict):
        for key, value in node.items():
            yield from walk(value, (*path, key))
    elif isinstance(node, list):
        for index, value in enumerate(node):
            yield from walk(value, (*path, index))


def operations(document: dict = DOC):
    for path, item in document["paths"].items():
        for method, operation in item.items():
            if method in HTTP_METHODS:
                yield path, method, operation


# --------------------------------------------------------------------------- document structure


def test_document_is_json_serialisable_and_stable():
    encoded = orjson.dumps(DOC)
    assert json.loads(encoded) == DOC
    assert DOC["openapi"] == "3.1.0"
    assert DOC["info"]["version"] == "1.2.3"
    again = build_openapi(LIMITS, max_body_bytes=MAX_BODY_BYTES, server_version="1.2.3")
    assert orjson.dumps(again) == encoded


def test_every_ref_resolves():
    refs = [node["$ref"] for _, node in walk(DOC) if isinstance(node, dict) and "$ref" in node]
    assert len(refs) > 20
    for ref in refs:
        assert isinstance(resolve(ref), dict), ref


def test_every_component_is_used():
    used = {node["$ref"] for _, node in walk(DOC) if isinstance(node, dict) and "$ref" in node}
    for section, components in DOC["components"].items():
        if section == "securitySchemes":
            continue
        for name in components:
            ref = f"#/components/{section}/{name}"
            # 404 and 405 are documented once as components (no route lists them).
            if ref not in used:
                assert name in ("NotFound", "MethodNotAllowed"), ref


def test_operations_are_well_formed():
    ids = [operation["operationId"] for _, _, operation in operations()]
    assert len(ids) == len(set(ids))
    for path, method, operation in operations():
        assert operation["responses"], (path, method)
        for status, response in operation["responses"].items():
            response = deref(response)
            assert status.isdigit() and 100 <= int(status) < 600, (path, method, status)
            assert response["description"], (path, method, status)
        for parameter in operation.get("parameters", []):
            # OpenAPI ignores header parameters with these names (they have their own fields).
            assert parameter["name"] not in ("Accept", "Content-Type", "Authorization")


EXPECTED = {
    ("/v1/ingest", "post"): {"202", "400", "401", "413", "415", "429", "503"},
    ("/v1/ingest", "options"): {"204"},
    ("/health", "get"): {"200"},
    ("/openapi.json", "get"): {"200"},
}


@pytest.mark.parametrize(("path", "method"), sorted(EXPECTED))
def test_routes_and_statuses_exist(path, method):
    operation = DOC["paths"][path][method]
    assert EXPECTED[(path, method)] <= set(operation["responses"])


def test_security():
    assert DOC["components"]["securitySchemes"]["bearerAuth"] == {
        "type": "http",
        "scheme": "bearer",
        "description": "The project API key: `Authorization: Bearer <key>`.",
    }
    assert DOC["security"] == [{"bearerAuth": []}]
    assert "security" not in INGEST  # inherits the bearer requirement
    for path, method, operation in operations():
        if path.encode() in SEGMENT_ROUTES and method == "post":
            # Segment SDKs send the key as the Basic user name; Bearer works too.
            assert operation["security"] == [{"basicAuth": []}, {"bearerAuth": []}]
        elif (path, method) != ("/v1/ingest", "post"):
            assert operation["security"] == [], (path, method)


def test_not_found_and_method_not_allowed_are_documented():
    responses = DOC["components"]["responses"]
    assert "Not found" in responses["NotFound"]["description"]
    assert responses["MethodNotAllowed"]["headers"]["Allow"] == {
        "$ref": "#/components/headers/Allow"
    }
    assert "405" in DOC["info"]["description"] and "404" in DOC["info"]["description"]


# --------------------------------------------------------------------------- ingest operation


def test_idempotency_key_pattern_is_what_the_server_accepts():
    [parameter] = [p for p in INGEST["parameters"] if p["name"] == "Idempotency-Key"]
    pattern = re.compile(parameter["schema"]["pattern"])
    for good in ("a", "order-77", "a b", "~" * MAX_IDEMPOTENCY_KEY_LENGTH):
        assert pattern.match(good), good
    for bad in ("", " a", "a ", "é", "a\tb", "x" * (MAX_IDEMPOTENCY_KEY_LENGTH + 1)):
        assert not pattern.match(bad), bad


def test_segment_routes_are_documented():
    for route in SEGMENT_ROUTES:
        post = DOC["paths"][route.decode()]["post"]
        assert {"200", "400", "401", "403", "413", "429", "503"} <= set(post["responses"])
    assert {"403", "409"} <= set(INGEST["responses"])


def test_request_body_media_types_match_the_server():
    content = INGEST["requestBody"]["content"]
    assert INGEST["requestBody"]["required"] is True
    assert set(content) == {media.decode() for media in ingest_body.JSON_MEDIA_TYPES}
    for media in content.values():
        assert media["schema"] == {"$ref": "#/components/schemas/Batch"}


def test_content_encoding_parameter():
    [parameter] = [p for p in INGEST["parameters"] if p["name"] == "Content-Encoding"]
    assert parameter["in"] == "header"
    assert set(parameter["schema"]["enum"]) == set(CONTENT_ENCODINGS)
    assert {"gzip", "deflate", "identity"} <= set(CONTENT_ENCODINGS)


def test_every_ingest_response_documents_rate_limit_headers():
    for status, response in INGEST["responses"].items():
        headers = deref(response)["headers"]
        for name in ("X-RateLimit-Limit", "X-RateLimit-Remaining", "X-RateLimit-Reset"):
            header = deref(headers[name])
            assert header["schema"] == {"type": "integer"}, (status, name)
            assert header["required"] is False  # unlimited projects get none


@pytest.mark.parametrize(
    ("status", "header"),
    [("401", "WWW-Authenticate"), ("429", "Retry-After"), ("503", "Retry-After")],
)
def test_required_response_headers(status, header):
    documented = deref(deref(INGEST["responses"][status])["headers"][header])
    assert documented["required"] is True


def test_response_bodies():
    responses = {status: deref(r) for status, r in INGEST["responses"].items()}
    accepted = deref(responses["202"]["content"]["application/json"]["schema"])
    assert accepted["required"] == ["accepted"]
    assert accepted["properties"]["accepted"]["type"] == "integer"
    error = deref(responses["400"]["content"]["application/json"]["schema"])
    assert error["required"] == ["error"]
    assert error["properties"]["error"] == {"type": "string"}
    assert error["properties"]["details"]["items"] == {"type": "string"}
    assert error["properties"]["details"]["maxItems"] == MAX_ERROR_DETAILS
    for status in ("401", "413", "415", "429", "503"):
        schema = deref(responses[status]["content"]["application/json"]["schema"])
        assert schema["required"] == ["error"], status
    assert str(MAX_BODY_BYTES) in responses["413"]["description"]
    # A batch over the project's whole limit is a 413 that says retrying cannot help.
    assert "per-minute limit" in responses["413"]["description"]
    assert "Retry-After" not in responses["413"].get("headers", {})


def test_preflight_headers_match_the_app():
    headers = DOC["paths"]["/v1/ingest"]["options"]["responses"]["204"]["headers"]
    sent = dict(
        line.split(": ", 1) for line in app.PREFLIGHT_HEADERS.decode().split("\r\n") if line
    )
    assert (
        headers["Access-Control-Allow-Methods"]["schema"]["const"]
        == (sent["Access-Control-Allow-Methods"])
    )
    assert (
        headers["Access-Control-Allow-Headers"]["schema"]["const"]
        == (sent["Access-Control-Allow-Headers"])
    )
    assert headers["Access-Control-Max-Age"]["required"] is True
    assert "content" not in DOC["paths"]["/v1/ingest"]["options"]["responses"]["204"]


def test_health_and_openapi_routes():
    health = DOC["paths"]["/health"]["get"]["responses"]["200"]
    schema = deref(health["content"]["application/json"]["schema"])
    assert schema["properties"]["status"] == {"const": "ok"}
    assert json.loads(app.HEALTH_BODY) == {"status": "ok"}
    document = DOC["paths"]["/openapi.json"]["get"]["responses"]["200"]
    assert document["content"]["application/json"]["schema"]["type"] == "object"
    for path in ("/health", "/openapi.json"):
        assert "content" not in DOC["paths"][path]["head"]["responses"]["200"]


# --------------------------------------------------------------------------- schemas vs limits


def test_batch_schema_matches_limits():
    events = DOC["components"]["schemas"]["Batch"]["properties"]["events"]
    assert (events["minItems"], events["maxItems"]) == (1, LIMITS.max_events)
    assert DOC["components"]["schemas"]["Batch"]["required"] == ["events"]


def test_event_required_fields_match_the_decoder():
    assert EVENT["required"] == [s.name for s in event_fields(LIMITS) if s.required]
    assert EVENT["required"] == [
        "eventName", "timestamp", "anonymousId", "sessionId", "consentGiven"
    ]  # fmt: skip
    assert list(EVENT["properties"]) == [s.name for s in event_fields(LIMITS)]
    assert EVENT["additionalProperties"] is True


def test_event_lengths_match_event_limits():
    props = EVENT["properties"]
    limits = LIMITS
    expected_max = {
        "eventName": limits.max_name_length,
        "anonymousId": limits.max_id_length,
        "sessionId": limits.max_id_length,
        "userId": limits.max_id_length,
        "pageUrl": limits.max_url_length,
        "referrer": limits.max_url_length,
        "pageTitle": limits.max_text_length,
        "utmSource": limits.max_text_length,
        "utmMedium": limits.max_text_length,
        "utmCampaign": limits.max_text_length,
        "browser": limits.max_text_length,
        "os": limits.max_text_length,
    }
    assert {name: p["maxLength"] for name, p in props.items() if "maxLength" in p} == expected_max
    assert {name for name, p in props.items() if p.get("minLength") == 1} == {
        "eventName", "anonymousId", "sessionId"
    }  # fmt: skip
    assert EVENT["x-inslytic-max-event-bytes"] == limits.max_event_bytes


def test_event_types():
    props = EVENT["properties"]
    for spec in event_fields(LIMITS):
        types = props[spec.name]["type"]
        types = types if isinstance(types, list) else [types]
        assert ("null" in types) == (not spec.required), spec.name
    assert (props["timestamp"]["type"], props["timestamp"]["format"]) == ("string", "date-time")
    assert props["consentGiven"]["type"] == "boolean"
    assert props["deviceType"]["enum"] == [*DEVICE_TYPES, None]
    properties = props["properties"]
    assert properties["maxProperties"] == LIMITS.max_properties
    assert properties["propertyNames"] == {"maxLength": LIMITS.max_property_key_length}
    assert properties["additionalProperties"] == {
        "type": "string",
        "maxLength": LIMITS.max_property_value_length,
    }


def test_custom_limits_flow_into_the_document():
    limits = EventLimits(
        max_events=10, max_event_bytes=999, max_name_length=11, max_id_length=12,
        max_url_length=13, max_text_length=14, max_properties=15,
        max_property_key_length=16, max_property_value_length=17,
    )  # fmt: skip
    document = build_openapi(limits, max_body_bytes=4096, server_version="dev")
    schemas = document["components"]["schemas"]
    event = schemas["Event"]["properties"]
    assert schemas["Batch"]["properties"]["events"]["maxItems"] == 10
    assert [event[n]["maxLength"] for n in ("eventName", "userId", "referrer", "os")] == [
        11, 12, 13, 14
    ]  # fmt: skip
    assert event["properties"]["maxProperties"] == 15
    assert event["properties"]["propertyNames"]["maxLength"] == 16
    assert event["properties"]["additionalProperties"]["maxLength"] == 17
    assert "999 bytes" in schemas["Event"]["description"]
    assert "4096" in document["paths"]["/v1/ingest"]["post"]["description"]


def test_validation_error_example_is_what_the_decoder_says():
    from inslytic_fast.ingest.schema import BatchRejected, Schema

    [example] = DOC["components"]["schemas"]["ValidationError"]["examples"]
    body = b'{"events": [{"anonymousId": "a", "sessionId": "s", "consentGiven": true}]}'
    with pytest.raises(BatchRejected) as caught:
        Schema(LIMITS).decode(body)
    assert caught.value.as_dict() == example


# --------------------------------------------------------------------------- external validators


def test_openapi_spec_validator_accepts_the_document():
    validator = pytest.importorskip("openapi_spec_validator")
    validator.validate(json.loads(orjson.dumps(DOC)))


def test_schema_valid_events_are_accepted_by_the_decoder():
    """JSON-Schema-valid events are accepted unless they break the byte cap (stated in prose)."""
    jsonschema = pytest.importorskip("jsonschema")
    from inslytic_fast.ingest.schema import BatchRejected, Schema

    schemas = json.loads(json.dumps(DOC["components"]["schemas"]).replace(
        "#/components/schemas/", "#/$defs/"
    ))  # fmt: skip
    validator = jsonschema.Draft202012Validator(
        {"$defs": schemas, **schemas["Batch"]},
        format_checker=jsonschema.Draft202012Validator.FORMAT_CHECKER,
    )
    schema = Schema(LIMITS)
    samples = [
        {"events": [{"eventName": "a", "timestamp": "2026-02-16T10:30:00Z", "anonymousId": "x",
                     "sessionId": "y", "consentGiven": False, "deviceType": None,
                     "properties": {"k": "v"}, "extra": [1]}]},
        {"events": [{"eventName": "a", "timestamp": "2026-02-16T10:30:00+02:00",
                     "anonymousId": "x", "sessionId": "y", "consentGiven": True,
                     "utmSource": None, "os": ""}], "sentAt": 1},
    ]  # fmt: skip
    for sample in samples:
        assert validator.is_valid(sample)
        schema.decode(json.dumps(sample).encode())
    invalid = {"events": [{"eventName": "", "timestamp": "x"}]}
    assert not validator.is_valid(invalid)
    with pytest.raises(BatchRejected):
        schema.decode(json.dumps(invalid).encode())
