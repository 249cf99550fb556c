"""An ingest request's body as sent: its media type and its Content-Encoding, undone."""

from __future__ import annotations

import zlib

from . import errors

JSON_MEDIA_TYPES = (b"application/json", b"text/plain")  # text/plain: navigator.sendBeacon
# gzip's magic bytes (RFC 1952 s2.3.1): a beacon cannot set Content-Encoding, so a body that
# starts with them is read as gzip (JSON text never starts with 0x1f).
GZIP_MAGIC = b"\x1f\x8b"


def is_beacon(content_type: bytes | None) -> bool:
    """text/plain: what navigator.sendBeacon sends (it cannot set headers)."""
    return content_type is not None and content_type[:10].lower() == b"text/plain"


def check_media_type(content_type: bytes | None) -> None:
    """Raise a 415 IngestError unless the body may be JSON."""
    # None: curl -d without -H; be lenient, the body decides.
    if content_type is None or content_type == b"application/json":
        return
    media_type = content_type.partition(b";")[0].strip().lower()
    if media_type not in JSON_MEDIA_TYPES:
        raise errors.unsupported_media_type()


def decode_body(body: bytes, content_encoding: bytes | None, limit: int) -> bytes:
    """Undo Content-Encoding, inflating at most ``limit`` bytes (a gzip bomb stops at the cap);
    raises an IngestError (415 unknown coding, 413 over the cap, 400 broken stream).

    Without Content-Encoding, a body starting with gzip's magic bytes is gzip (see GZIP_MAGIC).
    """
    if content_encoding is None:
        if body[:2] != GZIP_MAGIC:
            return body
        content_encoding = b"gzip"
    encoding = content_encoding.strip().lower()
    if encoding in (b"", b"identity"):
        return body
    if encoding in (b"gzip", b"x-gzip"):
        wbits = 16 + zlib.MAX_WBITS
    elif encoding == b"deflate":
        # RFC 9110 says zlib-wrapped; some clients send raw deflate. The zlib header's
        # first two bytes are a multiple of 31 (RFC 1950 s2.2), raw deflate's usually are not.
        zlib_wrapped = (
            len(body) >= 2 and (body[0] & 0x0F) == 8 and (body[0] << 8 | body[1]) % 31 == 0
        )
        wbits = zlib.MAX_WBITS if zlib_wrapped else -zlib.MAX_WBITS
    else:
        raise errors.unsupported_encoding()
    inflater = zlib.decompressobj(wbits)
    try:
        out = inflater.decompress(body, limit + 1)
    except zlib.error as exc:
        raise errors.invalid_compression(str(exc)) from None
    if len(out) > limit:
        raise errors.inflated_too_large(limit)
    if not inflater.eof:
        raise errors.invalid_compression("the stream is truncated")
    return out
