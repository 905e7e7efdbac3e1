"""Which bits each layer gets: the plans a quantize step on an LLM measures, and the choice among them.

mode int4_weight_only / int8_weight_only: one plan. auto: all layers int4, then the layers whose
weights move their outputs most on the calibration text (workers.llm.weight_quant.sensitivity)
promoted to int8 in growing shares, ending with all int8; the plans are in order of size, so the
first within max_perplexity_increase is the smallest that holds (objective size or latency alike:
decode speed of int4 and int8 weights is close on CPU, measured in the job's metrics)."""

from __future__ import annotations

from typing import Any

from service.core.methods.quantize import QuantizeStep
from workers.llm.weight_quant import Plan

PROMOTED_SHARES = (1 / 16, 1 / 8, 1 / 4, 1 / 2)


def base_plan(step: QuantizeStep, lm_head: str | None) -> Plan:
    algorithm = step.int4_algorithm or "gptq"
    plan = Plan(algorithm=algorithm, block_size=step.block_size, symmetric=True if step.symmetric is None else step.symmetric,
                accuracy_level=4 if step.accuracy_level is None else step.accuracy_level, embeddings=step.int4_embeddings)
    if step.mode == "int8_weight_only":
        plan.embeddings = False  # an 8-bit model keeps its table in float rather than 4-bit; the report says so
    if lm_head is not None:
        default_head = 8 if step.mode == "int8_weight_only" else 4
        plan.bits[lm_head] = step.lm_head_bits or default_head
    return plan


def plans(step: QuantizeStep, layers: list[str], ranked: list[dict[str, Any]], lm_head: str | None) -> list[tuple[str, Plan]]:
    base = base_plan(step, lm_head)
    if step.mode == "int8_weight_only":
        base.bits.update({name: 8 for name in layers if name != lm_head})
        return [("int8_weight_only", base)]
    if step.mode == "int4_weight_only":
        return [(f"int4_weight_only/{base.algorithm}", base)]
    out = [(f"int4/{base.algorithm}", base)]
    order = [r["layer"] for r in ranked]
    for share in PROMOTED_SHARES:
        count = max(1, round(len(order) * share))
        if count >= len(order):
            break
        plan = base_plan(step, lm_head)
        plan.bits.update({name: 8 for name in order[:count] if step.lm_head_bits is None or name != lm_head})
        out.append((f"mixed/{base.algorithm}/int8 {count} of {len(order)} layers", plan))
    every = base_plan(step, lm_head)
    every.bits.update({name: 8 for name in layers if step.lm_head_bits is None or name != lm_head})
    out.append(("int8_weight_only", every))
    return out
