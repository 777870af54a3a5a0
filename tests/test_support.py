"""The test kit's own promise: a killed run's PostgreSQL databases do not pile up."""

from __future__ import annotations

import time
import uuid

import asyncpg

from tests.support import PG_URL, STALE_AFTER, asyncpg_dsn, fresh_database, pg_admin


async def _exists(name: str) -> bool:
    conn = await asyncpg.connect(asyncpg_dsn(PG_URL))
    try:
        return bool(await conn.fetchval("SELECT 1 FROM pg_database WHERE datname = $1", name))
    finally:
        await conn.close()


async def test_fresh_database_sweeps_what_killed_runs_left_and_nothing_newer() -> None:
    prefix = f"aiagg_kit_{uuid.uuid4().hex[:6]}_"
    now = int(time.time())
    left = f"{prefix}{now - STALE_AFTER - 60}_{uuid.uuid4().hex[:12]}"  # a killed run's
    running = f"{prefix}{now - 60}_{uuid.uuid4().hex[:12]}"  # a run going on right now
    for name in (left, running):
        await pg_admin(f'CREATE DATABASE "{name}"')
    try:
        async with fresh_database(prefix) as url:
            mine = url.rsplit("/", 1)[1]
            assert mine.startswith(prefix) and await _exists(mine)
            assert not await _exists(left)
            assert await _exists(running)
        assert not await _exists(mine)  # dropped on the way out
    finally:
        for name in (left, running):
            await pg_admin(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
