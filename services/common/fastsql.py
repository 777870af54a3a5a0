"""SQLite statements that run again and again, without SQLAlchemy's per-execution work.

Measured during a c=50 chat run: SQLAlchemy spent 39-52 µs of CPU around each
statement (execution context, parameter processing, result metadata) that ``sqlite3``
ran in 14-20 µs; billing runs ~10 statements per chat request, so that was ~0.4 ms of
its ~1.3 ms. :class:`StatementCache` compiles a statement object once per set of
parameter names, keeps the SQL text, the parameter order and SQLAlchemy's own bind and
result processors, and then runs it on the ``sqlite3`` cursor of the session's
connection, inside the transaction SQLAlchemy began.

Only the module-level statements the stores build once benefit: a statement object is
planned the second time it is executed (statements built per call never are), and
anything the plan does not cover goes through SQLAlchemy as before: expanding (IN)
parameters, Python-side defaults that are not plain values, ``text()`` and other
statements without named result columns, results whose columns SQLAlchemy would name
differently. RETURNING for many rows runs one ``execute`` per row (``sqlite3``'s
``executemany`` returns no rows). Errors are
SQLAlchemy's exception classes (``IntegrityError``, ...), as on the normal path.

PostgreSQL gets the same plans (:meth:`StatementCache.execute_asyncpg`), run as
SQLAlchemy's asyncpg adapter runs them (its prepared-statement cache, inside its
transaction, under its mutex) but without the execution context, the greenlet hops and
the result machinery around each: measured with a two-statement transaction, 328 µs
of CPU through SQLAlchemy against 121 µs on asyncpg alone. An ``executemany`` runs as
asyncpg's (one pipeline of rows, row count -1, as through SQLAlchemy), except with
RETURNING, which SQLAlchemy turns into one multi-row statement: that stays on its
path. This reads private parts of SQLAlchemy's adapter (:data:`_ASYNCPG_PARTS`);
should a later SQLAlchemy lack one, every PostgreSQL statement stays on SQLAlchemy's
path.
"""

from __future__ import annotations

import logging
import re
import sqlite3
import weakref
from collections import namedtuple
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

from sqlalchemy.engine import Connection, Dialect
from sqlalchemy.exc import DBAPIError, MultipleResultsFound, NoResultFound
from sqlalchemy.ext.asyncio import AsyncConnection

log = logging.getLogger("aiagg.db")

Processor = Callable[[Any], Any] | None

#: a plan key with no plan: run through SQLAlchemy
_UNSUPPORTED = None

#: what the PostgreSQL fast path uses of SQLAlchemy's asyncpg adapter connection
_ASYNCPG_PARTS = (
    "_connection",
    "_execute_mutex",
    "_transaction",
    "_start_transaction",
    "_prepare",
    "_invalidate_schema_cache_asof",
    "_handle_exception",
)

#: the row count in PostgreSQL's command tag, read as SQLAlchemy's adapter reads it
_STATUS = re.compile(r"(?:SELECT|UPDATE|DELETE|INSERT \d+) (\d+)")


def asyncpg_adapter(adapted: Any) -> Any | None:
    """``adapted`` (SQLAlchemy's asyncpg adapter connection) if the fast path can use it."""
    return adapted if all(hasattr(adapted, name) for name in _ASYNCPG_PARTS) else None


async def begin_asyncpg(adapted: Any) -> None:
    """Send BEGIN now, as SQLAlchemy's adapter does before its first statement."""
    async with adapted._execute_mutex:
        await _begun(adapted)


async def _begun(adapted: Any) -> None:
    """BEGIN unless the adapter's transaction is open (call under its mutex): a statement
    never runs outside a transaction, as on SQLAlchemy's path."""
    if adapted._transaction is None:
        await adapted._start_transaction()


async def end_asyncpg(adapted: Any, *, commit: bool) -> None:
    """COMMIT or ROLLBACK what :func:`begin_asyncpg` began, as the adapter would: its
    transaction is forgotten whatever the outcome (a failed COMMIT ended it too)."""
    transaction = adapted._transaction
    if transaction is None:
        return
    try:
        async with adapted._execute_mutex:
            await (transaction.commit() if commit else transaction.rollback())
    finally:
        adapted._transaction = None


