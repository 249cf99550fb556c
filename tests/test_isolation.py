"""Tenant isolation and secrets: a key only ever acts as its own project, and no plaintext key
is left in logs, the catalog, error bodies or data files."""

from __future__ import annotations

import os
import re
from pathlib import Path

import duckdb
import orjson
import pytest

from inslytic_fast.ingest.keys import KEY_PREFIX, generate_key
from inslytic_fast.storage.query import run_query

from .adversarial_helpers import (
    ROLL_DEADLINE_S,
    TICK_DEADLINE_S,
    batch_body,
    event,
    exchange,
    ingest_request,
    poll_until,
)
from .conftest import cli

LIMIT_A, LIMIT_B = 5, 7


def create_project(data_dir: Path, name: str, limit: int) -> str:
    out = cli("projects", "create", name, "--events-per-minute", str(limit), data_dir=data_dir)
    return out.stdout.strip().splitlines()[-1]


def project_of(data_dir: Path, like: str) -> dict[str, set[str]]:
    _, rows = run_query(
        data_dir,
        "SELECT project, list(event_name) FROM events WHERE event_name LIKE ? GROUP BY ALL",
        [like],
    )
    return {project: set(names) for project, names in rows}


@pytest.fixture
def two_projects(make_server, tmp_path):
    data_dir = tmp_path / "iso"
    data_dir.mkdir()
    key_a = create_project(data_dir, "alpha", LIMIT_A)
    key_b = create_project(data_dir, "beta", LIMIT_B)
    server = make_server("--workers", "1", data_dir=data_dir)
    return server, key_a, key_b


def test_a_key_writes_only_to_its_own_project_whatever_the_request_claims(two_projects):
    server, key_a, _ = two_projects
    # Every place a client might try to name another project: body, event, header, query.
    body = orjson.dumps(
        {"project": "beta", "events": [event("claim-body", project="beta", projectId="beta")]}
    )
    assert server.request("POST", "/v1/ingest", body, key=key_a)[0] == 202
    status, _, _ = server.request(
        "POST",
        "/v1/ingest?project=beta&api_key=x",
        batch_body(["claim-query"]),
        headers={"X-Project": "beta", "X-Inslytic-Project": "beta"},
        key=key_a,
    )
    assert status == 202
    assert project_of(server.data_dir, "claim-%") == {"alpha": {"claim-body", "claim-query"}}


def test_exhausting_one_project_never_limits_another(two_projects):
    server, key_a, key_b = two_projects
    status, headers, _ = server.ingest([event(f"a-{i}") for i in range(LIMIT_A)], key_a)
    assert (status, headers["x-ratelimit-limit"], headers["x-ratelimit-remaining"]) == (
        202,
        str(LIMIT_A),
        "0",
    )
    status, headers, _ = server.ingest([event("a-over")], key_a)
    assert status == 429 and headers["x-ratelimit-remaining"] == "0"

    for i in range(LIMIT_B):  # B's whole bucket is still there, one event at a time
        status, headers, _ = server.ingest([event(f"b-{i}")], key_b)
        assert status == 202
        assert headers["x-ratelimit-limit"] == str(LIMIT_B)
        assert headers["x-ratelimit-remaining"] == str(LIMIT_B - 1 - i)
    assert server.ingest([event("b-over")], key_b)[0] == 429
    assert server.ingest([event("a-over-2")], key_a)[0] == 429  # B's traffic gave A nothing

    assert project_of(server.data_dir, "a-%") == {"alpha": {f"a-{i}" for i in range(LIMIT_A)}}
    assert project_of(server.data_dir, "b-%") == {"beta": {f"b-{i}" for i in range(LIMIT_B)}}


def test_events_land_only_under_their_project_partition_after_the_roll(two_projects):
    server, key_a, key_b = two_projects
    assert server.ingest([event("part-a")], key_a)[0] == 202
    assert server.ingest([event("part-b")], key_b)[0] == 202
    assert server.stop() == 0  # seals the segment; the next start rolls it
    server.start()
    events_dir = server.data_dir / "events"
    poll_until(lambda: list(events_dir.glob("project=beta/date=*/*.parquet")), ROLL_DEADLINE_S)
    poll_until(lambda: list(events_dir.glob("project=alpha/date=*/*.parquet")), ROLL_DEADLINE_S)
    for project, name in (("alpha", "part-a"), ("beta", "part-b")):
        files = sorted(str(p) for p in events_dir.glob(f"project={project}/date=*/*.parquet"))
        names = (
            duckdb.connect()
            .execute(f"SELECT list(event_name) FROM read_parquet({files!r})")
            .fetchone()[0]
        )
        assert names == [name]


