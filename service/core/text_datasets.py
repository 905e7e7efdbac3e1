"""Text datasets for LLM checkpoints: UTF-8 `.txt` (documents separated by blank lines) or `.jsonl`
(one JSON object per line with a `text` string). Checked in the API by streaming the file once:
strict UTF-8, no NUL bytes, bounded size and line length; tokenized later in the worker with the
model's own tokenizer (service never guesses a tokenizer at upload)."""

from __future__ import annotations

import codecs
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from service.core.errors import InvalidInput

TEXT_SUFFIXES = (".txt", ".jsonl")
MAX_LINE_BYTES = 4 * 1024**2
CHUNK = 1 << 20


def is_text_upload(filename: str, path: Path) -> bool:
    """By name (.txt/.jsonl); a .npz is a zip whatever it is called."""
    with open(path, "rb") as fh:
        if fh.read(4) == b"PK\x03\x04":
            return False
    return filename.lower().endswith(TEXT_SUFFIXES)


def _lines(path: Path) -> Iterator[str]:
    """Decoded lines, strictly UTF-8, each bounded, read a chunk at a time."""
    decoder = codecs.getincrementaldecoder("utf-8")("strict")
    pending = ""
    with open(path, "rb") as fh:
        while chunk := fh.read(CHUNK):
            if b"\x00" in chunk:
                raise InvalidInput("the text dataset contains NUL bytes; upload UTF-8 text", code="invalid_text")
            try:
                pending += decoder.decode(chunk)
            except UnicodeDecodeError as exc:
                raise InvalidInput(f"the text dataset is not valid UTF-8 (byte {exc.start} of a chunk)", code="invalid_text") from exc
            *complete, pending = pending.split("\n")
            if len(pending) > MAX_LINE_BYTES:
                raise InvalidInput(f"a line of the text dataset is longer than {MAX_LINE_BYTES} characters", code="invalid_text")
            yield from complete
    try:
        pending += decoder.decode(b"", final=True)
    except UnicodeDecodeError as exc:
        raise InvalidInput("the text dataset ends in the middle of a UTF-8 character", code="invalid_text") from exc
    if pending:
        yield pending


def read_documents(path: Path, jsonl: bool) -> list[str]:
    """The documents, in order: paragraphs of a .txt, `text` fields of a .jsonl."""
    documents: list[str] = []
    if jsonl:
        for number, line in enumerate(_lines(path), 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except (ValueError, RecursionError) as exc:
                raise InvalidInput(f"line {number} of the .jsonl is not JSON", code="invalid_text") from exc
            if not isinstance(record, dict) or not isinstance(record.get("text"), str):
                raise InvalidInput(f"line {number} of the .jsonl has no string field 'text'", code="invalid_text")
            if record["text"].strip():
                documents.append(record["text"])
        return documents
    paragraph: list[str] = []
    for line in _lines(path):
        if line.strip():
            paragraph.append(line)
        elif paragraph:
            documents.append("\n".join(paragraph))
            paragraph = []
    if paragraph:
        documents.append("\n".join(paragraph))
    return documents


def inspect_text(path: Path, filename: str) -> dict[str, Any]:
    """The dataset row's fields for a text upload, or InvalidInput saying what is wrong."""
    documents = read_documents(path, filename.lower().endswith(".jsonl"))
    if not documents:
        raise InvalidInput("the text dataset holds no text", code="invalid_text")
    return {"kind": "text", "arrays": {}, "samples": len(documents), "has_labels": False}
