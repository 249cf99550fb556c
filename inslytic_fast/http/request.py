"""A complete HTTP request, as the protocol hands it to the app."""

from __future__ import annotations


class Request:
    """What the protocol hands over once a request is complete."""

    __slots__ = (
        "method",
        "path",
        "authorization",
        "content_type",
        "content_encoding",
        "origin",
        "idempotency_key",
        "forwarded_for",
        "project",
        "body",
        "keep_alive",
    )

    def __init__(self) -> None:
        self.method = b""
        self.path = b""
        self.authorization: bytes | None = None
        self.content_type: bytes | None = None
        self.content_encoding: bytes | None = None
        self.origin: bytes | None = None
        self.idempotency_key: bytes | None = None
        self.forwarded_for: bytes | None = None  # X-Forwarded-For, for the access log
        self.project: str | None = None  # the authenticated project, for the access log
        self.body = b""
        self.keep_alive = True
