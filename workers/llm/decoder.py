"""Running a GenAI decoder graph with ONNX Runtime directly, one window at a time with an empty KV
cache: the log-likelihood of each next token (perplexity) and the most likely token at each
position (agreement with the original), reduced per window so memory is one window's logits.

The graph's inputs are those the builder writes: input_ids, attention_mask, past_key_values.N.key /
.value (batch, kv_heads, past, head_size), and position_ids for the architectures that take it."""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

ORT_DTYPES = {"tensor(float)": np.float32, "tensor(float16)": np.float16}


def session(folder: Path, threads: int):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.log_severity_level = 3
    return ort.InferenceSession(str(folder / "model.onnx"), options, providers=["CPUExecutionProvider"])


def head_size(folder: Path) -> int:
    """The KV cache's last axis (symbolic in the graph: the runtime reads it from genai_config.json)."""
    return int(json.loads((folder / "genai_config.json").read_text())["model"]["decoder"]["head_size"])


def feed(sess, ids: np.ndarray, head: int) -> dict[str, np.ndarray]:
    """Inputs for one sequence with an empty cache."""
    length = ids.size
    out: dict[str, np.ndarray] = {}
    for meta in sess.get_inputs():
        if meta.name == "input_ids":
            out[meta.name] = ids.reshape(1, length).astype(np.int64)
        elif meta.name == "attention_mask":
            out[meta.name] = np.ones((1, length), np.int64)
        elif meta.name == "position_ids":
            out[meta.name] = np.arange(length, dtype=np.int64).reshape(1, length)
        elif re.match(r"past_key_values\.\d+\.(key|value)", meta.name):
            out[meta.name] = np.zeros((1, int(meta.shape[1]), 0, head), ORT_DTYPES.get(meta.type, np.float32))
    return out


def _log_softmax(logits: np.ndarray) -> np.ndarray:
    logits = logits.astype(np.float64)
    top = logits.max(axis=-1, keepdims=True)
    return logits - top - np.log(np.exp(logits - top).sum(axis=-1, keepdims=True))


@dataclass
class TextScore:
    """Sums over every predicted position of every window."""

    nll: float = 0.0
    positions: int = 0
    argmax: list[np.ndarray] = field(default_factory=list)  # per window: the most likely next token at each position

    @property
    def perplexity(self) -> float:
        return math.exp(self.nll / max(1, self.positions))

    def agreement(self, other: "TextScore") -> float:
        same = sum(int((a == b).sum()) for a, b in zip(self.argmax, other.argmax))
        return same / max(1, sum(a.size for a in self.argmax))


def score(sess, windows: list[np.ndarray], head: int, progress=None) -> TextScore:
    result = TextScore()
    for index, ids in enumerate(windows):
        logits = sess.run(["logits"], feed(sess, ids, head))[0][0]  # [positions, vocabulary]
        logp = _log_softmax(logits[:-1])
        result.nll -= float(logp[np.arange(ids.size - 1), ids[1:]].sum())
        result.positions += ids.size - 1
        result.argmax.append(logits[:-1].argmax(axis=-1).astype(np.int32))
        if progress is not None:
            progress((index + 1) / len(windows))
    return result