def asyncpg_idle(adapted: Any) -> bool:
    """True when the adapter and its asyncpg connection are open and outside a transaction."""
    driver = adapted._connection
    return (
        adapted._transaction is None and not driver.is_closed() and not driver.is_in_transaction()
    )


async def asyncpg_error(
    conn: AsyncConnection, adapted: Any, dialect: Dialect, sql: str, values: Any, error: Exception
) -> Exception | None:
    """The driver's ``error`` as SQLAlchemy's own path raises it (``IntegrityError``,
    ...; a lost connection invalidated), or None when it is not the driver's."""
    dbapi_error = dialect.loaded_dbapi.Error
    translated: Exception = error
    if not isinstance(error, dbapi_error):
        try:
            adapted._handle_exception(error)  # raises the adapter's DB-API class for it
        except Exception as exc:
            translated = exc
    if not isinstance(translated, dbapi_error):
        return None
    invalidated = bool(dialect.is_disconnect(translated, adapted, None))
    if invalidated:
        try:
            await conn.invalidate(translated)
        except Exception:
            log.debug("invalidating a lost PostgreSQL connection failed", exc_info=True)
    return DBAPIError.instance(
        sql, values, translated, dbapi_error, dialect=dialect, connection_invalidated=invalidated
    )


class FastRow(tuple):
    """Base of the row classes: a named tuple with SQLAlchemy's ``_mapping``."""

    __slots__ = ()
    _fields: tuple[str, ...] = ()

    @property
    def _mapping(self) -> dict[str, Any]:
        return dict(zip(self._fields, self, strict=True))


def _row_class(keys: Sequence[str]) -> type[FastRow] | None:
    base = namedtuple("Row", keys, rename=True)  # type: ignore[misc]
    if base._fields != tuple(keys):
        return None  # a key that is not an identifier, or a duplicate: not covered
    return type("Row", (base, FastRow), {"__slots__": ()})


class FastResult:
    """The part of SQLAlchemy's ``Result`` the stores use, over already fetched rows."""

    __slots__ = ("_keys", "_rows", "rowcount")

    def __init__(self, rows: list[Any], rowcount: int, keys: tuple[str, ...]) -> None:
        self._rows = rows
        self.rowcount = rowcount
        self._keys = keys

    def keys(self) -> tuple[str, ...]:
        return self._keys

    def __iter__(self) -> Iterator[Any]:
        return iter(self._rows)

    def all(self) -> list[Any]:
        return list(self._rows)

    def first(self) -> Any:
        return self._rows[0] if self._rows else None

    def one(self) -> Any:
        if len(self._rows) != 1:
            raise (NoResultFound if not self._rows else MultipleResultsFound)(
                "No row was found when one was required"
                if not self._rows
                else "Multiple rows were found when exactly one was required"
            )
        return self._rows[0]

    def one_or_none(self) -> Any:
        if len(self._rows) > 1:
            raise MultipleResultsFound("Multiple rows were found when one or none was required")
        return self._rows[0] if self._rows else None

    def scalar(self) -> Any:
        return self._rows[0][0] if self._rows else None

    def scalar_one(self) -> Any:
        return self.one()[0]

    def scalar_one_or_none(self) -> Any:
        row = self.one_or_none()
        return None if row is None else row[0]

    def scalars(self) -> FastResult:
        return FastResult([row[0] for row in self._rows], self.rowcount, self._keys[:1])


