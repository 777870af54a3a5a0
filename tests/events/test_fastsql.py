"""services.common.fastsql: repeated statements give what SQLAlchemy gives, faster.

Every test runs on SQLite and on the real PostgreSQL (a database of its own per
Database); the PostgreSQL ones also hold what replaced ``pool_pre_ping``: a pooled
connection that died while idle is replaced at BEGIN, before anything was sent.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import asyncpg
import pytest
from sqlalchemy import (
    BigInteger,
    Boolean,
    Column,
    DateTime,
    Integer,
    MetaData,
    String,
    Table,
    bindparam,
    delete,
    func,
    insert,
    select,
    text,
    update,
)
from sqlalchemy.exc import DBAPIError, IntegrityError, NoResultFound

from services.common.db import Database, InsertIgnore
from tests.support import asyncpg_dsn, fresh_database

metadata = MetaData()
things = Table(
    "fast_things",
    metadata,
    Column("id", String(40), primary_key=True),
    Column("amount", BigInteger, nullable=False),
    Column("flag", Boolean, nullable=False, default=False),
    Column("tries", Integer, nullable=False, default=0),
    Column("at", DateTime(timezone=True), nullable=True),
)
stamped = Table(
    "fast_stamped",
    metadata,
    Column("id", String(40), primary_key=True),
    Column("made", DateTime(timezone=True), nullable=False, default=lambda: datetime.now(UTC)),
)

AT = datetime(2026, 11, 26, 12, 30, 15, 123456, tzinfo=UTC)
GET = select(things).where(things.c.id == bindparam("p_id"))
ADD = (
    update(things)
    .where(things.c.id == bindparam("p_id"))
    .values(amount=things.c.amount + bindparam("p_delta"), at=bindparam("p_at"))
    .returning(things.c.amount, things.c.at, things.c.flag)
)
INSERT = insert(things)
IGNORE = InsertIgnore(things, "id")
DROP = delete(things).where(things.c.amount < bindparam("p_below"))
BY_IDS = select(things.c.id).where(things.c.id.in_(bindparam("p_ids", expanding=True)))
COUNT = select(func.count().label("n")).select_from(things)
TEXT = text("SELECT id FROM fast_things ORDER BY id")
STAMP = insert(stamped)


MakeDb = Callable[[str, bool], Any]


@pytest.fixture(params=["sqlite", "postgres"])
async def make_db(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[MakeDb]:
    """``await make_db(name, fast)``: a Database with the tables, on a store of its own."""
    made: list[Database] = []
    async with contextlib.AsyncExitStack() as stack:

        async def make(name: str, fast: bool) -> Database:
            if request.param == "sqlite":
                url = f"sqlite:///{tmp_path}/{name}.db"
            else:
                url = await stack.enter_async_context(fresh_database("aiagg_fast_"))
            db = Database(url, fast_statements=fast)
            made.append(db)
            await db.create_all(metadata)
            return db

        try:
            yield make
        finally:
            for db in made:
                await db.close()


async def _script(db: Database) -> list[Any]:
    """The same statements twice over (the second round is the fast path), with every
    result shape the stores read."""
    seen: list[Any] = []
    for round_ in range(2):
        async with db.transaction() as s:
            base = f"r{round_}-"
            r = await s.execute(INSERT, {"id": base + "a", "amount": 10, "at": AT})
            seen.append(r.rowcount)
            r = await s.execute(
                INSERT, [{"id": base + "b", "amount": 20}, {"id": base + "c", "amount": 1}]
            )
            seen.append(r.rowcount)
            seen.append(await IGNORE.run(s, {"id": base + "a", "amount": 99}))  # exists
            seen.append(await IGNORE.run(s, {"id": base + "d", "amount": 5}))
            seen.append(
                sorted(
                    await IGNORE.run_returning(
                        s, "id", [{"id": base + "a", "amount": 1}, {"id": base + "e", "amount": 2}]
                    )
                )
            )
            row = (await s.execute(GET, {"p_id": base + "a"})).first()
            seen.append((tuple(row), row.amount, row.flag, row.tries, row.at, row._mapping))
            seen.append((await s.execute(GET, {"p_id": "nobody"})).first())
            moved = (
                await s.execute(ADD, {"p_id": base + "b", "p_delta": -7, "p_at": AT})
            ).one()
            seen.append((tuple(moved), moved.amount, type(moved.at).__name__))
            seen.append((await s.execute(ADD, {"p_id": base + "a", "p_delta": 1, "p_at": None}))
                        .scalar_one())
            seen.append((await s.execute(DROP, {"p_below": 2})).rowcount)
            seen.append(sorted((await s.execute(BY_IDS, {"p_ids": [base + "a", base + "b"]}))
                               .scalars().all()))
            seen.append((await s.execute(COUNT)).scalar())
            seen.append([r.id for r in (await s.execute(TEXT)).all()])
            await s.execute(STAMP, {"id": base + "s"})
            with pytest.raises(NoResultFound):
                (await s.execute(GET, {"p_id": "nobody"})).one()
    return seen


async def test_the_fast_path_gives_what_sqlalchemy_gives(make_db: MakeDb) -> None:
    plain = await make_db("plain", False)
    fast = await make_db("fast", True)
    expected = await _script(plain)
    got = await _script(fast)
    assert got == expected
    assert fast.statements is not None and fast.statements.fast >= 8  # it was taken
    async with plain.session() as a, fast.session() as b:
        dump = select(things).order_by(things.c.id)
        assert (await b.execute(dump)).all() == (await a.execute(dump)).all()
        made = select(stamped.c.made)
        assert len((await b.execute(made)).all()) == 2  # the callable default ran


async def test_errors_are_sqlalchemys_and_roll_back(make_db: MakeDb) -> None:
    db = await make_db("errors", True)
    for attempt in range(3):  # the first runs through SQLAlchemy, the rest fast
        with pytest.raises(IntegrityError):
            async with db.transaction() as s:
                await s.execute(INSERT, {"id": f"x{attempt}", "amount": 1})
                await s.execute(INSERT, {"id": f"x{attempt}", "amount": 2})
    assert db.statements is not None and db.statements.fast >= 2
    async with db.session() as s:
        assert (await s.execute(COUNT)).scalar() == 0  # every transaction rolled back
    async with db.transaction() as s:  # and the connections are fine afterwards
        await s.execute(INSERT, {"id": "after", "amount": 1})
    async with db.session() as s:
        assert (await s.execute(COUNT)).scalar() == 1


async def test_statements_built_per_call_are_never_planned(make_db: MakeDb) -> None:
    db = await make_db("dynamic", True)
    for i in range(5):
        async with db.transaction() as s:
            await s.execute(insert(things).values(id=f"d{i}", amount=i))
    assert db.statements is not None and db.statements.fast == 0
    assert len(db.statements._plans) <= 1  # weak keys: the dead statements are gone


# -- PostgreSQL: dead pooled connections, without a ping at every checkout ----------------


async def _kill_backends(url: str) -> int:
    """Terminate every other session on the database of ``url`` (as a restart would)."""
    conn = await asyncpg.connect(asyncpg_dsn(url))
    try:
        return len(
            await conn.fetch(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                "WHERE datname = current_database() AND pid <> pg_backend_pid()"
            )
        )
    finally:
        await conn.close()


@contextlib.asynccontextmanager
async def _pg_db(fast: bool = True) -> AsyncIterator[tuple[str, Database]]:
    async with fresh_database("aiagg_fast_") as url:
        db = Database(url, fast_statements=fast)
        try:
            await db.create_all(metadata)
            yield url, db
        finally:
            await db.close()


@pytest.mark.parametrize("fast", [True, False], ids=["fast", "sqlalchemy-statements"])
async def test_pooled_connections_killed_while_idle_are_replaced_at_begin(fast: bool) -> None:
    async with _pg_db(fast) as (url, db):
        assert db.async_engine is not None
        assert db.async_engine.pool._pre_ping is False  # type: ignore[attr-defined]
        # a few idle connections in the pool, then PostgreSQL drops them all
        async with db.transaction() as a, db.transaction() as b:
            await a.execute(INSERT, {"id": "a", "amount": 1})
            await b.execute(INSERT, {"id": "b", "amount": 2})
        assert await _kill_backends(url) >= 2
        await asyncio.sleep(0.2)  # as when idle: the loop sees the connections close
        for i in range(3):  # no error: BEGIN found them dead, nothing had been sent
            async with db.transaction() as s:
                await s.execute(INSERT, {"id": f"n{i}", "amount": i})
        # and when the server's goodbye has not been read yet either
        assert await _kill_backends(url) >= 1
        async with db.transaction() as s:
            await s.execute(INSERT, {"id": "m", "amount": 9})
        async with db.session() as s:
            assert (await s.execute(COUNT)).scalar() == 6


async def test_a_connection_lost_inside_a_transaction_is_an_error_not_a_retry() -> None:
    async with _pg_db() as (url, db):
        with pytest.raises(DBAPIError) as raised:
            async with db.transaction() as s:
                await s.execute(INSERT, {"id": "x", "amount": 1})
                await _kill_backends(url)
                await asyncio.sleep(0.2)
                await s.execute(INSERT, {"id": "y", "amount": 1})  # may have been processed
        assert raised.value.connection_invalidated
        async with db.transaction() as s:  # the next transaction gets a live connection
            await s.execute(INSERT, {"id": "z", "amount": 1})
        async with db.session() as s:
            assert [r.id for r in (await s.execute(TEXT)).all()] == ["z"]


async def test_fast_and_sqlalchemy_statements_share_one_transaction(make_db: MakeDb) -> None:
    """A statement built per call takes SQLAlchemy's path and joins the transaction the
    fast path began: both commit together, or both roll back."""
    db = await make_db("mixed", True)
    for round_ in range(3):  # the first round plans; later ones are fast
        with pytest.raises(RuntimeError):
            async with db.transaction() as s:
                await s.execute(INSERT, {"id": f"gone-{round_}", "amount": 1})
                await s.execute(insert(things).values(id=f"gone-dyn-{round_}", amount=2))
                raise RuntimeError("changed my mind")
        async with db.transaction() as s:
            await s.execute(INSERT, {"id": f"kept-{round_}", "amount": 1})
            await s.execute(insert(things).values(id=f"kept-dyn-{round_}", amount=2))
            await s.execute(INSERT, {"id": f"kept-after-{round_}", "amount": 3})
    assert db.statements is not None and db.statements.fast >= 4
    async with db.session() as s:
        ids = sorted(r.id for r in (await s.execute(TEXT)).all())
    assert ids == sorted(
        f"{name}-{r}" for r in range(3) for name in ("kept", "kept-dyn", "kept-after")
    )


SLEEP = select(func.pg_sleep(bindparam("p_s")).label("slept"))


async def test_a_cancelled_transaction_leaves_no_broken_connection_behind() -> None:
    async with _pg_db() as (_url, db):
        for _ in range(2):  # planned at the second execution
            async with db.transaction() as s:
                await s.execute(SLEEP, {"p_s": 0})
        assert db.statements is not None
        assert db.statements.plan_for(SLEEP, {"p_s": 0}) is not None  # the fast path runs it

        async def slow() -> None:
            async with db.transaction() as s:
                await s.execute(INSERT, {"id": "never", "amount": 1})
                await s.execute(SLEEP, {"p_s": 5})

        task = asyncio.create_task(slow())
        await asyncio.sleep(0.3)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        for i in range(db_idle_cap := 3):  # every connection handed out afterwards works
            async with db.transaction() as a, db.transaction() as b:
                await a.execute(INSERT, {"id": f"a{i}", "amount": i})
                await b.execute(INSERT, {"id": f"b{i}", "amount": i})
        async with db.session() as s:
            assert (await s.execute(COUNT)).scalar() == 2 * db_idle_cap  # "never" rolled back


async def test_executemany_takes_the_fast_path_except_returning_on_postgres(
    make_db: MakeDb,
) -> None:
    db = await make_db("many", True)
    assert db.statements is not None
    for round_ in range(3):  # planned at the second execution
        before = db.statements.fast
        async with db.transaction() as s:
            await s.execute(INSERT, [{"id": f"m{round_}-{i}", "amount": i} for i in range(4)])
        assert db.statements.fast - before == (1 if round_ else 0)
    for round_ in range(3):
        before = db.statements.fast
        async with db.transaction() as s:
            new = await IGNORE.run_returning(
                s, "id", [{"id": f"m0-{i}", "amount": 0} for i in range(2)]
                + [{"id": f"r{round_}", "amount": 0}]
            )
        assert new == {f"r{round_}"}
        # SQLite runs RETURNING for many rows one execute per row; PostgreSQL leaves it
        # to SQLAlchemy's single multi-row statement
        taken = db.statements.fast - before
        assert taken == (0 if round_ == 0 or db.is_postgres else 1)
    async with db.session() as s:
        assert (await s.execute(COUNT)).scalar() == 12 + 3


SLOW_COMMIT = """
CREATE FUNCTION slow_commit() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN PERFORM pg_sleep(2); RETURN NULL; END $$;
CREATE CONSTRAINT TRIGGER slow_commit AFTER INSERT ON fast_things
DEFERRABLE INITIALLY DEFERRED FOR EACH ROW EXECUTE FUNCTION slow_commit();
"""


async def test_a_commit_cancelled_midway_never_puts_a_dirty_connection_back(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """COMMIT is under way (a deferred trigger makes it take 2 s) when the task is
    cancelled: that connection's state is unknown (asyncpg closes it), so it is
    discarded, not handed out again to be found dead at the next BEGIN."""
    async with _pg_db() as (url, db):
        conn = await asyncpg.connect(asyncpg_dsn(url))
        try:
            await conn.execute(SLOW_COMMIT)
        finally:
            await conn.close()

        async def commit_slowly() -> None:
            async with db.transaction() as s:
                await s.execute(INSERT, {"id": "slow", "amount": 1})

        task = asyncio.create_task(commit_slowly())
        await asyncio.sleep(0.5)  # inside the COMMIT by now
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        # every connection handed out afterwards is clean: BEGIN works, work commits
        caplog.set_level(logging.WARNING, logger="aiagg.db")
        for i in range(4):
            async with db.transaction() as a, db.transaction() as b:
                await a.execute(stamped.insert(), {"id": f"a{i}"})
                await b.execute(stamped.insert(), {"id": f"b{i}"})
        async with db.session() as s:
            assert len((await s.execute(select(stamped.c.id))).all()) == 8
        assert "was lost" not in caplog.text  # none of them was found dead at BEGIN
