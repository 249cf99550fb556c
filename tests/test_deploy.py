"""deploy/: the example config cannot drift, the systemd unit and the Dockerfile say what the CLI
accepts, and (slow) a wheel built from the tree installs in a clean venv and serves."""

from __future__ import annotations

import http.client
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import orjson
import pytest

from inslytic_fast import __version__
from inslytic_fast.cli import build_parser
from inslytic_fast.config import OPTIONS, resolve
from inslytic_fast.config_render import example_config
from inslytic_fast.runtime.supervisor import DRAIN_MARGIN_S

from .conftest import LISTENING_RE, STARTUP_DEADLINE_S

REPO = Path(__file__).resolve().parents[1]
DEPLOY = REPO / "deploy"
UNIT = DEPLOY / "inslytic-fast.service"
DOCKERFILE = DEPLOY / "Dockerfile"
EXAMPLE_CONFIG = DEPLOY / "config.example.toml"

VENV = "/opt/inslytic-fast/venv"
CONFIG_PATH = "/etc/inslytic-fast/config.toml"
STATE_DIR = "/var/lib/inslytic-fast"
# The README's install step (`python3 -m venv .venv && .venv/bin/pip install -e .`) without -e,
# as the image runs it; the slow tests run the Dockerfile's copy of it.
INSTALL_LINE = "python3 -m venv {venv} && {venv}/bin/pip install --no-cache-dir ."
# pip resolving and downloading uvloop, httptools, msgspec, orjson and DuckDB.
INSTALL_TIMEOUT_S = 600


# Parsing the files


def unit_settings(text: str) -> dict[str, dict[str, list[str]]]:
    """systemd's INI dialect: [Section], Key=value, repeatable keys, # and ; comments."""
    sections: dict[str, dict[str, list[str]]] = {}
    current = None
    for line in text.splitlines():
        line = line.strip()
        if not line or line[0] in "#;":
            continue
        if line.startswith("[") and line.endswith("]"):
            current = sections.setdefault(line[1:-1], {})
            continue
        key, sep, value = line.partition("=")
        assert sep and current is not None, f"not a unit line: {line!r}"
        current.setdefault(key.strip(), []).append(value.strip())
    return sections


def service() -> dict[str, str]:
    """[Service] with each key's last value (how systemd reads a repeated scalar)."""
    return {key: values[-1] for key, values in unit_settings(UNIT.read_text())["Service"].items()}


def dockerfile_instructions(text: str) -> list[tuple[str, str]]:
    joined = re.sub(r"\\\n", " ", text)
    out = []
    for line in joined.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        instruction, _, rest = line.partition(" ")
        out.append((instruction.upper(), " ".join(rest.split())))
    return out


def instructions(name: str) -> list[str]:
    return [
        rest for instr, rest in dockerfile_instructions(DOCKERFILE.read_text()) if instr == name
    ]


def exec_form(rest: str) -> list[str]:
    argv = orjson.loads(rest)
    assert isinstance(argv, list) and all(isinstance(a, str) for a in argv), rest
    return argv


def healthcheck_argv() -> list[str]:
    (rest,) = instructions("HEALTHCHECK")
    _, cmd, argv = rest.partition("CMD ")
    assert cmd, f"HEALTHCHECK without CMD: {rest}"
    return exec_form(argv)


def install_line() -> str:
    (line,) = [run for run in instructions("RUN") if "pip install" in run]
    return line


# The example config


