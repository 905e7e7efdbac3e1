"""The text an LLM job calibrates and is measured on, as windows of token ids from the model's own
tokenizer (onnxruntime-genai's, the one generation uses).

Without a text dataset the job uses built-in English text that every machine has: the docstrings of
Python's standard library, calibration and evaluation drawn from different modules (held out)."""

from __future__ import annotations

import importlib
import inspect
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


def to_windows(documents: list[str], encode, eos: int | None, window: int, max_tokens: int) -> list[np.ndarray]:
    """Documents joined by the end-of-text token, cut into windows; at most max_tokens in all."""
    ids: list[int] = []
    for document in documents:
        ids.extend(int(t) for t in encode(document))
        if eos is not None:
            ids.append(eos)
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
