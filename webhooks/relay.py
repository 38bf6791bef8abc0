"""The relay: claims due deliveries, posts them signed, records the outcome.

Run it as `python -m webhooks.relay` (the `relay` line of the Procfile); run several for more
throughput or availability, they never claim the same delivery. Each process keeps up to
`concurrency` requests in flight on one pooled `DeliveryClient`, plus up to `batch_size` claimed
deliveries waiting for a free slot. Under a cap per subscription below `concurrency`, a claim
takes each subscription a chain of up to `batch_size // 2` deliveries in one slot, sent one
after another by one task of the pool: a busy subscription at its cap costs one claim, one task
and a few recordings per chain, not per delivery, and a chain running low is fed more from its
slot. A failing subscription gets chains of one (each retry in a slot of its own, as before),
and a chain whose next delivery cannot be attempted (its lease ran out) is handed back whole.
Delivery is at least once: a receiver drops repeats by `webhook-id`. The failure policy is
`webhooks.policy`'s.

Fairness: every attempt has a total deadline (`attempt_timeout`, cut shorter so it ends before
its claim's lease: a delivery is never sent again while an attempt is running), and no more than
`max_in_flight_per_subscription` deliveries of one subscription are in flight over all relays, so
slow subscribers cannot hold every slot.

On PostgreSQL an idle relay wakes on `NOTIFY` when an event commits; it also polls every
`poll_interval` seconds (SQLite, a lost notification, retries falling due). SIGTERM or SIGINT stops
it gracefully: no new claims, deliveries not started yet are handed back, those in flight are
finished and recorded (up to `shutdown_timeout`; any still running then are retried after their
lease by another relay).
"""

from __future__ import annotations

import logging
import queue
import sys
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import wait as wait_for
from datetime import datetime, timedelta

from webhooks import metrics
from webhooks.delivery import DEFAULT_ATTEMPT_TIMEOUT, ClaimedDelivery, Sender
from webhooks.interfaces import AttemptResult, DeliveryStore
from webhooks.policy import RetryPolicy
from webhooks.settings import WebhookSettings
from webhooks.sqltypes import utcnow

logger = logging.getLogger(__name__)

#: Longest wait gathering outcomes into one recording transaction, in seconds.
RECORD_EVERY = 0.05
#: How often the recorder takes the outcomes queued meanwhile while it gathers, in seconds.
GATHER_TICK = 0.005
#: Seconds of a claim's lease left free after an attempt's deadline, to record its outcome
#: (a tenth of the lease when that is shorter).
LEASE_MARGIN = 5.0


