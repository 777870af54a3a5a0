"""services.common.db: URLs, SQLite set-up and write serialisation, PostgreSQL."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
from sqlalchemy import Column, Integer, MetaData, String, Table, insert, select, text, update

from services.common.db import Database, default_sqlite_url, normalize_url


@pytest.mark.parametrize(
    ("given", "expected"),
    [
        ("sqlite:///var/billing.db", "sqlite+aiosqlite:///var/billing.db"),
        ("sqlite+aiosqlite:////abs/a.db", "sqlite+aiosqlite:////abs/a.db"),
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
    assert url == f"sqlite+aiosqlite:///{tmp_path}/data/billing.db"


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
            assert (await session.execute(text("PRAGMA busy_timeout"))).scalar() == 10000
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
