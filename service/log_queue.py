"""The server's log handlers moved off the event loop: a log line is put on a queue and a thread
writes it. Written from the event loop, every access-log line waited on stdout: with 200 event-stream
followers opened at once, a fifth of the loop's time went into those writes, and a reader that fell
behind (a pipe, a slow terminal or journal) stalled every request behind them."""

from __future__ import annotations

import logging
import queue
from logging.handlers import QueueHandler, QueueListener


class _AsIs(QueueHandler):
    # QueueHandler.prepare formats the message and drops record.args; uvicorn's access formatter
    # reads the args (client, method, path, status), so the record travels unchanged.
    def prepare(self, record: logging.LogRecord) -> logging.LogRecord:
        return record


def queue_handlers(*names: str) -> list[QueueListener]:
    """Each named logger's handlers behind a queue of its own (a listener per logger keeps each
    handler's records its own); started. Stop them at shutdown to write what is still queued."""
    listeners = []
    for name in names:
        logger = logging.getLogger(name)
        if not logger.handlers:
            continue
        lines: queue.SimpleQueue[logging.LogRecord] = queue.SimpleQueue()
        listener = QueueListener(lines, *logger.handlers, respect_handler_level=True)
        logger.handlers = [_AsIs(lines)]
        listener.start()
        listeners.append(listener)
    return listeners
