"""A clean stop while an upload crawls: the uploader's thread ends when told, leaves nothing
half-done in the store, and the next start uploads the file exactly once.

Real SeaweedFS behind a throttling proxy (tests/cluster_servers.py): the object store is slow,
not down, which is the case a deadline must cut short.
"""

from __future__ import annotations

import os

import pytest

from inslytic_fast.lake.layout import object_key
from inslytic_fast.lake.objectstore import MULTIPART_PART_BYTES
from inslytic_fast.lake.uploader import Uploader, finished_files, lake_uploader

from .adversarial_helpers import poll_until
from .cluster_servers import S3_CREDENTIALS, SlowProxy, lake_serve_args, multipart_uploads
from .conftest import EXAMPLE_EVENT
from .test_lake import (  # noqa: F401 - seaweed and s3_credentials are fixtures
    BIG_RELATIVE,
    BIG_SIZE,
    big_waiting_file,
    lake,
    lake_rows,
    nothing_waits_locally,
    s3_credentials,
    seaweed,
)

pytest.importorskip("obstore")

PREFIX = "slow-stop"
RATE = 1024 * 1024  # BIG_SIZE, over two multipart parts, takes ~16 s through the proxy
# 7,000 events of 4 x 1,000 random hex characters: ~28 MB of text, ~15 MB of Parquet.
BATCHES, PER_BATCH = 14, 500


def test_a_stop_during_a_slow_upload_ends_the_thread_and_the_next_start_uploads_once(
    seaweed,  # noqa: F811
    tmp_path,
):
    data_dir = tmp_path / "node"
    big = big_waiting_file(data_dir)
    key = object_key("edge-1", BIG_RELATIVE)
    store = lake(seaweed, PREFIX)
    with SlowProxy(seaweed.ports["s3.port"], RATE) as proxy:
        uploader = lake_uploader(
            f"s3://{seaweed.bucket}/{PREFIX}", proxy.endpoint, data_dir, "edge-1"
        )
        uploader.start()
        poll_until(lambda: proxy.forwarded > RATE, 60)  # the upload is under way
        uploader.stop(final_pass_s=0.5)
        assert not uploader.running(), "the upload thread must end before stop() returns"
    # The proxy is closed: every connection the uploader had is cut, as at the node's exit.
    assert store.head(key) is None
    assert multipart_uploads(seaweed) == [], "a half-done multipart upload was left behind"
    assert big.exists()
    # The next start, the store at full speed: uploaded once, verified, the local copy gone.
    assert Uploader(store, data_dir, "edge-1").upload_once() == 1
    assert store.head(key).size == BIG_SIZE
    assert not big.exists()
    assert multipart_uploads(seaweed) == []


@pytest.mark.slow
def test_a_node_stopped_during_a_slow_upload_exits_clean_and_uploads_at_next_start(
    seaweed,  # noqa: F811
    make_server,
    tmp_path,
):
    """The same through a real node: SIGTERM while the final roll's file (over one part's
    worth) crawls to the store; the node exits 0 within its bounds, the store holds neither
    the object nor parts, and the next start uploads every event exactly once."""
    env = {**os.environ, **S3_CREDENTIALS}
    prefix = "slow-stop-node"
    args = lake_serve_args(seaweed, prefix, "edge-1", 1)
    with SlowProxy(seaweed.ports["s3.port"], 256 * 1024) as proxy:
        endpoint = args.index("--s3-endpoint") + 1
        slow_args = [*args[:endpoint], proxy.endpoint, *args[endpoint + 1 :]]
        node = make_server(*slow_args, env=env)
        sent = 0
        for _ in range(BATCHES):  # random text: the Parquet stays over one 8 MiB part
            batch = [
                {**EXAMPLE_EVENT, "properties": {f"p{i}": os.urandom(500).hex() for i in range(4)}}
                for _ in range(PER_BATCH)
            ]
            assert node.ingest(batch, node.first_run_key)[0] == 202
            sent += PER_BATCH
        assert node.stop(timeout=90) == 0
    assert multipart_uploads(seaweed) == [], "a half-done multipart upload was left behind"
    waiting = finished_files(node.data_dir)
    # Over one part: the size a multipart upload was used for.
    assert any(f.size > MULTIPART_PART_BYTES for f in waiting), [f.size for f in waiting]
    restarted = make_server(*args, data_dir=node.data_dir, env=env)
    poll_until(lambda: nothing_waits_locally(restarted.data_dir), 90)
    keys, rows = lake_rows(lake(seaweed, prefix), tmp_path / "scratch")
    assert rows == sent and set(keys.values()) == {1}
    assert multipart_uploads(seaweed) == []
