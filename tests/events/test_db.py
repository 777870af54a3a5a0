"""services.common.db: URLs, SQLite set-up and write serialisation, PostgreSQL."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
from sqlalchemy import Column, Integer, MetaData, String, Table, insert, select, text, update

from services.common.db import SQLITE_LOOP_BUSY_MS, Database, default_sqlite_url, normalize_url


@pytest.mark.parametrize(
    ("given", "expected"),
    [
        ("sqlite:///var/billing.db", "sqlite:///var/billing.db"),
        ("sqlite+aiosqlite:////abs/a.db", "sqlite:////abs/a.db"),
        ("postgresql://u:p@db:5432/billing", "postgresql+asyncpg://u:p@db:5432/billing"),
        ("postgres://u@db/billing", "postgresql+asyncpg://u@db/billing"),
        ("postgresql+psycopg2://u@db/billing", "postgresql+asyncpg://u@db/billing"),
        ("postgresql://u@db/b?sslmode=require", "postgresql+asyncpg://u@db/b?ssl=require"),
    ],
)
def test_urls_are_normalised(given: str, expected: str) -> None:
    assert normalize_url(given).render_as_string(hide_password=False) == expected


@pytest.mark.parametrize("url", ["mysql://u@db/x", "sqlite+pysqlcipher:///x.db", "nonsense"])
def test_other_databases_are_refused(url: str) -> None:
    with pytest.raises(Exception, match=r"unsupported|Could not parse"):
        normalize_url(url)


def test_default_sqlite_url(tmp_path: Path) -> None:
    url = default_sqlite_url("billing", tmp_path / "data")
    assert url == f"sqlite:///{tmp_path}/data/billing.db"


counters = Table(
    "counters",
    MetaData(),
    Column("name", String(20), primary_key=True),
    Column("value", Integer, nullable=False),
)
other_metadata = MetaData()
notes = Table("notes", other_metadata, Column("id", Integer, primary_key=True))


async def test_sqlite_file_set_up(tmp_path: Path) -> None:
    db = Database(f"sqlite:///{tmp_path}/deep/er/x.db")  # parent dirs are created
    try:
        assert db.is_sqlite and not db.is_postgres
        assert await db.ping()
        await db.create_all(counters.metadata, other_metadata)  # several MetaData
        async with db.session() as session:
            assert (await session.execute(text("PRAGMA journal_mode"))).scalar() == "wal"
            busy = (await session.execute(text("PRAGMA busy_timeout"))).scalar()
            assert busy == SQLITE_LOOP_BUSY_MS
            tables = (
                (await session.execute(text("SELECT name FROM sqlite_master WHERE type='table'")))
                .scalars()
                .all()
            )
        assert {"counters", "notes"} <= set(tables)
        assert (tmp_path / "deep/er/x.db").exists()
    finally:
        await db.close()


async def test_transaction_commits_or_rolls_back(any_db: Database) -> None:
    await any_db.create_all(counters.metadata)
    async with any_db.transaction() as session:
        await session.execute(insert(counters).values(name="a", value=1))
    with pytest.raises(ZeroDivisionError):
        async with any_db.transaction() as session:
            await session.execute(insert(counters).values(name="b", value=2))
            _ = 1 / 0
    async with any_db.transaction(write=False) as session:
        names = (await session.execute(select(counters.c.name))).scalars().all()
    assert names == ["a"]


async def _increment(db: Database) -> None:
    async with db.transaction() as session:
        # FOR UPDATE locks the row on PostgreSQL; SQLite has no row locks (the dialect
        # leaves the clause out) and relies on BEGIN IMMEDIATE instead
        query = select(counters.c.value).where(counters.c.name == "n").with_for_update()
        value = await session.scalar(query)
        await asyncio.sleep(0.01)  # a read-modify-write that overlaps the others
        await session.execute(
            update(counters).where(counters.c.name == "n").values(value=value + 1)
        )


async def test_concurrent_read_modify_write_transactions_serialise(any_db: Database) -> None:
    """Two pools on one database (two processes), 20 overlapping read-then-write
    transactions: none fails ("database is locked" on SQLite without BEGIN IMMEDIATE)
    and no update is lost."""
    await any_db.create_all(counters.metadata)
    async with any_db.transaction() as session:
        await session.execute(insert(counters).values(name="n", value=0))
    other = Database(any_db.url)
    try:
        await asyncio.gather(*(_increment(any_db if i % 2 else other) for i in range(20)))
    finally:
        await other.close()
    async with any_db.session() as session:
        final = await session.scalar(select(counters.c.value).where(counters.c.name == "n"))
    assert final == 20


async def test_postgres_database(pg_db: Database) -> None:
    assert pg_db.is_postgres
    assert await pg_db.ping()
    await pg_db.create_all(counters.metadata)
    async with pg_db.transaction() as session:
        await session.execute(insert(counters).values(name="pg", value=7))
        version = (await session.execute(text("SHOW server_version"))).scalar()
    assert version
    async with pg_db.session() as session:
        assert await session.scalar(select(counters.c.value)) == 7


async def test_commit_listener_sees_committed_sessions_only(sqlite_db: Database) -> None:
    await sqlite_db.create_all(counters.metadata)
    seen: list[bool] = []
    listener = lambda session: seen.append(session.info.get("flag", False))  # noqa: E731
    sqlite_db.add_commit_listener(listener)
    async with sqlite_db.transaction() as session:
        session.info["flag"] = True
        await session.execute(insert(counters).values(name="x", value=1))
    with pytest.raises(RuntimeError):
        async with sqlite_db.transaction() as session:
            raise RuntimeError
    sqlite_db.remove_commit_listener(listener)
    async with sqlite_db.transaction() as session:
        await session.execute(insert(counters).values(name="y", value=1))
    assert seen == [True]


async def test_nested_sqlite_write_transaction_is_refused_not_deadlocked(
    sqlite_db: Database,
) -> None:
    await sqlite_db.create_all(counters.metadata)
    async with sqlite_db.transaction() as session:
        await session.execute(insert(counters).values(name="outer", value=1))
        with pytest.raises(RuntimeError, match="nested write transaction"):
            async with sqlite_db.transaction():
                pass

    # other tasks (concurrent requests) are not "nested": they just queue
    async def write(name: str) -> None:
        async with sqlite_db.transaction() as session:
            await session.execute(insert(counters).values(name=name, value=1))

    async with sqlite_db.transaction() as session:
        task = asyncio.create_task(write("queued"))
        await asyncio.sleep(0.05)
        assert not task.done()  # waits for the writer in progress
    await task
    async with sqlite_db.session() as session:
        names = (await session.execute(select(counters.c.name))).scalars().all()
    assert sorted(names) == ["outer", "queued"]


async def test_sqlite_lock_held_by_another_process_is_awaited_not_blocking(
    sqlite_db: Database,
) -> None:
    """SQLite runs in the loop's thread: while another connection (another process)
    holds the write lock, BEGIN IMMEDIATE is retried asynchronously and the event loop
    keeps running; the write goes through once the lock is released."""
    import sqlite3

    await sqlite_db.create_all(counters.metadata)
    other = sqlite3.connect(sqlite_db.url.database, isolation_level=None)
    other.execute("BEGIN IMMEDIATE")
    ticks = 0

    async def tick() -> None:
        nonlocal ticks
        while True:
            ticks += 1
            await asyncio.sleep(0.002)

    ticker = asyncio.create_task(tick())

    async def write() -> None:
        async with sqlite_db.transaction() as session:
            await session.execute(insert(counters).values(name="late", value=1))

    writer = asyncio.create_task(write())
    await asyncio.sleep(0.3)
    assert not writer.done()  # still waiting for the lock...
    assert ticks > 20  # ...without freezing the loop (a blocking wait would give ~1)
    other.execute("ROLLBACK")
    other.close()
    await asyncio.wait_for(writer, 5)
    ticker.cancel()
    async with sqlite_db.session() as session:
        assert await session.scalar(select(counters.c.value)) == 1


async def test_sqlite_many_concurrent_readers_never_wait_for_a_connection(
    sqlite_db: Database,
) -> None:
    """More open transactions than the pool's size: a bounded pool would block the
    event loop (and deadlock) on the 9th; this one opens more connections."""
    await sqlite_db.create_all(counters.metadata)
    gate = asyncio.Event()

    async def read() -> int:
        async with sqlite_db.session() as session:
            await gate.wait()
            return len((await session.execute(select(counters.c.name))).all())

    readers = [asyncio.create_task(read()) for _ in range(30)]
    await asyncio.sleep(0.05)
    gate.set()
    assert await asyncio.wait_for(asyncio.gather(*readers), 5) == [0] * 30


async def test_sqlite_busy_timeout_gives_up_with_the_driver_error(tmp_path: Path) -> None:
    import sqlite3

    from sqlalchemy.exc import OperationalError

    db = Database(f"sqlite:///{tmp_path}/x.db", busy_timeout_ms=100)
    try:
        await db.create_all(counters.metadata)
        other = sqlite3.connect(f"{tmp_path}/x.db", isolation_level=None)
        other.execute("BEGIN IMMEDIATE")
        with pytest.raises(OperationalError, match="locked"):
            async with db.transaction():
                pass
        other.execute("ROLLBACK")
        other.close()
    finally:
        await db.close()


async def test_sqlite_transactions_reuse_their_connections(sqlite_db: Database) -> None:
    """Transactions one after another run on one connection kept between them (BEGIN
    and COMMIT go to the driver); 30 at once open more, and at most 16 stay idle."""
    from sqlalchemy import event

    await sqlite_db.create_all(counters.metadata)
    opened: list[object] = []
    event.listen(sqlite_db.sync_engine, "connect", lambda conn, _: opened.append(conn))
    for i in range(20):
        async with sqlite_db.transaction() as session:
            await session.execute(insert(counters), {"name": f"n{i}", "value": i})
        async with sqlite_db.session() as session:
            await session.execute(select(counters.c.value).where(counters.c.name == f"n{i}"))
    assert len(opened) <= 1  # the one create_all did not leave idle, at most
    gate = asyncio.Event()

    async def read() -> None:
        async with sqlite_db.session() as session:
            await gate.wait()
            await session.execute(select(counters.c.name))

    readers = [asyncio.create_task(read()) for _ in range(30)]
    await asyncio.sleep(0.05)
    gate.set()
    await asyncio.gather(*readers)
    assert len(sqlite_db._idle) == 16


async def test_sqlite_fast_and_sqlalchemy_statements_share_one_transaction(
    sqlite_db: Database,
) -> None:
    """A statement on SQLAlchemy's own path (``text()``) inside a transaction opened on
    the driver joins it: both commit together, or both roll back."""
    await sqlite_db.create_all(counters.metadata)
    add = insert(counters)
    for name in ("warm-1", "warm-2"):  # the statement object now takes the fast path
        async with sqlite_db.transaction() as session:
            await session.execute(add, {"name": name, "value": 0})
    async with sqlite_db.transaction() as session:
        await session.execute(add, {"name": "fast", "value": 1})
        await session.execute(text("INSERT INTO counters (name, value) VALUES ('slow', 2)"))
    with pytest.raises(ZeroDivisionError):
        async with sqlite_db.transaction() as session:
            await session.execute(add, {"name": "fast-x", "value": 3})
            await session.execute(text("INSERT INTO counters (name, value) VALUES ('slow-x', 4)"))
            _ = 1 / 0
    async with sqlite_db.session() as session:
        names = set((await session.execute(select(counters.c.name))).scalars().all())
    assert names == {"warm-1", "warm-2", "fast", "slow"}
    assert sqlite_db.statements is not None and sqlite_db.statements.fast >= 2


async def test_sqlite_error_at_commit_is_sqlalchemys_and_rolls_back(tmp_path: Path) -> None:
    """A deferred foreign key fails at COMMIT: the caller gets SQLAlchemy's
    IntegrityError, nothing of the transaction stays, and the connection works after."""
    from sqlalchemy import ForeignKey
    from sqlalchemy.exc import IntegrityError

    metadata = MetaData()
    parents = Table("parents", metadata, Column("id", Integer, primary_key=True))
    children = Table(
        "children",
        metadata,
        Column("id", Integer, primary_key=True),
        Column(
            "parent",
            Integer,
            ForeignKey("parents.id", deferrable=True, initially="DEFERRED"),
            nullable=False,
        ),
    )
    db = Database(f"sqlite:///{tmp_path}/fk.db")
    try:
        await db.create_all(metadata)
        with pytest.raises(IntegrityError, match="FOREIGN KEY"):
            async with db.transaction() as session:
                await session.execute(insert(children), {"id": 1, "parent": 42})
                await session.execute(insert(parents), {"id": 7})
        async with db.transaction() as session:
            await session.execute(insert(parents), {"id": 42})
            await session.execute(insert(children), {"id": 1, "parent": 42})
        async with db.session() as session:
            assert (await session.execute(select(parents.c.id))).scalars().all() == [42]
            assert (await session.execute(select(children.c.parent))).scalars().all() == [42]
    finally:
        await db.close()


async def test_sqlite_writer_cancelled_while_waiting_for_the_lock_keeps_its_connection(
    tmp_path: Path,
) -> None:
    """A write transaction cancelled while another process holds the lock gives its
    connection back (not leaked), and the next transaction runs on it."""
    import sqlite3

    db = Database(f"sqlite:///{tmp_path}/x.db", busy_timeout_ms=5_000)
    try:
        await db.create_all(counters.metadata)
        other = sqlite3.connect(f"{tmp_path}/x.db", isolation_level=None)
        other.execute("BEGIN IMMEDIATE")

        async def write() -> None:
            async with db.transaction() as session:
                await session.execute(insert(counters), {"name": "late", "value": 1})

        waiting = asyncio.create_task(write())
        await asyncio.sleep(0.1)
        assert not waiting.done()
        waiting.cancel()
        with pytest.raises(asyncio.CancelledError):
            await waiting
        assert len(db._idle) == 1
        other.execute("ROLLBACK")
        other.close()
        await write()
        assert len(db._idle) == 1
    finally:
        await db.close()
