"""services.common.walcheckpoint: SQLite's WAL checkpoints run in a thread, not in the
event loop's COMMITs (real SQLite files)."""

from __future__ import annotations

import logging
import threading
from pathlib import Path

import pytest
from sqlalchemy import Column, Integer, MetaData, String, Table, insert, text

from services.common.db import Database
from services.common.walcheckpoint import SAFETY_NET_PAGES, WalCheckpointer

from .conftest import eventually

blobs = Table(
    "blobs",
    MetaData(),
    Column("id", Integer, primary_key=True),
    Column("body", String, nullable=False),
)

#: about one 4 KiB page per row
ROW = "x" * 3000


async def _write_pages(db: Database, pages: int, first: int = 0) -> None:
    for start in range(first, first + pages, 50):  # many small commits, as a service makes
        async with db.transaction() as session:
            await session.execute(
                insert(blobs), [{"id": i, "body": ROW} for i in range(start, start + 50)]
            )


async def test_commits_in_the_loop_leave_checkpoints_to_the_thread(tmp_path: Path) -> None:
    """Past SQLite's 1,000-page default the loop's COMMITs do not checkpoint: the log
    grows until the thread's turn. Closing does not wait for that turn: the thread
    copies the log back at once and ends."""
    path = tmp_path / "x.db"
    db = Database(f"sqlite:///{path}")
    assert db.checkpointer is not None
    db.checkpointer.interval = 3600.0  # one checkpoint at the first commit, then a long wait
    try:
        await db.create_all(blobs.metadata)
        async with db.session() as session:
            auto = (await session.execute(text("PRAGMA wal_autocheckpoint"))).scalar()
            assert auto == SAFETY_NET_PAGES
        await _write_pages(db, 1)
        await eventually(lambda: db.checkpointer.checkpoints == 1)
        await _write_pages(db, 2500, first=1000)
        # SQLite's own checkpoint at 1,000 pages would have restarted the log by now
        assert (path.parent / "x.db-wal").stat().st_size > 2000 * 4096
        assert db.checkpointer.checkpoints == 1
    finally:
        await db.close()  # does not wait out the hour
    assert db.checkpointer.checkpoints == 2
    assert db.checkpointer.pages_copied >= 2000
    assert not any(t.name == "wal-checkpoint x.db" for t in threading.enumerate())


async def test_without_the_thread_sqlite_checkpoints_in_the_commit(tmp_path: Path) -> None:
    """The control: the same writes with ``checkpoint_thread=False`` keep the log short."""
    path = tmp_path / "y.db"
    db = Database(f"sqlite:///{path}", checkpoint_thread=False)
    assert db.checkpointer is None
    try:
        await db.create_all(blobs.metadata)
        async with db.session() as session:
            assert (await session.execute(text("PRAGMA wal_autocheckpoint"))).scalar() == 1000
        await _write_pages(db, 2500)
        assert (path.parent / "y.db-wal").stat().st_size < 1300 * 4096
    finally:
        await db.close()


async def test_a_failing_thread_says_so_and_the_loop_keeps_its_safety_net(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    checkpointer = WalCheckpointer(tmp_path / "missing" / "dir" / "x.db")
    with caplog.at_level(logging.ERROR, logger="aiagg.db"):
        checkpointer.committed()
        await eventually(lambda: "WAL checkpoint thread" in caplog.text)
    checkpointer.close()
    assert checkpointer.checkpoints == 0
    checkpointer.committed()  # after close: nothing starts again
    assert not any(t.name == "wal-checkpoint x.db" for t in threading.enumerate())
