"""Text datasets for LLM checkpoints: .txt paragraphs and .jsonl records, strict UTF-8, clear refusals."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from service.core.errors import InvalidInput
from service.core.text_datasets import inspect_text, is_text_upload, read_documents
from workers.llm.text import calibration_separator, document_separators, split_held_out, to_windows


def _write(tmp_path: Path, name: str, data: bytes) -> Path:
    path = tmp_path / name
    path.write_bytes(data)
    return path


def test_paragraphs_and_records(tmp_path: Path) -> None:
    txt = _write(tmp_path, "a.txt", "first line\nsame paragraph\n\n\nsecond é\n".encode())
    assert read_documents(txt, jsonl=False) == ["first line\nsame paragraph", "second é"]
    assert inspect_text(txt, "a.txt") == {"kind": "text", "arrays": {}, "samples": 2, "has_labels": False}
    jsonl = _write(tmp_path, "b.jsonl", b'{"text": "one"}\n\n{"text": "two", "id": 3}\n')
    assert read_documents(jsonl, jsonl=True) == ["one", "two"]
    assert is_text_upload("b.jsonl", jsonl) and not is_text_upload("b.npz", jsonl)


@pytest.mark.parametrize("name, data, words", [
    ("bad.txt", b"caf\xe9 au lait", "not valid UTF-8"),
    ("cut.txt", b"caf\xc3", "middle of a UTF-8 character"),
    ("nul.txt", b"a\x00b", "NUL"),
    ("empty.txt", b"\n\n  \n", "no text"),
    ("bad.jsonl", b'{"text": "ok"}\nnot json\n', "line 2"),
    ("field.jsonl", b'{"body": "x"}\n', "no string field 'text'"),
])
def test_bad_text_is_refused_with_a_reason(tmp_path: Path, name: str, data: bytes, words: str) -> None:
    with pytest.raises(InvalidInput) as caught:
        inspect_text(_write(tmp_path, name, data), name)
    assert caught.value.code == "invalid_text" and words in caught.value.message


def test_windows_join_documents_with_the_end_token_and_respect_the_budget() -> None:
    encode = lambda text: [ord(c) for c in text]  # noqa: E731 - a character tokenizer
    windows = to_windows(["abcdef", "ghij"], encode, 0, window=4, max_tokens=9)
    assert [w.tolist() for w in windows] == [[97, 98, 99, 100], [101, 102, 0, 103]]  # the 1-token tail is dropped
    calibrate, held_out = split_held_out([str(i) for i in range(8)])
    assert calibrate == [str(i) for i in range(6)] and held_out == ["6", "7"]


def test_documents_are_joined_by_the_eos_and_the_end_of_text_token_in_turn(tmp_path: Path) -> None:
    (tmp_path / "tokenizer.json").write_text(json.dumps({"added_tokens": [{"id": 0, "content": "<|endoftext|>"}, {"id": 2, "content": "<|im_end|>"}]}))
    assert document_separators(tmp_path, [2]) == [2, 0]
    assert document_separators(tmp_path, 0) == [0]  # the eos is the end-of-text token: once
    (tmp_path / "tokenizer.json").write_text(json.dumps({"added_tokens": []}))
    assert document_separators(tmp_path, 2) == [2]
    encode = lambda text: [ord(c) for c in text]  # noqa: E731
    windows = to_windows(["ab", "cd", "ef"], encode, [2, 0], window=9, max_tokens=9)
    assert [w.tolist() for w in windows] == [[97, 98, 2, 99, 100, 0, 101, 102, 2]]
    assert calibration_separator([2, 0]) == [0] and calibration_separator([2]) == [2]
