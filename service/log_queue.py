"""The server's log handlers moved off the event loop: a log line is appended to a buffer and a
thread writes what has gathered ten times a second. Written from the event loop, every access-log
line waited on stdout: with 200 event-stream followers opened at once, a fifth of the loop's time went
into those writes, and a reader that fell behind (a pipe, a slow terminal or journal) stalled every
request behind them. The thread wakes on a clock, not per line (logging's QueueListener wakes for each
record, and those GIL hand-offs cost status polling 10-15% of its requests/s)."""

from __future__ import annotations

import collections
import logging
import threading

FLUSH_INTERVAL_S = 0.1


class _Buffered(logging.Handler):
    # The record is kept as it is (uvicorn's access formatter reads record.args); deque.append is
    # atomic, so the event loop takes no lock to log.
    def __init__(self, records: collections.deque) -> None:
        super().__init__()
        self.records = records

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


class BufferedLogs:
    """Each named logger's handlers behind a buffer of its own (each handler keeps its own records),
    written by one thread; `stop` writes what is left."""

    def __init__(self, *names: str) -> None:
        self._targets: list[tuple[collections.deque, list[logging.Handler]]] = []
        for name in names:
            logger = logging.getLogger(name)
            if logger.handlers:
                records: collections.deque = collections.deque()
                self._targets.append((records, list(logger.handlers)))
                logger.handlers = [_Buffered(records)]
        self._stopped = threading.Event()
        self._thread = threading.Thread(target=self._run, name="log-writer", daemon=True)
        self._thread.start()

    def _write(self) -> None:
        for records, handlers in self._targets:
            while records:
                record = records.popleft()
                for handler in handlers:
                    if record.levelno >= handler.level:
                        handler.handle(record)

    def _run(self) -> None:
        while not self._stopped.wait(FLUSH_INTERVAL_S):
            self._write()

    def stop(self) -> None:
        self._stopped.set()
        self._thread.join(timeout=5)
        self._write()