def test_example_config_is_what_print_config_prints():
    hint = "regenerate: inslytic-fast serve --print-config > deploy/config.example.toml"
    committed = EXAMPLE_CONFIG.read_text()
    assert committed == example_config(), hint
    proc = subprocess.run(
        [sys.executable, "-m", "inslytic_fast", "serve", "--print-config"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == committed, hint


def test_example_config_has_every_option_and_resolves_to_the_defaults():
    text = EXAMPLE_CONFIG.read_text()
    for opt in OPTIONS:
        assert re.search(rf"^{opt.name} = ", text, re.M), opt.name
    from_file = resolve({}, environ={}, config_file=str(EXAMPLE_CONFIG))
    assert from_file == resolve({}, environ={})


# The systemd unit


def test_unit_runs_the_venv_command_with_the_config_file_as_a_dedicated_user():
    unit = service()
    assert unit["User"] == "inslytic" and unit["Group"] == "inslytic"
    argv = shlex.split(unit["ExecStart"])
    assert argv[0] == f"{VENV}/bin/inslytic-fast"
    args = build_parser().parse_args(argv[1:])
    assert args.command == "serve" and args.config == CONFIG_PATH
    assert unit["StateDirectory"] == "inslytic-fast"
    assert STATE_DIR in unit["ReadWritePaths"].split()
    assert unit["WorkingDirectory"] == STATE_DIR
    # Readiness is the server's word (sd_notify READY=1, tests/test_systemd.py), not exec().
    assert unit["Type"] == "notify" and unit["NotifyAccess"] == "main"


def test_unit_hardening():
    unit = service()
    expected = {
        "ProtectSystem": "strict",
        "ProtectHome": "true",
        "PrivateTmp": "true",
        "NoNewPrivileges": "true",
        "CapabilityBoundingSet": "",
        "Restart": "on-failure",
        "KillSignal": "SIGTERM",
        "LimitNOFILE": "65536",
    }
    assert {key: unit.get(key) for key in expected} == expected
    assert set(unit["RestrictAddressFamilies"].split()) == {"AF_INET", "AF_INET6", "AF_UNIX"}


def test_unit_gives_the_drain_time_before_sigkill():
    unit = service()
    defaults = {opt.name: opt.default for opt in OPTIONS}
    assert int(defaults["max_connections"]) < int(unit["LimitNOFILE"])
    # The supervisor of --workers N waits shutdown_timeout + DRAIN_MARGIN_S for its workers.
    assert float(unit["TimeoutStopSec"]) > defaults["shutdown_timeout"] + DRAIN_MARGIN_S
    assert unit["KillMode"] == "mixed"


def test_unit_passes_systemd_analyze_verify(tmp_path):
    tool = shutil.which("systemd-analyze")
    if tool is None:
        pytest.skip("systemd-analyze is not installed (apt-get install systemd to run this check)")
    # verify insists that ExecStart's program exists: point it at this environment's command.
    installed = Path(sys.executable).with_name("inslytic-fast")
    program = installed if installed.exists() else Path(sys.executable)
    text = UNIT.read_text().replace(f"{VENV}/bin/inslytic-fast", str(program), 1)
    copy = tmp_path / UNIT.name
    copy.write_text(text)
    proc = subprocess.run([tool, "verify", str(copy)], capture_output=True, text=True, timeout=60)
    findings = [line for line in (proc.stdout + proc.stderr).splitlines() if UNIT.name in line]
    assert proc.returncode == 0 and not findings, proc.stdout + proc.stderr


# The Dockerfile (no container engine here: the lines are checked, and run by the slow tests)


def test_dockerfile_base_user_volume_port():
    (base,) = instructions("FROM")
    # Pinned: a patch release of Python on a named Debian release, not a moving tag.
    assert re.fullmatch(r"python:3\.11\.\d+-slim-bookworm(@sha256:[0-9a-f]{64})?", base), base
    parsed = dockerfile_instructions(DOCKERFILE.read_text())
    users = [(i, rest) for i, (instr, rest) in enumerate(parsed) if instr == "USER"]
    assert users, "no USER: the server would run as root"
    last_user_at, user = users[-1]
    assert user.split(":")[0] not in ("root", "0")
    first_start = min(i for i, (instr, _) in enumerate(parsed) if instr in ("CMD", "ENTRYPOINT"))
    assert last_user_at < first_start
    assert instructions("VOLUME") == ["/data"]
    assert instructions("EXPOSE") == ["8080"]
    assert instructions("STOPSIGNAL") == ["SIGTERM"]


def test_dockerfile_installs_with_the_readme_install_step_into_the_units_venv():
    assert install_line() == INSTALL_LINE.format(venv=VENV)
    assert shlex.split(service()["ExecStart"])[0] == exec_form(instructions("ENTRYPOINT")[0])[0]


def test_dockerfile_copies_what_the_build_needs():
    copied = []
    for rest in instructions("COPY"):
        *sources, _dest = rest.split()
        copied += sources
    for source in copied:
        assert (REPO / source).exists(), source
    pyproject = (REPO / "pyproject.toml").read_text()
    readme = re.search(r'^readme = "([^"]+)"', pyproject, re.M).group(1)
    assert {"pyproject.toml", readme, "inslytic_fast"} <= set(copied)


def test_dockerfile_command_is_a_valid_serve_invocation():
    entrypoint = exec_form(instructions("ENTRYPOINT")[0])
    command = exec_form(instructions("CMD")[0])
    assert entrypoint == [f"{VENV}/bin/inslytic-fast"]
    args = build_parser().parse_args(command)
    assert args.command == "serve"
    assert args.host == "0.0.0.0" and args.data_dir == "/data"


def test_dockerfile_healthcheck_passes_on_a_server_and_fails_without_one(shared_server):
    argv = healthcheck_argv()
    assert argv[0] == f"{VENV}/bin/python"
    here = [sys.executable, *argv[1:]]
    env = {**os.environ, "INSLYTIC_PORT": str(shared_server.port)}
    assert subprocess.run(here, env=env, capture_output=True, timeout=60).returncode == 0
    with socket.socket() as bound_not_listening:
        bound_not_listening.bind(("127.0.0.1", 0))
        env["INSLYTIC_PORT"] = str(bound_not_listening.getsockname()[1])
        assert subprocess.run(here, env=env, capture_output=True, timeout=60).returncode != 0


@pytest.mark.skipif(shutil.which("openssl") is None, reason="openssl CLI not installed")
def test_dockerfile_healthcheck_passes_on_an_https_server(make_server, tmp_path):
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key),
         "-out", str(cert), "-days", "1", "-subj", "/CN=localhost"],
        check=True, capture_output=True, timeout=60,
    )  # fmt: skip
    server = make_server("--workers", "1", "--tls-cert", str(cert), "--tls-key", str(key))
    here = [sys.executable, *healthcheck_argv()[1:]]
    env = {**os.environ, "INSLYTIC_PORT": str(server.port)}
    assert subprocess.run(here, env=env, capture_output=True, timeout=60).returncode == 0


