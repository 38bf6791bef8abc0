"""Queue depths and dead letters of the billing queue, read from the broker (`billing jobs`).

On Redis these are Dramatiq's own keys under the namespace: `{ns}:billing` (ready ids),
`{ns}:billing.msgs` (every message not yet acknowledged), `{ns}:billing.DQ.msgs` (delayed:
retries waiting their backoff), `{ns}:billing.XQ` and `.XQ.msgs` (dead letters, by time).
"""

from __future__ import annotations

import json
import sys
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from typing import Any, TextIO

from dramatiq import Broker
from dramatiq.brokers.rabbitmq import RabbitmqBroker
from dramatiq.brokers.redis import RedisBroker
from dramatiq.brokers.stub import StubBroker

from webhooks.output import print_rows
from workers.broker import QUEUE_NAME


@dataclass(frozen=True)
class DeadLetter:
    """One dead-lettered message, as `billing jobs` lists it."""

    message_id: str
    actor_name: str
    args: list[Any]
    retries: int
    dead_since: datetime | None
    last_error: str


@dataclass(frozen=True)
class QueueStats:
    """How many messages wait, run, wait for a retry, or are dead."""

    broker: str
    ready: int
    in_progress: int | None
    delayed: int
    dead: int
    dead_letters: list[DeadLetter] = field(default_factory=list)


def queue_stats(broker: Broker, *, queue_name: str = QUEUE_NAME, recent: int = 10) -> QueueStats:
    """The billing queue's counts and its `recent` newest dead letters."""
    if isinstance(broker, RedisBroker):
        return _redis_stats(broker, queue_name, recent)
    if isinstance(broker, RabbitmqBroker):
        ready, delayed, dead = broker.get_queue_message_counts(queue_name)
        return QueueStats("rabbitmq", ready, None, delayed, dead)
    if isinstance(broker, StubBroker):
        queue = broker.queues.get(queue_name)
        dead_messages = broker.dead_letters_by_queue.get(queue_name, [])
        delayed = broker.queues.get(f"{queue_name}.DQ")
        return QueueStats(
            "in-process",
            ready=queue.qsize() if queue else 0,
            in_progress=None,
            delayed=delayed.qsize() if delayed else 0,
            dead=len(dead_messages),
            dead_letters=[_dead_letter(m.asdict(), None) for m in dead_messages[-recent:]],
        )
    raise TypeError(f"no statistics for {type(broker).__name__}")


def _redis_stats(broker: RedisBroker, queue_name: str, recent: int) -> QueueStats:
    client = broker.client
    base = f"{broker.namespace}:{queue_name}"
    pipe = client.pipeline()
    pipe.llen(base)
    pipe.hlen(f"{base}.msgs")
    pipe.hlen(f"{base}.DQ.msgs")
    pipe.zcard(f"{base}.XQ")
    pipe.zrevrange(f"{base}.XQ", 0, recent - 1, withscores=True)
    ready, unacked, delayed, dead, newest = pipe.execute()
    letters = []
    if newest:
        ids = [member for member, _score in newest]
        bodies = client.hmget(f"{base}.XQ.msgs", ids)
        for (_member, score), body in zip(newest, bodies, strict=True):
            if body is not None:
                when = datetime.fromtimestamp(score / 1000, tz=UTC)
                letters.append(_dead_letter(json.loads(body), when))
    return QueueStats("redis", ready, unacked - ready, delayed, dead, letters)


def _dead_letter(message: dict[str, Any], when: datetime | None) -> DeadLetter:
    options = message.get("options", {})
    traceback = (options.get("traceback") or "").strip()
    return DeadLetter(
        message_id=message.get("message_id", "?"),
        actor_name=message.get("actor_name", "?"),
        args=list(message.get("args", [])),
        retries=int(options.get("retries", 0)),
        dead_since=when,
        last_error=traceback.splitlines()[-1] if traceback else "",
    )


def print_stats(stats: QueueStats, *, as_json: bool, out: TextIO | None = None) -> None:
    """`billing jobs`: the depths, then the recent dead letters, as tables; or one JSON object."""
    if as_json:
        (out or sys.stdout).write(json.dumps(asdict(stats), default=str) + "\n")
        return
    depths = {
        "queue": QUEUE_NAME,
        "broker": stats.broker,
        "ready": stats.ready,
        "in progress": "?" if stats.in_progress is None else stats.in_progress,
        "retry wait": stats.delayed,
        "dead letters": stats.dead,
    }
    print_rows(list(depths), [depths], as_json=False, out=out)
    if stats.dead_letters:
        letters = [
            {
                "dead since": letter.dead_since,
                "job": letter.actor_name,
                "id": letter.message_id,
                "retries": letter.retries,
                "args": json.dumps(letter.args, ensure_ascii=False),
                "last error": letter.last_error,
            }
            for letter in stats.dead_letters
        ]
        print_rows(list(letters[0]), letters, as_json=False, out=out)
