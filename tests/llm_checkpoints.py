"""Tiny Hugging Face causal-LM checkpoints for tests: a random LlamaForCausalLM from transformers in a
tiny configuration (2 layers, hidden 64, grouped-query attention 4/2 heads) with a byte-level BPE
tokenizer trained on standard-library docstrings, zipped as a user zips a `save_pretrained` folder."""

from __future__ import annotations

import io
import json
import struct
import zipfile
from functools import lru_cache
from pathlib import Path


@lru_cache(maxsize=1)
def _folder_files(tied: bool = False) -> dict[str, bytes]:
    import tempfile

    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    from workers.llm.text import CALIBRATION_MODULES, builtin_documents

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.train_from_iterator(builtin_documents(CALIBRATION_MODULES[:6]), trainers.BpeTrainer(
        vocab_size=512, special_tokens=["<|endoftext|>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False))
    fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token="<|endoftext|>", bos_token="<|endoftext|>")
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=fast.vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, max_position_embeddings=256, tie_word_embeddings=tied, bos_token_id=0, eos_token_id=0)
    model = LlamaForCausalLM(config)
    with tempfile.TemporaryDirectory() as tmp:
        fast.save_pretrained(tmp)
        model.save_pretrained(tmp)
        return {p.name: p.read_bytes() for p in Path(tmp).iterdir() if p.is_file()}


def checkpoint_files(tied: bool = False) -> dict[str, bytes]:
    return dict(_folder_files(tied))


def zipped(files: dict[str, bytes], folder: str | None = "tiny-llama") -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        for name, data in files.items():
            zf.writestr(f"{folder}/{name}" if folder else name, data)
    return buffer.getvalue()


def tiny_llama_zip(tied: bool = False) -> bytes:
    return zipped(checkpoint_files(tied))


def safetensors_bytes(header: dict, data: bytes) -> bytes:
    raw = json.dumps(header).encode()
    return struct.pack("<Q", len(raw)) + raw + data


def with_link(files: dict[str, bytes], name: str, target: str) -> bytes:
    """A zip with one member recorded as a symbolic link."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as zf:
        for member, data in files.items():
            zf.writestr(member, data)
        info = zipfile.ZipInfo(name)
        info.external_attr = (0o120777 << 16)
        zf.writestr(info, target)
    return buffer.getvalue()
