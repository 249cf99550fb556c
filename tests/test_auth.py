"""Keys, the catalog on disk and the KeyRing the server consults; real files, fake clocks."""

from __future__ import annotations

import errno
import fcntl
import hashlib
import logging
import os
import re
import stat
import threading
import time
from pathlib import Path

import pytest

from inslytic_fast.ingest import catalog as catalog_module
from inslytic_fast.ingest import keyring as keyring_module
from inslytic_fast.ingest.catalog import CATALOG_FILE, Catalog, CatalogError, ProjectError
from inslytic_fast.ingest.keyring import KeyRing, Project
from inslytic_fast.ingest.keys import KEY_LENGTH, KEY_PREFIX, generate_key, key_is_well_formed

KEY_RE = re.compile(r"ik_live_[0-9A-Za-z]{32}[0-9A-Za-z]{6}")
BASE62 = "0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"


class FakeClock:
    def __init__(self, now: float = 1_700_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


class NoProbe(dict):
    """A key map that fails the test if anything looks a key up in it."""

    def get(self, *args):
        raise AssertionError("lookup probed the key map for a key the checksum should reject")


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def catalog(tmp_path: Path, clock: FakeClock) -> Catalog:
    return Catalog(tmp_path, clock=clock)


@pytest.fixture
def ring(tmp_path: Path, clock: FakeClock) -> KeyRing:
    ring = KeyRing(tmp_path, clock=clock)
    ring.load()
    return ring


# Key format --------------------------------------------------------------------------------


def test_generated_keys_have_the_documented_format():
    keys = {generate_key() for _ in range(500)}
    assert len(keys) == 500
    for key in keys:
        assert len(key) == KEY_LENGTH == 46
        assert KEY_RE.fullmatch(key)
        assert key_is_well_formed(key.encode())


def test_key_bodies_use_the_whole_alphabet():
    # 32 chars x 500 keys: a generator stuck on a subset of base62 would show here.
    seen = set("".join(generate_key()[len(KEY_PREFIX) : -6] for _ in range(500)))
    assert seen == set(BASE62)


def test_checksum_is_crc32_of_the_body_in_base62():
    key = generate_key()
    body, check = key[len(KEY_PREFIX) : -6], key[-6:]
    value = 0
    for char in check:
        value = value * 62 + BASE62.index(char)
    assert value == __import__("zlib").crc32(body.encode())


# lookup ------------------------------------------------------------------------------------


def test_lookup_finds_the_project_of_a_valid_key(catalog, ring):
    key = catalog.create_project("shop", 500)
    assert ring.reload_if_changed()
    project = ring.lookup(key.encode())
    assert isinstance(project, Project)
    assert (project.name, project.events_per_minute) == ("shop", 500)
    assert ring.projects == {"shop": project}


def test_every_one_character_typo_is_rejected_without_probing_the_map(catalog, ring):
    key = catalog.create_project("shop")
    ring.reload_if_changed()
    ring._by_digest = NoProbe(ring._by_digest)
    typos = 0
    for position in range(len(KEY_PREFIX), KEY_LENGTH):
        for char in BASE62:
            if char != key[position]:
                typo = key[:position] + char + key[position + 1 :]
                assert ring.lookup(typo.encode()) is None
                typos += 1
    assert typos == (KEY_LENGTH - len(KEY_PREFIX)) * 61


def test_every_adjacent_transposition_is_rejected_without_probing_the_map(catalog, ring):
    # CRC32 detects every error burst of up to 32 bits; swapping neighbours is a 16-bit one.
    key = catalog.create_project("shop")
    ring.reload_if_changed()
    ring._by_digest = NoProbe(ring._by_digest)
    swapped = 0
    for i in range(len(KEY_PREFIX), KEY_LENGTH - 1):
        if key[i] != key[i + 1]:
            typo = key[:i] + key[i + 1] + key[i] + key[i + 2 :]
            assert ring.lookup(typo.encode()) is None
            swapped += 1
    assert swapped > 0


@pytest.mark.parametrize(
    "token",
    [b"", b"x", b"ik_live_", b"ik_test_" + b"a" * 38, b" " * KEY_LENGTH, "é".encode() * 23],
)
def test_malformed_tokens_are_rejected_without_probing_the_map(ring, token):
    ring._by_digest = NoProbe()
    assert ring.lookup(token) is None


def test_truncated_and_extended_keys_are_rejected(catalog, ring):
    key = catalog.create_project("shop").encode()
    ring.reload_if_changed()
    ring._by_digest = NoProbe(ring._by_digest)
    assert ring.lookup(key[:-1]) is None
    assert ring.lookup(key + b"0") is None
    assert ring.lookup(b" " + key[:-1]) is None


def test_a_well_formed_key_that_was_never_issued_is_refused(catalog, ring):
    catalog.create_project("shop")
    ring.reload_if_changed()
    assert ring.lookup(generate_key().encode()) is None


# Catalog file ------------------------------------------------------------------------------


def test_catalog_is_mode_0600_and_holds_only_digests(tmp_path, catalog):
    key = catalog.create_project("shop")
    path = tmp_path / CATALOG_FILE
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE((tmp_path / "catalog.lock").stat().st_mode) == 0o600
    text = path.read_text()
    body = key[len(KEY_PREFIX) :]
    assert key not in text
    # No run of the secret part longer than the 4 characters the display prefix shows.
    assert not any(body[i : i + 5] in text for i in range(len(body) - 4))
    assert hashlib.sha256(key.encode()).hexdigest() in text
    assert '"version": 1' in text


def test_catalog_mode_ignores_a_permissive_umask(tmp_path, catalog):
    old = os.umask(0)
    try:
        catalog.create_project("shop")
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / CATALOG_FILE).stat().st_mode) == 0o600


