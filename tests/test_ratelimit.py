"""Token buckets with a fake clock: the reference's semantics without sleeping a minute."""

from __future__ import annotations

from inslytic_fast.limits.ratelimit import RateLimiter, TokenBucket
from inslytic_fast.limits.window import REFILL_SECONDS, current_window, grant_size


class FakeClock:
    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def test_a_fresh_bucket_holds_the_full_limit_and_batches_cost_one_token_per_event():
    limiter = RateLimiter()
    bucket = limiter.bucket("p", 1000, 0.0)
    assert bucket.try_spend(600)
    assert bucket.tokens == 400
    assert not bucket.try_spend(401), "a batch costing more than what remains is refused whole"
    assert bucket.tokens == 400, "a refused batch spends nothing"
    assert bucket.try_spend(400)
    assert bucket.tokens == 0


def test_the_bucket_refills_to_full_when_the_window_ends():
    clock = FakeClock()
    limiter = RateLimiter(clock)
    bucket = limiter.bucket("p", 10, clock())
    assert bucket.try_spend(10)
    clock.now += REFILL_SECONDS - 0.001
    assert not limiter.bucket("p", 10, clock()).try_spend(1)
    clock.now += 0.001
    assert limiter.bucket("p", 10, clock()).try_spend(10)


def test_reset_counts_whole_seconds_to_the_refill_and_windows_stay_aligned():
    limiter = RateLimiter()
    bucket = limiter.bucket("p", 10, 100.0)
    assert bucket.reset_in(100.0) == 60
    assert bucket.reset_in(159.2) == 1
    bucket = limiter.bucket("p", 10, 100.0 + 3 * REFILL_SECONDS + 5)
    assert bucket.window_start == 100.0 + 3 * REFILL_SECONDS
    assert bucket.reset_in(100.0 + 3 * REFILL_SECONDS + 5) == 55


def test_projects_have_separate_buckets():
    limiter = RateLimiter()
    assert limiter.bucket("a", 5, 0).try_spend(5)
    assert limiter.bucket("b", 5, 0).try_spend(5)
    assert not limiter.bucket("a", 5, 1).try_spend(1)


def test_a_changed_limit_applies_to_the_current_window():
    limiter = RateLimiter()
    bucket = limiter.bucket("p", 100, 0)
    bucket.try_spend(30)
    assert limiter.bucket("p", 50, 1).tokens == 20  # 30 already spent of the new 50
    assert limiter.bucket("p", 10, 2).tokens == 0
    assert limiter.bucket("p", 200, 3).tokens == 170  # 30 spent: no token minted by the flip


def test_refund_only_within_the_window_the_tokens_were_spent_in():
    limiter = RateLimiter()
    bucket = limiter.bucket("p", 10, 0)
    window = bucket.window_start
    bucket.try_spend(4)
    bucket.refund(4, window)
    assert bucket.tokens == 10
    bucket.try_spend(4)
    limiter.bucket("p", 10, REFILL_SECONDS + 1)  # refilled
    bucket.refund(4, window)
    assert bucket.tokens == 10, "a refund from an old window must not overfill the new one"


def test_forget_drops_buckets_of_deleted_projects():
    limiter = RateLimiter()
    limiter.bucket("a", 1, 0)
    limiter.bucket("b", 1, 0)
    limiter.forget({"a"})
    assert set(limiter._buckets) == {"a"}


def test_a_limit_flipped_down_and_back_never_refills_the_window():
    limiter = RateLimiter()
    assert limiter.bucket("p", 1000, 0).try_spend(900)
    assert not limiter.bucket("p", 10, 1).try_spend(1)
    bucket = limiter.bucket("p", 1000, 2)
    assert bucket.tokens == 100
    assert not bucket.try_spend(101)


def test_a_bucket_spends_and_refills_by_the_shared_window_rules():
    """TokenBucket writes window.grant_size out for speed: the two must agree everywhere."""
    for limit in (0, 1, 5, 10):
        for spent in range(0, 13):
            for cost in range(1, 13):
                bucket = TokenBucket(limit, 0.0)
                bucket.spent = spent
                assert bucket.try_spend(cost) == (grant_size(limit, spent, cost, 0) == cost)
    for age in (0.0, 59.9, 60.0, 61.5, 180.0, 3599.0):
        bucket = TokenBucket(10, 100.0)
        bucket.refresh(10, 100.0 + age)
        assert bucket.window_start == current_window(100.0, 100.0 + age)
