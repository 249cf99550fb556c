"""Settings, resolved once at start: command-line flag > environment > TOML file > default.

Every option is declared once in ``OPTIONS``, with its default: ``Settings``, the ``serve``
parser, the ``INSLYTIC_*`` environment variables, the TOML keys and the example config file
(``config_render``) are all derived from that table, so they cannot drift apart.
"""

from __future__ import annotations

import os
import re
import socket
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .http.forwarded import TrustedProxies
from .ingest.dedup import BUCKET_SLOTS, DEFAULT_SLOTS
from .units import ByteSize, KiB, MiB, Seconds, parse_cpu_list


@dataclass(frozen=True, slots=True)
class Option:
    name: str  # snake_case: attribute, TOML key; flag is --kebab-case; env is INSLYTIC_UPPER
    type: type
    default: Any
    help: str
    choices: tuple[str, ...] | None = None
    metavar: str | None = None  # in --help; derived from the type when None (see metavar())
    # Conventional variables read after INSLYTIC_*: PORT (Heroku, Cloud Run), WEB_CONCURRENCY
    # (gunicorn, uvicorn).
    fallback_env: tuple[str, ...] = ()

    @property
    def flag(self) -> str:
        return "--" + self.name.replace("_", "-")

    @property
    def env(self) -> str:
        return "INSLYTIC_" + self.name.upper()


