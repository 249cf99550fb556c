"""Settings resolution: flag > env > TOML file > default, with clear errors."""

from __future__ import annotations

import ast
import dataclasses
import inspect
import os
import tomllib
from pathlib import Path

import pytest

import inslytic_fast.cli
from inslytic_fast.config import (
    OPTIONS,
    ConfigError,
    Settings,
    env_or_default,
    option,
    resolve,
)
from inslytic_fast.config_render import example_config
from inslytic_fast.units import parse_cpu_list


def no_flags(**given):
    flags = {opt.name: None for opt in OPTIONS}
    flags.update(given)
    return flags


def test_defaults():
    settings = resolve(no_flags(), environ={})
    assert settings.port == 8080 and settings.host == "127.0.0.1"
    assert settings.data_dir == Path("./inslytic-data")
    assert settings.durability == "fsync" and settings.fsync
    assert settings.max_header_bytes == 16 * 1024
    assert settings.max_body_bytes == 5 * 1024 * 1024
    assert settings.max_decompressed_bytes == 20 * 1024 * 1024
    assert settings.cors_origins == ("*",)
    assert settings.workers == len(os.sched_getaffinity(0))


def test_settings_built_directly_default_to_the_options_table():
    """Settings() (embedding, tests, bench harnesses) must not drift from OPTIONS. The two
    'one per CPU' options are the exception: built directly, Settings means one process with
    one roller thread, whatever the machine."""
    resolved = resolve(no_flags(), environ={})
    direct = Settings()
    for opt in OPTIONS:
        if opt.name in ("workers", "roller_threads"):
            assert getattr(direct, opt.name) == 1
            continue
        assert getattr(direct, opt.name) == getattr(resolved, opt.name), opt.name


def test_precedence_flag_over_env_over_file_over_default(tmp_path):
    config = tmp_path / "c.toml"
    config.write_text('[serve]\nport = 9001\nhost = "0.0.0.0"\nevents_per_minute = 5\n')
    env = {"INSLYTIC_PORT": "9002", "INSLYTIC_HOST": "127.0.0.2"}
    settings = resolve(no_flags(port=9003), environ=env, config_file=str(config))
    assert settings.port == 9003 and settings.sources["port"] == "--port"
    assert settings.host == "127.0.0.2" and settings.sources["host"] == "INSLYTIC_HOST"
    assert settings.events_per_minute == 5
    assert settings.durability == "fsync" and settings.sources["durability"] == "default"


def test_config_file_from_env_and_top_level_keys(tmp_path):
    config = tmp_path / "c.toml"
    config.write_text("max-pipelined = 8\n")
    settings = resolve(no_flags(), environ={"INSLYTIC_CONFIG": str(config)})
    assert settings.max_pipelined == 8


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"INSLYTIC_PORT": "eighty"}, "INSLYTIC_PORT: port must be int"),
        ({"INSLYTIC_DURABILITY": "maybe"}, "durability must be one of fsync, none"),
        ({"INSLYTIC_BODY_TIMEOUT": "-1"}, "must not be negative"),
        ({"INSLYTIC_PORT": "70000"}, "port must be 0-65535"),
    ],
)
def test_bad_values_name_their_source(env, message):
    with pytest.raises(ConfigError, match=message):
        resolve(no_flags(), environ=env)


