"""`inslytic-fast projects ...` end to end: the real console entry in subprocesses, real files."""

from __future__ import annotations

import json
import os
import re
import shutil
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest

from inslytic_fast.ingest.catalog import CATALOG_FILE, Catalog
from inslytic_fast.ingest.keyring import KeyRing

from .adversarial_helpers import killed_at_fsync

KEY_RE = re.compile(r"ik_live_[0-9A-Za-z]{38}")
ENTRY = [sys.executable, "-m", "inslytic_fast", "projects"]


class Runs:
    """Runs the CLI and keeps every output, so a test can grep all of it for plaintext keys."""

    def __init__(self, data_dir: Path) -> None:
        self.data_dir = data_dir
        self.stdout: list[str] = []
        self.stderr: list[str] = []

    def __call__(self, *args: str, expect: int = 0, data_dir: bool = True, **kw):
        cmd = [*ENTRY, *args]
        if data_dir:
            cmd += ["--data-dir", str(self.data_dir)]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=60, **kw)
        self.stdout.append(proc.stdout)
        self.stderr.append(proc.stderr)
        assert proc.returncode == expect, (cmd, proc.returncode, proc.stdout, proc.stderr)
        if expect == 0:
            assert "Traceback" not in proc.stderr
        else:
            assert "Traceback" not in proc.stderr
            assert proc.stderr.strip(), "an error exit must say why on stderr"
        return proc

    def create(self, name: str, *extra: str) -> str:
        proc = self("create", name, *extra)
        return last_line_key(proc.stdout)

    def listing(self) -> dict[str, dict]:
        return {p["name"]: p for p in json.loads(self("list", "--json").stdout)["projects"]}


def last_line_key(stdout: str) -> str:
    last = stdout.rstrip("\n").split("\n")[-1]
    assert KEY_RE.fullmatch(last), f"last line of stdout is not a key: {last!r}"
    return last


def error_line(proc) -> str:
    lines = proc.stderr.strip().split("\n")
    assert len(lines) == 1, f"expected one error line, got {proc.stderr!r}"
    return lines[0]


@pytest.fixture
def run(tmp_path: Path) -> Runs:
    return Runs(tmp_path / "data")


def ring_for(data_dir: Path) -> KeyRing:
    ring = KeyRing(data_dir)
    ring.load()
    return ring


# create ------------------------------------------------------------------------------------


def test_create_prints_the_key_last_and_it_works(run):
    proc = run("create", "shop")
    key = last_line_key(proc.stdout)
    assert "shown only this once" in proc.stdout
    assert proc.stderr == ""
    project = ring_for(run.data_dir).lookup(key.encode())
    assert (project.name, project.events_per_minute) == ("shop", None)


def test_create_with_limits(run):
    run.create("capped", "--events-per-minute", "500")
    run.create("free", "--events-per-minute", "unlimited")
    projects = ring_for(run.data_dir).projects
    assert projects["capped"].events_per_minute == 500
    assert projects["free"].events_per_minute == 0


@pytest.mark.parametrize("limit", ["0", "-5", "abc", "1.5", "default", str(10**13)])
def test_create_refuses_bad_limits_as_usage_errors(run, limit):
    proc = run("create", "shop", "--events-per-minute", limit, expect=2)
    assert "invalid limit" in proc.stderr
    assert not (run.data_dir / CATALOG_FILE).exists()


def test_create_json(run):
    out = json.loads(run("create", "shop", "--events-per-minute", "42", "--json").stdout)
    assert KEY_RE.fullmatch(out["api_key"])
    assert out["key_prefix"] == out["api_key"][:12]
    assert (out["name"], out["events_per_minute"]) == ("shop", 42)


def test_duplicate_create_is_an_operational_error(run):
    key = run.create("shop")
    proc = run("create", "shop", expect=1)
    assert "already exists" in error_line(proc)
    proc = run("create", "SHOP", expect=1)
    assert "names ignore case" in error_line(proc)
    assert ring_for(run.data_dir).lookup(key.encode()).name == "shop"  # untouched


@pytest.mark.parametrize("name", ["a b", "../etc", "x/y", "a" * 65, ""])
def test_invalid_names_are_usage_errors(run, name):
    proc = run("create", name, expect=2)
    assert "invalid project name" in proc.stderr


