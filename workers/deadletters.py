"""Acting on dead letters: `billing jobs requeue ID|--all` and `billing jobs purge ID|--all`.

On Redis, Dramatiq keeps a dead message's body in `{ns}:{queue}.XQ.msgs` and its Redis id in the
sorted set `{ns}:{queue}.XQ` (see `workers.queues`). Requeueing sends the message to the queue
again as if new: the same message id and payload (the jobs are idempotent), its retry count,
last traceback and delay cleared, and its timestamp renewed so `JOB_MAX_AGE` does not dead-letter
it again at once; then it leaves the dead letters. A crash between the two leaves it in both,
which the job's idempotency makes harmless. Purging deletes it.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Iterator, Sequence

from dramatiq import Broker, Message
from dramatiq.brokers.redis import RedisBroker

from webhooks.safetext import safe_text
from workers.broker import QUEUE_NAME
from workers.clierrors import CommandError

#: Options a dead message carries from its failed runs, dropped when it is sent again.
SPENT_OPTIONS = frozenset({"retries", "traceback", "eta", "redis_message_id", "dead_message_ttl"})


def requeue(broker: Broker, message_ids: Sequence[str] | None) -> list[str]:
    """Send the dead letters with `message_ids` (every one when None) to the queue again; return
    the ids sent, in the order found.

    Raises:
        CommandError: the broker is not Redis, or an id names no dead letter (nothing is sent).
    """
    redis_broker = _redis(broker)
    letters = _select(redis_broker, message_ids)
    for redis_id, message in letters:
        redis_broker.enqueue(fresh(message))
        _delete(redis_broker, redis_id)
    return [message.message_id for _, message in letters]


def purge(broker: Broker, message_ids: Sequence[str] | None) -> list[str]:
    """Delete the dead letters with `message_ids` (every one when None); return the ids deleted.

    Raises:
        CommandError: the broker is not Redis, or an id names no dead letter (nothing is deleted).
    """
    redis_broker = _redis(broker)
    letters = _select(redis_broker, message_ids)
    for redis_id, _message in letters:
        _delete(redis_broker, redis_id)
    return [message.message_id for _, message in letters]


def fresh(message: Message[object]) -> Message[object]:
    """`message` as a new send: the billing queue, no spent options, a timestamp of now."""
    options = {k: v for k, v in message.options.items() if k not in SPENT_OPTIONS}
    return dataclasses.replace(
        message,
        queue_name=QUEUE_NAME,
        options=options,
        message_timestamp=int(time.time() * 1000),
    )


def _redis(broker: Broker) -> RedisBroker:
    if not isinstance(broker, RedisBroker):
        raise CommandError(
            "dead letters can be requeued or purged on Redis only (set REDIS_URL); on RabbitMQ "
            "use its management tools"
        )
    return broker


def _select(
    broker: RedisBroker, message_ids: Sequence[str] | None
) -> list[tuple[str, Message[object]]]:
    letters = list(_dead_letters(broker))
    if message_ids is None:
        return letters
    by_id = {message.message_id: (redis_id, message) for redis_id, message in letters}
    unknown = [message_id for message_id in message_ids if message_id not in by_id]
    if unknown:
        raise CommandError(
            f"no dead letter with id {safe_text(', '.join(unknown))}: `billing jobs` lists them"
        )
    return [by_id[message_id] for message_id in dict.fromkeys(message_ids)]


def _dead_letters(broker: RedisBroker) -> Iterator[tuple[str, Message[object]]]:
    key = f"{broker.namespace}:{QUEUE_NAME}.XQ.msgs"
    for redis_id, body in broker.client.hscan_iter(key):
        yield _text(redis_id), Message.decode(body)


def _delete(broker: RedisBroker, redis_id: str) -> None:
    base = f"{broker.namespace}:{QUEUE_NAME}.XQ"
    pipe = broker.client.pipeline()
    pipe.zrem(base, redis_id)
    pipe.hdel(f"{base}.msgs", redis_id)
    pipe.execute()


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value