OPTIONS: tuple[Option, ...] = (
    Option("host", str, "127.0.0.1", "address to listen on", metavar="ADDRESS"),
    Option("port", int, 8080, "TCP port to listen on", metavar="PORT", fallback_env=("PORT",)),
    Option(
        "data_dir",
        str,
        "./inslytic-data",
        "where the log, Parquet files and key catalog live",
        metavar="DIR",
    ),
    Option(
        "durability",
        str,
        "fsync",
        "fsync: a 202 is sent only after the events are fsync'd (default). "
        "none: skip fsync -- FOR BENCHMARKS ONLY, a crash loses acknowledged events",
        choices=("fsync", "none"),
    ),
    Option(
        "events_per_minute",
        int,
        1000,
        "default token-bucket size per project (API reference: 1,000 events/minute); "
        "a project's own limit overrides it",
    ),
    # h11 and uvicorn use 16 KiB for request line + headers (nginx's large_client_header_buffers
    # is 4 x 8k); SDKs send a handful of short headers.
    Option("max_header_bytes", ByteSize, 16 * KiB, "request line + headers cap; over it -> 431"),
    # The hosted API's 1,000-event batches of ~1-2 KiB events fit in a few MiB after gzip.
    Option(
        "max_body_bytes", ByteSize, 5 * MiB, "request body cap as sent (compressed); over it -> 413"
    ),
    Option(
        "max_decompressed_bytes",
        ByteSize,
        20 * MiB,
        "cap on a gzip/deflate body once inflated; over it -> 413 (stops a gzip bomb early)",
    ),
    # Slowloris defence; 10 s / 30 s as the ingestion issue specifies (nginx: 60 s each).
    Option("header_timeout", Seconds, 10.0, "seconds to receive request line + headers; then 408"),
    Option("body_timeout", Seconds, 30.0, "seconds a body may stall between reads; then 408"),
    # AWS ALB's default idle timeout is 60 s; nginx keepalive_timeout is 75 s.
    Option("keepalive_timeout", Seconds, 60.0, "seconds an idle keep-alive connection is kept"),
    # nginx's send_timeout is 60 s between two writes; a non-reading client here also pins
    # memory (up to the per-connection bound, README: Reliability), so half that.
    Option(
        "send_timeout",
        Seconds,
        30.0,
        "seconds unsent answers may wait for a client that does not read them; then abort",
    ),
    Option("max_connections", int, 10_000, "open connections cap; over it new ones get 503"),
    Option(
        "max_pipelined",
        int,
        64,
        "requests in flight on one connection before reading from it pauses",
    ),
    Option(
        "cors_origins",
        str,
        "*",
        "comma-separated origins allowed by CORS, or * for any",
    ),
    # The roller's Parquet output and DuckDB temp files need room before the disk is full.
    Option(
        "min_free_bytes",
        ByteSize,
        512 * MiB,
        "refuse ingest (503, /ready 503) when the data dir's disk has less free space than this",
    ),
    # 2 GiB of unrolled log is minutes of peak ingest: enough to ride out a slow roll or a
    # compaction, small enough that query (which reads the log tail in Python) stays quick.
    Option(
        "max_unrolled_bytes",
        ByteSize,
        2048 * MiB,
        "refuse ingest (503) when this much log is waiting to be rolled to Parquet",
    ),
    Option("shutdown_timeout", Seconds, 10.0, "seconds SIGTERM waits for in-flight requests"),
    Option(
        "retention_days",
        int,
        0,
        "drop Parquet partitions whose event date is older than this many days (0: keep forever)",
    ),
    Option(
        "roller_threads",
        int,
        0,
        "DuckDB threads converting the log to Parquet; 0: one per 4 usable CPUs (at least 1)",
    ),
    # A roll on the serving core slowed fdatasync to 4-7 ms on a 2-vCPU VM (README, Benchmarks):
    # a server pinned with taskset or CPUAffinity= needs somewhere else to put the roller.
    Option(
        "roller_cpus",
        str,
        "",
        "CPUs the roller process runs on, as taskset -c lists them (2, 2-3, 0,2-5); "
        "empty: the CPUs the server runs on",
    ),
    Option(
        "log_format", str, "text", "log lines for people or for shippers", choices=("text", "json")
    ),
    Option(
        "log_level",
        str,
        "info",
        "least severe log lines written (debug shows every reload and roll)",
        choices=("debug", "info", "warning", "error"),
    ),
    # 16 bytes a slot; the window is min(24 h, slots / keyed messages per second): README,
    # Exactly once, sizes it from the measured rates.
    Option(
        "dedup_slots",
        int,
        DEFAULT_SLOTS,
        "slots of the dedup table of retried messages (16 bytes each, a power of two)",
    ),
    Option(
        "access_log",
        bool,
        False,
        "log one line per request (method, path, status, bytes, ms); off by default for speed",
    ),
    # Prometheus scrapes over a management network, the API on the public one.
    Option(
        "trusted_proxies",
        str,
        "",
        "comma-separated addresses or networks (10.0.0.0/8) of proxies in front, whose "
        "X-Forwarded-For names the client in the access log; empty: trust none",
        metavar="ADDRESSES",
    ),
    Option(
        "metrics_port",
        int,
        0,
        "serve GET /metrics on this port only (same --host), not on --port; 0: on --port",
        metavar="PORT",
    ),
    Option(
        "metrics_token",
        str,
        "",
        "require 'Authorization: Bearer TOKEN' on GET /metrics (Prometheus' bearer_token); "
        "empty: no auth. Prefer the env var: flags show in ps",
    ),
    Option(
        "tls_cert", str, "", "PEM certificate chain: serve HTTPS (needs --tls-key)", metavar="FILE"
    ),
    Option("tls_key", str, "", "PEM private key for --tls-cert", metavar="FILE"),
    Option(
        "workers",
        int,
        0,
        "worker processes sharing the port; 0: one per CPU this process may use; "
        "1: a single process",
        fallback_env=("WEB_CONCURRENCY",),
    ),
    # Cluster mode (README, Cluster mode). The URL names no secret: the password comes from
    # INSLYTIC_COORDINATOR_PASSWORD, so it shows neither in ps nor in --print-config.
    Option(
        "coordinator",
        str,
        "",
        "redis://HOST:PORT/DB of the Redis/Valkey all nodes share: projects, keys and rate "
        "limits become cluster-wide (needs the cluster extra); empty: this node alone",
        metavar="URL",
    ),
    Option(
        "lake",
        str,
        "",
        "s3://BUCKET/PREFIX: upload finished Parquet files there, exactly once, and delete the "
        "local copies (needs the cluster extra; AWS credentials from the environment); "
        "empty: Parquet stays in the data dir",
        metavar="URL",
    ),
    Option(
        "s3_endpoint",
        str,
        "",
        "S3 API endpoint for --lake (MinIO, SeaweedFS, Ceph, R2), e.g. http://minio:9000; "
        "empty: AWS S3",
        metavar="URL",
    ),
    Option(
        "node_id",
        str,
        "",
        "this node's name in a cluster (coordinator membership, logs); empty: the host name",
        metavar="NAME",
    ),
)

# A node id names objects and members: path- and URL-safe.
NODE_ID_RE = re.compile(r"[A-Za-z0-9._-]{1,64}")

_BY_NAME = {opt.name: opt for opt in OPTIONS}


def option(name: str) -> Option:
    """The table's row of a setting: its environment variable, default and flag."""
    return _BY_NAME[name]


