"""What the report says plainly when the result is worse than the original: slower (beyond timing
noise), larger, less accurate or less faithful, and where the loss comes from."""

from __future__ import annotations

from typing import Any

# Interleaved repeated timing still wobbles by a few percent on a busy machine: "slower" needs more.
SLOWER_MARGIN = 0.05
MAX_ACCURACY_DROP = 0.01  # absolute (1 point)
MIN_COSINE = 0.99


def quality_warnings(original: dict[str, Any], compressed: dict[str, Any]) -> list[str]:
    notes = []
    if original.get("accuracy") is not None and compressed.get("accuracy") is not None:
        drop = original["accuracy"] - compressed["accuracy"]
        if drop > MAX_ACCURACY_DROP:
            notes.append(f"Accuracy dropped by {drop * 100:.1f} points ({original['accuracy']:.2%} -> {compressed['accuracy']:.2%}) on the evaluation data.")
    cosine = (compressed.get("fidelity") or {}).get("cosine")
    if cosine is not None and cosine < MIN_COSINE:
        notes.append(f"The compressed model's outputs differ from the original's: mean cosine similarity {cosine:.4f} (below {MIN_COSINE}).")
    return notes


def speed_and_size_warnings(original: dict[str, Any], compressed: dict[str, Any], ratio: float) -> list[str]:
    notes = []
    for o, c in zip(original["latency_by_batch"], compressed["latency_by_batch"]):
        if c["p50"] > o["p50"] * (1 + SLOWER_MARGIN):
            notes.append(
                f"The compressed model is slower than the original on ONNX Runtime (CPU) at batch {o['batch']}: "
                f"p50 {c['p50']:.3f} ms vs {o['p50']:.3f} ms ({o['p50'] / c['p50']:.2f}x, interleaved timing)."
            )
    if ratio < 1:
        notes.append(f"The compressed model file is larger than the original ({ratio:.2f}x).")
    return notes


def attribution_note(sensitivity: list[dict[str, Any]] | None) -> str:
    if sensitivity is None:
        return ("The layers responsible cannot be isolated for this result (the graph changed, e.g. narrowed, "
                "distilled or quantized layers); see each step's report.")
    top = ", ".join(f"{r['layer']} (cosine {r['cosine']:.4f} alone)" for r in sensitivity[:5])
    return f"Layers most responsible, each measured alone in the original model: {top}."
