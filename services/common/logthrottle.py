"""A recurring condition logged once per interval, with how often it recurred meanwhile.

When a dependency is down every request hits the same error. One line per request
floods the log at production rates (400 req/s for a 5 s billing outage makes 2,000
lines) and hides whatever else happens. :class:`ThrottledLog` writes the first
occurrence at once, then at most one line per ``every`` seconds per key. A line that
stands for more than itself ends with ``(and N more like this in the last Xs)``, so
the occurrences are 1 + N summed over the lines. Inside an event loop the last
occurrences of a burst are written ``every`` seconds after the previous line, not held
back until the condition comes again.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

_MORE = " (and %d more like this in the last %.0fs)"


@dataclass
class _Seen:
    logged_at: float
    held: int = 0  # occurrences not written since ``logged_at``
    last: tuple[int, str, tuple[object, ...]] | None = None  # the last one held back
    timer: asyncio.TimerHandle | None = None


class ThrottledLog:
    """``log(level, key, msg, *args)``: like ``logger.log``, at most once per key and interval."""

    def __init__(
        self,
        logger: logging.Logger,
        every: float = 5.0,
        *,
        max_keys: int = 256,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.logger = logger
        self.every = every
        self.max_keys = max_keys
        self._clock = clock
        self._seen: OrderedDict[str, _Seen] = OrderedDict()

    def log(self, level: int, key: str, msg: str, *args: object) -> bool:
        """Write now, or hold the occurrence for the next line; True when written now."""
        now = self._clock()
        seen = self._seen.get(key)
        if seen is not None and now - seen.logged_at < self.every:
            seen.held += 1
            seen.last = (level, msg, args)
            if seen.timer is None:
                seen.timer = self._call_later(seen.logged_at + self.every - now, key)
            return False
        held, elapsed = (seen.held, now - seen.logged_at) if seen is not None else (0, 0.0)
        if seen is not None and seen.timer is not None:
            seen.timer.cancel()
        self._seen[key] = _Seen(now)
        self._seen.move_to_end(key)
        while len(self._seen) > self.max_keys:
            _, dropped = self._seen.popitem(last=False)
            if dropped.timer is not None:
                dropped.timer.cancel()
        if held:  # stacklevel: the record points at the caller, not at this module
            self.logger.log(level, msg + _MORE, *args, held, elapsed, stacklevel=2)
        else:
            self.logger.log(level, msg, *args, stacklevel=2)
        return True

    def _call_later(self, delay: float, key: str) -> asyncio.TimerHandle | None:
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return None  # no loop: what is held goes out with the next line
        return loop.call_later(max(0.0, delay), self._flush, key)

    def _flush(self, key: str) -> None:
        """Write the last held occurrence, standing for the others held with it."""
        seen = self._seen.get(key)
        if seen is None or not seen.held or seen.last is None:
            return
        now = self._clock()
        level, msg, args = seen.last
        more = seen.held - 1
        if more:
            self.logger.log(level, msg + _MORE, *args, more, now - seen.logged_at)
        else:
            self.logger.log(level, msg, *args)
        seen.logged_at, seen.held, seen.last, seen.timer = now, 0, None, None
