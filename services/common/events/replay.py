"""Move dead letters back to their queue: ``python -m services.common.events.replay QUEUE``.

Reads ``AMQP_URL`` and ``EVENTS_NAMESPACE`` from the environment like the services.
Only the messages in ``<QUEUE>.dlq`` when it starts are moved (a message that fails again
goes back to the DLQ, not round in circles). Each message is published to QUEUE with a
fresh attempt count and an ``x-replayed`` counter, confirmed, and only then removed from
the DLQ. ``--list`` shows the dead letters without moving them.
"""

from __future__ import annotations

import argparse
import asyncio
import sys

from .rabbit import RabbitBus
from .settings import EventSettings


async def replay(
    queue: str, *, limit: int | None = None, settings: EventSettings | None = None
) -> int:
    """Replay the dead letters of ``queue``; returns how many were moved."""
    settings = settings or EventSettings()
    bus = RabbitBus(settings.amqp_url, settings, queues=(), connection_name="aiagg-replay")
    await bus.start()
    try:
        if not bus.connected:
            raise SystemExit(f"replay: RabbitMQ at {bus.display_url()} is not reachable")
        return await bus.replay_dead_letters(queue, limit=limit)
    finally:
        await bus.close()


async def _list(queue: str, limit: int, settings: EventSettings) -> int:
    bus = RabbitBus(settings.amqp_url, settings, queues=(), connection_name="aiagg-replay")
    await bus.start()
    try:
        if not bus.connected:
            raise SystemExit(f"replay: RabbitMQ at {bus.display_url()} is not reachable")
        letters = await bus.dead_letters(queue, limit=limit)
    finally:
        await bus.close()
    for letter in letters:
        event = letter.event
        what = f"{event.type} {event.id}" if event else f"(poison) message_id={letter.message_id}"
        print(f"{what}\treason={letter.reason}\tattempts={letter.attempts}\terror={letter.error}")
    return len(letters)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m services.common.events.replay",
        description="Move the messages of <queue>.dlq back into <queue> (RabbitMQ at AMQP_URL).",
    )
    parser.add_argument("queue", help="the main queue, e.g. billing.usage")
    parser.add_argument("--limit", type=int, default=None, help="move at most this many")
    parser.add_argument("--list", action="store_true", help="only show the dead letters")
    args = parser.parse_args(argv)
    settings = EventSettings(amqp_connect_timeout=5.0)
    if not settings.amqp_url:
        print(
            "replay: AMQP_URL is not set (dead letters of the in-process bus live "
            "in its process: use InProcessBus.replay_dead_letters)",
            file=sys.stderr,
        )
        return 2
    try:
        if args.list:
            count = asyncio.run(_list(args.queue, args.limit or 100, settings))
            print(f"{count} dead letter(s) in {args.queue}.dlq")
        else:
            count = asyncio.run(replay(args.queue, limit=args.limit, settings=settings))
            print(f"replayed {count} message(s) from {args.queue}.dlq into {args.queue}")
    except SystemExit as exc:
        print(exc, file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