class Relay:
    """Moves deliveries from a `DeliveryStore` to their subscribers."""

    def __init__(
        self,
        store: DeliveryStore,
        sender: Sender,
        policy: RetryPolicy,
        *,
        concurrency: int = 16,
        batch_size: int = 100,
        lease: timedelta = timedelta(minutes=5),
        poll_interval: float = 1.0,
        disable_after: timedelta = timedelta(days=5),
        shutdown_timeout: float = 30.0,
        attempt_timeout: float = DEFAULT_ATTEMPT_TIMEOUT,
        max_in_flight_per_subscription: int | None = 2,
        now: Callable[[], datetime] = utcnow,
    ) -> None:
        self.store = store
        self.sender = sender
        self.policy = policy
        self.concurrency = concurrency
        self.batch_size = batch_size
        self.lease = lease
        self.poll_interval = poll_interval
        self.disable_after = disable_after
        self.shutdown_timeout = shutdown_timeout
        self.attempt_timeout = attempt_timeout
        self.max_in_flight_per_subscription = max_in_flight_per_subscription
        self._now = now
        #: Set to make a waiting relay look for work now (a NOTIFY, a finished request, a stop).
        self.wake = Wake()
        self._done: queue.SimpleQueue[AttemptResult] = queue.SimpleQueue()
        #: Each chain's task (or a delivery's alone), with the delivery it starts with.
        self._in_flight: dict[Future[None], ClaimedDelivery] = {}
        #: The claimed deliveries of each chain (`ClaimedDelivery.slot`) not started yet.
        self._chains: dict[tuple[str, str], deque[ClaimedDelivery]] = {}
        #: Chains running low, to feed from their slots (`DeliveryStore.extend`).
        self._low: set[tuple[str, str]] = set()
        self._lock = threading.Lock()
        self._more_due = False

    @classmethod
    def from_settings(
        cls, settings: WebhookSettings, store: DeliveryStore, sender: Sender
    ) -> Relay:
        """A relay configured by `settings`."""
        policy = RetryPolicy(
            schedule=settings.retry_schedule,
            jitter=settings.jitter,
            retry_after_max=settings.retry_after_max,
        )
        return cls(
            store,
            sender,
            policy,
            concurrency=settings.concurrency,
            batch_size=settings.batch_size,
            lease=settings.claim_lease,
            poll_interval=settings.poll_interval,
            disable_after=settings.disable_after,
            shutdown_timeout=settings.shutdown_timeout,
            attempt_timeout=settings.attempt_timeout,
            max_in_flight_per_subscription=settings.max_in_flight_per_subscription,
        )

    def attempt(self, delivery: ClaimedDelivery) -> AttemptResult | None:
        """Send one claimed delivery and decide its next state (`report` counts and logs it).

        The attempt must end a margin (`LEASE_MARGIN`, or a tenth of the lease when shorter)
        before the claim's lease does (after that another
        relay may claim and send it too): its deadline is `attempt_timeout` or what is left of
        the lease, whichever is shorter; a delivery whose lease ran out while it waited for a
        free slot is handed back unsent (None).
        """
        timeout = self.attempt_timeout
        if delivery.lease_ends_at is not None:
            margin = min(LEASE_MARGIN, self.lease.total_seconds() / 10)
            left = (delivery.lease_ends_at - self._now()).total_seconds() - margin
            if left <= 0:
                self._release([delivery])
                return None
            timeout = min(timeout, left)
        started = time.perf_counter()
        outcome = self.sender.send(delivery, timeout)
        seconds = time.perf_counter() - started
        decision = self.policy.decide(delivery.attempt, outcome, self._now())
        return AttemptResult(delivery, outcome, decision, seconds)

    def run_once(self) -> int:
        """Claim what is due now, deliver it all, record it; return how many were attempted.

        For tests and simple embeddings; `run` is the long-running loop.
        """
        claimed = self._claim(self.batch_size)
        if not claimed:
            return 0
        with ThreadPoolExecutor(max_workers=min(self.concurrency, len(claimed))) as pool:
            results = [r for r in pool.map(self.attempt, claimed) if r is not None]
        report(results)
        self.store.record(results, self._now(), self.disable_after)
        return len(results)

    def _claim(self, limit: int, chain: int = 1) -> list[ClaimedDelivery]:
        cap = self.max_in_flight_per_subscription
        return self.store.claim(limit, self._now(), self.lease, cap, chain=chain)

    @property
    def chain(self) -> int:
        """How many deliveries of one subscription `run` claims into one slot: half a batch
        while the cap holds a subscription to fewer requests than `concurrency` (a chain keeps
        each of its slots busy), else one (its deliveries alone can fill every request)."""
        cap = self.max_in_flight_per_subscription
        if cap is None or cap >= self.concurrency:
            return 1
        return max(1, self.batch_size // 2)

    def run(self, stop: threading.Event) -> None:
        """Deliver until `stop` is set, then shut down gracefully."""
        pool = ThreadPoolExecutor(max_workers=self.concurrency, thread_name_prefix="webhook-send")
        recorder_stop = threading.Event()
        recorder = threading.Thread(
            target=self._record_until, args=(recorder_stop,), name="webhook-record"
        )
        recorder.start()
        try:
            while not stop.is_set():
                self.wake.clear()
                claimed = self._claim_into(pool)
                idle = claimed == 0 or self._claimed_ahead() > self._refill_at
                if idle and not self.wake.wait(self._idle_wait()):
                    self.wake.ask()  # the poll
        finally:
            self._shut_down(pool)
            recorder_stop.set()
            recorder.join()

    @property
    def _refill_at(self) -> int:
        # Claim again while half a batch still waits behind the requests in flight, so the
        # senders never wait for a claim.
        return self.concurrency + self.batch_size // 2

    def _claim_into(self, pool: ThreadPoolExecutor) -> int:
        extended = self._extend_chains(pool)
        ahead = self._claimed_ahead()
        if ahead > self._refill_at or not self.wake.answer():
            return extended
        wanted = self.concurrency + self.batch_size - ahead
        try:
            claimed = self._claim(wanted, self.chain)
        except Exception:
            logger.exception("claiming deliveries failed; retrying in %.1fs", self.poll_interval)
            self.wake.ask()
            return 0
        # Only a full claim suggests more is due now; otherwise wait for a NOTIFY or the poll.
        self._more_due = len(claimed) == wanted
        if claimed:  # claim again before waiting, as long as claims take something
            self.wake.ask()
        for delivery in self._chain_heads(claimed):
            self._submit(pool, delivery)
        return extended + len(claimed)

    def _extend_chains(self, pool: ThreadPoolExecutor) -> int:
        """Feed each chain running low from its own slot, so a busy subscription's slot never
        waits for its chain to be recorded and a new one claimed; return how many it took."""
        with self._lock:
            low, self._low = self._low, set()
            wanted = {key: self.chain - len(self._chains.get(key, ())) for key in low}
        taken = 0
        for (slot, subscription_id), count in sorted(wanted.items()):
            try:
                more = self.store.extend(slot, subscription_id, count, self._now(), self.lease)
            except Exception:
                logger.exception("extending a chain failed; its slot ends with it")
                continue
            for delivery in self._chain_heads(more):
                self._submit(pool, delivery)
            taken += len(more)
        return taken

    def _chain_heads(self, claimed: Sequence[ClaimedDelivery]) -> list[ClaimedDelivery]:
        """The deliveries to start now: each chain's first (the rest wait in `_chains`, in
        order) and each one claimed alone."""
        heads = []
        with self._lock:
            for delivery in claimed:
                key = _chain_key(delivery)
                if key in self._chains:
                    self._chains[key].append(delivery)
                    continue
                if key is not None:
                    self._chains[key] = deque()
                heads.append(delivery)
        return heads

    def _submit(self, pool: ThreadPoolExecutor, delivery: ClaimedDelivery) -> None:
        with self._lock:
            future = self._start(pool, delivery)
        future.add_done_callback(self._finished)

    def _start(self, pool: ThreadPoolExecutor, delivery: ClaimedDelivery) -> Future[None]:
        # Called holding `_lock`: a stopping relay sees the attempt in `_in_flight` or not
        # started at all, never in between.
        future = pool.submit(self._deliver_chain, delivery)
        self._in_flight[future] = delivery
        return future

    def _deliver_chain(self, delivery: ClaimedDelivery) -> None:
        """Attempt `delivery`, then the rest of its chain one after another in this thread
        (one task per chain, not per delivery), queueing each outcome for the recorder once
        the next is known (so a chain's last outcome is queued after its chain has ended)."""
        current: ClaimedDelivery | None = delivery
        while current is not None:
            try:
                result = self.attempt(current)
            except Exception:
                result = None  # the claim's lease ends and another attempt follows
                logger.exception("a delivery attempt failed unexpectedly")
            following = self._next_in_chain(current, result)
            if result is not None:
                self._done.put(result)
            current = following
            self._wake_if_more_due()

    def _next_in_chain(
        self, delivery: ClaimedDelivery, result: AttemptResult | None
    ) -> ClaimedDelivery | None:
        """After an attempt of a chain: its next delivery to attempt, or None when the chain
        ends; if the attempt was not made (its lease ran out, or a bug), the rest of the chain
        is handed back."""
        key = _chain_key(delivery)
        if key is None:
            return None
        rest: list[ClaimedDelivery] = []
        following = None
        with self._lock:
            chain = self._chains.get(key)
            if chain is None:  # a stopping relay has none left (`_shut_down`)
                return None
            if chain and result is not None:
                following = chain.popleft()
                running_low = len(chain) < self.chain // 2 and key not in self._low
                if running_low:
                    self._low.add(key)
            else:
                rest, running_low = list(chain), False
                del self._chains[key]
                self._low.discard(key)
        if running_low:
            self.wake.feed()
        if rest:
            self._release(rest)
        return following

    def _finished(self, future: Future[None]) -> None:
        with self._lock:
            del self._in_flight[future]  # put there before its callback was added
        if not future.cancelled():
            self._wake_if_more_due()

    def _wake_if_more_due(self) -> None:
        """Claim again as the deliveries claimed fall to `_refill_at`, if more are due."""
        if self._more_due and self._claimed_ahead() == self._refill_at:
            self.wake.set()

    def _claimed_ahead(self) -> int:
        """Tasks claimed and not finished (a chain is one): what the refill mark counts. A
        chain's waiting deliveries are left out: they wait for their own slot, not for the
        senders, and counting them held back every other subscription's claim (until the
        poll) while a busy subscription's chains were long."""
        with self._lock:
            return len(self._in_flight)

    def _in_flight_count(self) -> int:
        """Claimed deliveries not finished: attempts started, and chains' deliveries waiting."""
        with self._lock:
            return len(self._in_flight) + sum(len(chain) for chain in self._chains.values())

    def _idle_wait(self) -> float:
        if self._in_flight_count():  # a finished request or a recording wakes the relay
            return self.poll_interval
        try:
            due = self.store.next_due()
        except Exception:
            logger.exception("looking for due deliveries failed")
            return self.poll_interval
        if due is None:
            return self.poll_interval
        until_due = (due - self._now()).total_seconds()
        return min(max(until_due, 0.001), self.poll_interval)

    def _record_until(self, stop: threading.Event) -> None:
        """Record outcomes as they come, in batches, in a thread of its own; drain at `stop`.

        Each outcome is counted and logged here (`report`) before its recording, once: not by
        the sending thread, whose next request it would hold back.
        """
        pending: list[AttemptResult] = []
        failures = reported = 0
        while True:
            try:
                pending.append(self._done.get(timeout=0.05))
            except queue.Empty:
                # A chain's task queues each outcome before it finishes, and `stop` is set
                # once the tasks are done (or given up on): nothing more is coming.
                if stop.is_set() and not pending and self._done.empty():
                    return
            if not pending:
                continue
            self._gather(pending, stop)
            report(pending[reported:])
            reported = len(pending)
            try:
                self.store.record(pending, self._now(), self.disable_after)
            except Exception:
                # Kept and retried; if the process dies first, the lease ends and the delivery
                # is sent again (at least once).
                failures += 1
                logger.exception("recording %d outcomes failed; will retry", len(pending))
                if stop.is_set() and failures >= 3:
                    return
                stop.wait(min(self.poll_interval, 1.0))
                continue
            if self._frees_slots(pending):  # claim what the cap held back
                self.wake.set()
            pending, failures, reported = [], 0, 0

    def _frees_slots(self, recorded: Sequence[AttemptResult]) -> bool:
        """True if recording freed a slot: a delivery alone in its slot, or a chain's last
        (its chain has ended). A chain going on holds its slot: a claim would find its
        subscription as full as before (at the cap, an empty claim after every recording)."""
        with self._lock:
            return any(_chain_key(r.delivery) not in self._chains for r in recorded)

    def _gather(self, pending: list[AttemptResult], stop: threading.Event) -> None:
        """Add to `pending` the outcomes of attempts still running, for up to `RECORD_EVERY`:
        one transaction per ~50 ms, not one per delivery. Outcomes are taken every
        `GATHER_TICK` (not a wake-up per outcome), and when no attempt is running there is
        nothing to wait for: a relay whose claims are few (a subscription at its cap, a quiet
        outbox) records them, freeing their slots, as soon as they are known."""
        deadline = time.monotonic() + RECORD_EVERY
        while not stop.is_set():
            # Looked at before taking: a chain's task queues its outcomes before it ends.
            running = self._running()
            self._take_queued(pending)
            left = deadline - time.monotonic()
            if len(pending) >= self.batch_size or not running or left <= 0:
                return
            stop.wait(min(GATHER_TICK, left))

    def _take_queued(self, pending: list[AttemptResult]) -> None:
        while len(pending) < self.batch_size:
            try:
                pending.append(self._done.get_nowait())
            except queue.Empty:
                return

    def _running(self) -> bool:
        """True while an attempt claimed by this relay has not finished."""
        with self._lock:
            return not all(future.done() for future in self._in_flight)

    def _shut_down(self, pool: ThreadPoolExecutor) -> None:
        with self._lock:  # no chain goes on past this: `_next_in_chain` finds none
            pending = list(self._in_flight.items())
            waiting = [delivery for chain in self._chains.values() for delivery in chain]
            self._chains.clear()
        not_started = [delivery for future, delivery in pending if future.cancel()] + waiting
        running = [future for future, _ in pending if not future.cancelled()]
        if not_started:
            self._release(not_started)
        if running:
            logger.info("waiting for %d deliveries in flight", len(running))
            wait_for(running, timeout=self.shutdown_timeout)
        pool.shutdown(wait=False)  # every attempt not started was cancelled above

    def _release(self, deliveries: Sequence[ClaimedDelivery]) -> None:
        try:
            self.store.release(deliveries, self._now())
        except Exception:
            logger.exception("handing back %d claimed deliveries failed", len(deliveries))


class Wake(threading.Event):
    """A relay's wake-up. `set()` asks it to claim (an event committed, a slot was freed, the
    relay stops, ...); `feed()` wakes it only to feed its chains running low, so that a
    subscription at its cap is not claimed for again (to no avail) at every feed."""

    def __init__(self) -> None:
        super().__init__()
        self._asked = True

    def set(self) -> None:
        self.ask()
        super().set()

    def feed(self) -> None:
        """Wake the relay to feed its chains, not to claim."""
        super().set()

    def ask(self) -> None:
        """Have the relay's next look for work claim, without waking it."""
        self._asked = True

    def answer(self) -> bool:
        """True (once) if a claim was asked for since the last answer."""
        asked, self._asked = self._asked, False
        return asked


def _chain_key(delivery: ClaimedDelivery) -> tuple[str, str] | None:
    """A chain is one claim's deliveries of one subscription in a slot (None: not chained)."""
    if delivery.slot is None:
        return None
    return (delivery.slot, delivery.subscription_id)


def report(results: Sequence[AttemptResult]) -> None:
    """Count each attempt (`webhooks.metrics`) and log its line (`log_attempt`). Never raises:
    an outcome that cannot be counted or logged is still recorded (the recorder's thread must
    outlive it, or no outcome would be recorded again and every slot would stay taken)."""
    for result in results:
        try:
            log_attempt(result, metrics.observe(result, result.duration), result.duration)
        except Exception:
            logger.exception("counting or logging delivery %s failed", result.delivery.delivery_id)


def log_attempt(result: AttemptResult, outcome: str, seconds: float) -> None:
    """Log one line per attempt: outcome, duration, ids, tenant, status code (and the error).

    `webhook delivered in 12.3 ms: event_id=… subscription_id=… tenant_id=t1 attempt=1 …`;
    the fields also go to `extra=`, so a JSON formatter gets them as keys.
    """
    delivery = result.delivery
    fields: dict[str, object] = {
        "event_id": delivery.event_id,
        "subscription_id": delivery.subscription_id,
        "tenant_id": delivery.tenant_id,
        "delivery_id": delivery.delivery_id,
        "attempt": delivery.attempt,
        "status_code": result.outcome.status_code,
    }
    if not result.outcome.delivered:
        fields["error"] = result.decision.last_error
        if result.decision.next_attempt_at is not None:
            fields["next_attempt_at"] = result.decision.next_attempt_at.isoformat()
    duration_ms = round(seconds * 1000, 1)
    logger.log(
        logging.WARNING if outcome in ("dead", "gone") else logging.INFO,
        "webhook %s in %.1f ms: %s",
        outcome,
        duration_ms,
        _Fields(fields),
        extra={"outcome": outcome, "duration_ms": duration_ms, **fields},
    )


class _Fields:
    """`key=value …`, formatted only if the line is written."""

    def __init__(self, fields: dict[str, object]) -> None:
        self.fields = fields

    def __str__(self) -> str:
        return " ".join(
            f"{key}={value!r}" if isinstance(value, str) and " " in value else f"{key}={value}"
            for key, value in self.fields.items()
        )


def main(argv: Sequence[str] | None = None) -> int:  # pragma: no mutate block (process only)
    """`python -m webhooks.relay`: deliver until SIGTERM or SIGINT."""
    from webhooks.background import run_until_signalled  # it builds on this module

    return run_until_signalled(WebhookSettings())


if __name__ == "__main__":
    sys.exit(main())
