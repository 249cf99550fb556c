"""A running server picks up catalog changes made by the CLI without a restart (within 2 s on a
quiet machine: the 1 s tick and an mtime poll)."""

from __future__ import annotations

import time

import pytest

from .adversarial_helpers import TICK_DEADLINE_S
from .conftest import EXAMPLE_EVENT, cli

# How long the rotated-out key stays valid: long enough that the overlap is still open when
# the new key has reached every worker, even when the ticks that bring it are late under load.
KEEP_OLD_FOR_S = 10


def wait_for_status(
    server, key: str, wanted: int, events=None, in_a_row: int = 6, deadline_s=TICK_DEADLINE_S
) -> float:
    """Seconds until ingests with ``key`` answer ``wanted`` ``in_a_row`` times (each on a new
    connection, so with several workers all of them have reloaded); fails past the deadline."""
    start = time.monotonic()
    streak = 0
    while streak < in_a_row:
        status = server.ingest(events or [EXAMPLE_EVENT], key)[0]
        elapsed = time.monotonic() - start
        streak = streak + 1 if status == wanted else 0
        assert elapsed < deadline_s, f"still {status} after {elapsed:.1f} s"
        if streak == 0:
            time.sleep(0.05)
    return time.monotonic() - start


@pytest.mark.parametrize("workers", ["1", "2"])
def test_create_rotate_revoke_and_limits_reach_a_running_server(make_server, tmp_path, workers):
    server = make_server("--workers", workers)
    data_dir = server.data_dir
    new_key = cli("projects", "create", "shop", data_dir=data_dir).stdout.strip().splitlines()[-1]
    wait_for_status(server, new_key, 202)

    rotating = ("projects", "rotate-key", "shop", "--keep-old-for", str(KEEP_OLD_FOR_S))
    rotated_at = time.monotonic()
    rotated = cli(*rotating, data_dir=data_dir).stdout.strip().splitlines()[-1]
    wait_for_status(server, rotated, 202)
    assert time.monotonic() - rotated_at < KEEP_OLD_FOR_S, "the overlap closed before the reload"
    assert server.ingest([EXAMPLE_EVENT], new_key)[0] == 202, "old key valid during overlap"

    cli("projects", "set-limit", "shop", "3", data_dir=data_dir)
    # 4 events can never fit a limit of 3 a minute: 413, not a 429 inviting a retry.
    wait_for_status(server, rotated, 413, events=[EXAMPLE_EVENT] * 4)
    cli("projects", "set-limit", "shop", "unlimited", data_dir=data_dir)
    wait_for_status(server, rotated, 202, events=[EXAMPLE_EVENT] * 4)

    # The old key expires KEEP_OLD_FOR_S after the rotation: then every worker refuses it.
    wait_for_status(server, new_key, 401, deadline_s=KEEP_OLD_FOR_S + TICK_DEADLINE_S)
    assert server.ingest([EXAMPLE_EVENT], rotated)[0] == 202

    prefix = rotated[:12]
    cli("projects", "revoke-key", "shop", prefix, data_dir=data_dir)
    wait_for_status(server, rotated, 401)
    assert server.request("GET", "/health")[0] == 200
    assert server.stop() == 0