def test_unknown_or_broken_config_files_are_clear_errors(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text("prot = 1\n")
    with pytest.raises(ConfigError, match="unknown setting 'prot'"):
        resolve(no_flags(), environ={}, config_file=str(bad))
    bad.write_text("port = \n")
    with pytest.raises(ConfigError, match="not valid TOML"):
        resolve(no_flags(), environ={}, config_file=str(bad))
    with pytest.raises(ConfigError, match="cannot read config file"):
        resolve(no_flags(), environ={}, config_file=str(tmp_path / "missing.toml"))


def test_cors_origins_list():
    settings = resolve(no_flags(cors_origins="https://a.example, https://b.example"), environ={})
    assert settings.cors_origins == ("https://a.example", "https://b.example")


def test_example_config_lists_every_option_and_loads_back_to_the_defaults(tmp_path):
    text = example_config()
    assert set(tomllib.loads(text)["serve"]) == {opt.name for opt in OPTIONS}
    path = tmp_path / "example.toml"
    path.write_text(text)
    assert resolve(no_flags(), environ={}, config_file=str(path)) == resolve(no_flags(), environ={})


@pytest.mark.parametrize(
    ("text", "cpus"),
    [
        ("", ()),
        ("2", (2,)),
        ("2,3", (2, 3)),
        ("2-5", (2, 3, 4, 5)),
        ("0,2-3", (0, 2, 3)),
        ("3,1,1-2", (1, 2, 3)),  # taskset -c takes overlaps and any order; so do we
        (" 1 , 0 ", (0, 1)),  # an env var written "0, 1"
        ("7-7", (7,)),
    ],
)
def test_cpu_lists_parse_as_taskset_reads_them(text, cpus):
    assert parse_cpu_list(text, cpu_count=8) == cpus


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("2,,3", "empty part in '2,,3'"),
        ("2,", "empty part in '2,'"),
        ("5-2", "part '5-2' is a range that runs backwards"),
        ("-1", "part '-1' is negative"),
        ("two", "part 'two' is not a CPU number"),
        ("1-", "part '1-' is not a CPU number"),
        ("0-6:2", "part '0-6:2' is not a CPU number"),  # taskset's stride: not supported
        ("\u0663", "is not a CPU number"),  # an Arabic-Indic 3: int() would take it
        ("8", "part '8' names CPU 8; this machine has CPUs 0-7"),
        ("0,6-9", "part '6-9' names CPU 9; this machine has CPUs 0-7"),
    ],
)
def test_bad_cpu_lists_name_the_part_at_fault(text, message):
    with pytest.raises(ValueError, match=message):
        parse_cpu_list(text, cpu_count=8)


def test_roller_cpus_resolve_to_a_tuple_and_bad_ones_name_source_and_setting():
    assert resolve(no_flags(), environ={}).roller_cpus == ()
    assert resolve(no_flags(roller_cpus="0"), environ={}).roller_cpus == (0,)
    beyond = os.cpu_count()
    with pytest.raises(ConfigError, match=f"^--roller-cpus: roller_cpus part '{beyond}' names"):
        resolve(no_flags(roller_cpus=str(beyond)), environ={})
    with pytest.raises(ConfigError, match="^INSLYTIC_ROLLER_CPUS: roller_cpus has an empty part"):
        resolve(no_flags(), environ={"INSLYTIC_ROLLER_CPUS": "0,"})


def test_sizes_and_durations_take_units_from_every_source(tmp_path):
    config = tmp_path / "c.toml"
    config.write_text('max_unrolled_bytes = "1.5GiB"\nshutdown_timeout = "2m"\n')
    settings = resolve(
        no_flags(max_body_bytes="10MiB", keepalive_timeout="500ms"),
        environ={"INSLYTIC_MIN_FREE_BYTES": "64 MB", "INSLYTIC_HEADER_TIMEOUT": "30s"},
        config_file=str(config),
    )
    assert settings.max_body_bytes == 10 * 1024 * 1024
    assert settings.keepalive_timeout == 0.5
    assert settings.min_free_bytes == 64_000_000
    assert settings.header_timeout == 30.0
    assert settings.max_unrolled_bytes == 3 * 512 * 1024 * 1024
    assert settings.shutdown_timeout == 120.0
    assert type(settings.max_body_bytes) is int and type(settings.shutdown_timeout) is float
    with pytest.raises(ConfigError, match="max_body_bytes must be a size such as .*'10 parsecs'"):
        resolve(no_flags(), environ={"INSLYTIC_MAX_BODY_BYTES": "10 parsecs"})


def test_the_serve_flags_take_units_and_say_what_they_expect():
    from inslytic_fast.cli import build_parser

    args = build_parser().parse_args(["serve", "--max-body-bytes", "1MiB", "--body-timeout", "1m"])
    assert (args.max_body_bytes, args.body_timeout) == (1024 * 1024, 60.0)
    with pytest.raises(SystemExit):
        build_parser().parse_args(["serve", "--body-timeout", "soon"])


def test_port_and_web_concurrency_are_read_after_the_inslytic_variables():
    # The conventions of Heroku/Cloud Run (PORT) and gunicorn/uvicorn (WEB_CONCURRENCY).
    settings = resolve(no_flags(), environ={"PORT": "9000", "WEB_CONCURRENCY": "3"})
    assert (settings.port, settings.workers) == (9000, 3)
    assert settings.sources["port"] == "PORT"
    env = {"PORT": "9000", "INSLYTIC_PORT": "9001", "WEB_CONCURRENCY": "3"}
    assert resolve(no_flags(), environ=env).port == 9001
    assert resolve(no_flags(port=9002, workers=1), environ=env).workers == 1
    assert resolve(no_flags(port=9002), environ=env).port == 9002


