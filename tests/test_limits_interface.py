"""The limiter seam: every limiter and bucket the ingest path may be handed has what the
``Limiter`` and ``Bucket`` protocols declare (mypy checks the types; this checks the names and
parameters at run time, where mypy is not run)."""

from __future__ import annotations

import inspect

import pytest

from inslytic_fast.limits.globallimit import GlobalBucket, GlobalRateLimiter
from inslytic_fast.limits.interface import Bucket, Limiter
from inslytic_fast.limits.ratelimit import RateLimiter, TokenBucket
from inslytic_fast.limits.sharedlimit import LeasedBucket, SharedRateLimiter


def declared(protocol: type) -> dict[str, inspect.Signature | None]:
    """The protocol's members: a method's signature, or None for a property."""
    members: dict[str, inspect.Signature | None] = {}
    for name, value in vars(protocol).items():
        if isinstance(value, property):
            members[name] = None
        elif inspect.isfunction(value) and not name.startswith("_"):
            members[name] = inspect.signature(value)
    return members


def has_attribute(cls: type, name: str) -> bool:
    slots = {s for klass in cls.__mro__ for s in getattr(klass, "__slots__", ())}
    return name in slots or hasattr(cls, name)


@pytest.mark.parametrize(
    ("protocol", "implementation"),
    [
        (Limiter, RateLimiter),
        (Limiter, SharedRateLimiter),
        (Limiter, GlobalRateLimiter),
        (Bucket, TokenBucket),
        (Bucket, LeasedBucket),
        (Bucket, GlobalBucket),
    ],
)
def test_each_limiter_and_bucket_implements_the_declared_seam(protocol, implementation):
    members = declared(protocol)
    assert members, "the protocol declares nothing"
    for name, signature in members.items():
        assert has_attribute(implementation, name), f"{implementation.__name__} lacks {name}"
        if signature is not None:
            implemented = inspect.signature(getattr(implementation, name))
            assert list(implemented.parameters) == list(signature.parameters), (
                f"{implementation.__name__}.{name}{implemented} is not {name}{signature}"
            )