def test_deploy_readme_covers_every_file():
    readme = (DEPLOY / "README.md").read_text()
    for path in DEPLOY.iterdir():
        if path.name != "README.md":
            assert f"`{path.name}`" in readme, path.name


# Slow: build, install from the package index, serve


def copy_build_context(dest: Path) -> Path:
    """What the Dockerfile's COPY lines put in its WORKDIR (so a build never touches the tree).
    Only the two forms it uses: files into a directory (DEST/), a directory to a directory."""
    for rest in instructions("COPY"):
        *sources, target = rest.split()
        for source in sources:
            origin = REPO / source
            if origin.is_dir():
                shutil.copytree(origin, dest / target, ignore=shutil.ignore_patterns("__pycache__"))
            else:
                assert target.endswith("/"), f"COPY {rest}: a file into a directory, please"
                (dest / target).mkdir(parents=True, exist_ok=True)
                shutil.copy2(origin, dest / target / origin.name)
    return dest


def get(host: str, port: int, path: str) -> int:
    conn = http.client.HTTPConnection(host, port, timeout=10)
    try:
        conn.request("GET", path)
        response = conn.getresponse()
        response.read()
        return response.status
    finally:
        conn.close()


def serve_check_and_stop(venv: Path, data_dir: Path, health_env_python: Path) -> None:
    """Start the installed command, wait for its startup line, /health and the image's
    healthcheck pass, SIGTERM exits 0."""
    version = subprocess.run(
        [venv / "bin" / "inslytic-fast", "--version"], capture_output=True, text=True, timeout=60
    )
    assert version.returncode == 0 and version.stdout.strip() == f"inslytic-fast {__version__}"
    stderr_path = data_dir.parent / "serve-stderr.log"
    with open(stderr_path, "wb") as err:
        proc = subprocess.Popen(
            [venv / "bin" / "inslytic-fast", "serve", "--port", "0", "--data-dir", data_dir]
            + ["--workers", "2"],  # spawned workers re-import the installed package
            stdout=subprocess.DEVNULL,
            stderr=err,
        )
    try:
        deadline = time.monotonic() + STARTUP_DEADLINE_S
        while not (match := LISTENING_RE.search(stderr_path.read_text(errors="replace"))):
            assert proc.poll() is None, stderr_path.read_text()
            assert time.monotonic() < deadline, stderr_path.read_text()
            time.sleep(0.05)
        host, port = match.group(1), int(match.group(2))
        assert get(host, port, "/health") == 200
        env = {**os.environ, "INSLYTIC_PORT": str(port)}
        check = [str(health_env_python), *healthcheck_argv()[1:]]
        assert subprocess.run(check, env=env, capture_output=True, timeout=60).returncode == 0
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 0, stderr_path.read_text()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