class _Plan:
    """One statement, compiled for one set of parameter names."""

    __slots__ = ("binds", "defaults", "keys", "many", "processors", "results", "row", "sql")

    def __init__(self, sql: str, many: bool) -> None:
        self.sql = sql
        self.many = many
        #: (parameter name, its bind processor) in the SQL's ``?`` order
        self.binds: list[tuple[str, Processor]] = []
        #: values of the binds the caller does not pass (literals, scalar column defaults)
        self.defaults: dict[str, Any] = {}
        self.keys: tuple[str, ...] = ()
        self.results: list[Processor] = []
        self.row: type[FastRow] | None = None
        self.processors = False  # any result processor at all

    def values(self, params: Mapping[str, Any]) -> tuple[Any, ...]:
        out = []
        for name, process in self.binds:
            value = params[name] if name in params else self.defaults[name]
            out.append(process(value) if process is not None and value is not None else value)
        return tuple(out)

    def run(self, dbapi: sqlite3.Connection, params: Any, dialect: Dialect) -> FastResult:
        cursor = dbapi.cursor()
        try:
            if self.many and self.row is not None:
                # RETURNING for many rows: sqlite3's executemany gives no rows, so one
                # execute per row, rows in parameter order (what SQLAlchemy returns too)
                values: Any = [self.values(p) for p in params]
                rows, rowcount = [], 0
                for one in values:
                    cursor.execute(self.sql, one)
                    rows.extend(cursor.fetchall())
                    rowcount += max(cursor.rowcount, 0)
            elif self.many:
                values = [self.values(p) for p in params]
                cursor.executemany(self.sql, values)
                rows, rowcount = [], cursor.rowcount
            else:
                values = self.values(params or {})
                cursor.execute(self.sql, values)
                rows = cursor.fetchall() if self.row is not None else []
                rowcount = cursor.rowcount
        except sqlite3.Error as exc:
            raise DBAPIError.instance(
                self.sql, values, exc, sqlite3.Error, dialect=dialect, ismulti=self.many
            ) from exc
        finally:
            cursor.close()
        return FastResult(self._rows(rows), rowcount, self.keys)

    async def run_asyncpg(self, adapted: Any, values: tuple[Any, ...]) -> FastResult:
        """One execution on SQLAlchemy's asyncpg adapter, as its cursor would run it."""
        async with adapted._execute_mutex:
            await _begun(adapted)
            prepared, _attributes = await adapted._prepare(
                self.sql, adapted._invalidate_schema_cache_asof
            )
            records = await prepared.fetch(*values)
            status = prepared.get_statusmsg()
        match = _STATUS.match(status or "")
        rowcount = int(match.group(1)) if match else -1
        return FastResult(self._rows(records), rowcount, self.keys)

    async def run_asyncpg_many(self, adapted: Any, values: list[tuple[Any, ...]]) -> FastResult:
        """An ``executemany`` without RETURNING, as SQLAlchemy's adapter runs it (asyncpg
        sends the rows in one pipeline; the row count is unknown, -1, as there)."""
        async with adapted._execute_mutex:
            await _begun(adapted)
            await adapted._connection.executemany(self.sql, values)
        return FastResult([], -1, self.keys)

    def _rows(self, rows: Sequence[Any]) -> list[Any]:
        if self.row is None:
            return list(rows)
        make = self.row._make
        if self.processors:
            results = self.results
            return [
                make(
                    value if process is None or value is None else process(value)
                    for process, value in zip(results, row, strict=True)
                )
                for row in rows
            ]
        return [make(row) for row in rows]


def _plan(statement: Any, dialect: Dialect, names: tuple[str, ...], many: bool) -> _Plan | None:
    """Compile ``statement`` for these parameter names, or None when it is not covered.

    It reads a few attributes of SQLAlchemy's compiled statement; should a later
    SQLAlchemy lack one, the statement simply stays on SQLAlchemy's path.
    """
    try:
        return _compile_plan(statement, dialect, names, many)
    except Exception:
        log.debug("no fast plan for %s", statement, exc_info=True)
        return _UNSUPPORTED


