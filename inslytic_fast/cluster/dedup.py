"""Cross-node dedup: the coordinator in front of each node's table, for retries that change node.

A load balancer may send an SDK's retry to another node; that node's table (ingest/dedup.py)
has never seen the key. With ``--coordinator``, every key the local table calls new is also
claimed in the coordinator before its events are committed:

- ``<ns>dedup:<project>:`` + the id's kind and digest (``coordinator_key``): ``p<token>``
  while a request of this process (``token``) commits it, for at most ``PENDING_CLAIM_MS``;
  ``d<count>`` once stored, for the window (24 h), as the local table keeps it.
- The claim never blocks the serving loop: the request is parked (a callback, no Task) and
  its keys queue for this process's coordinator thread, which claims every key queued
  meanwhile, from any number of requests, in one script call; it claims each key that is free
  (``SET NX PX``) and returns what the others hold. The answers resume each request on its
  loop (``call_soon_threadsafe``): a retry stored by another node is answered as the original
  was (and marked stored locally), one still committing there is refused with Retry-After, as
  a local one is, and a new one goes on to the commit log.
- Settling and releasing never hold up an answer: they queue for the same thread, which sends
  all that queued meanwhile in one pipelined round trip (before the claims). Until it lands,
  a retry elsewhere sees the claim as still committing (Retry-After), never as free.

Coordinator down or slow (a call fails or takes over ``CALL_TIMEOUT_S``): the request is
deduplicated by this node's table only, never refused for it. The failure is logged once per
outage and counted; calls resume once the coordinator link's poll reaches it again and
``RETRY_AFTER_FAILURE_S`` has passed, so an outage costs each worker at most one timeout per
``RETRY_AFTER_FAILURE_S``. Requests without ids never reach this module.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import secrets
import threading
import time
from collections import deque
from collections.abc import Sequence

from ..ingest.dedup import CLAIMED, DEFAULT_WINDOW_S, IN_FLIGHT, Claims, Confirmed, DedupTable
from .coordinator import (
    NAMESPACE,
    CoordinatorLink,
    connect,
    masked,
    no_script_error,
    redis_errors,
)

log = logging.getLogger("inslytic_fast.coordinator")

KEY_PREFIX = (NAMESPACE + "dedup:").encode()
# The id itself is not needed there, only its identity: a 16-byte digest keeps every key the
# same small size whatever the client sends (an Idempotency-Key may be 255 bytes).
DIGEST_BYTES = 16
# A commit answers within seconds (the log's own timeouts); a claim still pending after this
# belongs to a node that died mid-request, and a retry elsewhere may then be stored.
PENDING_CLAIM_MS = 60_000
# The coordinator answers in well under a millisecond on a LAN; a request waits (parked, the
# loop serving others) for its claim, so a call that takes longer than this counts as a
# failure and the request goes on with the local table.
CALL_TIMEOUT_S = 0.5
RETRY_AFTER_FAILURE_S = 5.0

# KEYS: dedup keys; ARGV[1]: this request's pending value, ARGV[2]: its expiry (ms).
# Per key: "" when claimed now, else what the key holds (p<token> or d<count>).
_CLAIM = """
local out = {}
for i, key in ipairs(KEYS) do
  if redis.call('SET', key, ARGV[1], 'NX', 'PX', ARGV[2]) then
    out[i] = ''
  else
    out[i] = redis.call('GET', key) or ''
  end
end
return out
"""
# KEYS: keys this process claimed; ARGV[1]: its pending value, ARGV[2]: d<count> to store for
# ARGV[3] ms, or "" to release. A key that expired and was claimed by another is left alone.
_SETTLE = """
for _, key in ipairs(KEYS) do
  if redis.call('GET', key) == ARGV[1] then
    if ARGV[2] == '' then
      redis.call('DEL', key)
    else
      redis.call('SET', key, ARGV[2], 'PX', ARGV[3])
    end
  end
end
return 0
"""


def coordinator_key(key: bytes) -> bytes:
    """The coordinator's name for a table key: ``inslytic:dedup:<project>:<kind><digest>``."""
    kind, project, _ = key.split(b"\0", 2)
    return b"%s%s:%s%s" % (
        KEY_PREFIX,
        project,
        kind,
        hashlib.blake2b(key, digest_size=DIGEST_BYTES).digest(),
    )


class ClusterClaims(list[tuple[int, int]]):
    """The local table's claimed slots, plus the coordinator keys claimed with them."""

    __slots__ = ("remote",)

    def __init__(self, local: Sequence[tuple[int, int]] = (), remote: Sequence[bytes] = ()):
        super().__init__(local)
        self.remote = list(remote)


