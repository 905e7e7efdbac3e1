"""What a search tries: recipes over the methods we have, and the fine-tuning budget of each rung.

A recipe is a job's steps at full budget. The first rung runs every recipe, the trainable ones at a
third of their fine-tuning epochs (successive halving); the driver promotes the promising ones to the
second rung at full budget (service.core.search_driver). Recipes are fixed lists, not sampled, so a
search is reproducible: the seed goes to every step's training (weight init of new layers, data order).
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field
from typing import Any

# Fine-tuning keys scaled per rung (every method's training budget is one of these).
EPOCH_KEYS = ("finetune_epochs", "epochs")
RUNG_BUDGET = (1 / 3, 1.0)
LAST_RUNG = len(RUNG_BUDGET) - 1


@dataclass(frozen=True)
class Recipe:
    name: str  # stable and unique within a search: how candidates and rungs refer to it
    steps: list[dict[str, Any]]
    trainable: bool
    why: str = ""
    methods: frozenset[str] = field(default_factory=frozenset)


def _recipe(name: str, why: str, *steps: dict[str, Any]) -> Recipe:
    methods = frozenset(s["method"] for s in steps)
    trainable = any(_has_training(s) for s in steps)
    return Recipe(name, [dict(s) for s in steps], trainable, why, methods)


def _has_training(step: dict[str, Any]) -> bool:
    if any((step.get(k) or 0) > 0 for k in EPOCH_KEYS):
        return True
    return any(isinstance(v, dict) and _has_training(v) for v in step.values())


def _quantize(objective: str, target: dict[str, float]) -> dict[str, Any]:
    # keep_closest: a candidate that misses the search's target still reports what it reached.
    return {"method": "quantize", "mode": "auto", "objective": objective, "target": target, "on_target_missed": "keep_closest"}


def _deep_compression(amount: float, bits: int, seed: int) -> dict[str, Any]:
    return {
        "method": "deep_compression",
        "prune": {"method": "prune", "kind": "unstructured", "amount": amount, "iterations": 3, "finetune_epochs": 3, "training": {"lr": 1e-3, "seed": seed}},
        "cluster": {"method": "cluster", "bits": bits, "finetune_epochs": 2, "training": {"lr": 1e-4, "seed": seed}},
        "huffman": True,
    }


def _llm_recipes(objective: str, target: dict[str, float]) -> list[Recipe]:
    """A decoder LLM checkpoint: weight-only quantization, the one family its runtime serves (int4 and int8
    MatMulNBits). No recipe trains, so a search has one rung; each candidate exports the checkpoint
    itself (the builder's fp32 export is every candidate's reference, measured on the same text)."""
    auto = {"method": "quantize", "objective": objective, "max_perplexity_increase": target.get("max_perplexity_increase", 0.05)}
    return [
        _recipe("llm-auto", "int4 with the layers that move their outputs most promoted to int8 until the perplexity target holds", auto),
        _recipe("llm-int4-gptq", "every layer int4, GPTQ on the calibration text (the smallest)", {"method": "quantize", "mode": "int4_weight_only"}),
        _recipe("llm-int4-gptq-lm-head-int8", "int4 GPTQ with the output projection in int8 (it decides every token)",
                {"method": "quantize", "mode": "int4_weight_only", "lm_head_bits": 8}),
        _recipe("llm-int4-rtn", "every layer int4 by round-to-nearest (the GenAI builder's default, as a reference point)",
                {"method": "quantize", "mode": "int4_weight_only", "int4_algorithm": "rtn"}),
        _recipe("llm-int8", "every layer int8 (near-lossless, about half of fp32)", {"method": "quantize", "mode": "int8_weight_only"}),
    ]


def recipes(objective: str, facts: dict[str, Any], target: dict[str, float], seed: int, methods: list[str] | None) -> list[Recipe]:
    """Every recipe worth trying for this objective, model and data, restricted to `methods`."""
    if facts.get("llm"):
        found = _llm_recipes(objective, target)
        return [r for r in found if r.methods <= set(methods)] if methods else found
    found = [_recipe("quantize-auto", "every quantization family, measured, best by the objective", _quantize(objective, target))]
    trainable = facts.get("has_dataset", False)
    # Token-id inputs (transformers): training paths on CPU are slow and the quantizers already fuse
    # attention, so a search there tries quantization and a low-rank student first.
    transformer = facts.get("token_inputs", False)
    training = {"seed": seed}
    if trainable and objective == "size" and not transformer:
        found += [
            _recipe("deep-compression-p92-b4", "Han et al.'s recipe: prune 92%, 4-bit clusters, Huffman", _deep_compression(0.92, 4, seed)),
            _recipe("deep-compression-p95-b4", "more pruning than the paper", _deep_compression(0.95, 4, seed)),
            _recipe("deep-compression-p90-b5", "less pruning, finer clusters", _deep_compression(0.90, 5, seed)),
            _recipe(
                "distill-w25-quantize", "a quarter-width student, then quantized",
                {"method": "distill", "student": {"kind": "width", "width": 0.25}, "epochs": 6, "training": training},
                _quantize("size", target),
            ),
        ]
    if trainable and objective == "latency" and not transformer:
        found += [
            _recipe("prune-structured-30", "30% of channels/neurons removed, fine-tuned",
                    {"method": "prune", "kind": "structured", "amount": 0.3, "finetune_epochs": 3, "training": training}),
            _recipe(
                "prune-structured-50-quantize", "half the channels/neurons removed, then quantized",
                {"method": "prune", "kind": "structured", "amount": 0.5, "finetune_epochs": 3, "training": training}, _quantize("latency", target),
            ),
            _recipe(
                "distill-w50-quantize", "a half-width student, then quantized",
                {"method": "distill", "student": {"kind": "width", "width": 0.5}, "epochs": 6, "training": training},
                _quantize("latency", target),
            ),
        ]
    if trainable:
        found.append(_recipe(
            "low-rank-quantize", "every large layer factorised by SVD (90% of its energy), fine-tuned, then quantized",
            {"method": "low_rank", "energy": 0.9, "finetune_epochs": 3, "training": training}, _quantize(objective, target),
        ))
    if methods:
        allowed = set(methods)
        found = [r for r in found if r.methods <= allowed]
    return found


def steps_at_rung(recipe: Recipe, rung: int) -> list[dict[str, Any]]:
    """The recipe's steps with every fine-tuning budget scaled to the rung (at least one epoch)."""
    factor = RUNG_BUDGET[rung]
    steps = copy.deepcopy(recipe.steps)

    def scale(node: dict[str, Any]) -> None:
        for key, value in node.items():
            if key in EPOCH_KEYS and isinstance(value, int) and value > 0:
                node[key] = max(1, math.ceil(value * factor))
            elif isinstance(value, dict):
                scale(value)

    for step in steps:
        scale(step)
    return steps
