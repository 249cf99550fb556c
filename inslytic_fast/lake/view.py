"""``query``/``export --lake``: the lake plus this node's local data not yet in it.

A reader: it lists and downloads objects, and never uploads or deletes one.
"""

from __future__ import annotations

import os
from pathlib import Path

from ..storage.layout import EVENTS_DIRNAME
from ..storage.query import Snapshot
from .layout import LAKE_EVENTS, lake_listing, object_key
from .objectstore import LakeError, ObjectInfo, ObjectStore, parse_lake_url
from .purges import as_local_purges, read_lake_purges


class LakeView:
    """Called with a local snapshot (query.take_snapshot, taken first), it drops the local
    files that are already in the lake under this node's name (uploaded, or uploaded and
    compacted) and adds the lake's objects, downloaded into ``cache_dir`` (kept between runs,
    keyed by object name; objects never change under a name, so a cached copy of the right
    size is the object). Another node's files that are not uploaded yet are not seen. The
    lake's purge tombstones join the snapshot's, so purged rows are filtered wherever they
    still are (lake/purges.py)."""

    def __init__(self, store: ObjectStore, node: str, data_dir: Path, cache_dir: Path) -> None:
        self.store = store
        self.node = node
        self.events_dir = Path(data_dir) / EVENTS_DIRNAME
        self.cache_dir = Path(cache_dir)

    def __call__(self, snapshot: Snapshot) -> None:
        try:
            self._extend(snapshot)
        except (FileNotFoundError, LakeError):
            raise  # FileNotFoundError: an object went meanwhile; the query retries
        except Exception as exc:  # the client's own errors: unreachable, denied, ...
            raise LakeError(f"cannot read the lake: {type(exc).__name__}: {exc}") from None

    def _extend(self, snapshot: Snapshot) -> None:
        # Tombstones first: a purge deletes objects only after writing its tombstone.
        snapshot.purges = snapshot.purges + as_local_purges(read_lake_purges(self.store))
        listing, gone = lake_listing(self.store)
        local = []
        for path in snapshot.parquet_files:
            key = object_key(self.node, path.relative_to(self.events_dir).as_posix())
            if key not in listing and key not in gone:
                local.append(path)
        snapshot.parquet_files = local + [self._cached(info) for info in listing.values()]
        self._prune(listing)

    def _cached(self, info: ObjectInfo) -> Path:
        path = self.cache_dir / info.key
        try:
            if path.stat().st_size == info.size:
                return path
        except FileNotFoundError:
            pass
        path.parent.mkdir(parents=True, exist_ok=True)
        partial = path.with_name(f".{path.name}.{os.getpid()}.part")
        self.store.get_file(info.key, partial)
        os.replace(partial, path)
        return path

    def _prune(self, listing: dict[str, ObjectInfo]) -> None:
        """Cached objects the lake no longer has (compacted, retention) leave the cache."""
        root = self.cache_dir / LAKE_EVENTS
        for directory, _, names in os.walk(root):
            for name in names:
                path = Path(directory) / name
                if path.relative_to(self.cache_dir).as_posix() not in listing:
                    path.unlink(missing_ok=True)


def default_cache_dir(lake_url: str) -> Path:
    bucket, prefix = parse_lake_url(lake_url)
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return base / "inslytic-fast" / "lake" / bucket / prefix
