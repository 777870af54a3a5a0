"""One small database layer for every service: SQLite files and PostgreSQL, one API.

Every service owns its database. ``Database(url)`` accepts the URLs people write
(``sqlite:///var/billing.db``, ``postgresql://user@host/db``, ``postgres://...``).
Stores see only :class:`DbSession`: ``await session.execute(statement, params)``,
``await session.scalar(...)``, ``session.info`` and ``session.dialect``, the same on
both databases, with SQLAlchemy Core statements.

* **PostgreSQL** runs on SQLAlchemy's asyncio engine over asyncpg: the network round
  trip is awaited, so the event loop serves other requests meanwhile. BEGIN is sent as
  the transaction starts, so a pooled connection that died while idle is found there,
  before anything was sent, and replaced (instead of a ping at every checkout), and
  repeated statements skip SQLAlchemy's per-execution work as on SQLite (``fastsql``).
* **SQLite** statements run *in the event loop's thread* on the standard ``sqlite3``
  driver. A statement on a local WAL file takes microseconds; handing it to a worker
  thread (what aiosqlite does) cost ten times more CPU than the statement itself
  (measured: 210 µs of CPU per statement and 550 µs per transaction through
  aiosqlite, 16 µs and 55 µs in the loop; see the README's benchmarks). Nothing here
  may block for long: the pool never waits (it opens another connection), readers
  never wait in WAL mode, and the only lock, the write lock, is taken with
  ``BEGIN IMMEDIATE`` under a very short busy timeout and *retried asynchronously*,
  so a writer of another process never freezes this one's event loop. The slow part
  of WAL mode, a checkpoint's disk syncs, runs in a thread (:mod:`.walcheckpoint`).

Write transactions go through :meth:`Database.transaction`: on SQLite they start with
``BEGIN IMMEDIATE`` (the write lock is taken up front, so two concurrent
read-then-write transactions cannot deadlock on lock upgrade) and writers of one
process queue on an asyncio lock instead of retrying against each other.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import sqlite3
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

from sqlalchemy import Engine, MetaData, Table, create_engine, event, text
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import URL, Connection, Dialect, Result, make_url
from sqlalchemy.exc import DBAPIError, OperationalError
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, create_async_engine

from .fastsql import (
    StatementCache,
    asyncpg_adapter,
    asyncpg_error,
    asyncpg_idle,
    begin_asyncpg,
    end_asyncpg,
)
from .groupcommit import GroupCommit
from .walcheckpoint import SAFETY_NET_PAGES, WalCheckpointer

log = logging.getLogger("aiagg.db")

#: how long one SQLite statement may block the event loop waiting for another
#: process's lock before it fails with "database is locked" (BEGIN IMMEDIATE then
#: retries asynchronously, up to ``busy_timeout_ms``)
SQLITE_LOOP_BUSY_MS = 5

Params = Mapping[str, Any] | Sequence[Mapping[str, Any]] | None


class DbSession:
    """One open transaction on one connection: what the stores use.

    ``info`` is a per-transaction dict (the outbox marks "events recorded" in it);
    ``dialect`` / ``bind.dialect`` say which database it is.
    """

    __slots__ = ("_adapted", "_blocking", "_conn", "_fast", "dialect", "info")

    def __init__(
        self,
        conn: Connection | AsyncConnection,
        dialect: Dialect,
        fast: StatementCache | None = None,
        *,
        adapted: Any = None,
    ) -> None:
        self._conn = conn
        self._blocking = isinstance(conn, Connection)
        self._fast = fast
        #: PostgreSQL: SQLAlchemy's asyncpg adapter of ``conn``, for the fast path
        self._adapted = adapted
        self.info: dict[str, Any] = {}
        self.dialect = dialect

    async def execute(self, statement: Any, params: Params = None) -> Result[Any]:
        if self._blocking:
            if self._fast is not None:  # SQLite: repeated statements skip SQLAlchemy's work
                result = self._fast.execute(self._conn, statement, params)  # type: ignore[arg-type]
                if result is not None:
                    return result  # type: ignore[return-value]
            return self._conn.execute(statement, params)  # type: ignore[return-value]
        if self._fast is not None and self._adapted is not None:  # PostgreSQL: the same
            result = await self._fast.execute_asyncpg(
                self._conn,  # type: ignore[arg-type]
                self._adapted,
                statement,
                params,
            )
            if result is not None:
                return result  # type: ignore[return-value]
        return await self._conn.execute(statement, params)  # type: ignore[misc]

    async def scalar(self, statement: Any, params: Params = None) -> Any:
        return (await self.execute(statement, params)).scalar()

    @property
    def bind(self) -> DbSession:
        """``session.bind.dialect.name`` keeps working (what SQLAlchemy sessions offer)."""
        return self

    def get_bind(self) -> DbSession:
        return self


CommitListener = Callable[[DbSession], None]


class InsertIgnore:
    """``INSERT ... ON CONFLICT DO NOTHING`` on ``table``, built once per dialect.

    Hot paths pass their values as parameters to statements built at import time:
    building a statement per call (``table.insert().values(...)``) and computing its
    cache key cost more CPU than running it on SQLite.
    """

    def __init__(self, table: Table, *conflict_columns: str) -> None:
        elements = list(conflict_columns) or None
        self._statements = {
            "postgresql": postgresql.insert(table).on_conflict_do_nothing(
                index_elements=elements
            ),
            "sqlite": sqlite.insert(table).on_conflict_do_nothing(index_elements=elements),
        }
        self._returning: dict[tuple[str, str], Any] = {}

    async def run(self, session: DbSession, values: Mapping[str, Any]) -> bool:
        """Insert ``values``; False (nothing written) when the row already exists."""
        result = await session.execute(self._statements[session.dialect.name], values)
        return bool(result.rowcount)  # type: ignore[attr-defined]

    async def run_many(self, session: DbSession, rows: Sequence[Mapping[str, Any]]) -> None:
        """Insert every row that does not exist yet, in one multi-row statement."""
        if rows:
            await session.execute(self._statements[session.dialect.name], list(rows))

    async def run_returning(
        self, session: DbSession, column: str, rows: Sequence[Mapping[str, Any]]
    ) -> set[Any]:
        """Like :meth:`run_many`; returns ``column`` of the rows actually inserted."""
        if not rows:
            return set()
        key = (session.dialect.name, column)
        statement = self._returning.get(key)
        if statement is None:
            base = self._statements[session.dialect.name]
            statement = self._returning[key] = base.returning(base.table.c[column])
        result = await session.execute(statement, list(rows))
        return set(result.scalars().all())


def default_sqlite_url(service_name: str, data_dir: str | Path = "var") -> str:
    """The embedded default: ``sqlite:///<data_dir>/<service_name>.db``."""
    path = Path(data_dir).expanduser().resolve() / f"{service_name}.db"
    return f"sqlite:///{path}"


