"""Settings resolution: flag > env > TOML file > default, with clear errors."""

from __future__ import annotations

import os
import tomllib
from pathlib import Path

import pytest

from inslytic_fast.config import OPTIONS, ConfigError, Settings, example_config, resolve


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
