"""The official Node SDK (@segment/analytics-node, npm), unmodified, against a real server."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest

from .sdk_helpers import (
    AnswerLosingProxy,
    duplicate_message_ids,
    expected_rows,
    mapped_rows,
    sdk_test_server,
)

NODE_DIR = Path(__file__).parent / "sdk" / "node"
NODE = shutil.which("node")

pytestmark = [
    pytest.mark.skipif(NODE is None, reason="node is not installed"),
    pytest.mark.skipif(
        not (NODE_DIR / "node_modules" / "@segment" / "analytics-node").is_dir(),
        reason="run `npm ci` in tests/sdk/node (.ci/run does)",
    ),
]


def send(host: str, key: str, tag: str) -> dict:
    done = subprocess.run(
        [NODE, "send.mjs", host, key, tag], cwd=NODE_DIR, capture_output=True, text=True,
        timeout=120,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.strip().splitlines()[-1])


def expected(tag: str) -> dict[str, tuple]:
    rows = expected_rows(tag, "@segment/analytics-node")
    lib, user = "@segment/analytics-node", f"user-{tag}"
    rows["screen"] = ("Home", user, None, None, None, None, None, None, None, lib, True, True)
    return rows


@pytest.fixture(scope="module")
def node_server(tmp_path_factory):
    yield from sdk_test_server(tmp_path_factory, "node-sdk")


def test_every_call_is_stored_with_the_segment_mapping(node_server):
    assert send(node_server.url, node_server.first_run_key, "node") == {"errors": []}
    assert mapped_rows(node_server.data_dir, "node") == expected("node")


def test_a_retry_after_a_lost_answer_stores_nothing_twice(node_server):
    proxy = AnswerLosingProxy((node_server.host, node_server.port), lose=2)
    try:
        assert send(proxy.url, node_server.first_run_key, "node-lost") == {"errors": []}
    finally:
        proxy.close()
    assert proxy.lost == 2
    assert mapped_rows(node_server.data_dir, "node-lost") == expected("node-lost")
    assert duplicate_message_ids(node_server.data_dir) == []