def normalize_url(url: str | URL) -> URL:
    """Map the URLs people write onto the drivers used here.

    ``sqlite://`` and ``sqlite+aiosqlite://`` → ``sqlite://`` (the standard driver, run
    in the loop); ``postgres://``, ``postgresql://`` and ``postgresql+psycopg2://`` →
    ``postgresql+asyncpg://``. Other databases are refused.
    """
    if isinstance(url, str) and url.startswith("postgres://"):
        url = "postgresql://" + url[len("postgres://") :]
    u = make_url(url)
    backend = u.get_backend_name()
    if backend == "sqlite":
        if u.get_driver_name() not in ("pysqlite", "aiosqlite"):
            raise ValueError(f"unsupported SQLite driver in {u.render_as_string()!r}")
        return u.set(drivername="sqlite")
    if backend == "postgresql":
        u = u.set(drivername="postgresql+asyncpg")
        # libpq's sslmode is spelled ssl for asyncpg
        if "sslmode" in u.query and "ssl" not in u.query:
            u = u.update_query_dict({"ssl": u.query["sslmode"]}).difference_update_query(
                ["sslmode"]
            )
        return u
    raise ValueError(
        f"unsupported database URL {u.render_as_string()!r}: use sqlite:///path or postgresql://"
    )


#: most SQLite connections kept open between transactions (more are closed after use)
_MAX_IDLE_SQLITE = 16
#: most PostgreSQL connections kept between transactions; the pool's default size (5)
#: plus headroom, well inside its overflow (10)
_MAX_IDLE_PG = 8


