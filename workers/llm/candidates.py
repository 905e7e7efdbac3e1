"""Which bits each layer gets: the plans a quantize step on an LLM measures, and the choice among them.

mode int4_weight_only / int8_weight_only: one plan. auto: plans in growing size, the first within
max_perplexity_increase kept: all int4; the lm_head in int8 (a tied table reads its codes, stored
once); the MLP output projections (down_proj) in int8 too; then the layers whose weights move their
outputs most on the calibration text (workers.llm.weight_quant.sensitivity) promoted in growing
shares; all int8 last. Why the first two come first, measured on SmolLM2-135M off its 4-bit grid
(held-out text, perplexity increase): int4 86.5 MB +10.2%; lm_head int8 100.7 MB +7.6%; every
down_proj int8 99.8 MB +6.8% (their inputs carry the model's largest activations); the 9 layers
ranked most sensitive, with the lm_head, 104.1 MB +7.0%. (Objective size or latency alike: decode
speed of int4 and int8 weights is close on CPU, measured in the job's metrics.)"""

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
        # An 8-bit model keeps an untied table in float rather than 4-bit (the report says so); a table
        # tied to the 8-bit lm_head reads its codes, stored once.
        plan.tied_embeddings_only = True
    if lm_head is not None:
        default_head = 8 if step.mode == "int8_weight_only" else 4
        plan.bits[lm_head] = step.lm_head_bits or default_head
    return plan


def mlp_output_projections(layers: list[str]) -> list[str]:
    """The GenAI builder names each block's MLP output projection /model/layers.N/mlp/down_proj/MatMul."""
    return [name for name in layers if "/mlp/down_proj/" in name]


def plans(step: QuantizeStep, layers: list[str], ranked: list[dict[str, Any]], lm_head: str | None) -> list[tuple[str, Plan]]:
    base = base_plan(step, lm_head)
    if step.mode == "int8_weight_only":
        base.bits.update({name: 8 for name in layers if name != lm_head})
        return [("int8_weight_only", base)]
    if step.mode == "int4_weight_only":
        return [(f"int4_weight_only/{base.algorithm}", base)]
    head_free = lm_head is not None and step.lm_head_bits is None  # auto may choose the lm_head's bits

    def plan_with(promoted: list[str]) -> Plan:
        plan = base_plan(step, lm_head)
        plan.bits.update({name: 8 for name in promoted if head_free or name != lm_head})
        return plan

    out = [(f"int4/{base.algorithm}", base)]
    promoted: list[str] = []
    if head_free:
        promoted = [lm_head]  # type: ignore[list-item]
        out.append((f"mixed/{base.algorithm}/int8 lm_head", plan_with(promoted)))
    down = mlp_output_projections(layers)
    if down:
        promoted = promoted + down
        out.append((f"mixed/{base.algorithm}/int8 lm_head and {len(down)} down_proj" if head_free else f"mixed/{base.algorithm}/int8 {len(down)} down_proj",
                    plan_with(promoted)))
    order = [r["layer"] for r in ranked if r["layer"] not in promoted]
    for share in PROMOTED_SHARES:
        count = max(1, round(len(layers) * share))
        if count <= len(promoted):
            continue
        extra = order[:count - len(promoted)]
        if len(promoted) + len(extra) >= len(layers):
            break
        out.append((f"mixed/{base.algorithm}/int8 {len(promoted) + len(extra)} of {len(layers)} layers", plan_with(promoted + extra)))
    every = base_plan(step, lm_head)
    every.bits.update({name: 8 for name in layers if head_free or name != lm_head})
    out.append(("int8_weight_only", every))
    return out
