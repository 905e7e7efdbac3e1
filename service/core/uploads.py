"""Streaming multipart upload: the file part goes straight to disk with the byte limit enforced
while it streams (413 the moment it is exceeded), never spooled whole in memory first.

Starlette's `request.form()` buffers the entire part before the handler can check its size, so the
parsing is driven here by python-multipart's push parser fed from `request.stream()`.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

from python_multipart.multipart import MultipartParser, parse_options_header
from starlette.requests import Request

from service.core.errors import InvalidInput, PayloadTooLarge

MAX_FORM_FIELD_BYTES = 64 * 1024
# Besides the file, a few small fields at most: a body made only of fields must not fill the API's memory.
MAX_FORM_FIELDS = 8
MAX_PART_HEADER_BYTES = 8 * 1024


@dataclass
class ReceivedUpload:
    path: Path
    filename: str
    size_bytes: int
    sha256: str
    fields: dict[str, str] = field(default_factory=dict)


class _PartCollector:
    """Callbacks for the push parser: the part named `file_field` to a file, small text fields to memory."""

    def __init__(self, file_field: str, dest_dir: Path, max_bytes: int) -> None:
        self.file_field = file_field
        self.dest_dir = dest_dir
        self.max_bytes = max_bytes
        self.fields: dict[str, str] = {}
        self.file_path: Path | None = None
        self.filename = ""
        self.size = 0
        self._digest = hashlib.sha256()
        self._fh: BinaryIO | None = None
        self._headers: dict[str, bytes] = {}
        self._hname = b""
        self._hvalue = b""
        self._current: str | None = None
        self._buffer = bytearray()

    def callbacks(self) -> Any:  # multipart's MultipartCallbacks (a TypedDict of callables)
        return {
            "on_part_begin": self._part_begin,
            "on_header_field": lambda d, s, e: self._header_bytes("_hname", d[s:e]),
            "on_header_value": lambda d, s, e: self._header_bytes("_hvalue", d[s:e]),
            "on_header_end": self._header_end,
            "on_headers_finished": self._headers_finished,
            "on_part_data": self._part_data,
            "on_part_end": self._part_end,
        }

    def _part_begin(self) -> None:
        self._parts = getattr(self, "_parts", 0) + 1
        if self._parts > MAX_FORM_FIELDS + 1:
            raise PayloadTooLarge(f"the upload has more than {MAX_FORM_FIELDS} form fields besides '{self.file_field}'")
        self._headers, self._current, self._buffer = {}, None, bytearray()
        self._header_total = 0

    def _header_bytes(self, attr: str, data: bytes) -> None:
        self._header_total += len(data)
        if self._header_total > MAX_PART_HEADER_BYTES:
            raise PayloadTooLarge("a multipart part's headers are too long")
        setattr(self, attr, getattr(self, attr) + data)

    def _header_end(self) -> None:
        self._headers[self._hname.decode("latin-1").lower()] = self._hvalue
        self._hname, self._hvalue = b"", b""

    def _headers_finished(self) -> None:
        _, params = parse_options_header(self._headers.get("content-disposition", b""))
        name = params.get(b"name", b"").decode("utf-8", "replace")
        self._current = name
        if name == self.file_field:
            if self._fh is not None:
                raise InvalidInput(f"send exactly one '{self.file_field}' part")
            self.filename = os.path.basename(params.get(b"filename", b"").decode("utf-8", "replace"))[:255]
            fd, tmp = tempfile.mkstemp(dir=self.dest_dir, prefix=".upload-", suffix=".part")
            self.file_path = Path(tmp)
            self._fh = os.fdopen(fd, "wb")

    def _part_data(self, data: bytes, start: int, end: int) -> None:
        chunk = data[start:end]
        if self._current == self.file_field:
            self.size += len(chunk)
            if self.size > self.max_bytes:
                raise PayloadTooLarge(f"upload exceeds the limit of {self.max_bytes} bytes")
            self._digest.update(chunk)
            assert self._fh is not None  # opened by the part's headers
            self._fh.write(chunk)
        else:
            self._buffer += chunk
            if len(self._buffer) > MAX_FORM_FIELD_BYTES:
                raise InvalidInput(f"form field '{self._current}' is too long")

    def _part_end(self) -> None:
        if self._current and self._current != self.file_field:
            self.fields[self._current] = self._buffer.decode("utf-8", "replace")

    def close(self) -> None:
        if self._fh is not None and not self._fh.closed:
            self._fh.close()

    def discard(self) -> None:
        self.close()
        if self.file_path is not None:
            self.file_path.unlink(missing_ok=True)


async def receive_upload(request: Request, dest_dir: Path, max_bytes: int, file_field: str = "file") -> ReceivedUpload:
    content_type, params = parse_options_header(request.headers.get("content-type", ""))
    if content_type != b"multipart/form-data" or b"boundary" not in params:
        raise InvalidInput(f"send the file as multipart/form-data in a field named '{file_field}'")
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > max_bytes + MAX_FORM_FIELD_BYTES * 4:
        # Refuse early when the client says up front that it is too big.
        raise PayloadTooLarge(f"upload exceeds the limit of {max_bytes} bytes")

    collector = _PartCollector(file_field, dest_dir, max_bytes)
    parser = MultipartParser(params[b"boundary"], collector.callbacks())
    try:
        async for chunk in request.stream():
            parser.write(chunk)
        parser.finalize()
    except (PayloadTooLarge, InvalidInput):
        collector.discard()
        raise
    except Exception as exc:  # malformed multipart body
        collector.discard()
        raise InvalidInput("malformed multipart/form-data body") from exc
    except BaseException:  # client went away: leave nothing behind
        collector.discard()
        raise
    collector.close()
    if collector.file_path is None:
        raise InvalidInput(f"no file part named '{file_field}' in the upload")
    return ReceivedUpload(
        path=collector.file_path,
        filename=collector.filename or "upload",
        size_bytes=collector.size,
        sha256=collector._digest.hexdigest(),
        fields=collector.fields,
    )
