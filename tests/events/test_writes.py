"""services.common.groupcommit: many callers' write units, one transaction each batch."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from sqlalchemy import Column, Integer, MetaData, String, Table, func, insert, select

from services.common.db import Database, DbSession
from services.common.groupcommit import Batcher, GroupCommitClosed

rows = Table(
    "gc_rows",
    MetaData(),
    Column("name", String(40), primary_key=True),
    Column("value", Integer, nullable=False),
)


def _insert(name: str, value: int):
    async def unit(session: DbSession) -> str:
        await session.execute(insert(rows).values(name=name, value=value))
        return f"{name}:{value}"

    return unit


def _batcher(db: Database, name: str, **options: Any) -> Batcher:
    """A Batcher that runs units in ``db``'s transactions, as ``db.writes`` does."""

    async def run_batch(units):
        async with db.transaction() as session:
            return [await unit(session) for unit in units]

    async def run_one(unit):
        async with db.transaction() as session:
            return await unit(session)

    return Batcher(name, run_batch, run_one, **options)


async def _names(db: Database) -> list[str]:
    async with db.session() as session:
        return sorted((await session.execute(select(rows.c.name))).scalars().all())


async def test_concurrent_units_share_transactions_and_get_their_own_results(
    any_db: Database,
) -> None:
    await any_db.create_all(rows.metadata)
    commits: list[object] = []
    any_db.add_commit_listener(commits.append)
    results = await asyncio.gather(*(any_db.writes.run(_insert(f"r{i}", i)) for i in range(50)))
    assert results == [f"r{i}:{i}" for i in range(50)]
    # without group commit this is 50 transactions
    assert any_db.writes.units == 50
    assert len(commits) == any_db.writes.batches <= 2
    assert await _names(any_db) == sorted(f"r{i}" for i in range(50))


async def test_a_failing_unit_fails_alone(any_db: Database) -> None:
    await any_db.create_all(rows.metadata)
    await any_db.writes.run(_insert("taken", 0))

    async def boom(session: DbSession) -> None:
        await session.execute(insert(rows).values(name="boom-row", value=1))
        raise ValueError("this unit is bad")

    units = [_insert(f"ok{i}", i) for i in range(5)]
    units.insert(2, boom)
    units.insert(4, _insert("taken", 1))  # primary-key clash: an IntegrityError
    outcomes = await asyncio.gather(*(any_db.writes.run(u) for u in units), return_exceptions=True)
    assert isinstance(outcomes[2], ValueError)
    assert type(outcomes[4]).__name__ == "IntegrityError"
    assert [o for i, o in enumerate(outcomes) if i not in (2, 4)] == [
        f"ok{i}:{i}" for i in range(5)
    ]
    # the bad units' writes are rolled back, everybody else's committed
    assert await _names(any_db) == ["ok0", "ok1", "ok2", "ok3", "ok4", "taken"]


async def test_a_refused_unit_does_not_turn_group_commit_off(any_db: Database) -> None:
    """A unit raising (a 402, say) costs its batch a rerun, but not one transaction per
    unit: the units before it commit together, it runs alone, the rest commit together."""
    await any_db.create_all(rows.metadata)
    commits: list[object] = []
    any_db.add_commit_listener(commits.append)

    class Refused(Exception):
        pass

    async def refused(session: DbSession) -> None:
        await session.execute(insert(rows).values(name="refused-row", value=1))
        raise Refused("balance too low")

    units = [_insert(f"u{i:02d}", i) for i in range(20)]
    units[7] = refused
    outcomes = await asyncio.gather(*(any_db.writes.run(u) for u in units), return_exceptions=True)
    assert isinstance(outcomes[7], Refused)
    assert [o for i, o in enumerate(outcomes) if i != 7] == [
        f"u{i:02d}:{i}" for i in range(20) if i != 7
    ]
    assert len(commits) == 2  # u00..u06, then u08..u19 (one unit at a time: 19)
    assert await _names(any_db) == [f"u{i:02d}" for i in range(20) if i != 7]


