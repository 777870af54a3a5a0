"""services.common.fastsql: repeated SQLite statements give what SQLAlchemy gives, faster."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path
from typing import Any

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
from sqlalchemy.exc import IntegrityError, NoResultFound

from services.common.db import Database, InsertIgnore

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


async def _db(tmp_path: Path, name: str, fast: bool) -> Database:
    db = Database(f"sqlite:///{tmp_path}/{name}.db", fast_statements=fast)
    await db.create_all(metadata)
    return db


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


async def test_the_fast_path_gives_what_sqlalchemy_gives(tmp_path: Path) -> None:
    plain = await _db(tmp_path, "plain", fast=False)
    fast = await _db(tmp_path, "fast", fast=True)
    try:
        expected = await _script(plain)
        got = await _script(fast)
        assert got == expected
        assert fast.statements is not None and fast.statements.fast >= 8  # it was taken
        async with plain.session() as a, fast.session() as b:
            dump = select(things).order_by(things.c.id)
            assert (await b.execute(dump)).all() == (await a.execute(dump)).all()
            made = select(stamped.c.made)
            assert len((await b.execute(made)).all()) == 2  # the callable default ran
    finally:
        await plain.close()
        await fast.close()


async def test_errors_are_sqlalchemys_and_roll_back(tmp_path: Path) -> None:
    db = await _db(tmp_path, "errors", fast=True)
    try:
        for attempt in range(3):  # the first runs through SQLAlchemy, the rest fast
            with pytest.raises(IntegrityError):
                async with db.transaction() as s:
                    await s.execute(INSERT, {"id": f"x{attempt}", "amount": 1})
                    await s.execute(INSERT, {"id": f"x{attempt}", "amount": 2})
        assert db.statements is not None and db.statements.fast >= 2
        async with db.session() as s:
            assert (await s.execute(COUNT)).scalar() == 0  # every transaction rolled back
    finally:
        await db.close()


async def test_statements_built_per_call_are_never_planned(tmp_path: Path) -> None:
    db = await _db(tmp_path, "dynamic", fast=True)
    try:
        for i in range(5):
            async with db.transaction() as s:
                await s.execute(insert(things).values(id=f"d{i}", amount=i))
        assert db.statements is not None and db.statements.fast == 0
        assert len(db.statements._plans) <= 1  # weak keys: the dead statements are gone
    finally:
        await db.close()
