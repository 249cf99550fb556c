"""The serving process's lifecycle, in-process (the HTTP behaviour is tested over sockets)."""

from __future__ import annotations

import asyncio
import dataclasses
import gc
import io

from inslytic_fast.config import Settings
from inslytic_fast.http.protocol import HttpProtocol
from inslytic_fast.http.state import ServerState
from inslytic_fast.runtime.process import loop_factory
from inslytic_fast.runtime.server import build_server

from .protocol_helpers import MockTransport, ScriptedApp, get, make_conn, post, statuses


def test_serving_freezes_what_start_up_built_out_of_full_collections(tmp_path):
    # A full collection walked ~30,000 start-up objects and stopped the loop for 12-39 ms under
    # load; frozen, they are skipped. Objects made while serving are still collected.
    settings = dataclasses.replace(
        Settings(), data_dir=tmp_path, port=0, durability="none", workers=1
    )
    server = build_server(settings, out=io.StringIO())
    seen: dict[str, int] = {}

    def ready() -> None:
        seen["frozen"] = gc.get_freeze_count()
        garbage: list = []
        garbage.append(garbage)  # a cycle made while serving
        del garbage
        seen["collected"] = gc.collect()
        server.request_stop()

    server.on_ready = ready
    gc.unfreeze()
    try:
        with asyncio.Runner(loop_factory=loop_factory()) as runner:
            runner.run(server.serve())
    finally:
        gc.unfreeze()  # leave this test process's collector as it was
    assert seen["frozen"] > 10_000
    assert seen["collected"] >= 1


class AbortRecordingTransport(MockTransport):
    def __init__(self) -> None:
        super().__init__()
        self.aborted = False

    def abort(self) -> None:
        self.aborted = True
        super().abort()


def test_the_drain_closes_an_idle_connection_and_leaves_a_busy_one_to_answer():
    conn, transport, app = make_conn()
    conn.data_received(get("/a"))
    assert statuses(transport.take()) == [200]
    assert conn.is_idle()
    conn.shutdown()
    assert transport.closed

    busy, busy_transport, busy_app = make_conn()
    busy.data_received(post("/slow", b"{}"))  # its answer is owed (a commit in flight)
    assert not busy.is_idle()
    busy.shutdown()
    assert not busy_transport.closed
    busy_app.release()
    assert statuses(busy_transport.take()) == [202]
    assert busy.is_idle()


def test_a_connection_half_way_through_a_request_is_not_idle():
    conn, transport, _ = make_conn()
    conn.data_received(b"POST /x HTTP/1.1\r\nHost: x\r\nContent-Length: 10\r\n\r\n12345")
    assert not conn.is_idle()
    conn.shutdown()
    assert not transport.closed


def test_the_drain_deadline_aborts_a_connection_whatever_it_is_doing():
    conn = HttpProtocol(ScriptedApp(), ServerState(Settings()))
    transport = AbortRecordingTransport()
    conn.connection_made(transport)
    conn.data_received(post("/slow", b"{}"))
    conn.shutdown(abort=True)
    assert transport.aborted


def test_a_server_is_built_whole_with_only_the_features_asked_for(tmp_path):
    def settings(data_dir, **overrides):
        return dataclasses.replace(
            Settings(), data_dir=data_dir, port=0, durability="none", **overrides
        )

    alone = build_server(settings(tmp_path / "alone", metrics_port=1), out=io.StringIO())
    assert alone.roller is not None and alone.data_dir_lock is not None
    assert alone.metrics_app is not None and alone.metrics_app is not alone.app
    assert alone.coordinator is None and alone.first_run_key is None
    assert alone.app.ingestor.commitlog is alone.commitlog
    worker = build_server(
        settings(tmp_path / "worker"), worker_id="w1", standalone=False, parent_pid=1
    )
    # The supervisor runs the roller and holds the data dir's lock for its workers.
    assert worker.roller is None and worker.data_dir_lock is None
    assert worker.metrics_app is None and worker.parent_pid == 1
    asyncio.run(alone.commitlog.close())
    asyncio.run(worker.commitlog.close())