async def _pg_discard(conn: AsyncConnection) -> None:
    """Close a PostgreSQL connection for good. Not returned to the pool: its reset rolls
    back only a transaction the adapter knows of, and this one may be in another, or
    half-way through a BEGIN or a COMMIT."""
    with contextlib.suppress(Exception):
        await conn.invalidate()
    with contextlib.suppress(Exception):
        await conn.close()


def _wrapped(statement: str, exc: sqlite3.Error, dialect: Dialect) -> DBAPIError:
    """The driver's error as SQLAlchemy's exception class (what its own path raises)."""
    return DBAPIError.instance(statement, None, exc, sqlite3.Error, dialect=dialect)


def _is_locked(exc: OperationalError) -> bool:
    return "locked" in str(exc.orig).lower() or "busy" in str(exc.orig).lower()


class Database:
    """An engine plus transactions, with SQLite made safe for concurrent writers.

    ``busy_timeout_ms`` is how long a SQLite writer waits for another process's lock.
    """

    def __init__(
        self,
        url: str | URL,
        *,
        echo: bool = False,
        busy_timeout_ms: int = 10_000,
        engine_kwargs: dict[str, Any] | None = None,
        fast_statements: bool = True,
        checkpoint_thread: bool = True,
    ) -> None:
        self.url = normalize_url(url)
        self.busy_timeout_ms = busy_timeout_ms
        self._commit_listeners: list[CommitListener] = []
        self._write_lock: asyncio.Lock | None = None
        self._write_owner: asyncio.Task[object] | None = None
        #: SQLite connections between transactions, kept checked out of the pool
        self._idle: list[Connection] = []
        #: PostgreSQL connections between transactions, with their asyncpg adapters
        self._pg_idle: list[tuple[AsyncConnection, Any]] = []
        kwargs: dict[str, Any] = {"echo": echo}
        self.sync_engine: Engine | None = None
        self.async_engine: AsyncEngine | None = None
        self._asyncpg = False
        #: SQLite files: WAL checkpoints (and their disk syncs) off the event loop
        self.checkpointer: WalCheckpointer | None = None
        if self.is_sqlite:
            database = self.url.database or ""
            if database and database != ":memory:" and not database.startswith("file:"):
                path = Path(database).expanduser()
                path.parent.mkdir(parents=True, exist_ok=True)
                if checkpoint_thread:
                    self.checkpointer = WalCheckpointer(path.resolve())
            # never wait for a free connection: waiting would block the event loop
            kwargs.update(pool_size=8, max_overflow=-1)
            kwargs.update(engine_kwargs or {})
            self.sync_engine = create_engine(self.url, **kwargs)
            self.dialect: Dialect = self.sync_engine.dialect
            self._install_sqlite_hooks()
            #: plans of the statements this database runs again and again (fastsql.py);
            #: off with ``echo``, whose statement log only SQLAlchemy's path writes
            self.statements: StatementCache | None = (
                StatementCache(self.dialect) if fast_statements and not echo else None
            )
        else:
            from sqlalchemy.dialects.postgresql.asyncpg import AsyncAdapt_asyncpg_connection

            #: SQLAlchemy's asyncpg adapter can be driven directly (see fastsql.py): BEGIN
            #: is sent as a transaction starts, which finds a dead pooled connection before
            #: anything was sent (see _pg_begin), so no ping at every checkout
            self._asyncpg = asyncpg_adapter(AsyncAdapt_asyncpg_connection) is not None
            kwargs["pool_pre_ping"] = not self._asyncpg
            kwargs.update(engine_kwargs or {})
            self.async_engine = create_async_engine(self.url, **kwargs)
            self.dialect = self.async_engine.dialect
            self.statements = (
                StatementCache(self.dialect)
                if fast_statements and not echo and self._asyncpg
                else None
            )
        #: the group-commit writer: ``await db.writes.run(unit)`` (see :mod:`.groupcommit`)
        self.writes = GroupCommit(self.transaction, name=f"group commit of {self!r}")

    @property
    def is_sqlite(self) -> bool:
        return self.url.get_backend_name() == "sqlite"

    @property
    def is_postgres(self) -> bool:
        return self.url.get_backend_name() == "postgresql"

    def __repr__(self) -> str:
        return f"Database({self.url.render_as_string(hide_password=True)!r})"

    def _install_sqlite_hooks(self) -> None:
        assert self.sync_engine is not None

        @event.listens_for(self.sync_engine, "connect")
        def _on_connect(dbapi_connection: Any, _record: Any) -> None:
            # SQLAlchemy, not the driver, emits BEGIN (see the begin hook below)
            dbapi_connection.isolation_level = None
            cursor = dbapi_connection.cursor()
            try:
                cursor.execute(f"PRAGMA busy_timeout = {SQLITE_LOOP_BUSY_MS}")
                cursor.execute("PRAGMA journal_mode = WAL")
                cursor.execute("PRAGMA synchronous = NORMAL")
                cursor.execute("PRAGMA foreign_keys = ON")
                if self.checkpointer is not None:  # the thread checkpoints; this is a net
                    cursor.execute(f"PRAGMA wal_autocheckpoint = {SAFETY_NET_PAGES}")
            finally:
                cursor.close()

        @event.listens_for(self.sync_engine, "begin")
        def _on_begin(conn: Any) -> None:
            # inside a transaction of ours (see _sqlite_transaction) SQLAlchemy only
            # adopts it; its own transactions (create_all, engine.begin()) get BEGIN
            if not conn.connection.dbapi_connection.in_transaction:
                conn.exec_driver_sql("BEGIN")

    def add_commit_listener(self, listener: CommitListener) -> None:
        """Call ``listener(session)`` after each commit of a transaction of this database.

        The outbox relay uses it to wake up as soon as a transaction that recorded
        events has committed. Listeners run in the event loop's thread and must be quick.
        """
        self._commit_listeners.append(listener)

    def remove_commit_listener(self, listener: CommitListener) -> None:
        if listener in self._commit_listeners:
            self._commit_listeners.remove(listener)

    def _committed(self, session: DbSession) -> None:
        for listener in list(self._commit_listeners):
            try:
                listener(session)
            except Exception:  # a listener must never break a committed transaction
                log.exception("commit listener %r failed", listener)

    def session(self) -> Any:
        """A read transaction (deferred on SQLite): ``async with db.session() as s:``."""
        return self.transaction(write=False)

    @asynccontextmanager
    async def transaction(self, *, write: bool = True) -> AsyncIterator[DbSession]:
        """One transaction: commits on normal exit, rolls back on error.

        On SQLite a write transaction starts with ``BEGIN IMMEDIATE`` and writers of this
        process run one at a time; ``write=False`` gives a deferred (read) transaction.
        """
        if self.is_sqlite and write:
            if self._write_lock is None:
                self._write_lock = asyncio.Lock()
            me = asyncio.current_task()
            if me is not None and self._write_owner is me:
                raise RuntimeError(
                    "nested write transaction on the same SQLite database would deadlock: "
                    "pass the open session down instead"
                )
            async with self._write_lock:
                self._write_owner = me
                try:
                    async with self._sqlite_transaction(immediate=True) as session:
                        yield session
                finally:
                    self._write_owner = None
        elif self.is_sqlite:
            async with self._sqlite_transaction(immediate=False) as session:
                yield session
        else:
            async with self._async_transaction() as session:
                yield session

    async def _sqlite_begin(self, immediate: bool) -> Connection:
        """A connection inside BEGIN; the write lock is awaited, never slept on.

        The connections are SQLAlchemy's, kept checked out between transactions
        (``self._idle``), and BEGIN/COMMIT/ROLLBACK go to the driver directly: through
        SQLAlchemy's pool, connection, transaction and event machinery a transaction
        cost ~150 µs of CPU around a ~20 µs statement (measured in the latest session).
        A statement that takes SQLAlchemy's own path inside makes SQLAlchemy adopt the
        transaction (its ``begin`` hook then emits nothing), and it is ended through
        SQLAlchemy.
        """
        assert self.sync_engine is not None
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.busy_timeout_ms / 1000
        pause = 0.001
        conn = self._idle.pop() if self._idle else self.sync_engine.connect()
        raw = conn.connection.dbapi_connection
        statement = "BEGIN IMMEDIATE" if immediate else "BEGIN"
        try:
            while True:
                try:
                    raw.execute(statement)
                    return conn
                except sqlite3.Error as exc:
                    error = _wrapped(statement, exc, self.dialect)
                    if not (isinstance(error, OperationalError) and _is_locked(error)) or (
                        loop.time() >= deadline
                    ):
                        raise error from exc
                await asyncio.sleep(pause * random.uniform(0.5, 1.0))
                pause = min(pause * 2, 0.05)
        except BaseException:  # refused, timed out or cancelled while waiting for the lock
            self._release(conn)
            raise

    def _end(self, conn: Connection, *, commit: bool) -> None:
        """COMMIT or ROLLBACK, through SQLAlchemy when it adopted the transaction (its
        transaction object stays, inactive, after a failed statement or COMMIT: its
        rollback clears it)."""
        if conn.get_transaction() is not None:
            if commit:
                conn.commit()
                return
            conn.rollback()  # after a failed COMMIT SQLite may still be in the transaction
        raw = conn.connection.dbapi_connection
        if not raw.in_transaction:
            return
        statement = "COMMIT" if commit else "ROLLBACK"
        try:
            raw.commit() if commit else raw.rollback()
        except sqlite3.Error as exc:
            raise _wrapped(statement, exc, self.dialect) from exc

    def _release(self, conn: Connection) -> None:
        """Back to the idle connections, or closed when it is broken or left in a
        transaction (a failed ROLLBACK)."""
        try:
            healthy = (
                not conn.closed
                and not conn.invalidated
                and conn.get_transaction() is None
                and not conn.connection.dbapi_connection.in_transaction
            )
        except Exception:
            healthy = False
        if healthy and len(self._idle) < _MAX_IDLE_SQLITE:
            self._idle.append(conn)
            return
        with contextlib.suppress(Exception):
            conn.close()

    @asynccontextmanager
    async def _sqlite_transaction(self, *, immediate: bool) -> AsyncIterator[DbSession]:
        conn = await self._sqlite_begin(immediate)
        session = DbSession(conn, self.dialect, self.statements)
        try:
            try:
                yield session
            except BaseException:
                with contextlib.suppress(Exception):  # the error that got us here wins
                    self._end(conn, commit=False)
                raise
            try:
                self._end(conn, commit=True)
            except BaseException:
                with contextlib.suppress(Exception):
                    self._end(conn, commit=False)
                raise
        finally:
            self._release(conn)
        if immediate and self.checkpointer is not None:
            self.checkpointer.committed()
        self._committed(session)

    @asynccontextmanager
    async def _async_transaction(self) -> AsyncIterator[DbSession]:
        if not self._asyncpg:  # SQLAlchemy's own transactions, pinged at checkout
            assert self.async_engine is not None
            async with self.async_engine.connect() as conn:
                session = DbSession(conn, self.dialect)
                async with conn.begin():
                    yield session
            self._committed(session)
            return
        conn, adapted = await self._pg_begin()
        session = DbSession(conn, self.dialect, self.statements, adapted=adapted)
        try:
            try:
                yield session
            except BaseException:
                with contextlib.suppress(Exception):  # the error that got us here wins
                    await self._pg_end(conn, adapted, commit=False)
                raise
            try:
                await self._pg_end(conn, adapted, commit=True)
            except BaseException:
                with contextlib.suppress(Exception):
                    await self._pg_end(conn, adapted, commit=False)
                raise
        finally:
            await self._pg_release(conn, adapted)
        self._committed(session)

    async def _pg_begin(self) -> tuple[AsyncConnection, Any]:
        """A connection inside BEGIN, with its asyncpg adapter.

        The connections are SQLAlchemy's, kept checked out between transactions
        (``self._pg_idle``), and BEGIN/COMMIT/ROLLBACK go to the adapter directly:
        through SQLAlchemy's pool and transaction machinery (greenlet hops included) a
        transaction cost ~120 µs of CPU more. A statement that takes SQLAlchemy's own
        path makes SQLAlchemy adopt the transaction, and it is ended through SQLAlchemy.

        BEGIN goes out at once instead of with the first statement. A connection that
        died while idle (PostgreSQL restarted, a proxy's idle timeout) fails right there,
        before anything of the transaction was sent, so the idle connections are dropped
        and the transaction starts again on a new one. ``pool_pre_ping`` did that with a
        ping at every checkout: three round trips on asyncpg (BEGIN, ``;``, ROLLBACK).
        """
        assert self.async_engine is not None
        for attempt in (1, 2):
            if self._pg_idle:
                conn, adapted = self._pg_idle.pop()
            else:
                conn = await self.async_engine.connect()
                try:
                    adapted = (await conn.get_raw_connection()).dbapi_connection
                except BaseException:
                    with contextlib.suppress(Exception):
                        await conn.close()
                    raise
            try:
                await begin_asyncpg(adapted)
                return conn, adapted
            except Exception as error:
                wrapped = await asyncpg_error(conn, adapted, self.dialect, "BEGIN", (), error)
                await _pg_discard(conn)
                if wrapped is None:
                    raise
                if attempt == 1 and wrapped.connection_invalidated:  # type: ignore[attr-defined]
                    log.warning(
                        "a pooled PostgreSQL connection was lost (%s); reconnecting",
                        wrapped.orig,  # type: ignore[attr-defined]
                    )
                    await self._pg_drop_idle()  # the others are likely dead too
                    continue
                raise wrapped from error
            except BaseException:  # cancelled while BEGIN was under way: state unknown
                await _pg_discard(conn)
                raise
        raise AssertionError("unreachable")

    async def _pg_end(self, conn: AsyncConnection, adapted: Any, *, commit: bool) -> None:
        if conn.in_transaction():  # SQLAlchemy adopted it (a statement took its path)
            await (conn.commit() if commit else conn.rollback())
            return
        try:
            await end_asyncpg(adapted, commit=commit)
        except Exception as error:
            statement = "COMMIT" if commit else "ROLLBACK"
            wrapped = await asyncpg_error(conn, adapted, self.dialect, statement, (), error)
            if wrapped is None:
                raise
            raise wrapped from error

    async def _pg_release(self, conn: AsyncConnection, adapted: Any) -> None:
        """Back to the idle connections, or closed when broken or not cleanly ended."""
        try:
            healthy = (
                not conn.closed
                and not conn.invalidated
                and not conn.in_transaction()
                and asyncpg_idle(adapted)
            )
        except Exception:
            healthy = False
        if healthy and len(self._pg_idle) < _MAX_IDLE_PG:
            self._pg_idle.append((conn, adapted))
        elif healthy:
            with contextlib.suppress(Exception):
                await conn.close()  # back to the pool
        else:
            await _pg_discard(conn)

    async def _pg_drop_idle(self) -> None:
        idle, self._pg_idle = self._pg_idle, []
        for conn, _adapted in idle:
            await _pg_discard(conn)
        if self.async_engine is not None:
            await self.async_engine.dispose()  # and those checked in to the pool

    async def create_all(self, *metadatas: MetaData) -> None:
        """Create the tables of every given MetaData that do not exist yet."""
        if self.sync_engine is not None:
            with self.sync_engine.begin() as conn:
                for metadata in metadatas:
                    metadata.create_all(conn)
            return
        assert self.async_engine is not None
        async with self.async_engine.begin() as conn:
            for metadata in metadatas:
                await conn.run_sync(metadata.create_all)

    async def ping(self) -> bool:
        """True when the database answers ``SELECT 1``; raises what the driver raises."""
        async with self.transaction(write=False) as session:
            return (await session.execute(text("SELECT 1"))).scalar_one() == 1

    async def close(self) -> None:
        await self.writes.close()
        idle, self._idle = self._idle, []
        for conn in idle:
            with contextlib.suppress(Exception):
                conn.close()
        pg_idle, self._pg_idle = self._pg_idle, []
        for pg_conn, _adapted in pg_idle:
            with contextlib.suppress(Exception):
                await pg_conn.close()
        if self.sync_engine is not None:
            self.sync_engine.dispose()
        if self.checkpointer is not None:
            await asyncio.to_thread(self.checkpointer.close)
        if self.async_engine is not None:
            await self.async_engine.dispose()


__all__ = ["Database", "DbSession", "InsertIgnore", "default_sqlite_url", "normalize_url"]
