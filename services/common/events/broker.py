"""Looking after a namespace on the broker: queue depths, listing and deleting names.

For operators' tools, the benchmarks and the tests (which each work in a namespace of
their own and remove it afterwards); services do not need these.
"""

from __future__ import annotations

import contextlib
import shutil
import subprocess
from collections.abc import Callable, Iterable

import aio_pika

from .settings import EventSettings
from .topology import STANDARD_QUEUES, Topology


def namespace_names(
    settings: EventSettings, queues: Iterable[str] = tuple(q.name for q in STANDARD_QUEUES)
) -> set[str]:
    """Every exchange and queue a namespace's topology declares for ``queues``."""
    topology = Topology(settings.events_namespace)
    names = {topology.exchange}
    for queue in queues:
        names |= {topology.queue(queue), topology.dlq(queue)}
        names |= {topology.retry_queue(queue, d) for d in settings.retry_delays_in_use()}
    return names


def listed_names(matches: Callable[[str], bool]) -> set[str]:
    """Queue and exchange names that ``matches``, as ``rabbitmqctl`` lists them (empty
    when rabbitmqctl is not here): catches what an earlier, killed run left behind."""
    ctl = shutil.which("rabbitmqctl")
    if not ctl:
        return set()
    found: set[str] = set()
    for what in ("list_queues", "list_exchanges"):
        with contextlib.suppress(Exception):
            out = subprocess.run(
                [ctl, what, "-q", "--no-table-headers", "name"],
                capture_output=True,
                text=True,
                timeout=30,
                check=False,
            ).stdout
            found |= {n for n in (line.strip() for line in out.splitlines()) if n and matches(n)}
    return found


async def delete_names(url: str, names: Iterable[str]) -> None:
    """Delete queues and exchanges by name (missing ones are fine)."""
    connection = await aio_pika.connect(url, timeout=10)
    try:
        for name in sorted(set(names)):
            for kind in ("queue", "exchange"):
                channel = await connection.channel()
                with contextlib.suppress(Exception):
                    if kind == "queue":
                        await channel.queue_delete(name)
                    else:
                        await channel.exchange_delete(name)
                with contextlib.suppress(Exception):
                    await channel.close()
    finally:
        await connection.close()


async def queue_depths(url: str, names: Iterable[str]) -> dict[str, int | None]:
    """Ready messages per queue (a passive declare); None for a queue that does not exist."""
    out: dict[str, int | None] = {}
    connection = await aio_pika.connect(url, timeout=10)
    try:
        for name in names:
            channel = await connection.channel()
            try:
                queue = await channel.declare_queue(name, passive=True)
                out[name] = queue.declaration_result.message_count
            except Exception:
                out[name] = None
            with contextlib.suppress(Exception):
                await channel.close()
    finally:
        await connection.close()
    return out