def test_writes_leave_no_temp_files_and_clear_stale_ones(tmp_path, catalog):
    catalog.create_project("a")
    stale = tmp_path / f".{CATALOG_FILE}.999.deadbeef.tmp"
    stale.write_text("{half a catal")
    catalog.create_project("b")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["catalog.json", "catalog.lock"]


def test_a_failed_write_is_a_catalog_error_and_changes_nothing(tmp_path, catalog, monkeypatch):
    catalog.create_project("shop")
    before = (tmp_path / CATALOG_FILE).read_bytes()

    def disk_full(fd):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "fsync", disk_full)
    with pytest.raises(CatalogError, match="cannot write catalog .*No space left"):
        catalog.create_project("other")
    monkeypatch.undo()
    assert (tmp_path / CATALOG_FILE).read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["catalog.json", "catalog.lock"]


def test_missing_catalog_means_no_projects(tmp_path):
    ring = KeyRing(tmp_path / "not-yet")
    ring.load()
    assert ring.projects == {}
    assert not (tmp_path / "not-yet").exists()  # reading creates nothing


def test_duplicate_names_are_refused_ignoring_case(catalog):
    catalog.create_project("Shop")
    with pytest.raises(ProjectError, match="'Shop' already exists"):
        catalog.create_project("Shop")
    with pytest.raises(ProjectError, match="names ignore case"):
        catalog.create_project("shop")


@pytest.mark.parametrize(
    "name", ["", "a b", "../x", "x/y", "é", "a" * 65, "a.b", "project=x", "x\n", "my_ik_live_x"]
)
def test_invalid_names_are_refused(catalog, name):
    with pytest.raises(ProjectError, match="invalid project name"):
        catalog.create_project(name)


def test_a_key_given_as_a_project_name_is_never_echoed(catalog):
    key = generate_key()
    for operation in (
        lambda: catalog.create_project(key),
        lambda: catalog.delete_project(key),
        lambda: catalog.set_limit("x" + key, 5),
    ):
        with pytest.raises(ProjectError) as info:
            operation()
        assert key[12:] not in str(info.value)
        assert key[:12] in str(info.value)  # enough for the operator to see what they pasted


def test_unknown_project_operations_are_refused(catalog):
    for operation in (
        lambda: catalog.set_limit("nope", 5),
        lambda: catalog.rotate_key("nope", 60),
        lambda: catalog.revoke_key("nope", "ik_live_abcd"),
        lambda: catalog.delete_project("nope"),
    ):
        with pytest.raises(ProjectError, match="no project named 'nope'"):
            operation()


def test_concurrent_writers_lose_nothing(tmp_path):
    names = [f"p{i}" for i in range(16)]
    barrier = threading.Barrier(len(names))
    keys: dict[str, str] = {}

    def create(name: str) -> None:
        barrier.wait()
        keys[name] = Catalog(tmp_path).create_project(name)

    threads = [threading.Thread(target=create, args=(n,)) for n in names]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    ring = KeyRing(tmp_path)
    ring.load()
    assert sorted(ring.projects) == sorted(names)
    for name, key in keys.items():
        assert ring.lookup(key.encode()).name == name