def env_or_default(name: str, environ: Mapping[str, str] | None = None) -> Any:
    """A serve setting as the other commands take it: its INSLYTIC_* variable when set and not
    empty, else the table's default (flags and the config file are serve's)."""
    opt = _BY_NAME[name]
    return (os.environ if environ is None else environ).get(opt.env) or opt.default


def usable_cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


class ConfigError(Exception):
    """A setting that cannot be used; the message names its source."""


def _settled(name: str, value: Any) -> Any:
    """An option's coerced value in the form ``Settings`` holds it (ValueError if unusable)."""
    if name == "data_dir":
        return Path(value).expanduser()
    if name == "cors_origins":
        return tuple(o.strip() for o in str(value).split(",") if o.strip()) or ("*",)
    if name == "roller_cpus":
        # All of the machine's CPUs, not only this process's: the point is to leave its pin.
        return parse_cpu_list(value, os.cpu_count() or 1)
    return value


def _default(name: str) -> Any:
    """A ``Settings`` field's default: its option's, as ``resolve`` would settle it."""
    return _settled(name, _BY_NAME[name].default)


@dataclass(frozen=True, slots=True)
class Settings:
    """What ``resolve`` produced. Built directly (embedding, tests, bench harnesses) the defaults
    are OPTIONS', except that ``workers`` and ``roller_threads`` are 1 instead of "one per
    CPU": one process with one roller thread, whatever the machine."""

    host: str = _default("host")
    port: int = _default("port")
    data_dir: Path = _default("data_dir")
    durability: str = _default("durability")
    events_per_minute: int = _default("events_per_minute")
    max_header_bytes: int = _default("max_header_bytes")
    max_body_bytes: int = _default("max_body_bytes")
    max_decompressed_bytes: int = _default("max_decompressed_bytes")
    header_timeout: float = _default("header_timeout")
    body_timeout: float = _default("body_timeout")
    keepalive_timeout: float = _default("keepalive_timeout")
    send_timeout: float = _default("send_timeout")
    max_connections: int = _default("max_connections")
    max_pipelined: int = _default("max_pipelined")
    cors_origins: tuple[str, ...] = _default("cors_origins")
    min_free_bytes: int = _default("min_free_bytes")
    max_unrolled_bytes: int = _default("max_unrolled_bytes")
    shutdown_timeout: float = _default("shutdown_timeout")
    retention_days: int = _default("retention_days")
    workers: int = 1
    roller_threads: int = 1
    roller_cpus: tuple[int, ...] = _default("roller_cpus")  # empty: the server's affinity
    log_format: str = _default("log_format")
    log_level: str = _default("log_level")
    trusted_proxies: str = _default("trusted_proxies")
    dedup_slots: int = _default("dedup_slots")
    access_log: bool = _default("access_log")
    metrics_port: int = _default("metrics_port")
    metrics_token: str = _default("metrics_token")
    tls_cert: str = _default("tls_cert")
    tls_key: str = _default("tls_key")
    coordinator: str = _default("coordinator")
    lake: str = _default("lake")
    s3_endpoint: str = _default("s3_endpoint")
    node_id: str = _default("node_id")
    sources: dict[str, str] = field(default_factory=dict, compare=False)

    @property
    def fsync(self) -> bool:
        return self.durability == "fsync"

    @property
    def node(self) -> str:
        """--node-id, or the host name (its first label: a node id is path- and URL-safe)."""
        if self.node_id:
            return self.node_id
        name = socket.gethostname().split(".")[0]
        return name if NODE_ID_RE.fullmatch(name) else "node"


def _coerce(opt: Option, value: Any, source: str) -> Any:
    try:
        if opt.type is bool and isinstance(value, str):
            return value.lower() in ("1", "true", "yes", "on")
        if opt.type is not bool and isinstance(value, bool):
            raise ValueError
        value = opt.type(value)
        if isinstance(value, ByteSize | Seconds):  # plain numbers from here on
            value = int(value) if isinstance(value, int) else float(value)
    except (TypeError, ValueError):
        what = getattr(opt.type, "description", opt.type.__name__)
        raise ConfigError(f"{source}: {opt.name} must be {what}, got {value!r}") from None
    if opt.choices and value not in opt.choices:
        raise ConfigError(f"{source}: {opt.name} must be one of {', '.join(opt.choices)}")
    if opt.type is not bool and issubclass(opt.type, int | float) and value < 0:
        raise ConfigError(f"{source}: {opt.name} must not be negative")
    return value


