"""The text an LLM job calibrates and is measured on, as windows of token ids from the model's own
tokenizer (onnxruntime-genai's, the one generation uses).

Without a text dataset the job uses built-in English text that every machine has: the docstrings of
Python's standard library, calibration and evaluation drawn from different modules (held out)."""

from __future__ import annotations

import importlib
import inspect
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from service.core.text_datasets import read_documents

CALIBRATION_MODULES = ("json", "pathlib", "collections", "itertools", "functools", "argparse", "logging", "subprocess", "threading",
                       "zipfile", "tarfile", "csv", "decimal", "statistics", "datetime", "textwrap", "string", "difflib", "heapq", "shutil")
EVALUATION_MODULES = ("tempfile", "typing", "dataclasses", "inspect", "ast", "pickle", "copy", "pprint", "random", "socket",
                      "selectors", "contextlib", "abc", "fractions", "calendar", "bisect", "enum", "queue", "sched", "uuid")


def builtin_documents(modules: tuple[str, ...]) -> list[str]:
    documents = []
    for name in modules:
        module = importlib.import_module(name)
        documents.append(inspect.getdoc(module) or "")
        for _, member in sorted(vars(module).items()):
            if (inspect.isclass(member) or inspect.isfunction(member)) and getattr(member, "__module__", None) == name:
                documents.append(inspect.getdoc(member) or "")
    return [d for d in documents if len(d) > 40]


@dataclass
class TextWindows:
    windows: list[np.ndarray]  # int64 token ids, each of `window` tokens (the last may be shorter)
    source: str  # dataset, eval_dataset, dataset (held-out part), builtin
    documents: int

    @property
    def tokens(self) -> int:
        return int(sum(w.size for w in self.windows))


# The token many tokenizers put between pretraining documents, distinct from the chat-turn end an
# instruct model's config names as eos (SmolLM2 and Qwen2: <|im_end|> ends a turn, <|endoftext|>
# separated the pretraining text).
END_OF_TEXT = ("<|endoftext|>", "<|end_of_text|>", "</s>", "<eos>")


def document_separators(folder: Path, eos: int | list[int] | None) -> list[int]:
    """The tokens that can join documents in text the model meets: its end-of-sequence token and,
    when the tokenizer has a different one, its end-of-text token (the last of the list). The
    evaluation text takes them in turn; the calibration text uses the last alone (calibration_separator).

    Why it matters: the positions after a separator carry the model's largest activations
    (attention sinks: on SmolLM2-135M, 98 such positions of 8,192 held 99.8% of one layer's input
    energy), so the separator in the calibration text decides what GPTQ fits. Int4 of SmolLM2 off
    its 4-bit grid, perplexity increase on held-out text joined by <|endoftext|> / by <|im_end|>:
    calibrated on <|im_end|> (the config's eos) +27.0% / +14.2%; on both in turn +13.4% / +13.8%;
    on <|endoftext|> (its pretraining separator) +9.6% / +13.1%; on no separator +29.4% / +14.8%."""
    ids = [eos] if isinstance(eos, int) else list(eos or [])
    out = ids[:1]
    try:
        added = json.loads((folder / "tokenizer.json").read_text()).get("added_tokens", [])
    except (OSError, ValueError):
        added = []
    by_content = {t.get("content"): t.get("id") for t in added if isinstance(t, dict)}
    end_of_text = next((by_content[c] for c in END_OF_TEXT if isinstance(by_content.get(c), int)), None)
    if end_of_text is not None and end_of_text not in out:
        out.append(end_of_text)
    return out


def calibration_separator(separators: list[int]) -> list[int]:
    """The pretraining end-of-text token when there is one, else the end-of-sequence token."""
    return separators[-1:]


def to_windows(documents: list[str], encode, separators: int | list[int] | None, window: int, max_tokens: int) -> list[np.ndarray]:
    """Documents joined by the separator tokens (taking turns), cut into windows; at most max_tokens in all."""
    joins = [separators] if isinstance(separators, int) else list(separators or [])
    ids: list[int] = []
    for index, document in enumerate(documents):
        ids.extend(int(t) for t in encode(document))
        if joins:
            ids.append(joins[index % len(joins)])
        if len(ids) >= max_tokens:
            break
    ids = ids[:max_tokens]
    windows = [np.asarray(ids[start:start + window], np.int64) for start in range(0, len(ids), window)]
    # A short tail says little and would weigh as much as a full window in per-window statistics.
    return [w for w in windows if w.size >= max(2, window // 4)] or windows[:1]


def dataset_documents(path: Path) -> list[str]:
    return read_documents(path, path.suffix == ".jsonl")


def split_held_out(documents: list[str]) -> tuple[list[str], list[str]]:
    """One dataset, no eval_dataset: the last quarter of its documents is held out for evaluation."""
    if len(documents) < 2:
        return documents, documents
    cut = max(1, (len(documents) * 3) // 4)
    return documents[:cut], documents[cut:]