def test_a_stuck_lock_holder_gives_a_clear_error(tmp_path, catalog, monkeypatch):
    monkeypatch.setattr(catalog_module, "LOCK_TIMEOUT_SECONDS", 0.05)
    catalog.create_project("a")
    before = (tmp_path / CATALOG_FILE).read_bytes()
    fd = os.open(tmp_path / "catalog.lock", os.O_RDWR)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        with pytest.raises(CatalogError, match=r"catalog lock .*catalog.lock is still held"):
            Catalog(tmp_path).create_project("b")
    finally:
        os.close(fd)
    assert (tmp_path / CATALOG_FILE).read_bytes() == before


# Rotation, revocation, expiry --------------------------------------------------------------


def test_rotation_keeps_both_keys_until_the_old_one_expires(catalog, ring, clock):
    old = catalog.create_project("shop").encode()
    clock.now += 10
    new, old_records = catalog.rotate_key("shop", keep_old_for=60)
    new = new.encode()
    assert [r.prefix for r in old_records] == [old[:12].decode()]
    assert ring.reload_if_changed()
    clock.now += 59.999
    assert ring.lookup(old).name == "shop"
    assert ring.lookup(new).name == "shop"
    clock.now += 0.001  # exactly keep_old_for after the rotation
    assert ring.lookup(old) is None
    assert ring.lookup(new).name == "shop"


def test_rotation_with_zero_grace_revokes_the_old_key_at_once(catalog, ring):
    old = catalog.create_project("shop").encode()
    new, old_records = catalog.rotate_key("shop", keep_old_for=0)
    assert old_records == []
    ring.reload_if_changed()
    assert ring.lookup(old) is None
    assert ring.lookup(new.encode()).name == "shop"


def test_a_second_rotation_does_not_extend_an_earlier_grace_period(catalog, ring, clock):
    first = catalog.create_project("shop").encode()
    catalog.rotate_key("shop", keep_old_for=60)  # first expires at +60
    clock.now += 30
    second, _ = catalog.rotate_key("shop", keep_old_for=3600)
    third, _ = catalog.rotate_key("shop", keep_old_for=3600)
    ring.reload_if_changed()
    clock.now += 30
    assert ring.lookup(first) is None
    assert ring.lookup(second.encode()).name == "shop"
    assert ring.lookup(third.encode()).name == "shop"


def test_expired_keys_are_dropped_from_the_catalog_on_the_next_write(tmp_path, catalog, clock):
    catalog.create_project("shop")
    catalog.rotate_key("shop", keep_old_for=60)
    assert len(catalog.read().projects["shop"].keys) == 2
    clock.now += 61
    catalog.create_project("other")
    assert len(catalog.read().projects["shop"].keys) == 1


def test_revoke_by_display_prefix_with_or_without_the_fixed_part(catalog, ring):
    first = catalog.create_project("shop")
    second, _ = catalog.rotate_key("shop", keep_old_for=600)
    revoked, remaining = catalog.revoke_key("shop", first[:12])
    assert (revoked.prefix, remaining) == (first[:12], 1)
    revoked, remaining = catalog.revoke_key("shop", second[len(KEY_PREFIX) : 12])
    assert (revoked.prefix, remaining) == (second[:12], 0)
    ring.reload_if_changed()
    assert ring.lookup(first.encode()) is None
    assert ring.lookup(second.encode()) is None
    assert "shop" in ring.projects  # the project stays, keyless


def test_revoke_by_the_whole_leaked_key(catalog, ring):
    key = catalog.create_project("shop")
    revoked, _ = catalog.revoke_key("shop", key)
    assert revoked.prefix == key[:12]
    ring.reload_if_changed()
    assert ring.lookup(key.encode()) is None


def test_a_key_in_use_is_refused_as_soon_as_the_revocation_is_reloaded(catalog, ring):
    key = catalog.create_project("shop")
    ring.reload_if_changed()
    for _ in range(3):  # served many times: the ring remembers it was verified
        assert ring.lookup(key.encode()).name == "shop"
    catalog.revoke_key("shop", key)
    assert ring.lookup(key.encode()).name == "shop"  # not reloaded yet
    assert ring.reload_if_changed()
    assert ring.lookup(key.encode()) is None
    catalog.delete_project("shop")
    ring.reload_if_changed()
    assert ring.lookup(key.encode()) is None


