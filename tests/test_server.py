"""The serving process's lifecycle, in-process (the HTTP behaviour is tested over sockets)."""

from __future__ import annotations

import asyncio
import dataclasses
import gc
import io

from inslytic_fast.config import Settings
from inslytic_fast.runtime.server import Server, loop_factory


def test_serving_freezes_what_start_up_built_out_of_full_collections(tmp_path):
    # A full collection walked ~30,000 start-up objects and stopped the loop for 12-39 ms under
    # load; frozen, they are skipped. Objects made while serving are still collected.
    settings = dataclasses.replace(
        Settings(), data_dir=tmp_path, port=0, durability="none", workers=1
    )
    server = Server(settings, out=io.StringIO())
    server.open_storage()
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