def test_concurrent_creates_lose_nothing(run):
    run.data_dir.mkdir()
    names = [f"p{i}" for i in range(8)]
    procs = [
        subprocess.Popen(
            [*ENTRY, "create", name, "--data-dir", str(run.data_dir)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for name in names
    ]
    keys = {}
    for name, proc in zip(names, procs, strict=True):
        stdout, stderr = proc.communicate(timeout=60)
        assert proc.returncode == 0, stderr
        keys[name] = last_line_key(stdout)
    ring = ring_for(run.data_dir)
    assert sorted(ring.projects) == names
    for name, key in keys.items():
        assert ring.lookup(key.encode()).name == name


# list --------------------------------------------------------------------------------------


def test_list_on_a_missing_data_dir_creates_nothing(run):
    assert "No projects" in run("list").stdout
    assert json.loads(run("list", "--json").stdout) == {"projects": []}
    assert not run.data_dir.exists()


def test_list_shows_limits_prefixes_and_key_counts(run):
    shop = run.create("shop", "--events-per-minute", "500")
    free = run.create("free", "--events-per-minute", "unlimited")
    run.create("plain")
    rotated = last_line_key(run("rotate-key", "shop", "--keep-old-for", "1h").stdout)
    listing = run.listing()
    assert sorted(listing) == ["free", "plain", "shop"]
    assert listing["shop"]["events_per_minute"] == 500
    assert listing["free"]["events_per_minute"] == 0
    assert listing["plain"]["events_per_minute"] is None
    assert listing["shop"]["active_keys"] == 2
    assert [k["prefix"] for k in listing["shop"]["keys"]] == [shop[:12], rotated[:12]]
    assert listing["shop"]["keys"][0]["expires"].endswith("Z")
    assert listing["shop"]["keys"][1]["expires"] is None
    table = run("list").stdout.splitlines()
    assert table[0].split() == ["NAME", "LIMIT", "KEYS", "CREATED", "KEY", "PREFIXES"]
    rows = {line.split()[0]: line for line in table[1:]}
    assert rows["shop"].split()[1:3] == ["500/min", "2"]
    assert rows["free"].split()[1:3] == ["unlimited", "1"]
    assert rows["plain"].split()[1:3] == ["default", "1"]
    assert shop[:12] in rows["shop"] and "expires" in rows["shop"]
    assert free[:12] in rows["free"]


# set-limit ---------------------------------------------------------------------------------


def test_set_limit_is_seen_by_a_running_keyring_on_its_next_reload(run):
    key = run.create("shop").encode()
    ring = ring_for(run.data_dir)
    project = ring.lookup(key)
    for arg, expected in (("250", 250), ("unlimited", 0), ("default", None), ("7", 7)):
        run("set-limit", "shop", arg)
        assert ring.reload_if_changed()
        assert ring.lookup(key) is project
        assert project.events_per_minute == expected
    out = json.loads(run("set-limit", "shop", "9", "--json").stdout)
    assert out == {"name": "shop", "events_per_minute": 9}


def test_set_limit_errors(run):
    run.create("shop")
    assert "no project named 'nope'" in error_line(run("set-limit", "nope", "5", expect=1))
    run("set-limit", "shop", "0", expect=2)
    run("set-limit", "shop", "lots", expect=2)


# rotate-key / revoke-key -------------------------------------------------------------------


def test_rotate_keeps_the_old_key_for_a_day_by_default(run):
    old = run.create("shop")
    before = time.time()
    new = last_line_key(run("rotate-key", "shop").stdout)
    ring = ring_for(run.data_dir)
    assert ring.lookup(old.encode()).name == "shop"
    assert ring.lookup(new.encode()).name == "shop"
    expiry = Catalog(run.data_dir).read().projects["shop"].keys[0].expires.timestamp()
    assert before + 86_400 <= expiry <= time.time() + 86_400


def test_rotate_with_zero_grace_and_unit_suffixes(run):
    old = run.create("shop")
    proc = run("rotate-key", "shop", "--keep-old-for", "0")
    new = last_line_key(proc.stdout)
    ring = ring_for(run.data_dir)
    assert ring.lookup(old.encode()) is None
    assert ring.lookup(new.encode()).name == "shop"
    before = time.time()
    out = json.loads(run("rotate-key", "shop", "--keep-old-for", "90m", "--json").stdout)
    assert KEY_RE.fullmatch(out["api_key"])
    [old_key] = out["old_keys"]
    assert old_key["prefix"] == new[:12]
    expiry = Catalog(run.data_dir).read().projects["shop"].keys[0].expires.timestamp()
    assert before + 5400 <= expiry <= time.time() + 5400


@pytest.mark.parametrize("grace", ["-1", "soon", "1w", "400d"])
def test_rotate_refuses_bad_grace_periods(run, grace):
    run.create("shop")
    run("rotate-key", "shop", "--keep-old-for", grace, expect=2)


def test_rotated_out_key_is_refused_once_expired(run):
    old = run.create("shop").encode()
    run("rotate-key", "shop", "--keep-old-for", "60")
    ring = ring_for(run.data_dir)
    assert ring.lookup(old).name == "shop"
    later = KeyRing(run.data_dir, clock=lambda: time.time() + 61)
    later.load()
    assert later.lookup(old) is None


def test_revoke_by_listed_prefix_is_seen_on_the_next_reload(run):
    first = run.create("shop").encode()
    second = last_line_key(run("rotate-key", "shop", "--keep-old-for", "1d").stdout).encode()
    ring = ring_for(run.data_dir)
    prefix = run.listing()["shop"]["keys"][0]["prefix"]
    proc = run("revoke-key", "shop", prefix)
    assert proc.stderr == ""
    assert prefix in proc.stdout
    assert ring.reload_if_changed()
    assert ring.lookup(first) is None
    assert ring.lookup(second).name == "shop"
    # The last key: allowed (a leak must be stoppable), with a warning saying what to do next.
    out = json.loads(run("revoke-key", "shop", second[:12].decode(), "--json").stdout)
    assert out == {"name": "shop", "revoked": second[:12].decode(), "active_keys": 0}
    assert "rotate-key shop" in run.stderr[-1]
    assert ring.reload_if_changed()
    assert ring.lookup(second) is None


def test_revoke_errors(run):
    run.create("shop")
    assert "no active key" in error_line(run("revoke-key", "shop", "ik_live_zzzz", expect=1))
    assert "no project" in error_line(run("revoke-key", "nope", "ik_live_zzzz", expect=1))


# delete ------------------------------------------------------------------------------------


def test_delete_keeps_data_unless_purged(run):
    key = run.create("shop").encode()
    run.create("other")
    ring = ring_for(run.data_dir)
    events = run.data_dir / "events" / "project=shop"
    (events / "date=2026-01-01").mkdir(parents=True)
    (events / "date=2026-01-01" / "part-0.parquet").write_bytes(b"PAR1")
    proc = run("delete", "shop")
    assert str(events) in proc.stdout and "--purge" in proc.stdout
    assert ring.reload_if_changed()
    assert ring.lookup(key) is None
    assert sorted(ring.projects) == ["other"]
    assert (events / "date=2026-01-01" / "part-0.parquet").exists()
    # Purging what a plain delete left behind.
    out = json.loads(run("delete", "shop", "--purge", "--json").stdout)
    assert out["deleted"] is False and out["purged"] is True
    assert not events.exists()
    assert "no project named 'shop'" in error_line(run("delete", "shop", "--purge", expect=1))


def test_delete_purge_in_one_go(run):
    run.create("shop")
    events = run.data_dir / "events" / "project=shop"
    events.mkdir(parents=True)
    kept = run.data_dir / "events" / "project=shop2"
    kept.mkdir()
    run("delete", "shop", "--purge")
    assert not events.exists() and kept.exists()
    assert "shop" not in run.listing()


# Errors, environment, secrecy --------------------------------------------------------------


def test_a_corrupt_catalog_fails_every_command_and_is_left_untouched(run):
    run.create("shop")
    path = run.data_dir / CATALOG_FILE
    corrupt = path.read_bytes()[:-30]
    path.write_bytes(corrupt)
    for args in (
        ["list"],
        ["create", "other"],
        ["set-limit", "shop", "5"],
        ["rotate-key", "shop"],
        ["revoke-key", "shop", "ik_live_abcd"],
        ["delete", "shop"],
    ):
        line = error_line(run(*args, expect=1))
        assert str(path) in line and "left untouched" in line
    assert path.read_bytes() == corrupt


def test_data_dir_comes_from_the_environment_then_the_working_directory(tmp_path, run):
    env_dir = tmp_path / "from-env"
    env = {**os.environ, "INSLYTIC_DATA_DIR": str(env_dir)}
    run("create", "a", data_dir=False, env=env)
    assert (env_dir / CATALOG_FILE).exists()
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    env.pop("INSLYTIC_DATA_DIR")
    run("create", "b", data_dir=False, env=env, cwd=cwd)
    assert (cwd / "inslytic-data" / CATALOG_FILE).exists()


def test_a_data_dir_that_is_a_file_is_an_operational_error(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("")
    run = Runs(blocker)
    assert str(blocker) in error_line(run("create", "shop", expect=1))


def test_usage_errors_exit_2(run):
    run(data_dir=False, expect=2)  # `projects` with no command
    run("frobnicate", data_dir=False, expect=2)
    run("set-limit", "shop", expect=2)


def test_catalog_mode_and_no_plaintext_key_anywhere(run):
    keys = [run.create("shop"), json.loads(run("create", "other", "--json").stdout)["api_key"]]
    keys.append(last_line_key(run("rotate-key", "shop", "--keep-old-for", "1h").stdout))
    keys.append(last_line_key(run("rotate-key", "other", "--keep-old-for", "0").stdout))
    run("revoke-key", "shop", keys[0])  # by the whole (leaked) key
    run("revoke-key", "other", keys[1], expect=1)  # already revoked: the error must not echo it
    run("revoke-key", "other", keys[1][:-1] + "x", expect=1)  # a typo'd key, likewise
    run("create", "shop", expect=1)
    pasted = keys[2]  # a live key pasted where a name or a number goes
    run("delete", pasted, expect=2)
    run("set-limit", "shop", pasted, expect=2)
    run("rotate-key", "shop", "--keep-old-for", pasted, expect=2)
    run("create", "x", "--events-per-minute", pasted, expect=2)
    run("list")
    run("list", "--json")
    catalog = run.data_dir / CATALOG_FILE
    assert stat.S_IMODE(catalog.stat().st_mode) == 0o600
    # The secret part is what follows the 4 characters `list` shows.
    secrets_ = [k[12:] for k in keys] + [k[12:-1] for k in keys]
    everything = b"".join(p.read_bytes() for p in run.data_dir.rglob("*") if p.is_file())
    stderr = "".join(run.stderr)
    for secret in secrets_:
        assert secret.encode() not in everything
        assert secret not in stderr


@pytest.mark.skipif(shutil.which("strace") is None, reason="needs strace")
def test_rotate_with_zero_grace_killed_at_any_step_never_locks_the_project_out(run, tmp_path):
    """Before: killed after the catalog's rename, the old key was revoked and the new one never
    printed. Now at every kill point a key the operator holds still works."""
    for when in range(1, 50):
        data_dir = tmp_path / f"kill-{when}"
        old = Runs(data_dir).create("shop")
        cmd = [
            *killed_at_fsync(when),
            *[*ENTRY, "rotate-key", "shop", "--keep-old-for", "0", "--data-dir", str(data_dir)],
        ]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
        printed = KEY_RE.findall(proc.stdout)
        ring = ring_for(data_dir)
        working = [k for k in [old, *printed] if ring.lookup(k.encode()) is not None]
        assert working, f"killed at fsync {when}: no key the operator holds works"
        if proc.returncode == 0:
            assert working == printed, "a finished rotation left the old key working"
            break
    else:
        raise AssertionError("rotate-key never finished")


def test_projects_help_is_plain_text():
    proc = subprocess.run(
        [sys.executable, "-m", "inslytic_fast", "projects", "--help"],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert proc.returncode == 0
    assert "``" not in proc.stdout and "inslytic_fast.ingest.catalog" not in proc.stdout
    text = " ".join(proc.stdout.split())  # argparse wraps lines
    assert "catalog.json" in text and "Exit codes" in text
