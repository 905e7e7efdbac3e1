"""Handing freed memory back to the system between the phases of a job.

A job's memory limit is watched from outside as the resident size of its process (workers.runner).
glibc keeps freed heap pages mapped: after ONNX Runtime's transformer optimizer or a candidate's
session has been dropped, the process still looks as large as at its peak (measured on a 2-layer
GPT-2 with its 50,257-word vocabulary: 1.45 GB resident before the original was even measured,
most of it freed protobuf copies). `malloc_trim` returns those pages, so the limit measures what
the job holds, not what it once held."""

from __future__ import annotations

import ctypes
import sys


def release_freed_memory() -> None:
    # No gc.collect(): what these phases drop is freed by reference counting, and a full collection
    # in a long-lived process (a test session) cost seconds each time.
    if sys.platform.startswith("linux"):
        try:
            ctypes.CDLL("libc.so.6").malloc_trim(0)
        except (OSError, AttributeError):  # not glibc (musl): nothing to trim
            pass
