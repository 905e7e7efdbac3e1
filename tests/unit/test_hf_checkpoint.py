"""Hugging Face checkpoint intake checks (service.core.hf_checkpoint), on a real tiny Llama checkpoint
and on hostile variants of it: each refused with its own code, nothing loaded but headers."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from service.core.hf_checkpoint import BundleRefused, inspect_checkpoint, is_checkpoint
from tests.llm_checkpoints import checkpoint_files, safetensors_bytes, with_link, zipped


def _inspect(tmp_path: Path, data: bytes) -> dict:
    path = tmp_path / "upload.zip"
    path.write_bytes(data)
    return inspect_checkpoint(path)


def _refused(tmp_path: Path, data: bytes) -> BundleRefused:
    with pytest.raises(BundleRefused) as caught:
        _inspect(tmp_path, data)
    return caught.value


def test_a_real_tiny_llama_is_described(tmp_path: Path) -> None:
    path = tmp_path / "ok.zip"
    path.write_bytes(zipped(checkpoint_files()))
    assert is_checkpoint(path)
    info = inspect_checkpoint(path)
    assert info["architecture"] == "LlamaForCausalLM"
    assert (info["layers"], info["heads"], info["kv_heads"], info["vocabulary"], info["context_length"]) == (2, 4, 2, 512, 256)
    assert info["parameters"] == 2 * 512 * 64 + 2 * (64 * 64 * 2 + 64 * 32 * 2 + 3 * 64 * 128 + 2 * 64) + 64
    assert info["tokenizer"] == ["tokenizer.json", "tokenizer_config.json"]


@pytest.mark.parametrize("name, code", [
    ("pytorch_model.bin", "pickled_weights"), ("weights.pt", "pickled_weights"), ("modeling_llama.py", "code_not_allowed"),
    ("custom_ops.so", "code_not_allowed"), ("notes.xyz", "unsafe_archive"),
])
def test_unsafe_files_are_refused(tmp_path: Path, name: str, code: str) -> None:
    files = checkpoint_files() | {name: b"\x80\x04payload"}
    assert _refused(tmp_path, zipped(files)).code == code


def test_remote_code_in_the_config_is_refused(tmp_path: Path) -> None:
    files = checkpoint_files()
    config = json.loads(files["config.json"]) | {"auto_map": {"AutoModelForCausalLM": "modeling.MyModel"}}
    assert _refused(tmp_path, zipped(files | {"config.json": json.dumps(config).encode()})).code == "code_not_allowed"


def test_unsupported_architecture_lists_the_supported_ones(tmp_path: Path) -> None:
    files = checkpoint_files()
    config = json.loads(files["config.json"]) | {"architectures": ["BertForMaskedLM"]}
    error = _refused(tmp_path, zipped(files | {"config.json": json.dumps(config).encode()}))
    assert error.code == "unsupported_architecture" and "LlamaForCausalLM" in error.message


def test_missing_tokenizer_is_refused(tmp_path: Path) -> None:
    files = {k: v for k, v in checkpoint_files().items() if not k.startswith("tokenizer")}
    assert _refused(tmp_path, zipped(files)).code == "tokenizer_missing"


@pytest.mark.parametrize("header, data, words", [
    ({"w": {"dtype": "F32", "shape": [4, 4], "data_offsets": [0, 64]}}, b"\0" * 32, "describes 64 bytes"),  # header claims more than the file
    ({"w": {"dtype": "F32", "shape": [4, 4], "data_offsets": [0, 32]}}, b"\0" * 32, "needs 64"),  # length disagrees with dtype x shape
    ({"w": {"dtype": "F32", "shape": [2**40, 2**40], "data_offsets": [0, 64]}}, b"\0" * 64, "beyond the bounds"),  # huge declared shape
    ({"a": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}, "b": {"dtype": "F32", "shape": [4], "data_offsets": [8, 24]}}, b"\0" * 24, "overlap"),
    ({"w": {"dtype": "OBJ", "shape": [1], "data_offsets": [0, 8]}}, b"\0" * 8, "dtype"),
])
def test_inconsistent_safetensors_headers_are_refused(tmp_path: Path, header: dict, data: bytes, words: str) -> None:
    files = checkpoint_files() | {"model.safetensors": safetensors_bytes(header, data)}
    error = _refused(tmp_path, zipped(files))
    assert error.code == "invalid_checkpoint" and words in error.message, error.message


def test_a_header_length_beyond_the_file_is_refused(tmp_path: Path) -> None:
    files = checkpoint_files() | {"model.safetensors": (10**12).to_bytes(8, "little") + b"{}"}
    assert _refused(tmp_path, zipped(files)).code == "invalid_checkpoint"


def test_links_and_nested_folders_are_refused(tmp_path: Path) -> None:
    assert _refused(tmp_path, with_link(checkpoint_files(), "tokenizer_config.json.lnk", "/etc/passwd")).code == "unsafe_archive"
    nested = checkpoint_files() | {"original/params.json": b"{}"}
    assert _refused(tmp_path, zipped(nested, folder=None)).code == "unsafe_archive"


def test_a_sharded_index_must_match_the_shards(tmp_path: Path) -> None:
    files = checkpoint_files()
    index = {"weight_map": {"model.embed_tokens.weight": "model-00002-of-00002.safetensors"}}
    error = _refused(tmp_path, zipped(files | {"model.safetensors.index.json": json.dumps(index).encode()}))
    assert error.code == "invalid_checkpoint" and "not in the archive" in error.message
