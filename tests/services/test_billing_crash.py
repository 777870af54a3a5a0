"""``kill -9`` billing while it charges, on SQLite (the default database): after a restart
every usage event is charged exactly once and the balance adds up.

The fault-injection bench does this on PostgreSQL; here it runs on the store a plain
``make run`` uses, with a real billing process and the real RabbitMQ.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import sqlite3
import sys
import time
import uuid
from pathlib import Path

import aiohttp
import pytest

from services.common.events import USAGE_RECORDED, Event, EventSettings, RabbitBus
from services.common.events.broker import queue_depths
from services.common.events.topology import Topology
from tests.support import free_port, serves_health

from .conftest import ADMIN, MASTER_KEY

USAGES = 1500
COST = "0.000029"  # per usage event: 29 micro-units
TOP_UP_MICRO = 100_000_000


def _usage(request_id: str, user_id: str) -> Event:
    return Event.new(
        USAGE_RECORDED,
        "proxy",
        {
            "request_id": request_id,
            "user_id": user_id,
            "provider": "mock",
            "model": "m",
            "prompt_tokens": 21,
            "completion_tokens": 12,
            "total_tokens": 33,
            "cost": COST,
            "currency": "USD",
        },
    )


def _append(log: Path):
    """The log, opened for the child's output (a blocking call, kept out of coroutines)."""
    return log.open("ab")


async def _start(env: dict[str, str], log: Path) -> asyncio.subprocess.Process:
    with _append(log) as out:  # the child keeps its own copy of the descriptor
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "services.billing", env=env, stdout=out, stderr=out
        )
    if not await serves_health(proc, int(env["BILLING_PORT"])):
        pytest.fail(f"billing did not come up:\n{_tail(log)}")
    return proc


def _tail(log: Path) -> str:
    """The end of billing's output, for a failure message."""
    return log.read_text(errors="replace")[-3000:]


def _charged(db: Path, user_id: str) -> int:
    with contextlib.closing(sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=5)) as conn:
        return conn.execute(
            "SELECT count(*) FROM billing_ledger WHERE user_id = ? AND kind = 'charge'",
            (user_id,),
        ).fetchone()[0]


async def test_billing_killed_while_charging_loses_and_doubles_nothing(
    tmp_path: Path, rabbit_settings: EventSettings
) -> None:
    port = free_port()
    data = tmp_path / "data"
    log = tmp_path / "billing.log"
    env = {
        **{k: v for k, v in os.environ.items() if not k.endswith("_DATABASE_URL")},
        "BILLING_PORT": str(port),
        "AIAGG_DATA_DIR": str(data),
        "MASTER_KEY": MASTER_KEY,
        "AMQP_URL": rabbit_settings.amqp_url or "",
        "EVENTS_NAMESPACE": rabbit_settings.events_namespace,
        "LOG_LEVEL": "WARNING",
    }
    env.pop("CONSUL_HTTP_ADDR", None)
    db = data / "billing.db"
    user = f"u-crash-{uuid.uuid4().hex[:8]}"
    ids = [f"req-{uuid.uuid4().hex}" for _ in range(USAGES)]
    base = f"http://127.0.0.1:{port}"

    proc = await _start(env, log)
    bus = RabbitBus(settings=rabbit_settings, queues=(), connection_name="test-crash")
    publishing: asyncio.Task[None] | None = None
    try:
        async with aiohttp.ClientSession(headers=ADMIN) as http:
            body = {"user_id": user, "amount": "100.00", "idempotency_key": f"t-{user}"}
            async with http.post(f"{base}/billing/top-up", json=body) as resp:
                assert resp.status == 201, await resp.text()
            gate = asyncio.Semaphore(16)

            async def hold(request_id: str) -> None:
                body = {"request_id": request_id, "user_id": user, "amount": "0.006200"}
                async with gate, http.post(f"{base}/internal/billing/reservations", json=body) as r:
                    assert r.status == 201, await r.text()

            await asyncio.gather(*(hold(i) for i in ids))

        await bus.start()
        await asyncio.wait_for(bus.wait_connected(), 10)

        async def publish_all() -> None:
            for start in range(0, USAGES, 100):
                batch = ids[start : start + 100]
                await asyncio.gather(*(bus.publish(_usage(i, user)) for i in batch))

        publishing = asyncio.create_task(publish_all())
        # kill -9 once the first charges have committed, with most still to come
        deadline = time.monotonic() + 30
        while _charged(db, user) < 20:
            assert time.monotonic() < deadline, _tail(log)
            await asyncio.sleep(0.005)
        proc.send_signal(signal.SIGKILL)
        await proc.wait()
        at_kill = _charged(db, user)
        assert at_kill < USAGES, f"all {at_kill} charged before the kill: raise USAGES"
        await publishing  # the queue outlives its consumer

        proc = await _start(env, log)  # the broker redelivers what was not acked
        deadline = time.monotonic() + 30
        while (charged := _charged(db, user)) < USAGES:
            assert time.monotonic() < deadline, f"{charged} of {USAGES} charged: some were lost"
            await asyncio.sleep(0.05)

        async with aiohttp.ClientSession(headers=ADMIN) as http:
            async with http.get(f"{base}/billing/balance/{user}") as resp:
                balance = await resp.json()
    finally:
        if publishing is not None:
            publishing.cancel()
        await bus.close()
        if proc.returncode is None:
            proc.send_signal(signal.SIGTERM)
            try:
                await asyncio.wait_for(proc.wait(), 20)
            except TimeoutError:
                proc.kill()
                await proc.wait()

    with contextlib.closing(sqlite3.connect(db)) as conn:
        charges = conn.execute(
            "SELECT charge_request_id, amount_micro FROM billing_ledger "
            "WHERE user_id = ? AND kind = 'charge'",
            (user,),
        ).fetchall()
        account = conn.execute(
            "SELECT balance_micro, held_micro FROM billing_accounts WHERE user_id = ?", (user,)
        ).fetchone()
        last_after = conn.execute(
            "SELECT balance_after_micro FROM billing_ledger WHERE user_id = ? "
            "ORDER BY seq DESC LIMIT 1",
            (user,),
        ).fetchone()[0]
        hold_states = dict(
            conn.execute(
                "SELECT status, count(*) FROM billing_holds WHERE user_id = ? GROUP BY status",
                (user,),
            ).fetchall()
        )
    # each request charged once, for its cost; nothing charged that was not used
    assert sorted(r[0] for r in charges) == sorted(ids)
    assert {r[1] for r in charges} == {-29}
    expected = TOP_UP_MICRO - 29 * USAGES
    assert account == (expected, 0)  # balance = top-up - charges; no hold left open
    assert last_after == expected
    assert hold_states == {"settled": USAGES}
    assert balance["balance"] == "99.956500" and balance["held"] == "0.000000"
    topology = Topology(rabbit_settings.events_namespace)
    depths = await queue_depths(
        rabbit_settings.amqp_url or "",
        [topology.queue("billing.usage"), topology.dlq("billing.usage")],
    )
    assert set(depths.values()) == {0}, depths  # nothing left over, nothing dead-lettered