def test_log_level_is_a_setting():
    assert resolve(no_flags(), environ={}).log_level == "info"
    assert resolve(no_flags(), environ={"INSLYTIC_LOG_LEVEL": "warning"}).log_level == "warning"
    with pytest.raises(ConfigError, match="log_level must be one of"):
        resolve(no_flags(log_level="loud"), environ={})


def test_print_config_effective_shows_the_settings_in_force_and_their_sources(tmp_path):
    import subprocess
    import sys

    env = {**os.environ, "PORT": "9100", "INSLYTIC_METRICS_TOKEN": "s3cret"}
    env.pop("INSLYTIC_PORT", None)
    cmd = [sys.executable, "-m", "inslytic_fast", "serve", "--print-config", "effective"]
    proc = subprocess.run(
        [*cmd, "--max-body-bytes", "1MiB", "--workers", "3"],
        capture_output=True, text=True, timeout=60, env=env,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert "max_body_bytes = 1048576  # --max-body-bytes" in proc.stdout
    assert "port = 9100  # PORT" in proc.stdout
    assert "s3cret" not in proc.stdout and "metrics_token" in proc.stdout
    # What it prints is a config file that gives the same settings back.
    saved = tmp_path / "effective.toml"
    saved.write_text(proc.stdout)
    assert tomllib.loads(proc.stdout)["serve"]["workers"] == 3
    again = resolve(no_flags(metrics_token="s3cret"), environ={}, config_file=str(saved))
    expected = resolve(
        no_flags(max_body_bytes=1024 * 1024, workers=3, port=9100, metrics_token="s3cret"),
        environ={},
    )
    assert again == expected


def test_the_other_commands_durations_take_the_same_units():
    from inslytic_fast.cli import build_parser

    parser = build_parser()
    assert parser.parse_args(["stats", "--interval", "500ms"]).interval == 0.5
    rotate = parser.parse_args(["projects", "rotate-key", "shop", "--keep-old-for", "90m"])
    assert rotate.keep_old_for == 5400


def test_settings_has_one_field_per_option_and_takes_its_default_from_the_table():
    fields = {f.name for f in dataclasses.fields(Settings)} - {"sources"}
    assert fields == {opt.name for opt in OPTIONS}
    # The defaults are the table's, not a second copy: no literal default in the class body
    # (workers and roller_threads are the documented 1s).
    tree = ast.parse(inspect.getsource(Settings))
    literal = [
        node.target.id
        for node in ast.walk(tree)
        if isinstance(node, ast.AnnAssign)
        and isinstance(node.target, ast.Name)
        and node.value is not None
        and not isinstance(node.value, ast.Call)
    ]
    assert literal == ["workers", "roller_threads"]


def test_the_other_commands_name_no_serve_variable_of_their_own():
    """The CLI commands take INSLYTIC_DATA_DIR & co. from the options table (env_or_default,
    option(...).env): a command that spells one out would drift from serve's."""
    env_names = {opt.env for opt in OPTIONS}
    cli_dir = Path(inslytic_fast.cli.__file__).parent
    spelled = [
        (path.name, node.value)
        for path in sorted(cli_dir.glob("*.py"))
        for node in ast.walk(ast.parse(path.read_text()))
        if isinstance(node, ast.Constant) and node.value in env_names
    ]
    assert spelled == []


def test_env_or_default_reads_the_variable_serve_reads_else_the_default():
    assert env_or_default("data_dir", {}) == option("data_dir").default == "./inslytic-data"
    assert env_or_default("data_dir", {"INSLYTIC_DATA_DIR": "/srv/x"}) == "/srv/x"
    assert env_or_default("data_dir", {"INSLYTIC_DATA_DIR": ""}) == "./inslytic-data"


def test_the_commit_log_built_directly_takes_the_config_tables_defaults():
    """The log's overload marks are serve settings: their defaults live in OPTIONS only."""
    from inslytic_fast.log.writer import CommitLog

    parameters = inspect.signature(CommitLog).parameters
    for name in ("max_unrolled_bytes", "min_free_bytes"):
        assert parameters[name].default == option(name).default == getattr(Settings(), name)
