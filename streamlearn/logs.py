"""Rate-limited logging for conditions that repeat (an unreachable broker, a bad record).

A broker outage or a stream of bad records must not turn into thousands of log
lines a second.  Two tools, both thread-safe and pure (no I/O of their own):

- :class:`RateLimitedLog` wraps a logger we own: one line per *key* (say a
  rejection reason) per interval; the next line that gets through says how
  many were suppressed since.  Every line carries ``extra={"event": key,
  "suppressed": n}`` so a structured (JSON) formatter can index them.
- :class:`RateLimitFilter` is a :class:`logging.Filter` for loggers we do not
  own (aiokafka, faust): records with the same logger, level and message
  template pass at most ``burst`` times per interval; a suppressed-count note
  is appended to the next one that passes.  :func:`limit_loggers` attaches it.

Examples
--------
>>> import logging
>>> now = [0.0]
>>> rl = RateLimitedLog(logging.getLogger("demo"), interval_s=10.0, clock=lambda: now[0])
>>> [rl.warning("bad_sig", "rejected snapshot %s", k) for k in ("a", "b", "c")]
[True, False, False]
>>> now[0] = 11.0
>>> rl.warning("bad_sig", "rejected snapshot %s", "d"), rl.suppressed("bad_sig")
(True, 0)
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Hashable, Iterable
from typing import Any

__all__ = ["RateLimitFilter", "RateLimitedLog", "limit_loggers"]

#: Loggers of the Kafka clients that repeat one line per retry during an outage.
NOISY_KAFKA_LOGGERS: tuple[str, ...] = ("aiokafka", "kafka", "faust.transport", "mode")


class RateLimitedLog:
    """Log through ``logger`` at most once per ``interval_s`` for each key.

    Parameters
    ----------
    logger
        Where lines go.
    interval_s
        Minimum seconds between two lines of one key.
    clock
        Monotonic time source (injectable for tests).
    """

    def __init__(
        self,
        logger: logging.Logger,
        interval_s: float = 60.0,
        *,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.logger = logger
        self.interval_s = interval_s
        self._clock = clock
        self._lock = threading.Lock()
        self._last: dict[Hashable, float] = {}
        self._skipped: dict[Hashable, int] = {}

    def log(self, level: int, key: Hashable, msg: str, *args: Any, **fields: Any) -> bool:
        """Emit unless ``key`` was logged less than ``interval_s`` ago; True when emitted.

        ``fields`` are added to the record's ``extra`` (structured logging).
        """
        now = self._clock()
        with self._lock:
            last = self._last.get(key)
            if last is not None and now - last < self.interval_s:
                self._skipped[key] = self._skipped.get(key, 0) + 1
                return False
            skipped = self._skipped.pop(key, 0)
            self._last[key] = now
        if skipped:
            msg += " [%d similar suppressed in the last %.0fs]"
            args = (*args, skipped, now - last if last is not None else 0.0)
        extra = {"event": str(key), "suppressed": skipped, **fields}
        self.logger.log(level, msg, *args, extra=extra)
        return True

    def warning(self, key: Hashable, msg: str, *args: Any, **fields: Any) -> bool:
        """:meth:`log` at WARNING."""
        return self.log(logging.WARNING, key, msg, *args, **fields)

    def error(self, key: Hashable, msg: str, *args: Any, **fields: Any) -> bool:
        """:meth:`log` at ERROR."""
        return self.log(logging.ERROR, key, msg, *args, **fields)

    def info(self, key: Hashable, msg: str, *args: Any, **fields: Any) -> bool:
        """:meth:`log` at INFO."""
        return self.log(logging.INFO, key, msg, *args, **fields)

    def suppressed(self, key: Hashable) -> int:
        """Lines of ``key`` suppressed since the last one emitted."""
        with self._lock:
            return self._skipped.get(key, 0)

    def reset(self, key: Hashable) -> None:
        """Forget ``key`` so its next line is emitted at once (say, after a recovery)."""
        with self._lock:
            self._last.pop(key, None)
            self._skipped.pop(key, None)


class RateLimitFilter(logging.Filter):
    """Let each (logger, level, message template) through ``burst`` times per interval.

    Examples
    --------
    >>> now = [0.0]
    >>> f = RateLimitFilter(interval_s=5.0, burst=2, clock=lambda: now[0])
    >>> rec = lambda: logging.LogRecord("aiokafka", logging.ERROR, "", 0,
    ...                                 "Unable connect to %s", ("node 1",), None)
    >>> [f.filter(rec()) for _ in range(4)]
    [True, True, False, False]
    >>> now[0] = 6.0
    >>> r = rec(); f.filter(r), r.getMessage()
    (True, 'Unable connect to node 1 [2 similar suppressed]')
    """

    def __init__(
        self,
        interval_s: float = 30.0,
        burst: int = 1,
        *,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        super().__init__()
        self.interval_s = interval_s
        self.burst = max(1, burst)
        self._clock = clock
        self._lock = threading.Lock()
        # key -> [window start, lines passed in the window, lines suppressed]
        self._seen: dict[tuple[str, int, str], list[float]] = {}

    def filter(self, record: logging.LogRecord) -> bool:
        key = (record.name, record.levelno, str(record.msg))
        now = self._clock()
        with self._lock:
            entry = self._seen.get(key)
            if entry is None or now - entry[0] >= self.interval_s:
                skipped = int(entry[2]) if entry is not None else 0
                self._seen[key] = [now, 1, 0]
                if len(self._seen) > 4096:  # bound memory against unbounded templates
                    self._seen = {key: self._seen[key]}
            elif entry[1] < self.burst:
                entry[1] += 1
                skipped = 0
            else:
                entry[2] += 1
                return False
        if skipped:
            record.msg = f"{record.msg} [{skipped} similar suppressed]"
        return True


def limit_loggers(
    names: Iterable[str] = NOISY_KAFKA_LOGGERS, interval_s: float = 30.0, burst: int = 1
) -> RateLimitFilter:
    """Attach one :class:`RateLimitFilter` to each named logger (idempotent per logger).

    A filter on a logger sees only records created on that very logger, so the
    filter is attached to the named loggers and to their already created children.
    """
    flt = RateLimitFilter(interval_s, burst)
    manager = logging.Logger.manager
    targets = set(names)
    for existing in list(manager.loggerDict):
        if any(existing.startswith(n + ".") for n in names):
            targets.add(existing)
    for name in sorted(targets):
        logger = logging.getLogger(name)
        if not any(isinstance(f, RateLimitFilter) for f in logger.filters):
            logger.addFilter(flt)
    return flt
