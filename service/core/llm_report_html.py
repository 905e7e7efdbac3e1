"""The LLM part of a job's report page: perplexity, agreement and speed bars for the original (the
fp32 export) and the compressed model, each layer's measured sensitivity and the bits it got, and
the greedy generations of both side by side. Every text is escaped."""

from __future__ import annotations

from html import escape
from typing import Any

from service.core.llm import LlmMeasurement
from service.core.methods.quantize import QuantizeReport
from service.core.report_html import bars, fmt


def _pair(title: str, original: Any, compressed: Any, unit: str = "") -> str:
    return bars(title, [("original (fp32 export)", original, "original"), ("compressed", compressed, "compressed")], unit)


def llm_sections(o: LlmMeasurement, c: LlmMeasurement) -> list[str]:
    sections = [
        _pair("perplexity on the evaluation text (lower is better)", o.perplexity, c.perplexity),
        bars("agreement with the original", [("next token (top-1)", c.next_token_agreement, "compressed"),
                                             ("greedy generation, position by position", c.generation_agreement, "compressed")]),
        _pair("decode tokens/s at batch 1", o.decode_tokens_per_s, c.decode_tokens_per_s),
    ]
    compressed_prefill = {p.prompt_tokens: p.ms for p in c.prefill}
    for p in o.prefill:
        sections.append(_pair(f"prefill of a {p.prompt_tokens}-token prompt (ms)", p.ms, compressed_prefill.get(p.prompt_tokens)))
    if o.peak_memory_bytes and c.peak_memory_bytes:
        sections.append(_pair("peak memory loading and generating (MB)", o.peak_memory_bytes / 1e6, c.peak_memory_bytes / 1e6))
    rows = []
    for a, b in zip(o.generations, c.generations):
        rows.append(f"<tr><td><code>{escape(a.prompt)}</code></td><td>{escape(a.text)}</td><td>{escape(b.text)}</td></tr>")
    if rows:
        sections.append("<h2>greedy generations</h2><table border=\"1\" cellpadding=\"4\" style=\"border-collapse:collapse;font-size:12px\">"
                        "<tr><th>prompt</th><th>original</th><th>compressed</th></tr>" + "".join(rows) + "</table>")
    return sections


def llm_step_sections(step: QuantizeReport) -> list[str]:
    sections = []
    if step.candidates:
        sections.append(bars("candidates: perplexity increase on the calibration text (%)",
                             [(f"{c.candidate} ({fmt(c.compression_ratio)}x)", None if c.perplexity_increase is None else 100 * c.perplexity_increase,
                               "chosen" if c.candidate == step.chosen else "compressed" if c.meets_target else "original") for c in step.candidates]))
        sections.append(f"<p>kept <b>{escape(fmt(step.chosen))}</b>: {escape(fmt(step.reason))}</p>")
    if step.sensitivity:
        sections.append(bars("layers by sensitivity: output error at int4 on the calibration text (bits kept in the label)",
                             [(f"{r.layer.strip('/').replace('/MatMul', '')} [{r.bits}b]", r.error_int4,
                               "warn" if r.bits == 8 else "compressed") for r in step.sensitivity[:24]]))
    return sections
