"""One small wrapper over SQLAlchemy 2 async engines, for SQLite files and PostgreSQL.

Every service owns its database. ``Database(url)`` accepts the URLs people write
(``sqlite:///var/billing.db``, ``postgresql://user@host/db``, ``postgres://...``)
and turns them into the async drivers' (``sqlite+aiosqlite``, ``postgresql+asyncpg``).

Write transactions go through :meth:`Database.transaction`: on SQLite they start with
``BEGIN IMMEDIATE`` (the write lock is taken up front, so two concurrent
read-then-write transactions cannot deadlock on lock upgrade) and writers of one
process queue on an asyncio lock instead of spinning in SQLite's busy handler.
The file runs in WAL mode, so readers never wait for the writer.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

from sqlalchemy import MetaData, event, text
from sqlalchemy.engine import URL, make_url
from sqlalchemy.ext.asyncio import (
    AsyncEngine,
    AsyncSession,
    async_sessionmaker,
    create_async_engine,
)
from sqlalchemy.orm import Session

log = logging.getLogger("aiagg.db")

#: execution option read by the SQLite ``begin`` hook: "DEFERRED" or "IMMEDIATE"
_SQLITE_BEGIN = "aiagg_sqlite_begin"

CommitListener = Callable[[Session], None]


def default_sqlite_url(service_name: str, data_dir: str | Path = "var") -> str:
    """The embedded default: ``sqlite+aiosqlite:///<data_dir>/<service_name>.db``."""
    path = Path(data_dir).expanduser().resolve() / f"{service_name}.db"
    return f"sqlite+aiosqlite:///{path}"


def normalize_url(url: str | URL) -> URL:
    """Map the URLs people write onto the async drivers.

    ``sqlite://`` → ``sqlite+aiosqlite://``; ``postgres://``, ``postgresql://`` and
    ``postgresql+psycopg2://`` → ``postgresql+asyncpg://``. Other drivers are refused:
    the services only support these two databases.
    """
    if isinstance(url, str) and url.startswith("postgres://"):
        url = "postgresql://" + url[len("postgres://") :]
    u = make_url(url)
    backend = u.get_backend_name()
    if backend == "sqlite":
        if u.get_driver_name() not in ("pysqlite", "aiosqlite"):
            raise ValueError(f"unsupported SQLite driver in {u.render_as_string()!r}")
        return u.set(drivername="sqlite+aiosqlite")
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


class Database:
    """An async engine plus a session factory, with SQLite made safe for concurrent writers.

    ``busy_timeout_ms`` is how long a SQLite writer of *another* process waits for the lock.
    """

    def __init__(
        self,
        url: str | URL,
        *,
        echo: bool = False,
        busy_timeout_ms: int = 10_000,
        engine_kwargs: dict[str, Any] | None = None,
    ) -> None:
        self.url = normalize_url(url)
        self._commit_listeners: list[CommitListener] = []
        self._write_lock: asyncio.Lock | None = None
        self._write_owner: asyncio.Task[object] | None = None
        kwargs: dict[str, Any] = {"echo": echo, "pool_pre_ping": not self.is_sqlite}
        if self.is_sqlite:
            database = self.url.database or ""
            if database and database != ":memory:" and not database.startswith("file:"):
                Path(database).expanduser().parent.mkdir(parents=True, exist_ok=True)
        kwargs.update(engine_kwargs or {})
        self.engine: AsyncEngine = create_async_engine(self.url, **kwargs)
        if self.is_sqlite:
            self._install_sqlite_hooks(busy_timeout_ms)

        db = self

        class _Session(Session):
            """Per-database session class, so commit listeners stay per database."""

        @event.listens_for(_Session, "after_commit")
        def _after_commit(session: Session) -> None:
            for listener in list(db._commit_listeners):
                try:
                    listener(session)
                except Exception:  # a listener must never break a committed transaction
                    log.exception("commit listener %r failed", listener)

        self.sessionmaker: async_sessionmaker[AsyncSession] = async_sessionmaker(
            self.engine, expire_on_commit=False, sync_session_class=_Session
        )

    @property
    def is_sqlite(self) -> bool:
        return self.url.get_backend_name() == "sqlite"

    @property
    def is_postgres(self) -> bool:
        return self.url.get_backend_name() == "postgresql"

    def __repr__(self) -> str:
        return f"Database({self.url.render_as_string(hide_password=True)!r})"

    def _install_sqlite_hooks(self, busy_timeout_ms: int) -> None:
        sync_engine = self.engine.sync_engine

        @event.listens_for(sync_engine, "connect")
        def _on_connect(dbapi_connection: Any, _record: Any) -> None:
            # SQLAlchemy, not the driver, emits BEGIN (see the begin hook below)
            dbapi_connection.isolation_level = None
            cursor = dbapi_connection.cursor()
            try:
                cursor.execute(f"PRAGMA busy_timeout = {int(busy_timeout_ms)}")
                cursor.execute("PRAGMA journal_mode = WAL")
                cursor.execute("PRAGMA synchronous = NORMAL")
                cursor.execute("PRAGMA foreign_keys = ON")
            finally:
                cursor.close()

        @event.listens_for(sync_engine, "begin")
        def _on_begin(conn: Any) -> None:
            mode = conn.get_execution_options().get(_SQLITE_BEGIN, "DEFERRED")
            conn.exec_driver_sql(f"BEGIN {mode}")

    def add_commit_listener(self, listener: CommitListener) -> None:
        """Call ``listener(sync_session)`` after each commit of a session of this database.

        The outbox relay uses it to wake up as soon as a transaction that recorded
        events has committed. Listeners run in the event loop's thread and must be quick.
        """
        self._commit_listeners.append(listener)

    def remove_commit_listener(self, listener: CommitListener) -> None:
        if listener in self._commit_listeners:
            self._commit_listeners.remove(listener)

    def session(self) -> AsyncSession:
        """A plain session (autobegin, deferred on SQLite): for reads, or to manage yourself."""
        return self.sessionmaker()

    @asynccontextmanager
    async def transaction(self, *, write: bool = True) -> AsyncIterator[AsyncSession]:
        """A session inside one transaction: commits on normal exit, rolls back on error.

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
                    async with self._transaction(immediate=True) as session:
                        yield session
                finally:
                    self._write_owner = None
        else:
            async with self._transaction(immediate=False) as session:
                yield session

    @asynccontextmanager
    async def _transaction(self, *, immediate: bool) -> AsyncIterator[AsyncSession]:
        async with self.sessionmaker() as session, session.begin():
            if immediate:
                await session.connection(execution_options={_SQLITE_BEGIN: "IMMEDIATE"})
            yield session

    async def create_all(self, *metadatas: MetaData) -> None:
        """Create the tables of every given MetaData that do not exist yet."""
        async with self.engine.begin() as conn:
            for metadata in metadatas:
                await conn.run_sync(metadata.create_all)

    async def ping(self) -> bool:
        """True when the database answers ``SELECT 1``; raises what the driver raises."""
        async with self.engine.connect() as conn:
            result = await conn.execute(text("SELECT 1"))
            return result.scalar_one() == 1

    async def close(self) -> None:
        await self.engine.dispose()


__all__ = ["Database", "default_sqlite_url", "normalize_url"]
