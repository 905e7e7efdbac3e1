"""An LLM job's metrics (the JobMetrics shape every job has, with `llm` measurements) and its step
report, with the warnings a user must not miss said in words."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from service.core.llm import LlmMeasurement
from workers.llm.decoder import TextScore
from workers.llm.export import folder_bytes

PERPLEXITY_WARNING = 0.05
SLOWER_DECODE = 0.95


def _generation_agreement(original: list[dict[str, Any]], compressed: list[dict[str, Any]]) -> float:
    same = total = 0
    for a, b in zip(original, compressed):
        total += len(a["tokens"])
        same += sum(1 for x, y in zip(a["tokens"], b["tokens"]) if x == y)
    return same / max(1, total)


def _measurement(folder: Path, parameters: int, score: TextScore, runtime: dict[str, Any], llm: dict[str, Any]) -> dict[str, Any]:
    decode = runtime["decode_tokens_per_s"]
    per_token_ms = 1000.0 / max(decode, 1e-9)
    return {
        "size_bytes": folder_bytes(folder),
        "parameters": parameters,
        "latency_ms": {"p50": per_token_ms, "p95": per_token_ms, "batch": 1},
        "latency_by_batch": [],
        "llm": LlmMeasurement(perplexity=score.perplexity, decode_tokens_per_s=decode, prefill=runtime["prefill"],
                              peak_memory_bytes=runtime.get("peak_memory_bytes"), weight_bytes=folder_bytes(folder),
                              generations=[{"prompt": g["prompt"], "text": g["text"]} for g in runtime["generations"]], **llm).model_dump(),
    }


def warnings_for(original: dict[str, Any], compressed: dict[str, Any], ratio: float) -> list[str]:
    out = []
    o, c = original["llm"], compressed["llm"]
    if c["perplexity_increase"] > PERPLEXITY_WARNING:
        out.append(f"perplexity rose {100 * c['perplexity_increase']:.1f}% on the evaluation text ({o['perplexity']:.3g} -> {c['perplexity']:.3g}); "
                   "more layers in int8 (mode auto with a lower max_perplexity_increase, or lm_head_bits 8) trade size for it")
    if c["decode_tokens_per_s"] < SLOWER_DECODE * o["decode_tokens_per_s"]:
        out.append(f"decoding is slower than the original's: {c['decode_tokens_per_s']:.3g} vs {o['decode_tokens_per_s']:.3g} tokens/s at batch 1")
    if ratio < 1:
        out.append(f"the compressed model is larger than the original ({compressed['size_bytes']} vs {original['size_bytes']} bytes)")
    if c["generation_agreement"] is not None and c["generation_agreement"] < 0.5:
        out.append(f"greedy generations differ from the original's: {100 * c['generation_agreement']:.0f}% of the first {len(o['generations'])} "
                   "prompts' tokens agree (side by side in the report)")
    return out


def job_metrics(info: dict[str, Any], original: Path, compressed: Path, reference: TextScore, result: TextScore,
                original_runtime: dict[str, Any], compressed_runtime: dict[str, Any], evaluation: dict[str, Any]) -> dict[str, Any]:
    parameters = int(info.get("parameters") or 0) or None
    before = _measurement(original, parameters, reference, original_runtime, {})
    after = _measurement(compressed, parameters, result, compressed_runtime, {
        "perplexity_increase": result.perplexity / reference.perplexity - 1,
        "next_token_agreement": result.agreement(reference),
        "generation_agreement": _generation_agreement(original_runtime["generations"], compressed_runtime["generations"]),
    })
    ratio = before["size_bytes"] / after["size_bytes"]
    return {
        "original": before,
        "compressed": after,
        "compression_ratio": ratio,
        "speedup": after["llm"]["decode_tokens_per_s"] / max(before["llm"]["decode_tokens_per_s"], 1e-9),
        "evaluation": evaluation,
        "warnings": warnings_for(before, after, ratio),
        "sensitivity": None,
    }


def step_report(step, chosen: dict[str, Any], candidates: list[dict[str, Any]], ranked: list[dict[str, Any]], lm_head: str | None,
                warnings: list[str]) -> dict[str, Any]:
    bits = {row["layer"]: row["bits"] for row in chosen["settings"]["layers"]}
    return {
        "method": "quantize",
        "mode": step.mode,
        "chosen": chosen["candidate"],
        "settings": {k: v for k, v in chosen["settings"].items() if k not in ("layers",)},
        "objective": step.objective,
        "target": {"max_perplexity_increase": step.max_perplexity_increase, "met": chosen["meets_target"],
                   "perplexity_increase": chosen["perplexity_increase"], "measured_on": "held-out calibration windows"},
        "measured_on": "the last quarter of the calibration windows, which GPTQ did not fit (the job's metrics are on the evaluation text)",
        "reason": ("the smallest candidate within max_perplexity_increase on the held-out calibration windows" if chosen["meets_target"]
                   else "no candidate met the target: the most faithful one is kept (flagged)"),
        "candidates": [{k: v for k, v in c.items() if k not in ("settings", "index")} for c in candidates],
        "layers": chosen["settings"]["layers"],
        "lm_head": {"layer": lm_head, "bits": bits.get(lm_head)} if lm_head else None,
        "sensitivity": [{"layer": r["layer"], "error_int4": round(r["error_int4"], 6), "error_int8": round(r["error_int8"], 8), "bits": bits.get(r["layer"])}
                        for r in ranked],
        "warnings": warnings if not chosen["meets_target"] else [],
    }