def test_only_keys_that_matched_a_digest_are_remembered(catalog, ring):
    key = catalog.create_project("shop")
    ring.reload_if_changed()
    forged = key[:-1] + ("A" if key[-1] != "A" else "B")
    for guess in (forged, key[:-4] + "abcd", "ik_live_" + "x" * 30, key):
        ring.lookup(guess.encode())
    assert list(ring._verified) == [key.encode()]


def test_revoke_errors_never_echo_more_than_a_display_prefix(catalog):
    key = catalog.create_project("shop")
    other = catalog.create_project("other")
    for attempt in (other, other[:-1], other[:20], "ik_live_zzzz"):
        with pytest.raises(ProjectError) as info:
            catalog.revoke_key("shop", attempt)
        assert other[12:16] not in str(info.value)
        assert key not in str(info.value)


def test_an_ambiguous_prefix_is_refused(catalog, ring):
    catalog.create_project("shop")
    catalog.rotate_key("shop", keep_old_for=600)
    with catalog.edit() as doc:  # two keys whose display prefixes collide (1 in 14.7M)
        keys = doc.projects["shop"].keys
        keys[1].prefix = keys[0].prefix
    with pytest.raises(ProjectError, match="2 keys of project 'shop' share"):
        catalog.revoke_key("shop", keys[0].prefix)


# Reloading ---------------------------------------------------------------------------------


def test_reload_picks_up_every_write_even_within_one_mtime_tick(catalog, ring):
    # Back-to-back CLI writes land within the same timestamp tick; each must be seen by the
    # very next reload call.
    key = catalog.create_project("shop", 100).encode()
    assert ring.reload_if_changed()
    project = ring.lookup(key)
    for limit in (200, 300, None, 0):
        catalog.set_limit("shop", limit)
        assert ring.reload_if_changed()
        assert ring.lookup(key) is project  # same instance, limit updated in place
        assert project.events_per_minute == limit
    catalog.revoke_key("shop", key.decode())
    assert ring.reload_if_changed()
    assert ring.lookup(key) is None
    new = catalog.create_project("new").encode()
    assert ring.reload_if_changed()
    assert ring.lookup(new).name == "new"
    assert not ring.reload_if_changed()  # nothing changed since


def test_reload_sees_an_in_place_edit_that_keeps_size_and_timestamps(tmp_path, catalog):
    # A hand edit rewriting the file in place within one timestamp tick keeps inode, mtime,
    # ctime and size: the racy-file check must still compare contents.
    catalog.create_project("shop", 100)
    ring = KeyRing(tmp_path, clock=time.time)
    ring.load()
    path = tmp_path / CATALOG_FILE
    before = path.stat()
    with open(path, "r+b") as fh:
        data = fh.read().replace(b'"events_per_minute": 100', b'"events_per_minute": 700')
        fh.seek(0)
        fh.write(data)
    os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns))
    # ctime moved unless the edit fell in the same tick as the write; make it so.
    ring._seen_signature = keyring_module._signature(path.stat())
    assert ring.reload_if_changed()
    assert ring.projects["shop"].events_per_minute == 700


def test_an_unchanged_settled_file_is_not_re_read(tmp_path, catalog, monkeypatch):
    catalog.create_project("shop")
    later = FakeClock(time.time() + 2 * keyring_module.RACY_WINDOW_NS / 1e9)
    ring = KeyRing(tmp_path, clock=later)
    ring.load()

    def fail(*_args):
        raise AssertionError("re-read an unchanged catalog")

    monkeypatch.setattr(ring, "_read_bytes", fail)
    assert not ring.reload_if_changed()


def test_a_removed_catalog_refuses_every_key(tmp_path, catalog, ring, caplog):
    key = catalog.create_project("shop").encode()
    ring.reload_if_changed()
    (tmp_path / CATALOG_FILE).unlink()
    with caplog.at_level(logging.WARNING, logger="inslytic_fast.auth"):
        assert ring.reload_if_changed()
    assert ring.lookup(key) is None
    assert "was removed" in caplog.text


# Corrupt catalogs --------------------------------------------------------------------------