NEAR_MISSES = [
    "Bearer {a}x",  # one character more
    "Bearer {a_upper}",  # case matters in the body
    "Bearer {b_body_on_a_prefix}",
    "Basic {a}",
    "Bearer {a},Bearer {b}",
    "Bearer",
    "Token {a}",
]


def test_near_miss_keys_are_401_and_not_echoed(two_projects):
    server, key_a, key_b = two_projects
    for authorization in NEAR_MISSES:
        header = authorization.format(
            a=key_a,
            b=key_b,
            a_upper=key_a[:8] + key_a[8:].swapcase(),
            b_body_on_a_prefix=key_a[:12] + key_b[12:],
        )
        status, headers, body = server.request(
            "POST", "/v1/ingest", batch_body(["near-miss"]), headers={"Authorization": header}
        )
        assert status == 401 and headers["www-authenticate"] == "Bearer", authorization
        assert key_a[len(KEY_PREFIX) :] not in body.decode()
        assert key_b[len(KEY_PREFIX) :] not in body.decode()
    assert project_of(server.data_dir, "near-miss") == {}


# -- Secrets -------------------------------------------------------------------------------


def secret_part(key: str) -> str:
    """What must never leak: everything after the display prefix (ik_live_ + 4 characters)."""
    return key[len(KEY_PREFIX) + 4 :]


def text_of_parquet(path: Path) -> str:
    # ZSTD pages hide plaintext from a byte grep: read the values back instead.
    return str(duckdb.connect().execute(f"SELECT * FROM read_parquet('{path}')").fetchall())


def leaks(root: Path, secrets: list[str]) -> list[str]:
    found = []
    for dirpath, _, names in os.walk(root):
        for name in names:
            path = Path(dirpath) / name
            data = path.read_bytes()
            text = data.decode("latin-1")
            if name.endswith(".parquet"):
                text += text_of_parquet(path)
            found += [f"{path}: {s[:6]}..." for s in secrets if s in text]
    return found


def test_no_plaintext_key_in_data_dir_logs_or_error_bodies(make_server, tmp_path):
    data_dir = tmp_path / "secrets"
    server = make_server("--workers", "2", "--access-log", data_dir=data_dir)
    default_key = server.first_run_key
    key_a = create_project(data_dir, "alpha", 1000)
    key_b = create_project(data_dir, "beta", 3)
    unissued = generate_key()  # well formed, valid checksum, never in the catalog
    secrets = [secret_part(k) for k in (default_key, key_a, key_b, unissued)]
    poll_until(lambda: server.ingest([event("s-a")], key_a)[0] == 202, TICK_DEADLINE_S)

    bodies = []
    for key in (default_key, key_b, key_b + "x", unissued, key_a[:-1]):
        for events in ([event("s-ok")], [event("s-bad", consentGiven="yes")], [event("x")] * 4):
            bodies.append(server.ingest(events, key)[2])
    for path in (f"/v1/ingest?api_key={key_a}", "/nope"):
        bodies.append(server.request("POST", path, batch_body(["s-q"]), key=key_a)[2])
    got = exchange(  # a broken request carrying a key: the 400 must not quote it
        server.host,
        server.port,
        ingest_request(key_a, batch_body(["s-raw"])).replace(b"Content-Length", b"Content-Length "),
    )
    bodies.append(got.data)
    assert server.stop() == 0
    server.start()  # a second run: recovery, roll, and its own logs
    rolled = data_dir / "events"
    poll_until(lambda: list(rolled.glob("project=*/date=*/*.parquet")), ROLL_DEADLINE_S)
    assert server.stop() == 0

    assert not [s for s in secrets for body in bodies if s.encode() in body]
    assert not leaks(data_dir, secrets)
    first_stdout = (tmp_path / "secrets-stdout-1.log").read_text()
    assert secret_part(default_key) in first_stdout  # shown once, by design
    logs = [(tmp_path / "secrets-stderr-1.log").read_text()]
    logs += [(tmp_path / f"secrets-{stream}-2.log").read_text() for stream in ("stdout", "stderr")]
    assert re.search(r"POST /v1/ingest", logs[0]), "the access log was expected to be on"
    assert not [s[:6] for s in secrets for text in logs if s in text]


def test_a_key_pasted_into_the_path_is_not_written_to_the_access_log(make_server, tmp_path):
    server = make_server("--workers", "1", "--access-log")
    key = server.first_run_key
    assert server.request("GET", f"/v1/ingest/{key}")[0] == 404
    poll_until(lambda: "/v1/ingest/" in server.stderr(), TICK_DEADLINE_S)
    assert secret_part(key) not in server.stderr()
