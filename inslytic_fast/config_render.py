"""The options table rendered: serve's flags and their --help, the example config file, and
the settings in force (``--print-config effective``). Everything here is generated from
``config.OPTIONS``, so none of it can drift from what ``resolve`` reads.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import orjson

from .config import OPTIONS, Option, Settings
from .units import ByteSize, GiB, KiB, MiB, Seconds


def add_arguments(parser) -> None:
    """Add one flag per option to an argparse parser (defaults None: resolve() fills them in)."""
    parser.add_argument(
        "--config",
        metavar="FILE",
        default=None,
        help="TOML file with settings (keys as below, snake_case, optionally under [serve]); "
        "env INSLYTIC_CONFIG",
    )
    for opt in OPTIONS:
        if opt.type is bool:
            parser.add_argument(
                opt.flag,
                action=argparse.BooleanOptionalAction,
                default=None,
                help=f"{opt.help} (default: {'on' if opt.default else 'off'}; env {opt.env})",
            )
            continue
        parser.add_argument(
            opt.flag,
            type=_flag_type(opt),
            default=None,
            choices=opt.choices,
            metavar=None if opt.choices else metavar(opt),
            help=f"{opt.help} (default: {_shown_default(opt)}; env {_env_names(opt)})",
        )


def _flag_type(opt: Option):
    """The argparse type of a flag: its option's, with an error that says what is expected."""
    if opt.type in (int, float, str):
        return opt.type

    def parse(text: str):
        try:
            return opt.type(text)
        except ValueError:
            what = getattr(opt.type, "description", opt.type.__name__)
            raise argparse.ArgumentTypeError(f"expected {what}") from None

    parse.__name__ = opt.type.__name__
    return parse


def metavar(opt: Option) -> str:
    """One name per kind of value in --help: SIZE, DURATION, N, or what the option names."""
    if opt.metavar:
        return opt.metavar
    if opt.type is ByteSize:
        return "SIZE"
    if opt.type is Seconds:
        return "DURATION"
    if opt.type is int:
        return "N"
    return opt.name.split("_")[-1].upper()


def _shown_default(opt: Option) -> str:
    if opt.type is ByteSize and opt.default and opt.default % KiB == 0:
        for unit, size in (("GiB", GiB), ("MiB", MiB), ("KiB", KiB)):
            if opt.default % size == 0:
                return f"{opt.default // size}{unit}"
    if opt.type is Seconds:
        return f"{opt.default:g}s"
    return str(opt.default)


def _env_names(opt: Option) -> str:
    return " or ".join((opt.env, *opt.fallback_env))


def example_config() -> str:
    """The text of an example TOML file with every option at its default."""
    lines = [
        "# inslytic-fast settings; every key is optional. Flags and INSLYTIC_* env win.",
        "[serve]",
    ]
    for opt in OPTIONS:
        lines.append(f"# {opt.help}")
        default = opt.default
        if isinstance(default, bool):
            rendered = "true" if default else "false"
        elif isinstance(default, str):
            rendered = f'"{default}"'
        else:
            rendered = repr(default)
        lines.append(f"{opt.name} = {rendered}")
    return "\n".join(lines) + "\n"


# Settings whose values are secrets: --print-config effective says whether they are set.
SECRET_OPTIONS = frozenset(("metrics_token",))


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str | Path):
        return orjson.dumps(str(value)).decode()  # a JSON string is a TOML basic string
    if isinstance(value, tuple):
        return _toml_value(",".join(map(str, value)))
    return repr(value)


def effective_config(settings: Settings) -> str:
    """The settings in force, as TOML, each with the source it came from (secrets hidden)."""
    lines = ["# inslytic-fast effective settings (flag > env > config file > default)", "[serve]"]
    for opt in OPTIONS:
        value = getattr(settings, opt.name)
        source = settings.sources.get(opt.name, "default")
        if opt.name in SECRET_OPTIONS and value:
            lines.append(f'# {opt.name} = "..."  # set, from {source}; not shown')
            continue
        lines.append(f"{opt.name} = {_toml_value(value)}  # {source}")
    return "\n".join(lines) + "\n"
