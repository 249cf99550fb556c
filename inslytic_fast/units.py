"""Quantities in settings and flags: sizes (``5MiB``), durations (``30s``), CPU lists (``0,2-3``).

Text in, a number out, or a ValueError saying what was expected; no I/O.
"""

from __future__ import annotations

import re

KiB = 1024
MiB = 1024 * KiB
GiB = 1024 * MiB

_SIZE_UNITS = {
    "": 1, "b": 1,
    "k": KiB, "kib": KiB, "kb": 1000,
    "m": MiB, "mib": MiB, "mb": 1000**2,
    "g": GiB, "gib": GiB, "gb": 1000**3,
    "t": 1024 * GiB, "tib": 1024 * GiB, "tb": 1000**4,
}  # fmt: skip
_DURATION_UNITS = {"": 1.0, "ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}
_QUANTITY_RE = re.compile(r"\s*(-?[0-9]+(?:\.[0-9]+)?)\s*([a-z]*)\s*")  # -: "must not be negative"


def parse_size(text: str) -> int:
    """``"10MiB"`` -> 10485760: bytes, or a number with a unit (KiB, MiB, GiB, TiB; k/m/g/t
    alike; KB, MB, GB, TB are powers of 1000), case-insensitive. ValueError if not one."""
    match = _QUANTITY_RE.fullmatch(text.lower())
    if match is None or match[2] not in _SIZE_UNITS:
        raise ValueError(f"not a size: {text!r}")
    return int(float(match[1]) * _SIZE_UNITS[match[2]])


def parse_duration(text: str) -> float:
    """``"30s"`` -> 30.0: seconds, or a number with ms, s, m, h or d. ValueError if not one."""
    match = _QUANTITY_RE.fullmatch(text.lower())
    if match is None or match[2] not in _DURATION_UNITS:
        raise ValueError(f"not a duration: {text!r}")
    return float(match[1]) * _DURATION_UNITS[match[2]]


class ByteSize(int):
    """A setting in bytes: a number, or a string with a unit (``"5MiB"``)."""

    description = "a size such as 1048576, 512KiB or 5MiB"

    def __new__(cls, value: str | int = 0) -> ByteSize:
        return super().__new__(cls, parse_size(value) if isinstance(value, str) else value)


class Seconds(float):
    """A setting in seconds: a number, or a string with a unit (``"30s"``, ``"500ms"``)."""

    description = "a duration such as 30, 30s, 500ms or 2m"

    def __new__(cls, value: str | float = 0.0) -> Seconds:
        return super().__new__(cls, parse_duration(value) if isinstance(value, str) else value)


# One part of a Linux cpu-list (taskset -c, cpuset.cpus): a CPU or an inclusive range. ASCII
# digits only: int() would also take other scripts' digits.
_CPU_LIST_PART = re.compile(r"([0-9]+)(?:-([0-9]+))?")


def parse_cpu_list(text: str, cpu_count: int) -> tuple[int, ...]:
    """``"0,2-3"`` -> ``(0, 2, 3)``: distinct, ascending, each below ``cpu_count``. ``""`` ->
    ``()``: no CPUs chosen. ValueError names the part at fault."""
    if not text.strip():
        return ()
    cpus: set[int] = set()
    for raw_part in text.split(","):
        part = raw_part.strip()
        if not part:
            raise ValueError(f"has an empty part in {text!r}")
        match = _CPU_LIST_PART.fullmatch(part)
        if match is None:
            if part.startswith("-"):
                raise ValueError(f"part {part!r} is negative")
            raise ValueError(f"part {part!r} is not a CPU number or a range such as 2-5")
        first = int(match.group(1))
        last = int(match.group(2)) if match.group(2) is not None else first
        if last < first:
            raise ValueError(f"part {part!r} is a range that runs backwards")
        if last >= cpu_count:
            have = f"CPUs 0-{cpu_count - 1}" if cpu_count > 1 else "only CPU 0"
            raise ValueError(f"part {part!r} names CPU {last}; this machine has {have}")
        cpus.update(range(first, last + 1))
    return tuple(sorted(cpus))
