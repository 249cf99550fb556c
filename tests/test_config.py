"""Settings resolution: flag > env > TOML file > default, with clear errors."""

from __future__ import annotations

import os
import tomllib
from pathlib import Path

import pytest

from inslytic_fast.config import (
    OPTIONS,
    ConfigError,
    Settings,
    example_config,
    parse_cpu_list,
    resolve,
)


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