async def test_the_answer_comes_after_the_commit(sqlite_db: Database) -> None:
    await sqlite_db.create_all(rows.metadata)

    async def write_then_check(i: int) -> None:
        await sqlite_db.writes.run(_insert(f"c{i}", i))
        async with sqlite_db.session() as session:  # another connection sees it already
            found = await session.scalar(select(func.count()).where(rows.c.name == f"c{i}"))
        assert found == 1

    await asyncio.gather(*(write_then_check(i) for i in range(20)))


async def test_close_fails_what_is_queued(sqlite_db: Database) -> None:
    await sqlite_db.create_all(rows.metadata)
    gate = asyncio.Event()

    async def slow(session: DbSession) -> None:
        await gate.wait()

    first = asyncio.create_task(sqlite_db.writes.run(slow))
    await asyncio.sleep(0.01)
    queued = asyncio.create_task(sqlite_db.writes.run(_insert("never", 0)))
    await asyncio.sleep(0.01)
    await sqlite_db.writes.close()
    with pytest.raises(GroupCommitClosed):
        await first
    with pytest.raises(GroupCommitClosed):
        await queued
    assert await _names(sqlite_db) == []
    # the writer starts again on the next use
    assert await sqlite_db.writes.run(_insert("again", 1)) == "again:1"


async def test_linger_gathers_work_that_trickles_in_into_one_batch(sqlite_db: Database) -> None:
    """Deliveries arrive a little apart (as from a broker); without a linger each one
    is a transaction of its own, with one they share a transaction."""
    await sqlite_db.create_all(rows.metadata)

    async def trickle(batcher: Batcher, prefix: str) -> None:
        tasks = []
        for i in range(10):
            tasks.append(asyncio.create_task(batcher.submit(_insert(f"{prefix}{i}", i))))
            await asyncio.sleep(0.002)
        await asyncio.gather(*tasks)

    eager = _batcher(sqlite_db, "eager")
    patient = _batcher(sqlite_db, "patient", linger=0.05)
    await trickle(eager, "e")
    await trickle(patient, "p")
    assert eager.batches >= 5  # each arrival found the worker idle or nearly
    assert patient.batches == 1 and patient.items == 10
    await eager.close()
    await patient.close()


async def test_a_full_batch_does_not_wait_for_the_linger(sqlite_db: Database) -> None:
    """Lingering is for a trickle; a consumer whose prefetch-worth of deliveries is
    already queued (a backlog) must not sleep on it, or the linger caps throughput."""
    await sqlite_db.create_all(rows.metadata)

    batcher = _batcher(sqlite_db, "backlog", max_batch=5, linger=30.0)
    loop = asyncio.get_running_loop()
    began = loop.time()
    await asyncio.wait_for(
        asyncio.gather(*(batcher.submit(_insert(f"f{i}", i)) for i in range(5))), 5
    )
    assert loop.time() - began < 1.0
    assert batcher.batches == 1
    await batcher.close()


async def test_a_batch_where_every_unit_fails_gives_each_caller_its_error() -> None:
    """Each failure splits off the rest of the batch, without recursing once per unit."""
    from services.common.groupcommit import ItemFailed

    class Refused(Exception):
        pass

    attempts: list[int] = []

    async def run_batch(items: list[int]) -> list[int]:
        attempts.append(len(items))
        raise ItemFailed(0, Refused(items[0]))

    async def run_one(item: int) -> int:
        raise Refused(item)

    batcher: Batcher[int, int] = Batcher("all-refused", run_batch, run_one, max_batch=3000)
    try:
        outcomes = await asyncio.gather(
            *(batcher.submit(i) for i in range(2500)), return_exceptions=True
        )
    finally:
        await batcher.close()
    assert [type(o) for o in outcomes] == [Refused] * 2500
    assert [o.args[0] for o in outcomes] == list(range(2500))
    assert attempts == list(range(2500, 1, -1))  # then the last one runs alone
