"""query.py and the query/export CLI over real data directories."""

from __future__ import annotations

import asyncio
import csv
import io
import subprocess
import sys

import duckdb
import orjson
import pytest

from inslytic_fast.cli import main
from inslytic_fast.log.format import frame_record, list_segments
from inslytic_fast.log.writer import CommitLog
from inslytic_fast.storage.query import open_events, run_query, take_snapshot
from inslytic_fast.storage.roller import Roller

from .storage_helpers import LogOnLoop, batch_counts, open_log


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, timeout=30))


def populate(data_dir, *, rolled: dict[str, int], in_log: dict[str, int]) -> None:
    """``rolled`` batches end up in Parquet, ``in_log`` ones stay in the log (not rolled)."""

    async def write(batches: dict[str, int], projects: tuple[str, ...]) -> None:
        log = open_log(data_dir)
        driver = LogOnLoop(log)
        for n, (batch, count) in enumerate(batches.items()):
            assert await driver.append(projects[n % len(projects)], batch, count) is None
        await log.close()  # a clean close seals the segment

    run(write(rolled, ("shop",)))
    Roller(data_dir).roll_once()
    run(write(in_log, ("shop", "blog")))


@pytest.fixture
def data_dir(tmp_path):
    populate(tmp_path, rolled={"r1": 2, "r2": 3}, in_log={"l1": 1, "l2": 4})
    return tmp_path


def test_events_is_parquet_plus_log(data_dir):
    snap = take_snapshot(data_dir)
    assert snap.parquet_files and snap.log_records == 2
    snap.discard()
    assert batch_counts(data_dir) == {"r1": 2, "r2": 3, "l1": 1, "l2": 4}