CORRUPTIONS = {
    "truncated": lambda data: data[: len(data) // 2],
    "empty": lambda data: b"",
    "not an object": lambda data: b"[1, 2]",
    "newer version": lambda data: data.replace(b'"version": 1', b'"version": 2'),
    "wrong type": lambda data: data.replace(
        b'"events_per_minute": 100', b'"events_per_minute": "x"'
    ),
    "negative limit": lambda data: data.replace(
        b'"events_per_minute": 100', b'"events_per_minute": -1'
    ),
    "bad digest": lambda data: re.sub(rb'"sha256": "[0-9a-f]{4}', b'"sha256": "XYZW', data),
    "bad name": lambda data: data.replace(b'"shop"', b'"../shop"'),
    "naive time": lambda data: re.sub(rb'(\d\d:\d\d:\d\d(\.\d+)?)Z"', rb'\1"', data),
}


@pytest.mark.parametrize("corruption", sorted(CORRUPTIONS))
def test_a_corrupt_catalog_is_a_clear_error_and_is_left_untouched(tmp_path, catalog, corruption):
    catalog.create_project("shop", 100)
    path = tmp_path / CATALOG_FILE
    corrupt = CORRUPTIONS[corruption](path.read_bytes())
    assert corrupt != path.read_bytes()
    path.write_bytes(corrupt)
    ring = KeyRing(tmp_path)
    with pytest.raises(CatalogError, match=re.escape(str(path))) as info:
        ring.load()
    assert "left untouched" in str(info.value)
    with pytest.raises(CatalogError):
        catalog.create_project("other")  # a writer never resets what it cannot read
    assert ring.ensure_default_project() is None
    assert path.read_bytes() == corrupt


def test_a_catalog_corrupted_while_serving_keeps_the_old_keys_and_logs_once(
    tmp_path, catalog, ring, caplog
):
    key = catalog.create_project("shop", 100).encode()
    ring.reload_if_changed()
    path = tmp_path / CATALOG_FILE
    good = path.read_bytes()
    path.write_bytes(good[:-20])
    with caplog.at_level(logging.ERROR, logger="inslytic_fast.auth"):
        for _ in range(5):
            assert not ring.reload_if_changed()
    errors = [r for r in caplog.records if r.levelno == logging.ERROR]
    assert len(errors) == 1
    assert str(path) in errors[0].getMessage()
    assert ring.lookup(key).name == "shop"
    # Fixed by hand: picked up on the next tick.
    path.write_bytes(good.replace(b'"events_per_minute": 100', b'"events_per_minute": 900'))
    assert ring.reload_if_changed()
    assert ring.lookup(key).events_per_minute == 900


def test_unknown_fields_are_tolerated(tmp_path, catalog, ring):
    key = catalog.create_project("shop")
    path = tmp_path / CATALOG_FILE
    path.write_bytes(path.read_bytes().replace(b'"version": 1,', b'"version": 1, "note": "x",'))
    ring.load()
    assert ring.lookup(key.encode()).name == "shop"


# First run ---------------------------------------------------------------------------------


def test_first_run_creates_default_once(tmp_path, clock):
    ring = KeyRing(tmp_path / "data", clock=clock)
    key = ring.ensure_default_project()
    assert key is not None and KEY_RE.fullmatch(key)
    assert ring.lookup(key.encode()).name == "default"  # usable at once, no reload needed
    assert ring.projects["default"].events_per_minute is None
    assert ring.ensure_default_project() is None
    assert KeyRing(tmp_path / "data").ensure_default_project() is None


def test_no_default_when_a_project_exists(tmp_path, catalog):
    catalog.create_project("shop")
    ring = KeyRing(tmp_path)
    assert ring.ensure_default_project() is None
    ring.load()
    assert list(ring.projects) == ["shop"]


def test_a_deleted_default_is_not_resurrected(tmp_path, catalog):
    KeyRing(tmp_path).ensure_default_project()
    catalog.delete_project("default")
    ring = KeyRing(tmp_path)
    assert ring.ensure_default_project() is None
    ring.load()
    assert ring.projects == {}


def test_first_run_races_create_one_default(tmp_path):
    rings = [KeyRing(tmp_path) for _ in range(6)]
    barrier = threading.Barrier(len(rings))
    results: list[str | None] = []

    def first_run(ring: KeyRing) -> None:
        barrier.wait()
        results.append(ring.ensure_default_project())

    threads = [threading.Thread(target=first_run, args=(r,)) for r in rings]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len([k for k in results if k is not None]) == 1
    assert len(Catalog(tmp_path).read().projects["default"].keys) == 1


# Micro-benchmark ---------------------------------------------------------------------------


@pytest.mark.slow
def test_lookup_cost(catalog, ring, capsys):
    keys = [catalog.create_project(f"p{i}").encode() for i in range(100)]
    ring.reload_if_changed()
    key, typo = keys[50], keys[50][:20] + b"!" + keys[50][21:]
    rounds = 200_000
    results = {}
    for label, token in (("valid", key), ("typo", typo), ("short", b"abc")):
        best = float("inf")
        for _ in range(5):
            start = time.perf_counter_ns()
            for _ in range(rounds):
                ring.lookup(token)
            best = min(best, (time.perf_counter_ns() - start) / rounds)
        results[label] = best
    with capsys.disabled():
        print("\nKeyRing.lookup ns/call (best of 5):", {k: round(v) for k, v in results.items()})
    # A key seen before is one dict probe; a mistyped one pays the checksum (never a hash).
    assert results["valid"] < results["typo"] < 20_000


def test_routine_reloads_log_nothing_at_info_and_new_projects_do(catalog, ring, clock, caplog):
    """Before: every reload logged an INFO line, so a script adjusting limits all day filled
    the log with them."""
    catalog.create_project("shop")
    assert ring.reload_if_changed()
    with caplog.at_level(logging.INFO, logger="inslytic_fast.auth"):
        for limit in (10, 20, 30):
            clock.now += 10  # past the racy window: the change is seen by its signature
            catalog.set_limit("shop", limit)
            assert ring.reload_if_changed()
        assert not [r for r in caplog.records if r.levelno >= logging.INFO]
        clock.now += 10
        catalog.create_project("blog")
        assert ring.reload_if_changed()
    [line] = [r.getMessage() for r in caplog.records if r.levelno >= logging.INFO]
    assert line == "key catalog reloaded: 2 projects, 2 keys"


def test_a_reload_decodes_only_the_projects_that_changed(catalog, ring, clock, monkeypatch):
    """Before: every reload decoded and converted the whole catalog on the worker's loop
    (17 ms CPU at 2,000 projects after one set-limit; ~5 ms now)."""
    for i in range(50):
        catalog.create_project(f"p{i}")
    assert ring.reload_if_changed()
    decoded = []
    real = keyring_module.PROJECT_DECODER

    class Counting:
        def decode(self, text):
            decoded.append(bytes(text))
            return real.decode(text)

    monkeypatch.setattr(keyring_module, "PROJECT_DECODER", Counting())
    clock.now += 10
    catalog.set_limit("p7", 5)
    assert ring.reload_if_changed()
    assert len(decoded) == 1 and b'"events_per_minute": 5' in decoded[0]
    assert ring.projects["p7"].events_per_minute == 5


def test_a_deleted_name_waits_until_no_server_can_take_its_old_keys(tmp_path):
    """The deletion time is a later addition to the catalog: a catalog without it still loads
    (server and CLI), and a name deleted through it is refused until the window has passed."""
    now = 1_790_000_000.0
    (tmp_path / CATALOG_FILE).write_text(
        '{"version":1,"projects":{"shop":{"created":"2026-01-01T00:00:00Z","keys":[]}}}'
    )
    ring = KeyRing(tmp_path)
    ring.load()
    assert list(ring.projects) == ["shop"]
    catalog = Catalog(tmp_path, clock=lambda: now)
    assert catalog.read().deleted == {}
    catalog.delete_project("shop")
    with pytest.raises(ProjectError, match=r"can be reused from .* \(in 5 s\)"):
        catalog.create_project("SHOP")  # names ignore case, as partition directories may
    assert ring.reload_if_changed() and ring.projects == {}
    later = Catalog(tmp_path, clock=lambda: now + catalog_module.DELETED_KEYS_ACCEPTED_FOR_S)
    later.create_project("shop")
    assert later.read().deleted == {}  # the record goes once it has served its purpose


def test_the_key_format_and_the_catalog_do_not_depend_on_the_server_side():
    """keys (format, checksum, digest) is pure: it imports nothing of the package and no I/O
    module. The catalog (what the CLI edits) never imports the server's key map."""
    import ast
    from pathlib import Path

    def imported(module) -> set[str]:
        tree = ast.parse(Path(module.__file__).read_text())
        names: set[str] = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                names.update(alias.name for alias in node.names)
            elif isinstance(node, ast.ImportFrom):
                names.add("." * node.level + (node.module or ""))
        return names

    from inslytic_fast.ingest import keys as keys_module

    assert imported(keys_module) <= {"__future__", "hashlib", "secrets", "zlib"}
    assert not {name for name in imported(catalog_module) if "keyring" in name}