@pytest.mark.slow
def test_wheel_installs_in_a_clean_venv_and_serves(tmp_path):
    source = copy_build_context(tmp_path / "src")
    dist = tmp_path / "dist"
    built = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "-w", dist, source],
        capture_output=True,
        text=True,
        timeout=INSTALL_TIMEOUT_S,
    )
    assert built.returncode == 0, built.stdout + built.stderr
    (wheel,) = dist.glob("*.whl")
    assert wheel.name.startswith(f"inslytic_fast-{__version__}-py3-none-any")
    with zipfile.ZipFile(wheel) as archive:
        names = set(archive.namelist())
        entry_points = next(n for n in names if n.endswith(".dist-info/entry_points.txt"))
        assert "inslytic-fast = inslytic_fast.cli:main" in archive.read(entry_points).decode()
    modules = {p.relative_to(REPO).as_posix() for p in (REPO / "inslytic_fast").rglob("*.py")}
    assert modules <= names, modules - names

    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", venv], check=True, timeout=120)
    installed = subprocess.run(
        [venv / "bin" / "pip", "install", "--disable-pip-version-check", wheel],
        capture_output=True,
        text=True,
        timeout=INSTALL_TIMEOUT_S,
    )
    assert installed.returncode == 0, installed.stdout + installed.stderr
    serve_check_and_stop(venv, tmp_path / "data", venv / "bin" / "python")


@pytest.mark.slow
def test_dockerfile_install_steps_work_outside_a_container(tmp_path):
    context = copy_build_context(tmp_path / "src")
    venv = tmp_path / "venv"
    line = install_line().replace(VENV, str(venv))
    env = {**os.environ, "PIP_DISABLE_PIP_VERSION_CHECK": "1"}
    env.pop("VIRTUAL_ENV", None)
    installed = subprocess.run(
        ["bash", "-c", line],
        cwd=context,
        env=env,
        capture_output=True,
        text=True,
        timeout=INSTALL_TIMEOUT_S,
    )
    assert installed.returncode == 0, installed.stdout + installed.stderr
    serve_check_and_stop(venv, tmp_path / "data", venv / "bin" / "python")


# deploy/cluster: the fleet example


CLUSTER = DEPLOY / "cluster"


def compose_commands(text: str) -> list[list[str]]:
    """Every flow-style ``command: [...]`` of the compose file (JSON-compatible lists)."""
    return [
        orjson.loads("[" + body + "]")
        for body in re.findall(r"^\s+command: \[(.*?)\]", text, re.S | re.M)
    ]


def test_every_inslytic_command_of_the_fleet_example_parses_with_the_real_cli():
    parser = build_parser()
    subcommands = set(parser._subparsers._group_actions[0].choices)  # serve, projects, lake...
    commands = [
        c for c in compose_commands((CLUSTER / "compose.yaml").read_text()) if c[0] in subcommands
    ]
    assert [c[0] for c in commands] == ["serve", "serve", "lake"]
    for command in commands:
        args = parser.parse_args(command)  # an unknown flag or a bad value exits here
        if command[0] == "serve":
            flags = {k: v for k, v in vars(args).items() if k not in ("func", "command", "config")}
            settings = resolve(flags, environ={})
            assert settings.coordinator and settings.lake and settings.node_id
    help_text = subprocess.run(
        [sys.executable, "-m", "inslytic_fast", "serve", "--help"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    for flag in {t for c in commands if c[0] == "serve" for t in c if t.startswith("--")}:
        assert flag in help_text, flag


def test_the_fleet_example_keeps_secrets_out_of_the_files():
    compose = (CLUSTER / "compose.yaml").read_text()
    assert "AWS_SECRET_ACCESS_KEY=" not in compose and "PASSWORD=" not in compose
    assert "secrets.env" in (REPO / ".gitignore").read_text()
    image = (CLUSTER / "Dockerfile").read_text()
    assert '"/src[cluster]"' in image  # the extra declared in pyproject, not a copy of its list