def test_a_half_written_tail_record_is_never_shown(data_dir):
    active = list_segments(data_dir / "log")["w0"][-1]
    record = frame_record(
        b'{"p":"shop","r":1,"b":"01a2174d-a42a-7000-9ed8-fb534111c","e":[{"eventName":"x",'
        b'"timestamp":"2026-02-16T10:30:00Z","anonymousId":"torn","sessionId":"s",'
        b'"consentGiven":true}]}\n'
    )
    for cut in (5, 12, len(record) // 2, len(record) - 1):
        with open(active, "ab") as f:
            f.write(record[:cut])
        assert "torn" not in batch_counts(data_dir)
        with open(active, "r+b") as f:
            f.truncate(f.seek(0, 2) - cut)
    with open(active, "ab") as f:
        f.write(record)
    assert batch_counts(data_dir)["torn"] == 1


def test_query_works_on_an_empty_or_fresh_data_dir(tmp_path):
    assert run_query(tmp_path, "SELECT count(*) FROM events") == (["count_star()"], [(0,)])
    con = open_events(tmp_path)
    assert [r[0] for r in con.execute("DESCRIBE events").fetchall()][:3] == [
        "event_id",
        "project",
        "event_name",
    ]


def test_properties_is_a_map(data_dir):
    _, rows = run_query(
        data_dir, "SELECT DISTINCT properties['path'], properties['missing'] FROM events"
    )
    assert rows == [("/pricing", None)]


# -- CLI: query ---------------------------------------------------------------------------------

SQL = "SELECT anonymous_id, count(*) AS n FROM events GROUP BY ALL ORDER BY anonymous_id"
EXPECTED = [("l1", 1), ("l2", 4), ("r1", 2), ("r2", 3)]


def cli(capsys, *args):
    code = main(list(args))
    out, err = capsys.readouterr()
    return code, out, err


def test_cli_query_json_is_one_array_of_row_objects(data_dir, capsys):
    code, out, _ = cli(capsys, "query", SQL, "--data-dir", str(data_dir), "--format", "json")
    assert code == 0
    assert orjson.loads(out) == [{"anonymous_id": a, "n": n} for a, n in EXPECTED]


def test_cli_query_ndjson(data_dir, capsys):
    code, out, _ = cli(capsys, "query", SQL, "--data-dir", str(data_dir), "--format", "ndjson")
    assert code == 0
    assert [orjson.loads(line) for line in out.splitlines()] == [
        {"anonymous_id": a, "n": n} for a, n in EXPECTED
    ]


def test_cli_query_csv(data_dir, capsys):
    code, out, _ = cli(capsys, "query", SQL, "--data-dir", str(data_dir), "--format", "csv")
    assert code == 0
    rows = list(csv.reader(io.StringIO(out)))
    assert rows == [["anonymous_id", "n"], *[[a, str(n)] for a, n in EXPECTED]]


def test_cli_query_table_is_aligned(data_dir, capsys):
    code, out, _ = cli(capsys, "query", SQL, "--data-dir", str(data_dir))
    assert code == 0
    lines = out.splitlines()
    assert lines[0].split() == ["anonymous_id", "n"]
    assert set(lines[1].replace(" ", "")) == {"-"}
    assert [line.split() for line in lines[2:-1]] == [[a, str(n)] for a, n in EXPECTED]
    assert lines[-1] == "(4 rows)"
    # Numbers are right-aligned under their header, text left-aligned.
    assert len({len(line) for line in lines[:-1]}) == 1


def test_cli_query_timestamps_and_maps_as_text(data_dir, capsys):
    sql = "SELECT \"timestamp\", properties FROM events WHERE anonymous_id = 'l1'"
    _, out, _ = cli(capsys, "query", sql, "--data-dir", str(data_dir), "--format", "json")
    assert orjson.loads(out) == [
        {"timestamp": "2026-02-16T10:30:00Z", "properties": {"path": "/pricing"}}
    ]
    _, out, _ = cli(capsys, "query", sql, "--data-dir", str(data_dir), "--format", "csv")
    assert out.splitlines()[1] == '2026-02-16T10:30:00Z,"{""path"":""/pricing""}"'


def test_cli_query_errors_are_one_line_with_exit_codes(data_dir, tmp_path, capsys):
    code, out, err = cli(capsys, "query", "SELEC 1", "--data-dir", str(data_dir))
    assert code == 2 and out == "" and len(err.strip().splitlines()) == 1
    assert err.startswith("inslytic-fast: error:")
    code, _, err = cli(capsys, "query", "SELECT 1", "--data-dir", str(tmp_path / "nope"))
    assert code == 1 and "no data directory" in err


# -- CLI: export ---------------------------------------------------------------------------------


def test_cli_export_parquet_round_trips(data_dir, tmp_path, capsys):
    out_dir = tmp_path / "out"
    code, _, err = cli(capsys, "export", "--out", str(out_dir), "--data-dir", str(data_dir))
    assert code == 0 and "exported 10 events" in err
    exported = duckdb.sql(f"SELECT * FROM '{out_dir / 'events.parquet'}' ORDER BY event_id")
    _, original = run_query(data_dir, "SELECT * FROM events ORDER BY event_id")
    assert exported.fetchall() == original
    # No clobbering without --force.
    code, _, err = cli(capsys, "export", "--out", str(out_dir), "--data-dir", str(data_dir))
    assert code == 1 and "already exists" in err
    code, _, _ = cli(
        capsys, "export", "--out", str(out_dir), "--data-dir", str(data_dir), "--force"
    )
    assert code == 0


def test_cli_export_filters_by_project_and_time(tmp_path, capsys):
    populate(tmp_path / "d", rolled={"r1": 2}, in_log={"s1": 3, "b1": 5, "s2": 1})
    out_dir = tmp_path / "out"
    args = ["export", "--out", str(out_dir), "--data-dir", str(tmp_path / "d")]
    code, _, err = cli(capsys, *args, "--project", "blog", "--format", "ndjson")
    assert code == 0 and "exported 5 events" in err
    rows = [orjson.loads(line) for line in (out_dir / "events.ndjson").read_bytes().splitlines()]
    assert {r["anonymous_id"] for r in rows} == {"b1"}
    assert rows[0]["timestamp"] == "2026-02-16T10:30:00.000000Z"
    assert rows[0]["properties"] == {"path": "/pricing"}
    # The events are at 2026-02-16T10:30Z: an --until of that instant is exclusive.
    code, _, err = cli(capsys, *args, "--until", "2026-02-16T10:30:00Z", "--format", "csv")
    assert code == 0 and "exported 0 events" in err
    code, _, err = cli(
        capsys, *args, "--since", "2026-02-16", "--format", "csv", "--project", "shop", "--force"
    )
    assert code == 0 and "exported 6 events" in err
    header = (out_dir / "events.csv").read_text().splitlines()[0]
    assert header.startswith("event_id,project,event_name,timestamp")


def test_cli_export_of_an_unknown_project_fails_clearly(data_dir, tmp_path, capsys):
    from inslytic_fast.ingest.catalog import Catalog

    Catalog(data_dir).create_project("shop")
    Catalog(data_dir).create_project("quiet")  # known, with no events: an empty export is fine
    out_dir = tmp_path / "out"
    args = ["export", "--out", str(out_dir), "--data-dir", str(data_dir)]
    code, _, err = cli(capsys, *args, "--project", "shpo")
    assert code == 1 and "no project named 'shpo'" in err
    assert list(out_dir.iterdir()) == []  # no empty file left behind
    code, _, err = cli(capsys, *args, "--project", "quiet")
    assert code == 0 and "exported 0 events" in err


def test_cli_export_rejects_bad_times(data_dir, tmp_path, capsys):
    with pytest.raises(SystemExit) as info:
        main(
            ["export", "--out", str(tmp_path), "--since", "yesterday", "--data-dir", str(data_dir)]
        )
    assert info.value.code == 2
    code, _, err = cli(
        capsys,
        "export",
        "--out",
        str(tmp_path),
        "--since",
        "2026-02-17",
        "--until",
        "2026-02-16",
        "--data-dir",
        str(data_dir),
    )
    assert code == 2 and "--since" in err


def test_cli_query_reads_sql_from_stdin(data_dir, capsys, monkeypatch):
    monkeypatch.setattr("sys.stdin", io.StringIO(SQL))
    code, out, _ = cli(capsys, "query", "-", "--data-dir", str(data_dir), "--format", "ndjson")
    assert code == 0
    assert [tuple(orjson.loads(line).values()) for line in out.splitlines()] == EXPECTED


def test_a_file_deleted_under_a_snapshot_makes_the_query_retry(tmp_path, monkeypatch):
    from inslytic_fast.storage import query as query_module

    populate(tmp_path, rolled={"r1": 2, "r2": 3}, in_log={"l1": 1})
    populate(tmp_path, rolled={"r3": 4}, in_log={"l2": 2})
    real_snapshot = query_module.take_snapshot
    snapshots = []

    def snapshot_then_compact(data_dir):
        snap = real_snapshot(data_dir)
        if not snapshots:
            # The compactor replaces the files this snapshot names before DuckDB opens them.
            assert Roller(data_dir, compact_min_files=2).compact_once() >= 1
        snapshots.append(snap)
        return snap

    monkeypatch.setattr(query_module, "take_snapshot", snapshot_then_compact)
    assert batch_counts(tmp_path) == {"r1": 2, "r2": 3, "r3": 4, "l1": 1, "l2": 2}
    assert len(snapshots) == 2


@pytest.mark.parametrize("compact_too", [False, True])
def test_a_roll_finishing_mid_snapshot_is_counted_once(tmp_path, monkeypatch, compact_too):
    from inslytic_fast.storage import query as query_module

    populate(tmp_path, rolled={"r1": 2, "r2": 3}, in_log={"l1": 1})
    populate(tmp_path, rolled={"r3": 4}, in_log={"l2": 2})
    # Seal the active segments so the roller has work to do mid-snapshot.
    log = CommitLog(tmp_path)
    log.open()
    log._close_and_seal()  # noqa: SLF001
    real_listing = query_module._parquet_files
    listings = []

    def roll_then_list(events_dir, live):
        if not listings:
            assert Roller(tmp_path).roll_once() > 0  # segments read a moment ago vanish
            if compact_too:
                assert Roller(tmp_path, compact_min_files=2).compact_once() >= 1
        listings.append(live)
        return real_listing(events_dir, live)

    # The roller finishes between the snapshot reading the log and listing Parquet.
    monkeypatch.setattr(query_module, "_parquet_files", roll_then_list)
    assert batch_counts(tmp_path) == {"r1": 2, "r2": 3, "r3": 4, "l1": 1, "l2": 2}
    # Retaken only when a compaction could have merged what the first attempt read from the log.
    assert len(listings) == (2 if compact_too else 1)


def test_a_reader_starved_by_compactions_pauses_the_roller_for_one_snapshot(data_dir, monkeypatch):
    from inslytic_fast.storage import query as query_module

    Roller(data_dir).roll_once()  # creates the roller's lock file, as a running server has
    real_attempt = query_module._attempt
    roller_could_run = []

    def attempt(*args):
        if len(roller_could_run) < query_module.LOCK_FREE_ATTEMPTS:
            roller_could_run.append(True)
            return None  # as if a compaction had landed during this attempt
        with Roller(data_dir)._exclusive() as mine:  # noqa: SLF001
            roller_could_run.append(mine)
        return real_attempt(*args)

    monkeypatch.setattr(query_module, "_attempt", attempt)
    assert batch_counts(data_dir) == {"r1": 2, "r2": 3, "l1": 1, "l2": 4}
    assert roller_could_run == [True] * query_module.LOCK_FREE_ATTEMPTS + [False]
    with Roller(data_dir)._exclusive() as mine:  # noqa: SLF001 - released afterwards
        assert mine


def test_cli_query_prints_any_duckdb_type(data_dir, capsys):
    sql = (
        "SELECT 12.5::DECIMAL(10,2) AS d, 170141183460469231731687303715884105727::HUGEINT AS h, "
        "'x'::BLOB AS bl, DATE '2026-01-02' AS day, [1, 2] AS l"
    )
    code, out, _ = cli(capsys, "query", sql, "--data-dir", str(data_dir), "--format", "json")
    assert code == 0
    assert orjson.loads(out.replace("170141183460469231731687303715884105727", '"big"')) == [
        {"d": "12.50", "h": "big", "bl": "78", "day": "2026-01-02", "l": [1, 2]}
    ]
    assert "170141183460469231731687303715884105727" in out  # a number, not rounded
    code, out, _ = cli(capsys, "query", sql, "--data-dir", str(data_dir), "--format", "csv")
    assert (
        out.splitlines()[1] == '12.50,170141183460469231731687303715884105727,78,2026-01-02,"[1,2]"'
    )


def test_duckdb_connections_print_no_progress_bar_into_results(tmp_path):
    """DuckDB's progress bar goes to stdout, a TTY or not, once a statement runs longer than
    progress_bar_time (2 s): `query ... > out.csv` got bars in the CSV, and the roller's went
    into the server's output. Here the bar is due at once (progress_bar_time 0), so it would
    print however fast the machine; stdout must stay empty."""
    script = (
        "from inslytic_fast.storage.events_sql import connect_duckdb\n"
        "con = connect_duckdb(threads=1)\n"
        "con.execute('SET progress_bar_time = 0')\n"
        "con.execute('SELECT count(*) FROM range(30000000) t(x) WHERE x % 7 = 3').fetchall()\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, timeout=120, cwd=tmp_path
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout == b""
