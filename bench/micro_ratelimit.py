"""Micro-benchmark of inslytic_fast.limits.ratelimit: one admission check, ns per request.

Usage:  python bench/micro_ratelimit.py [--min-time SECONDS]

Prints ONE JSON line, e.g.
  {"bench": "micro_ratelimit", "check_ns": ..., "check_and_headers_ns": ..., "projects": 1000}

``check`` is what the ingest path does for a limited project: clock read, bucket lookup with
refresh, spend. ``check_and_headers`` adds the X-RateLimit-* header bytes the 202 carries.
Requests rotate over 1000 projects so the dict lookup is not the best case of one hot key.
Each figure is the best of several timed repeats (the least noisy estimate of the code's cost).
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time

from inslytic_fast.ingest.admission import limit_headers
from inslytic_fast.limits.ratelimit import RateLimiter

PROJECTS = 1000
# High enough that no bucket runs dry during a timing loop, so every check takes the
# admit path (the one served at full load).
LIMIT = 10**12
REPEATS = 7


def time_per_call(body, calls: int) -> float:
    best = float("inf")
    for _ in range(REPEATS):
        start = time.perf_counter_ns()
        body(calls)
        best = min(best, (time.perf_counter_ns() - start) / calls)
    return best


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--min-time", type=float, default=0.2, help="seconds per repeat, about")
    args = parser.parse_args(argv)
    limiter = RateLimiter()
    names = [f"project-{i}" for i in range(PROJECTS)]
    clock = limiter.clock

    def check(calls: int) -> None:
        bucket_for = limiter.bucket
        for i in range(calls):
            bucket_for(names[i % PROJECTS], LIMIT, clock()).try_spend(1)

    def check_and_headers(calls: int) -> None:
        bucket_for = limiter.bucket
        for i in range(calls):
            now = clock()
            bucket = bucket_for(names[i % PROJECTS], LIMIT, now)
            bucket.try_spend(1)
            limit_headers(bucket, now)

    # Size the loop so a repeat lasts about --min-time.
    start = time.perf_counter()
    check(10_000)
    calls = max(10_000, int(10_000 * args.min_time / max(1e-9, time.perf_counter() - start)))
    result = {
        "bench": "micro_ratelimit",
        "check_ns": round(time_per_call(check, calls), 1),
        "check_and_headers_ns": round(time_per_call(check_and_headers, calls), 1),
        "projects": PROJECTS,
        "calls_per_repeat": calls,
        "python": platform.python_version(),
    }
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