def load_toml(path: Path) -> dict[str, Any]:
    try:
        with open(path, "rb") as fh:
            raw = tomllib.load(fh)
    except OSError as exc:
        raise ConfigError(f"cannot read config file {path}: {exc.strerror}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"config file {path} is not valid TOML: {exc}") from None
    table = raw.get("serve", raw)
    out = {}
    for key, value in table.items():
        name = key.replace("-", "_")
        if name not in _BY_NAME:
            raise ConfigError(f"config file {path}: unknown setting {key!r}")
        out[name] = value
    return out


def resolve(
    flags: dict[str, Any],
    environ: Mapping[str, str] | None = None,
    config_file: str | None = None,
) -> Settings:
    """Merge the sources; ``flags`` holds None for every flag not given on the command line."""
    environ = os.environ if environ is None else environ
    config_file = config_file or environ.get("INSLYTIC_CONFIG")
    from_file = load_toml(Path(config_file)) if config_file else {}
    values: dict[str, Any] = {}
    sources: dict[str, str] = {}
    for opt in OPTIONS:
        fallback = next((name for name in opt.fallback_env if environ.get(name)), None)
        if flags.get(opt.name) is not None:
            value, source = flags[opt.name], opt.flag
        elif opt.env in environ:
            value, source = environ[opt.env], opt.env
        elif fallback is not None:
            value, source = environ[fallback], fallback
        elif opt.name in from_file:
            value, source = from_file[opt.name], f"{config_file}"
        else:
            value, source = opt.default, "default"
        values[opt.name] = _coerce(opt, value, source)
        sources[opt.name] = source
    if not 0 < values["port"] < 65536 and values["port"] != 0:
        raise ConfigError(f"{sources['port']}: port must be 0-65535")
    if not 0 <= values["metrics_port"] < 65536:
        raise ConfigError(f"{sources['metrics_port']}: metrics_port must be 0-65535")
    if values["metrics_port"] and values["metrics_port"] == values["port"]:
        raise ConfigError("--metrics-port must differ from --port (0 serves /metrics on --port)")
    try:
        TrustedProxies(values["trusted_proxies"])
    except ValueError as exc:
        raise ConfigError(f"{sources['trusted_proxies']}: trusted_proxies: {exc}") from None
    if bool(values["tls_cert"]) != bool(values["tls_key"]):
        raise ConfigError("--tls-cert and --tls-key go together")
    slots = values["dedup_slots"]
    if slots < BUCKET_SLOTS or slots & (slots - 1):
        raise ConfigError(
            f"{sources['dedup_slots']}: dedup_slots must be a power of two >= {BUCKET_SLOTS}"
        )
    if values["workers"] == 0:
        values["workers"] = usable_cpus()
    if values["roller_threads"] == 0:
        # Rolling costs ~10 us/event on one DuckDB thread, serving ~4 us: on a big box the
        # roller needs threads of its own to keep up, on a small one it must not crowd serving.
        values["roller_threads"] = max(1, usable_cpus() // 4)
    try:
        values["roller_cpus"] = _settled("roller_cpus", values["roller_cpus"])
    except ValueError as exc:
        raise ConfigError(f"{sources['roller_cpus']}: roller_cpus {exc}") from None
    if values["roller_cpus"] and not hasattr(os, "sched_setaffinity"):
        raise ConfigError(f"{sources['roller_cpus']}: roller_cpus needs Linux (sched_setaffinity)")
    if values["coordinator"]:
        from .cluster.coordinator import CoordinatorError, check_url

        try:
            check_url(values["coordinator"])
        except CoordinatorError as exc:
            raise ConfigError(f"{sources['coordinator']}: {exc}") from None
    if values["lake"]:
        from .lake.objectstore import LakeError, parse_lake_url

        try:
            parse_lake_url(values["lake"])
        except LakeError as exc:
            raise ConfigError(f"{sources['lake']}: {exc}") from None
    elif values["s3_endpoint"]:
        raise ConfigError(f"{sources['s3_endpoint']}: s3_endpoint is only used with --lake")
    if values["node_id"] and not NODE_ID_RE.fullmatch(values["node_id"]):
        raise ConfigError(
            f"{sources['node_id']}: node_id {values['node_id']!r} must be 1-64 letters, digits, "
            "'.', '-' or '_'"
        )
    for name in ("data_dir", "cors_origins"):
        values[name] = _settled(name, values[name])
    return Settings(**values, sources=sources)
