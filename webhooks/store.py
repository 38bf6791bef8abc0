"""`SqlDeliveryStore`: how relays claim and settle deliveries in SQL.

A claim is one short transaction: `SELECT … FOR UPDATE SKIP LOCKED LIMIT n` picks due rows, then
an `UPDATE` counts the attempt and pushes `next_attempt_at` (and `claimed_until`) out by a lease,
so relays running side by side never pick the same row, and no transaction stays open while HTTP
requests are in flight. With a cap per subscription, the claim first counts each subscription's
deliveries in flight (`claimed_until` in the future), skips the full ones, and takes the rest
round-robin, so one slow subscriber cannot fill every relay's slots. A slot may hold a chain of
one subscription's deliveries that the relay sends one after another (`claim(chain=…)`): one
claim and one recording serve many deliveries of a subscription at its cap. A relay
that dies mid-batch loses nothing: its claimed rows fall due again when the lease ends (a delivery
may then be sent twice, with the same `webhook-id`). Outcomes are written only if the row still
carries the attempt number and lease end that were claimed, so a stale relay (or a claim from
before a replay) cannot overwrite a newer state.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from datetime import datetime, timedelta
from typing import Any, cast

from sqlalchemy import (
    ARRAY,
    ColumnElement,
    DateTime,
    Integer,
    Row,
    Select,
    String,
    Subquery,
    Table,
    Text,
    Update,
    any_,
    bindparam,
    case,
    func,
    or_,
    select,
    text,
    update,
)
from sqlalchemy.orm import Session, sessionmaker

from webhooks.delivery import ClaimedDelivery
from webhooks.encryption import SecretBox, reveal
from webhooks.interfaces import AttemptResult
from webhooks.models import FAILED, PENDING, WebhookDelivery, WebhookEvent, WebhookSubscription
from webhooks.policy import failure_streak
from webhooks.secrets import active_secrets
from webhooks.sqltypes import new_id

_CLAIMABLE = (PENDING, FAILED)
# Spelled as the partial index `ix_webhook_deliveries_due` is, with constants rather than bound
# parameters, so PostgreSQL can prove the index applies even to a prepared statement's plan.
_DUE = text("webhook_deliveries.status IN ('pending', 'failed')")
_deliveries = cast(Table, WebhookDelivery.__table__)
_events = cast(Table, WebhookEvent.__table__)
_subscriptions = cast(Table, WebhookSubscription.__table__)
#: With a cap per subscription, a claim reads this many times `limit` due rows to fill it.
CLAIM_SCAN_FACTOR = 4
#: The PostgreSQL advisory lock that claims counting deliveries in flight take in turn.
CLAIM_LOCK_KEY = 0x7765_6268_6F6F_6B73 >> 1  # "webhooks", kept positive in a bigint


class SqlDeliveryStore:
    """Deliveries in the `webhook_deliveries` table; each call is its own transaction."""

    def __init__(
        self, session_factory: sessionmaker[Session], *, box: SecretBox | None = None
    ) -> None:
        self._sessions = session_factory
        self._box = box

    def claim(
        self,
        limit: int,
        now: datetime,
        lease: timedelta,
        max_in_flight: int | None = None,
        chain: int = 1,
    ) -> list[ClaimedDelivery]:
        """Reserve up to `limit` due deliveries of enabled subscriptions until `now + lease`,
        at most `max_in_flight` slots of one subscription in flight at once (over every relay).

        A slot is one delivery; with `chain` > 1 (and a cap), each subscription with a free
        slot gets one, holding up to `chain` of its deliveries (oldest first) that the relay
        sends one after another: they carry the slot's name (`ClaimedDelivery.slot`). The
        claimed deliveries come round-robin: each subscription's first, then the seconds.
        """
        params: dict[str, Any] = {"b_now": now, "b_limit": limit}
        if max_in_flight is None:
            chosen = _CLAIM
        else:
            chosen = _CLAIM_CHAINS if chain > 1 else _CLAIM_CAPPED
            scan = limit * CLAIM_SCAN_FACTOR
            params |= {"b_cap": max_in_flight, "b_scan": scan, "b_chain": chain}
        slot = new_id() if chain > 1 and max_in_flight is not None else None
        return self._take_chosen(
            chosen, params, now, lease, slot, serialize=max_in_flight is not None
        )

    def extend(
        self, slot: str, subscription_id: str, limit: int, now: datetime, lease: timedelta
    ) -> list[ClaimedDelivery]:
        """Claim up to `limit` more due deliveries of `subscription_id` into the caller's
        `slot`, oldest first, while the slot is held (one of its deliveries still claimed):
        a busy subscription's slot goes on with no pause between chains. Once the slot is
        free it may count for another claim, and nothing is taken."""
        params = {"b_now": now, "b_limit": limit, "b_slot": slot, "b_sid": subscription_id}
        return self._take_chosen(_EXTEND, params, now, lease, slot, serialize=True)

    def _take_chosen(
        self,
        chosen: Select[Any],
        params: dict[str, Any],
        now: datetime,
        lease: timedelta,
        slot: str | None,
        *,
        serialize: bool,
    ) -> list[ClaimedDelivery]:
        with self._sessions.begin() as session:
            if serialize:
                _serialize_claims(session)
            rows = list(session.execute(chosen, params))
            if not rows:
                return []
            taken_params = {
                "b_ids": [row[0] for row in rows],
                "b_now": now,
                "b_until": now + lease,
                "b_slot": slot,
            }
            take = _TAKE_ARRAY if session.get_bind().dialect.name == "postgresql" else _TAKE
            taken = {i: n for i, n in session.execute(take, taken_params)}
        secrets = _signing_secrets(rows, now, self._box)
        return [
            _claimed(row, taken[row[0]], now + lease, secrets, slot)
            for row in rows
            if row[0] in taken
        ]

    def record(
        self, results: Sequence[AttemptResult], now: datetime, disable_after: timedelta
    ) -> None:
        """Store each attempt's decision and the subscriptions' failure streaks."""
        if not results:
            return
        with self._sessions.begin() as session:
            if not _settle(session, results, now):
                _update_streaks(session, results, now, disable_after)

    def release(self, deliveries: Sequence[ClaimedDelivery], now: datetime) -> None:
        """Hand back claimed, unattempted deliveries, uncounted, due when they fell due (in
        their place in the queue) or else now."""
        if not deliveries:
            return
        params = [
            {
                "b_id": d.delivery_id,
                "b_attempt": d.attempt,
                "b_lease": d.lease_ends_at,
                "b_due": d.due_at or now,
                "b_now": now,
            }
            for d in deliveries
        ]
        with self._sessions.begin() as session:
            session.execute(_RELEASE, params)

    def next_due(self) -> datetime | None:
        """When the earliest unclaimed delivery of an enabled subscription falls due."""
        query = (
            select(func.min(WebhookDelivery.next_attempt_at))
            .join(WebhookSubscription, WebhookSubscription.id == WebhookDelivery.subscription_id)
            .where(
                WebhookDelivery.status.in_(_CLAIMABLE),
                WebhookSubscription.enabled.is_(True),
            )
        )
        with self._sessions() as session:
            return session.execute(query).scalar()


def _detail_columns() -> tuple[Any, ...]:
    """What sending needs of a delivery, from it, its event and its subscription."""
    d, e, sub = _deliveries, _events, _subscriptions
    return (
        d.c.id,
        e.c.id,
        e.c.topic,
        e.c.payload,
        e.c.created_at,
        e.c.tenant_id,
        sub.c.id,
        sub.c.url,
        sub.c.secret,
        sub.c.previous_secret,
        sub.c.previous_secret_expires_at,
        d.c.next_attempt_at,
    )


def _details() -> Select[Any]:
    """What sending needs of each delivery due at `:b_now` of an enabled subscription."""
    d, e, sub = _deliveries, _events, _subscriptions
    return (
        select(*_detail_columns())
        .join_from(d, e, e.c.id == d.c.event_id)
        .join(sub, sub.c.id == d.c.subscription_id)
        .where(_DUE, d.c.next_attempt_at <= bindparam("b_now"), sub.c.enabled.is_(True))
    )


def _capped(*, chains: bool) -> Select[Any]:
    """`_details` of the deliveries a claim takes under a cap per subscription (`:b_cap`), in
    one statement: `fair_share` in SQL, so only the rows taken come back (none is locked: the
    claims counting what is in flight take turns, `_serialize_claims`). With `chains`, up to
    `:b_chain` of each subscription with a free slot (they fill one slot); one only of a
    subscription failing, which gets each retry in a slot of its own as it falls due."""
    d, sub = _deliveries, _subscriptions
    slots = func.count(func.distinct(func.coalesce(d.c.slot, d.c.id)))
    flying = (
        select(d.c.subscription_id.label("sid"), slots.label("n"))
        .where(d.c.claimed_until > bindparam("b_now"), _DUE)
        .group_by(d.c.subscription_id)
        .subquery()
    )
    full = select(flying.c.sid).where(flying.c.n >= bindparam("b_cap", type_=Integer))
    due = (
        select(
            d.c.id,
            d.c.subscription_id,
            d.c.next_attempt_at,
            sub.c.failing_since.is_(None).label("healthy"),
        )
        .join_from(d, sub, sub.c.id == d.c.subscription_id)
        .where(
            _DUE,
            d.c.next_attempt_at <= bindparam("b_now"),
            sub.c.enabled.is_(True),
            d.c.subscription_id.not_in(full),
        )
        .order_by(d.c.next_attempt_at)
        .limit(bindparam("b_scan", type_=Integer))
        .subquery()
    )
    turn = func.row_number().over(
        partition_by=due.c.subscription_id, order_by=(due.c.next_attempt_at, due.c.id)
    )
    room = (
        case((due.c.healthy, bindparam("b_chain", type_=Integer)), else_=1)
        if chains
        else bindparam("b_cap", type_=Integer) - func.coalesce(flying.c.n, 0)
    )
    ranked = (
        select(due.c.id, due.c.next_attempt_at, turn.label("turn"), room.label("room"))
        .outerjoin(flying, flying.c.sid == due.c.subscription_id)
        .subquery()
    )
    picked = (
        select(ranked.c.id, ranked.c.turn, ranked.c.next_attempt_at)
        .where(ranked.c.turn <= ranked.c.room)
        .order_by(ranked.c.turn, ranked.c.next_attempt_at, ranked.c.id)
        .limit(bindparam("b_limit", type_=Integer))
        .subquery()
    )
    return _by_key(picked).order_by(picked.c.turn, picked.c.next_attempt_at, picked.c.id)


def _by_key(picked: Subquery) -> Select[Any]:
    """`_details` of the deliveries `picked` (its `id`s, checked due), each delivery, event
    and subscription looked up by its key. Picked first, then joined: the other way round, a
    planner that believes few rows are due (statistics taken while the outbox was near empty,
    then a burst) scanned every due delivery, with its event, once per row picked."""
    d = _deliveries
    return (
        select(*_detail_columns())
        .select_from(picked)
        .join(d, d.c.id == picked.c.id)
        .join(_events, _events.c.id == d.c.event_id)
        .join(_subscriptions, _subscriptions.c.id == d.c.subscription_id)
    )


def _extend() -> Select[Any]:
    """`_details` of up to `:b_limit` due deliveries of subscription `:b_sid`, oldest first,
    while its slot `:b_slot` is held (one of its deliveries still claimed), picked from the
    deliveries alone (see `_by_key`)."""
    d = _deliveries
    held = (
        select(d.c.id)
        .where(
            d.c.subscription_id == bindparam("b_sid"),
            d.c.slot == bindparam("b_slot"),
            d.c.claimed_until > bindparam("b_now"),
            _DUE,
        )
        .exists()
    )
    picked = (
        select(d.c.id, d.c.next_attempt_at, d.c.created_at)
        .where(
            d.c.subscription_id == bindparam("b_sid"),
            _DUE,
            d.c.next_attempt_at <= bindparam("b_now"),
            held,
        )
        .order_by(d.c.next_attempt_at, d.c.created_at)
        .limit(bindparam("b_limit", type_=Integer))
        .subquery()
    )
    return (
        _by_key(picked)
        .where(_subscriptions.c.enabled.is_(True))
        .order_by(picked.c.next_attempt_at, picked.c.created_at)
    )


# Built once: a claim only binds its parameters (building and caching a statement this size
# costs more CPU than running it).
_CLAIM = (
    _details()
    .order_by(_deliveries.c.next_attempt_at, _events.c.created_at)
    .limit(bindparam("b_limit", type_=Integer))
    .with_for_update(skip_locked=True, of=_deliveries)
)
_CLAIM_CAPPED = _capped(chains=False)
_CLAIM_CHAINS = _capped(chains=True)
_EXTEND = _extend()


def _take(ids: ColumnElement[bool]) -> Update:
    """Claims the deliveries `ids` names in slot `:b_slot` until `:b_until`, counting the
    attempt; returns `(id, attempt)` of each still due (another relay's claim without a cap
    may have taken one)."""
    return (
        _deliveries.update()
        .where(ids, _DUE, _deliveries.c.next_attempt_at <= bindparam("b_now"))
        .values(
            attempts=_deliveries.c.attempts + 1,
            next_attempt_at=bindparam("b_until"),
            claimed_until=bindparam("b_until"),
            slot=bindparam("b_slot"),
            updated_at=bindparam("b_now"),
        )
        .returning(_deliveries.c.id, _deliveries.c.attempts)
    )


#: `_take` of the ids `:b_ids`, one bound parameter each.
_TAKE = _take(_deliveries.c.id.in_(bindparam("b_ids", expanding=True)))
#: `_TAKE` on PostgreSQL: the ids as one array, so the statement is the same text however many
#: there are, converted by psycopg and planned by PostgreSQL once (a list of more than 50
#: parameters was parsed again by psycopg at every claim: half the claiming thread's CPU).
_TAKE_ARRAY = _take(_deliveries.c.id == any_(bindparam("b_ids", type_=ARRAY(String()))))
#: Settles a claim: only the one that claimed `:b_id` for attempt `:b_attempt` until `:b_lease`
#: (a replay restarts the attempts: a claim since may count the same attempt).
_SETTLE = (
    _deliveries.update()
    .where(
        _deliveries.c.id == bindparam("b_id"),
        _deliveries.c.attempts == bindparam("b_attempt"),
        _deliveries.c.claimed_until == bindparam("b_lease"),
    )
    .values(
        status=bindparam("b_status"),
        next_attempt_at=bindparam("b_next"),
        last_status_code=bindparam("b_code"),
        last_error=bindparam("b_error"),
        delivered_at=bindparam("b_delivered"),
        claimed_until=None,
        slot=None,
        updated_at=bindparam("b_now"),
    )
)
#: What `record` writes of each outcome, as `_SETTLE`'s parameters (`b_<name>`) and
#: `_SETTLE_ALL`'s arrays.
_OUTCOME = ("id", "attempt", "lease", "status", "next", "code", "error", "delivered")


def _settle_all() -> Update:
    """`_SETTLE` for many outcomes in one statement: the arrays `:b_<name>` of `_OUTCOME`."""
    moment = ARRAY(DateTime(timezone=True))
    arrays = [
        bindparam("b_id", type_=ARRAY(String())),
        bindparam("b_attempt", type_=ARRAY(Integer())),
        bindparam("b_lease", type_=moment),
        bindparam("b_status", type_=ARRAY(String())),
        bindparam("b_next", type_=moment),
        bindparam("b_code", type_=ARRAY(Integer())),
        bindparam("b_error", type_=ARRAY(Text())),
        bindparam("b_delivered", type_=moment),
    ]
    outcome = func.unnest(*arrays).table_valued(*_OUTCOME).render_derived(name="outcome")
    d = _deliveries
    return (
        d.update()
        .where(
            d.c.id == outcome.c.id,
            d.c.attempts == outcome.c.attempt,
            d.c.claimed_until == outcome.c.lease,
        )
        .values(
            status=outcome.c.status,
            next_attempt_at=outcome.c.next,
            last_status_code=outcome.c.code,
            last_error=outcome.c.error,
            delivered_at=outcome.c.delivered,
            claimed_until=None,
            slot=None,
            updated_at=bindparam("b_now"),
        )
    )


_SETTLE_ALL = _settle_all()
#: `_SETTLE_ALL` of successes, and the end of `:b_sids`' failure streaks, in one statement.
_SETTLE_DELIVERED = (
    _subscriptions.update()
    .where(
        _subscriptions.c.id.in_(bindparam("b_sids", expanding=True)),
        _subscriptions.c.failing_since.is_not(None),
    )
    .values(failing_since=None, updated_at=bindparam("b_now"))
    .add_cte(_SETTLE_ALL.returning(_deliveries.c.id).cte("settled"))
)
_STREAKS = select(_subscriptions.c.id, _subscriptions.c.failing_since).where(
    _subscriptions.c.id.in_(bindparam("b_ids", expanding=True))
)
_CLAIM_LOCK = select(func.pg_advisory_xact_lock(CLAIM_LOCK_KEY))
_RELEASE = (
    _deliveries.update()
    .where(
        _deliveries.c.id == bindparam("b_id"),
        _deliveries.c.attempts == bindparam("b_attempt"),
        # The claim's own lease, as `_SETTLE`: a replay counts attempt 1 again, and a claim
        # made before it must not end the claim made since.
        _deliveries.c.claimed_until == bindparam("b_lease"),
        # Not `IN (...)`: expanding parameters cannot go through executemany.
        or_(_deliveries.c.status == PENDING, _deliveries.c.status == FAILED),
    )
    .values(
        attempts=_deliveries.c.attempts - 1,
        next_attempt_at=bindparam("b_due"),
        claimed_until=None,
        slot=None,
        updated_at=bindparam("b_now"),
    )
)


def fair_share(
    due: Sequence[tuple[str, str]],
    in_flight: Mapping[str, int],
    max_in_flight: int | None,
    limit: int,
) -> list[str]:
    """Of the `(delivery id, subscription id)` pairs due, oldest first, the ids to claim: no
    subscription past `max_in_flight` counting `in_flight`, round-robin, at most `limit`."""
    taken: dict[str, int] = dict(in_flight)
    ranked: list[tuple[int, int, str]] = []
    for position, (delivery_id, sid) in enumerate(due):
        count = taken.get(sid, 0)
        if max_in_flight is not None and count >= max_in_flight:
            continue
        taken[sid] = count + 1
        ranked.append((count - in_flight.get(sid, 0), position, delivery_id))
    return [delivery_id for _, _, delivery_id in sorted(ranked)[:limit]]


def _settle(session: Session, results: Sequence[AttemptResult], now: datetime) -> bool:
    """Write each attempt's decision to its delivery, if still claimed for that attempt: on
    PostgreSQL in one statement (`unnest` of one array per column), elsewhere one per row.

    Return True if the streaks were written too: on PostgreSQL, when every attempt succeeded
    (each subscription's streak ends), the same statement ends them.
    """
    rows = [
        (
            r.delivery.delivery_id,
            r.delivery.attempt,
            r.delivery.lease_ends_at,
            r.decision.status,
            r.decision.next_attempt_at,
            r.decision.last_status_code,
            r.decision.last_error,
            r.decision.delivered_at,
        )
        for r in results
    ]
    if session.get_bind().dialect.name == "postgresql":
        columns = zip(*rows, strict=True)
        params = {f"b_{name}": list(values) for name, values in zip(_OUTCOME, columns, strict=True)}
        if all(r.outcome.delivered for r in results):
            sids = sorted({r.delivery.subscription_id for r in results})
            session.execute(_SETTLE_DELIVERED, {**params, "b_now": now, "b_sids": sids})
            return True
        session.execute(_SETTLE_ALL, {**params, "b_now": now})
        return False
    keys = [f"b_{name}" for name in _OUTCOME]
    session.execute(_SETTLE, [{**dict(zip(keys, row, strict=True)), "b_now": now} for row in rows])
    return False


def _serialize_claims(session: Session) -> None:
    # On PostgreSQL, claims that count what is in flight take turns (for a few milliseconds),
    # or two relays could each see a subscription below its cap and both fill it.
    if session.get_bind().dialect.name == "postgresql":
        session.execute(_CLAIM_LOCK)


def _signing_secrets(
    rows: Sequence[Row[Any]], now: datetime, box: SecretBox | None
) -> dict[str, tuple[str, ...]]:
    """Each claimed subscription's secrets to sign with now, revealed (decrypted) once per
    claim rather than once per delivery."""
    secrets: dict[str, tuple[str, ...]] = {}
    for row in rows:
        (sub_id, _, secret, previous_secret, previous_expires_at) = tuple(row)[6:11]
        if sub_id not in secrets:
            previous = reveal(previous_secret, box) if previous_secret else None
            current = reveal(secret, box)
            secrets[sub_id] = tuple(active_secrets(current, previous, previous_expires_at, now))
    return secrets


def _claimed(
    row: Row[Any],
    attempt: int,
    lease_ends_at: datetime,
    secrets: Mapping[str, tuple[str, ...]],
    slot: str | None = None,
) -> ClaimedDelivery:
    (delivery_id, event_id, topic, payload, created_at, tenant_id, *subscription) = tuple(row)
    (sub_id, url, _, _, _, due_at) = subscription
    return ClaimedDelivery(
        delivery_id=delivery_id,
        event_id=event_id,
        topic=topic,
        payload=payload,
        event_created_at=created_at,
        subscription_id=sub_id,
        url=url,
        secrets=secrets[sub_id],
        attempt=attempt,
        tenant_id=tenant_id,
        lease_ends_at=lease_ends_at,
        slot=slot,
        due_at=due_at,
    )


def _update_streaks(
    session: Session, results: Sequence[AttemptResult], now: datetime, disable_after: timedelta
) -> None:
    """Start, extend or end each subscription's failure streak; disable the ones to disable."""
    ids = sorted({r.delivery.subscription_id for r in results})
    rows = session.execute(_STREAKS, {"b_ids": ids})
    current: dict[str, datetime | None] = {sid: since for sid, since in rows}
    streaks: dict[str, datetime | None] = dict(current)
    reasons: dict[str, str] = {}
    for result in results:
        sid = result.delivery.subscription_id
        streak = failure_streak(streaks.get(sid), result.outcome, now, disable_after)
        streaks[sid] = streak.failing_since
        if streak.disable_reason and sid not in reasons:
            reasons[sid] = streak.disable_reason
    for sid in ids:
        if sid in reasons:
            session.execute(
                update(WebhookSubscription)
                .where(WebhookSubscription.id == sid, WebhookSubscription.enabled.is_(True))
                .values(
                    enabled=False,
                    disabled_reason=reasons[sid],
                    failing_since=streaks[sid],
                    updated_at=now,
                )
                .execution_options(synchronize_session=False)
            )
        elif streaks.get(sid) != current.get(sid):
            session.execute(
                update(WebhookSubscription)
                .where(WebhookSubscription.id == sid)
                .values(failing_since=streaks[sid], updated_at=now)
                .execution_options(synchronize_session=False)
            )
