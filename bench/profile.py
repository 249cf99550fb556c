"""Sample the server under load with py-spy and boil the stacks down to the top functions.

py-spy is not a dependency: ``--profile PATH_TO_PY_SPY`` (e.g. a binary installed in a separate
venv) turns this on. It records in ``--nonblocking`` mode so the server is never paused (the
stacks are then occasionally torn, which a top-N list does not notice), on the generator's
CPU, for the measured window only.
"""

from __future__ import annotations

import re
import subprocess
from collections import Counter
from pathlib import Path

SAMPLE_RATE_HZ = 250  # py-spy's default is 100; more samples give a steadier top-N in 10 s
TOP_N = 25
FRAME_RE = re.compile(r"^(?P<func>.*?) \((?P<file>.*?)(?::(?P<line>\d+))?\)$")


def start(py_spy: str, pid: int, seconds: float, out: Path, preexec=None) -> subprocess.Popen:
    return subprocess.Popen(
        [
            py_spy,
            "record",
            "--pid",
            str(pid),
            "--duration",
            str(max(1, round(seconds))),
            "--rate",
            str(SAMPLE_RATE_HZ),
            "--format",
            "raw",
            "--nonblocking",
            "--output",
            str(out),
        ],  # fmt: skip
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        preexec_fn=preexec,
    )


def _short(frame: str) -> str:
    """``func (path/to/pkg/mod.py:12)`` -> ``func (pkg/mod.py)``: lines split one function."""
    match = FRAME_RE.match(frame.strip())
    if not match:
        return frame.strip()
    parts = Path(match["file"]).parts
    return f"{match['func']} ({'/'.join(parts[-2:])})"


def summarize(collapsed: str, top: int = TOP_N) -> dict:
    """Self and inclusive sample shares per function from py-spy's collapsed-stack output."""
    own: Counter[str] = Counter()
    inclusive: Counter[str] = Counter()
    total = 0
    for line in collapsed.splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        samples = int(count)
        total += samples
        frames = [_short(f) for f in stack.split(";") if f]
        if not frames:
            continue
        own[frames[-1]] += samples
        for frame in set(frames):
            inclusive[frame] += samples
    if not total:
        return {"samples": 0, "self": [], "inclusive": []}

    def share(counter: Counter[str]) -> list[list]:
        return [[name, round(100 * n / total, 1)] for name, n in counter.most_common(top)]

    return {"samples": total, "self": share(own), "inclusive": share(inclusive)}


def as_text(summary: dict, title: str) -> str:
    lines = [f"{title}: {summary['samples']} samples (non-idle)", "  self %  function"]
    lines += [f"  {pct:6.1f}  {name}" for name, pct in summary["self"]]
    lines += ["  incl %  function"]
    lines += [f"  {pct:6.1f}  {name}" for name, pct in summary["inclusive"]]
    return "\n".join(lines)
