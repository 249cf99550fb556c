"""fuzz/fuzz_protocol.py stays runnable: its seeds pass through its own invariant checks.

atheris (libFuzzer) is not part of the test install; the harness only needs it to instrument
imports and to drive inputs, so a stand-in module that does neither lets the suite load the
harness and feed it the seed corpus. A refactor that renames what the harness imports, or
changes the commit sink or transport it fakes, fails here instead of at the next fuzzing run.
"""

from __future__ import annotations

import contextlib
import importlib.util
import sys
import types
from pathlib import Path

HARNESS = Path(__file__).resolve().parent.parent / "fuzz" / "fuzz_protocol.py"


def load_harness(monkeypatch):
    engine = types.ModuleType("atheris")
    engine.instrument_imports = lambda **_: contextlib.nullcontext()
    monkeypatch.setitem(sys.modules, "atheris", engine)
    spec = importlib.util.spec_from_file_location("fuzz_protocol_under_test", HARNESS)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_fuzz_harness_runs_its_seeds_through_its_invariants(monkeypatch):
    harness = load_harness(monkeypatch)
    seeds = harness.seeds()
    assert len(seeds) >= 5
    for seed in seeds:
        harness.TestOneInput(seed)  # raises AssertionError on a broken invariant


def test_the_harness_checks_catch_a_server_error(monkeypatch):
    harness = load_harness(monkeypatch)
    answer = b"HTTP/1.1 500 Internal Server Error\r\nContent-Length: 2\r\n\r\n{}"
    try:
        harness.check_responses(answer)
    except AssertionError as exc:
        assert "server error" in str(exc)
    else:
        raise AssertionError("a 500 passed the harness' response check")
