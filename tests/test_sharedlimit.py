"""The shared rate-limit table: real mmap'd file, several processes, exact global limits."""

from __future__ import annotations

import multiprocessing

from inslytic_fast.limits.sharedlimit import SharedBudget, SharedRateLimiter, project_key
from inslytic_fast.limits.window import REFILL_SECONDS


class Clock:
    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def two_workers(tmp_path) -> tuple[SharedRateLimiter, SharedRateLimiter, Clock]:
    """Two workers' limiters over one fresh table, sharing a fake clock."""
    path = tmp_path / "rl.bin"
    SharedBudget(path, create=True).close()
    clock = Clock()
    return (
        SharedRateLimiter(SharedBudget(path), workers=2, clock=clock),
        SharedRateLimiter(SharedBudget(path), workers=2, clock=clock),
        clock,
    )


def test_two_workers_never_accept_more_than_the_limit_together(tmp_path):
    a, b, clock = two_workers(tmp_path)
    accepted = 0
    for i in range(3000):
        limiter = a if i % 3 else b
        if limiter.bucket("p", 1000, clock()).try_spend(1):
            accepted += 1
    assert accepted <= 1000
    # Bounded undershoot: at most (workers - 1) x top-up tokens stranded in the other lease.
    assert accepted >= 1000 - 1000 // 32


def test_small_limits_are_exact_and_a_refusing_worker_gives_its_lease_back(tmp_path):
    a, b, clock = two_workers(tmp_path)
    assert a.bucket("p", 5, clock()).try_spend(3)
    assert not b.bucket("p", 5, clock()).try_spend(3)
    assert b.bucket("p", 5, clock()).tokens == 2
    assert a.bucket("p", 5, clock()).try_spend(2)
    assert not b.bucket("p", 5, clock()).try_spend(1)


def test_unused_leases_go_back_on_the_tick_so_the_other_worker_can_spend_them(tmp_path):
    a, b, clock = two_workers(tmp_path)
    assert a.bucket("p", 100, clock()).try_spend(1)  # a leases 1 + a top-up of 3
    a.tick()  # marks the lease as used this tick
    a.tick()  # unused for a whole tick: given back
    assert b.bucket("p", 100, clock()).try_spend(99)
    assert not b.bucket("p", 100, clock()).try_spend(1)


def test_the_window_refills_once_for_everyone(tmp_path):
    a, b, clock = two_workers(tmp_path)
    assert a.bucket("p", 10, clock()).try_spend(10)
    assert not b.bucket("p", 10, clock()).try_spend(1)
    clock.now += REFILL_SECONDS
    assert b.bucket("p", 10, clock()).try_spend(10)
    assert not a.bucket("p", 10, clock()).try_spend(1)


def test_projects_do_not_share_budgets(tmp_path):
    path = tmp_path / "rl.bin"
    SharedBudget(path, create=True, slots=8).close()
    limiter = SharedRateLimiter(SharedBudget(path), workers=1, clock=Clock())
    for name in ("a", "b", "c"):
        assert limiter.bucket(name, 5, 0).try_spend(5)
        assert not limiter.bucket(name, 5, 0).try_spend(1)
    assert len({project_key(n) for n in ("a", "b", "c")}) == 3


def _spend_all(path: str, results, start) -> None:
    limiter = SharedRateLimiter(SharedBudget(path), workers=4)
    start.wait()
    accepted = 0
    for _ in range(2000):
        if limiter.bucket("shared", 1000, limiter.clock()).try_spend(1):
            accepted += 1
    results.put(accepted)


def test_four_processes_racing_accept_at_most_the_limit(tmp_path):
    path = tmp_path / "rl.bin"
    SharedBudget(path, create=True).close()
    ctx = multiprocessing.get_context("spawn")
    results = ctx.Queue()
    start = ctx.Event()
    procs = [ctx.Process(target=_spend_all, args=(str(path), results, start)) for _ in range(4)]
    for proc in procs:
        proc.start()
    start.set()
    total = sum(results.get(timeout=60) for _ in procs)
    for proc in procs:
        proc.join(30)
    assert 1000 - 3 * (1000 // 64) <= total <= 1000


def test_workers_that_disagree_on_a_changed_limit_never_mint_tokens(tmp_path):
    """One worker has reloaded 1000 -> 40, the other not yet: their grants alternate."""
    a, b, clock = two_workers(tmp_path)
    accepted = 0
    for i in range(400):
        limiter, limit = (a, 40) if i % 2 else (b, 1000)
        if limiter.bucket("p", limit, clock()).try_spend(20):
            accepted += 20
    assert accepted <= 1000


def test_a_full_table_limits_new_projects_per_worker_and_reuses_idle_rows(tmp_path):
    """Before: once every row held a project (16,384 in production) the rest got 429 on every
    request until a restart, each refusal locking every row twice."""
    path = tmp_path / "rl.bin"
    SharedBudget(path, create=True, slots=16).close()
    clock = Clock()
    a, b = (SharedRateLimiter(SharedBudget(path), workers=2, clock=clock) for _ in range(2))
    for i in range(16):
        assert a.bucket(f"p{i}", 10, clock()).try_spend(10)
    # The table is full of projects active this window: a new one gets its per-worker share.
    late = b.bucket("late", 10, clock())
    assert late.try_spend(5) and not late.try_spend(1)
    assert late.tokens == 0
    clock.now += REFILL_SECONDS  # p0-p15 idle for a window: their rows are free to take
    for i in range(16, 32):
        bucket = b.bucket(f"p{i}", 10, clock())
        assert bucket.try_spend(10) and not bucket.try_spend(1), "not the shared budget"
    # a's cached row of p0 now belongs to another project: a finds p0 a row of its own.
    assert not a.bucket("p0", 10, clock()).try_spend(10)  # a full table again: share of 5
    assert a.bucket("p0", 10, clock()).try_spend(5)
    clock.now += REFILL_SECONDS
    assert a.bucket("p0", 10, clock()).try_spend(10)
    assert not b.bucket("p0", 10, clock()).try_spend(1), "two rows for one project"