def _compile_plan(
    statement: Any, dialect: Dialect, names: tuple[str, ...], many: bool
) -> _Plan | None:
    compiled = statement.compile(dialect=dialect, column_keys=list(names))
    if not compiled.positional or compiled.literal_execute_params or compiled.post_compile_params:
        return _UNSUPPORTED
    if getattr(compiled, "update_prefetch", None):
        return _UNSUPPORTED  # Python-side onupdate values: SQLAlchemy computes them
    # (``postfetch``, columns set to SQL expressions, only informs the ORM: not needed)
    plan = _Plan(compiled.string, many)
    binds = compiled.binds
    prefetch = {column.key: column for column in getattr(compiled, "insert_prefetch", ())}
    for name in compiled.positiontup or ():
        bind = binds.get(name)
        if bind is None or bind.expanding or bind.isoutparam:
            return _UNSUPPORTED
        if name not in names:
            column = prefetch.get(name)
            if column is not None:  # a column default SQLAlchemy would fill in
                default = column.default
                if default is None or not default.is_scalar:
                    return _UNSUPPORTED
                plan.defaults[name] = default.arg
            elif bind.required or bind.callable is not None:
                return _UNSUPPORTED
            else:
                plan.defaults[name] = bind.value
        plan.binds.append((name, bind.type.dialect_impl(dialect).bind_processor(dialect)))
    columns = compiled._result_columns  # SQLAlchemy's own names and types of the result
    if columns:
        plan.keys = tuple(column[0] for column in columns)
        plan.row = _row_class(plan.keys)
        if plan.row is None:
            return _UNSUPPORTED
        plan.results = [c[3].dialect_impl(dialect).result_processor(dialect, None) for c in columns]
        plan.processors = any(p is not None for p in plan.results)
    elif compiled.returning or not (compiled.isinsert or compiled.isupdate or compiled.isdelete):
        return _UNSUPPORTED  # may give rows it has no names for (text(), ...): SQLAlchemy
    return plan


class StatementCache:
    """Plans of the statements executed on one database (see the module doc)."""

    def __init__(self, dialect: Dialect) -> None:
        self.dialect = dialect
        #: statement → {(parameter names, many): plan or None}; an empty dict means
        #: "seen once": planned at its second execution
        self._plans: weakref.WeakKeyDictionary[Any, dict[tuple[Any, ...], _Plan | None]] = (
            weakref.WeakKeyDictionary()
        )
        self.fast = 0  # executions that took the fast path (for tests and benchmarks)

    def plan_for(self, statement: Any, params: Any) -> _Plan | None:
        """The plan for this statement and these parameter names, or None: then
        SQLAlchemy runs it (first sight, not covered, or not cacheable)."""
        try:
            plans = self._plans.get(statement)
            if plans is None:
                self._plans[statement] = {}  # seen once: planned if it comes again
                return None
        except TypeError:
            return None  # not weak-referenceable, not hashable, or compared like SQL
        if params is None or isinstance(params, Mapping):
            names, many = tuple(params or ()), False
        elif isinstance(params, Sequence) and params and isinstance(params[0], Mapping):
            names, many = tuple(params[0]), True
        else:
            return None
        key = (names, many)
        plan = plans.get(key, False)
        if plan is False:
            plan = plans[key] = _plan(statement, self.dialect, names, many)
        return plan

    def execute(self, conn: Connection, statement: Any, params: Any) -> FastResult | None:
        """SQLite: run ``statement`` on the fast path, or return None: then SQLAlchemy runs it."""
        plan = self.plan_for(statement, params)
        if plan is None:
            return None
        dbapi = conn.connection.dbapi_connection
        result = plan.run(dbapi, params, self.dialect)  # type: ignore[arg-type]
        self.fast += 1
        return result

    async def execute_asyncpg(
        self, conn: AsyncConnection, adapted: Any, statement: Any, params: Any
    ) -> FastResult | None:
        """PostgreSQL: the same, on the asyncpg adapter ``adapted`` of ``conn``."""
        plan = self.plan_for(statement, params)
        if plan is None or (plan.many and plan.row is not None):
            return None  # RETURNING for many rows: SQLAlchemy's one multi-row statement
        values: Any = [plan.values(p) for p in params] if plan.many else plan.values(params or {})
        try:
            if plan.many:
                result = await plan.run_asyncpg_many(adapted, values)
            else:
                result = await plan.run_asyncpg(adapted, values)
        except Exception as error:
            wrapped = await asyncpg_error(conn, adapted, self.dialect, plan.sql, values, error)
            if wrapped is None:
                raise
            raise wrapped from error
        self.fast += 1
        return result


__all__ = [
    "FastResult",
    "FastRow",
    "StatementCache",
    "asyncpg_adapter",
    "asyncpg_error",
    "asyncpg_idle",
    "begin_asyncpg",
    "end_asyncpg",
]
