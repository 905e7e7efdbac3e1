"""What a model's output is, hence how it is compared with the original's and trained towards it.
Torch-free (numpy), so the pipeline's measurements and the training loops share one rule."""

from __future__ import annotations

import re
from typing import Any

import numpy as np
import onnx

from workers.data import token_vocabularies

# Output names that say "this is a vector representation, not class scores".
EMBEDDING_NAME = re.compile(r"embed|pool|feature|hidden|vector|encod|represent", re.IGNORECASE)
# Kinds whose last axis holds scores, so an argmax (top-1 agreement, accuracy) means something.
SCORED = ("classifier", "token_logits")


def output_kind(outputs: np.ndarray, vocabulary_sizes: set[int] | None = None, name: str | None = None, has_labels: bool = False) -> str:
    """classifier: [batch, classes] logits; token_logits: [batch, positions, vocabulary]; features:
    anything else (hidden states, embeddings, feature maps). A [batch, d] output is an embedding, not
    logits, when its rows are L2-normalised (sentence-transformers' Normalize) or its name says so
    ("sentence_embedding", "pooler_output"), unless the data has class labels for it."""
    if outputs.ndim == 3 and outputs.shape[-1] in (vocabulary_sizes or set()):
        return "token_logits"
    if outputs.ndim == 2 and outputs.shape[1] > 1:
        if has_labels:
            return "classifier"
        norms = np.linalg.norm(outputs.astype(np.float64), axis=1)
        normalised = len(norms) > 0 and bool((np.abs(norms - 1) < 1e-3).all())
        return "features" if normalised or (name is not None and EMBEDDING_NAME.search(name)) else "classifier"
    return "features"


def model_output_kind(model: onnx.ModelProto, outputs: np.ndarray, has_labels: bool) -> str:
    """The kind of `model`'s first output, given what it answered on the evaluation data."""
    vocab: Any = set(token_vocabularies(model).values())
    return output_kind(outputs, vocab, model.graph.output[0].name if model.graph.output else None, has_labels)
