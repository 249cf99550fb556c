"""Where an ingest request's key comes from: the Authorization header (Bearer, or HTTP Basic
on the Segment routes) or a ``writeKey`` field in the body (a beacon cannot set headers)."""

from __future__ import annotations

import base64
import binascii

import msgspec

from . import errors


class _BodyKey(msgspec.Struct):
    """The write key a body may carry (Segment's ``writeKey``; sendBeacon cannot set headers)."""

    writeKey: str | None = None  # noqa: N815 - the SDKs' spelling


_body_key_decoder = msgspec.json.Decoder(_BodyKey)


def bearer_token(authorization: bytes | None, *, basic: bool = False) -> bytes:
    """The key of an Authorization header; ``basic``: also HTTP Basic with the key as user
    name (Segment's write key: ``base64(key + ":")``). Raises a 401 IngestError."""
    if authorization is not None and authorization.startswith(b"Bearer "):
        token = authorization[7:].strip()  # what SDKs send: no partition, no lower()
        if token:
            return token
    if authorization is None:
        raise errors.unauthorized("Missing API key: send 'Authorization: Bearer <key>'")
    scheme, _, token = authorization.strip().partition(b" ")
    if basic and scheme.lower() == b"basic":
        try:
            user = base64.b64decode(token.strip(), validate=True).partition(b":")[0]
        except (binascii.Error, ValueError):
            raise errors.unauthorized(
                "Authorization: Basic credentials are not valid base64"
            ) from None
        if not user:
            raise errors.unauthorized("Missing write key: the Basic user name is empty")
        return user
    if scheme.lower() != b"bearer":  # RFC 9110 s11.1: auth schemes are case-insensitive
        raise errors.unauthorized("Authorization must use the Bearer scheme")
    token = token.strip()
    if not token:
        raise errors.unauthorized("Missing API key: the Bearer token is empty")
    return token


def body_write_key(body: bytes) -> str | None:
    """The body's ``writeKey`` field, or None (also for a body that is not JSON: the schema
    explains what is wrong with it)."""
    try:
        return _body_key_decoder.decode(body).writeKey
    except (msgspec.DecodeError, UnicodeDecodeError, RecursionError):
        return None
