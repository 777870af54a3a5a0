"""SQLite WAL checkpoints in a thread of their own, not in the event loop's COMMITs.

In WAL mode SQLite copies the log back into the database file ("checkpoints") from
inside a COMMIT once the log holds 1,000 pages. With ``synchronous = NORMAL`` that is
the only time it syncs: two ``fdatasync`` calls, the log's and the database's. Our
SQLite statements run in the event loop's thread (see :mod:`.db`), so during those
syncs the service answers nobody. Under load, with RabbitMQ and four other databases
writing to the same disk, a sync took 5-10 ms typically and up to 140 ms here
(``strace -T``), and every request in flight through that service waited with it:
the gateway's access log showed all 50 requests of a c=50 run stalled for 0.3-0.7 s
every few seconds, both cores idle in iowait.

:class:`WalCheckpointer` moves that work to a daemon thread with a connection of its
own (``sqlite3`` releases the GIL while SQLite works). The event loop's connections
keep an automatic checkpoint only as a safety net, at :data:`SAFETY_NET_PAGES`, for a
thread that has fallen far behind. A PASSIVE checkpoint never blocks writers or
readers: they go on appending to the log while it copies. The price: under continuous
writes it never finds the log fully copied, so the log does not restart from its
beginning and the safety net still fires now and then (every few seconds in billing at
full load), with little left to copy by then.

The thread checkpoints at most once per ``interval`` and only after a commit: more
often copies the same hot pages again and again (an earlier measurement: a checkpoint
every 0.2 s cost 10-20 % of the throughput).
"""

from __future__ import annotations

import contextlib
import logging
import sqlite3
import threading
import time
from pathlib import Path

log = logging.getLogger("aiagg.db")

#: the event loop's own automatic checkpoint, kept for a checkpoint thread that is far
#: behind (SQLite's default is 1,000 pages: 4 MB of log with 4 KiB pages)
SAFETY_NET_PAGES = 10_000
#: at most one checkpoint this often (seconds)
DEFAULT_INTERVAL = 1.0


class WalCheckpointer:
    """One database file's checkpoints, in a daemon thread (module doc).

    :meth:`committed` after each write transaction (cheap, from the event loop);
    :meth:`close` to stop the thread, after a last checkpoint.
    """

    def __init__(self, path: str | Path, *, interval: float = DEFAULT_INTERVAL) -> None:
        self.path = str(path)
        self.interval = interval
        #: checkpoints run, and pages copied by them (for tests and curiosity)
        self.checkpoints = 0
        self.pages_copied = 0
        self._work = threading.Event()
        self._closed = threading.Event()
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None

    def committed(self) -> None:
        """A write transaction committed: the log grew, a checkpoint is due in a while."""
        if self._thread is None:
            self._start()
        self._work.set()

    def _start(self) -> None:
        with self._lock:
            if self._thread is not None or self._closed.is_set():
                return
            self._thread = threading.Thread(
                target=self._run, name=f"wal-checkpoint {Path(self.path).name}", daemon=True
            )
            self._thread.start()

    def close(self, timeout: float = 5.0) -> None:
        """Stop the thread, after one last checkpoint, without waiting out the interval."""
        with self._lock:
            self._closed.set()
            thread = self._thread
        self._work.set()
        if thread is not None:
            thread.join(timeout)

    def _run(self) -> None:
        conn: sqlite3.Connection | None = None
        last = float("-inf")  # the first checkpoint comes at once
        try:
            # a PASSIVE checkpoint never waits for a lock, so no busy timeout is needed
            conn = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
            while True:
                self._work.wait()
                # let the log grow for up to ``interval`` after the last checkpoint
                # (close() cuts the wait short)
                pause = last + self.interval - time.monotonic()
                if pause > 0:
                    self._closed.wait(pause)
                self._work.clear()
                self._checkpoint(conn)
                last = time.monotonic()
                if self._closed.is_set():
                    return
        except Exception:  # the loop's own automatic checkpoint takes over
            log.exception("WAL checkpoint thread of %s stopped", self.path)
        finally:
            if conn is not None:
                with contextlib.suppress(Exception):
                    conn.close()

    def _checkpoint(self, conn: sqlite3.Connection) -> None:
        try:
            _busy, _log_pages, copied = conn.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone()
        except sqlite3.OperationalError as exc:  # locked by a checkpoint of another process
            log.debug("WAL checkpoint of %s skipped: %s", self.path, exc)
            return
        self.checkpoints += 1
        if copied > 0:  # -1 when the database is not in WAL mode
            self.pages_copied += copied


__all__ = ["DEFAULT_INTERVAL", "SAFETY_NET_PAGES", "WalCheckpointer"]