class _Claim:
    """One request's keys waiting for the coordinator, and where its answer goes."""

    __slots__ = ("keys", "statuses", "claimed", "fresh", "remote", "then", "loop")

    def __init__(
        self,
        keys: list[bytes],
        statuses: list[int],
        claimed: Claims,
        fresh: list[int],
        remote: list[bytes],
        then: Confirmed,
        loop: asyncio.AbstractEventLoop,
    ) -> None:
        self.keys = keys
        self.statuses = statuses  # this node's answer, updated with the coordinator's
        self.claimed = claimed
        self.fresh = fresh  # the indexes of the keys this node called new
        self.remote = remote  # their coordinator keys
        self.then = then
        self.loop = loop


class ClusterDedup:
    """``Dedup`` for a node of a cluster: its table first, then the coordinator."""

    def __init__(
        self,
        table: DedupTable,
        link: CoordinatorLink,
        member: str,
        *,
        timeout: float = CALL_TIMEOUT_S,
        window_s: int = DEFAULT_WINDOW_S,
    ) -> None:
        self.table = table
        self.link = link
        self.client = connect(link.url, timeout=timeout)
        self.claim_script = self.client.register_script(_CLAIM)
        self.settle_script = self.client.register_script(_SETTLE)
        # Who holds a pending claim: a retry's claim on another node must not settle it.
        self.pending = f"p{member}/{secrets.token_hex(8)}".encode()
        self.window_ms = window_s * 1000
        self.errors = redis_errors()
        self.no_script = no_script_error()
        self.stats = table.stats
        self.retry_at = 0.0
        self._outage_logged = False
        self._queued: deque[tuple[list[bytes], bytes]] = deque()
        self._claims: deque[_Claim] = deque()
        self._wake = threading.Event()
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name="inslytic-dedup", daemon=True)
        self._thread.start()
        link.stoppers.append(self.stop)

    # -- the Dedup interface (on the serving loop) ----------------------------------------

    coordinated = True

    def claim(self, keys: list[bytes], owner: int) -> tuple[list[int], Claims]:
        return self.table.claim(keys, owner)

    def confirm(
        self, keys: list[bytes], statuses: list[int], claimed: Claims, then: Confirmed
    ) -> bool:
        fresh = [i for i, status in enumerate(statuses) if status == CLAIMED]
        if not fresh or IN_FLIGHT in statuses:  # nothing new, or refused whatever it holds
            return False
        if not self._reachable():
            self.stats.coordinator["local_only"] += 1
            return False
        remote = [coordinator_key(keys[i]) for i in fresh]
        loop = asyncio.get_running_loop()
        self._claims.append(_Claim(keys, statuses, claimed, fresh, remote, then, loop))
        self._wake.set()
        return True

    def _confirmed(
        self, batch: list[_Claim], answers: list[bytes] | None, error: BaseException | None
    ) -> None:
        """On the loop: the coordinator's answers to ``batch`` (None: not asked or failed,
        so each request goes on with this node's answer)."""
        if answers is None:
            if error is not None:
                self._failed(error)
            for claim in batch:
                self.stats.coordinator["local_only"] += 1
                self._resume(claim, claim.statuses, claim.claimed)
            return
        self._reached()
        offset = 0
        for claim in batch:
            held = answers[offset : offset + len(claim.remote)]
            offset += len(claim.remote)
            self._resume(claim, *self._decide(claim, held))

    @staticmethod
    def _resume(claim: _Claim, statuses: list[int], claimed: Claims) -> None:
        try:
            claim.then(statuses, claimed)
        except Exception:  # one request's fault must not leave the others of its batch parked
            log.exception("dedup: resuming a request after its claim failed")

    def _decide(self, claim: _Claim, answers: list[bytes]) -> tuple[list[int], Claims]:
        """The final statuses and claims of one request from what the coordinator held."""
        keys, statuses, claimed = claim.keys, claim.statuses, claim.claimed
        won: list[bytes] = []
        stored: list[tuple[bytes, int, int]] = []
        now = int(self.table.clock())
        for i, remote_key, held in zip(claim.fresh, claim.remote, answers, strict=True):
            kind = keys[i][0]
            if not held:
                won.append(remote_key)
            elif held[:1] == b"d":
                statuses[i] = count = int(held[1:])
                stored.append((keys[i], count, now))
                self.stats.duplicates[kind] += 1
                self.stats.cross_node[kind] += 1
            else:
                statuses[i] = IN_FLIGHT
                self.stats.in_flight[kind] += 1
        if IN_FLIGHT in statuses:
            # Refused as a whole (Retry-After): give back what this request took, here and there.
            self.table.release(claimed)
            self._queue(won, b"")
            return statuses, ClusterClaims()
        if stored:
            # The next retry is answered here, without a call; these are settled already.
            self.table.mark_stored(stored)
            settled = {self.table.locate(key)[1] for key, _, _ in stored}
            claimed = [slot for slot in claimed if slot[1] not in settled]
        return statuses, ClusterClaims(claimed, won)

    def settle(self, claimed: Claims, count: int) -> None:
        self.table.settle(claimed, count)
        if type(claimed) is ClusterClaims and claimed.remote:
            self._queue(claimed.remote, b"d%d" % count)

    def release(self, claimed: Claims) -> None:
        self.table.release(claimed)
        if type(claimed) is ClusterClaims and claimed.remote:
            self._queue(claimed.remote, b"")

    def counters(self) -> dict[str, dict[str, int]]:
        return self.table.counters()

    def gauges(self) -> dict[str, float]:
        return self.table.gauges()

    # -- health -----------------------------------------------------------------------------

    def _reachable(self) -> bool:
        return self.link.up and time.monotonic() >= self.retry_at

    def _failed(self, exc: BaseException) -> None:
        self.stats.coordinator["failures"] += 1
        self.retry_at = time.monotonic() + RETRY_AFTER_FAILURE_S
        if not self._outage_logged:
            self._outage_logged = True
            log.error(
                "dedup: coordinator %s failed (%s: %s); retries are deduplicated on this node "
                "only until it answers again",
                masked(self.link.url),
                type(exc).__name__,
                exc,
            )

    def _reached(self) -> None:
        if self._outage_logged:
            self._outage_logged = False
            log.warning("dedup: coordinator %s answers again", masked(self.link.url))

    # -- the coordinator's thread: claims and settles, off the serving loop ------------------

    def _queue(self, keys: list[bytes], value: bytes) -> None:
        if keys:
            self._queued.append((keys, value))
            self._wake.set()

    def _run(self) -> None:
        while True:
            self._wake.wait()
            self._wake.clear()
            # Settles first: a release must reach the coordinator before a retry's new claim.
            if self._queued:
                self._flush()
            if self._claims:
                self._send_claims()
            if self._stopping and not self._queued and not self._claims:
                return

    def _send_claims(self) -> None:
        """Every claim queued so far, from any number of requests, in one script call; the
        answers go back to each request's loop in one callback per loop."""
        batch: list[_Claim] = []
        while self._claims:
            batch.append(self._claims.popleft())  # deque: safe against the loop's appends
        answers: list[bytes] | None = None
        error: BaseException | None = None
        if time.monotonic() >= self.retry_at:  # else a call failed meanwhile: no second wait
            keys = [key for claim in batch for key in claim.remote]
            try:
                try:
                    answers = self._claim_call(keys)
                except self.no_script:  # a coordinator restarted without its scripts
                    self.client.script_load(_CLAIM)
                    answers = self._claim_call(keys)  # NOSCRIPT ran nothing: safe to repeat
            except self.errors as exc:
                # Set here, so claims queued meanwhile do not wait on the coordinator again.
                self.retry_at = time.monotonic() + RETRY_AFTER_FAILURE_S
                error = exc
        by_loop: dict[asyncio.AbstractEventLoop, list[_Claim]] = {}
        for claim in batch:
            by_loop.setdefault(claim.loop, []).append(claim)
        for loop, claims in by_loop.items():
            try:
                loop.call_soon_threadsafe(self._confirmed, claims, answers, error)
            except RuntimeError:  # the loop closed: the server stopped with them parked
                log.debug("dedup: %d claims answered after the loop closed", len(claims))

    def _claim_call(self, keys: list[bytes]) -> list[bytes]:
        sha = self.claim_script.sha
        answers: list[bytes] = self.client.evalsha(
            sha, len(keys), *keys, self.pending, PENDING_CLAIM_MS
        )
        return answers

    def _flush(self) -> None:
        """Everything queued so far, in one pipelined round trip."""
        batch = []
        while self._queued:
            batch.append(self._queued.popleft())  # deque: safe against the loop's appends
        try:
            try:
                self._send(batch)
            except self.no_script:  # a coordinator restarted without its scripts
                self.client.script_load(_SETTLE)
                self._send(batch)  # settling twice is harmless: it compares and sets
        except self.errors as exc:
            # The claims expire by themselves (PENDING_CLAIM_MS); meanwhile a retry elsewhere
            # is refused with Retry-After, and afterwards stored again: see the module doc.
            self._failed(exc)
            log.debug("dedup: %d settles lost", len(batch))

    def _send(self, batch: list[tuple[list[bytes], bytes]]) -> None:
        # EVALSHA by hand: a pipeline given a Script object asks SCRIPT EXISTS first, every time.
        pipe = self.client.pipeline(transaction=False)
        sha = self.settle_script.sha
        for keys, value in batch:
            pipe.evalsha(sha, len(keys), *keys, self.pending, value, self.window_ms)
        pipe.execute()

    def stop(self) -> None:
        """Send what is queued (the link stops with the server), then end the thread."""
        self._stopping = True
        self._wake.set()
        self._thread.join(timeout=5)
