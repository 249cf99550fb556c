"""A running server picks up catalog changes made by the CLI within 2 s, without a restart."""

from __future__ import annotations

import time

import pytest

from .conftest import EXAMPLE_EVENT, cli

RELOAD_DEADLINE_S = 2.5  # the promise is 2 s (1 s tick + mtime poll); a little slack for CI


def wait_for_status(
    server, key: str, wanted: int, events=None, in_a_row: int = 6, deadline_s=RELOAD_DEADLINE_S
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

    rotated = (
        cli("projects", "rotate-key", "shop", "--keep-old-for", "8", data_dir=data_dir)
        .stdout.strip()
        .splitlines()[-1]
    )
    wait_for_status(server, rotated, 202)
    assert server.ingest([EXAMPLE_EVENT], new_key)[0] == 202, "old key valid during overlap"

    cli("projects", "set-limit", "shop", "3", data_dir=data_dir)
    # 4 events can never fit a limit of 3 a minute: 413, not a 429 inviting a retry.
    wait_for_status(server, rotated, 413, events=[EXAMPLE_EVENT] * 4)
    cli("projects", "set-limit", "shop", "unlimited", data_dir=data_dir)
    wait_for_status(server, rotated, 202, events=[EXAMPLE_EVENT] * 4)

    # The old key expires 8 s after the rotation: then every worker refuses it.
    wait_for_status(server, new_key, 401, deadline_s=8 + RELOAD_DEADLINE_S)
    assert server.ingest([EXAMPLE_EVENT], rotated)[0] == 202

    prefix = rotated[:12]
    cli("projects", "revoke-key", "shop", prefix, data_dir=data_dir)
    wait_for_status(server, rotated, 401)
    assert server.request("GET", "/health")[0] == 200
    assert server.stop() == 0
