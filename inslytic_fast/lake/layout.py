"""The lake's layout: where an uploaded file lands, and which objects a reader should use.

::

    <prefix>/events/<the file's directory, as in events/>/<node>-<file name>
    <prefix>/_compactions/<id>.json      a lake compaction's intent: partition, inputs, output

Names are deterministic (the node id and the roller's own name, which comes from a segment
that exists once), so a retry, a replay after a crash or a second uploader over the same tree
all aim at the same object. Intents stay after their merge as its record: the keys they list
as inputs hold rows that now live in the output (``merged_away``).
"""

from __future__ import annotations

from typing import TypedDict

import orjson

from .objectstore import ObjectInfo, ObjectStore

LAKE_EVENTS = "events"
LAKE_INTENTS = "_compactions"


class LakeIntent(TypedDict):
    partition: str
    inputs: list[str]
    output: str


def object_key(node: str, relative: str) -> str:
    """The lake key of a local file ``relative`` to events/ (POSIX separators)."""
    directory, _, name = relative.rpartition("/")
    return (
        f"{LAKE_EVENTS}/{directory}/{node}-{name}" if directory else f"{LAKE_EVENTS}/{node}-{name}"
    )


def read_intents(store: ObjectStore) -> dict[str, LakeIntent]:
    """The lake's compaction intents by key (kept after their merge, as its record)."""
    intents: dict[str, LakeIntent] = {}
    for info in store.list(LAKE_INTENTS + "/"):
        try:
            intents[info.key] = orjson.loads(store.get_bytes(info.key))
        except FileNotFoundError:
            continue  # undone by a recovering leader meanwhile
    return intents


def merged_away(intents: dict[str, LakeIntent], present: set[str]) -> set[str]:
    """Keys whose rows live in another object: inputs of an intent whose output is present,
    or was itself merged further (a small output can be the input of a later compaction)."""
    gone: set[str] = set()
    changed = True
    while changed:
        changed = False
        for intent in intents.values():
            if intent["output"] in present or intent["output"] in gone:
                before = len(gone)
                gone.update(intent["inputs"])
                changed |= len(gone) != before
    return gone


def lake_listing(store: ObjectStore) -> tuple[dict[str, ObjectInfo], set[str]]:
    """The lake's event objects a reader should use, and every key compacted away.

    Intents are read after the listing (as storage/query.py does locally): an output seen in
    the listing was written after its intent, and the intent outlives the inputs it names, so
    an input still listed beside its output is dropped rather than read twice."""
    listing = {info.key: info for info in store.list(LAKE_EVENTS + "/")}
    gone = merged_away(read_intents(store), set(listing))
    for key in gone:
        listing.pop(key, None)
    return listing, gone
