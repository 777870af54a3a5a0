"""One clear line per broker outage instead of aio-pika's and aiormq's per-attempt noise.

While RabbitMQ restarts, the libraries log at every reconnection attempt: an ERROR
"error when creating transport", a WARNING "Connection attempt ... failed", an INFO
"Reconnecting", and an ERROR with a traceback from ``RobustChannel._on_close`` (a
channel trying to reopen on the connection that just closed). Nothing is wrong: the
robust connection comes back by itself and the outbox keeps the events. An operator
reading ERROR tracebacks cannot tell that apart from real trouble, so the bus logs the
outage itself (one WARNING when the connection is lost, one when it is back, see
``rabbit.py``) and :class:`ReconnectNoise` turns exactly those library records into
DEBUG records. Everything else the libraries log is left as it is.
"""

from __future__ import annotations

import logging

#: (logger name, start of the message format string) of the records that only retell
#: a connection loss the bus reports itself
_NOISE: tuple[tuple[str, str], ...] = (
    ("aiormq.connection", "error when creating transport"),
    ("aiormq.connection", "Cancelling cause reader exited abnormally"),
    ("aiormq.connection", "Unexpected connection close from remote"),
    ("aio_pika.robust_connection", "Connection to %s closed. Reconnecting"),
    ("aio_pika.robust_connection", "Connection attempt to"),
)
#: aio-pika's callback runner; only the robust channel's close callback is demoted
_CALLBACKS = "aio_pika.tools"


def _callback_name(record: logging.LogRecord) -> str:
    """The qualified name of the callback an aio-pika "Callback %r error" record is about.

    Read from the object, not its repr: aio-pika deletes ``callback`` once it ran, after
    which the repr raises.
    """
    args = record.args if isinstance(record.args, tuple) else ()
    callback = getattr(args[0], "callback", args[0]) if args else None
    return getattr(callback, "__qualname__", "")


def _is_noise(record: logging.LogRecord) -> bool:
    message = str(record.msg)
    if record.name == _CALLBACKS:
        return (
            message.startswith("Callback %r error")
            and _callback_name(record) == "RobustChannel._on_close"
        )
    return any(record.name == name and message.startswith(start) for name, start in _NOISE)


class ReconnectNoise(logging.Filter):
    """Demotes the libraries' reconnection chatter to DEBUG (kept when DEBUG is on)."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno <= logging.DEBUG or not _is_noise(record):
            return True
        if not logging.getLogger(record.name).isEnabledFor(logging.DEBUG):
            return False
        record.levelno, record.levelname = logging.DEBUG, "DEBUG"
        return True


_FILTER = ReconnectNoise()


def install() -> None:
    """Attach the filter to the libraries' loggers (idempotent)."""
    for name in {name for name, _ in _NOISE} | {_CALLBACKS}:
        logger = logging.getLogger(name)
        if _FILTER not in logger.filters:
            logger.addFilter(_FILTER)
