"""What the API and the workers share about decoder-LLM checkpoints (format `hf_causal_lm`): the
description stored with the model, the measurements an LLM job reports, and which steps apply.
No torch and no onnxruntime here (the API imports it)."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from service.core.errors import InvalidInput
from service.core.reported import Reported

LLM_FORMAT = "hf_causal_lm"
# quantize modes that apply to a checkpoint (weight-only: activations stay float, the runtime's kernels dequantize blocks).
LLM_QUANTIZE_MODES = ("auto", "int4_weight_only", "int8_weight_only")
# fp16 is not offered on checkpoints: the builder's CPU fp16 graph fails to run in ONNX Runtime 1.32 (a Cast buffer shape mismatch).


class LlmInfo(BaseModel):
    model_config = ConfigDict(extra="allow", from_attributes=True)
    architecture: str = Field(description="config.json's architectures[0], e.g. LlamaForCausalLM.")
    model_type: str
    parameters: int = Field(description="Elements of every tensor in the safetensors files.")
    layers: int | None
    hidden_size: int | None
    heads: int | None
    kv_heads: int | None = Field(description="Key/value heads (grouped-query attention when fewer than heads).")
    vocabulary: int | None
    context_length: int | None = Field(description="max_position_embeddings.")
    tied_embeddings: bool = Field(description="The output projection (lm_head) is the embedding table.")
    weight_dtypes: list[str]
    tokenizer: list[str]
    chat_template: bool


class PrefillLatency(Reported):
    prompt_tokens: int
    ms: float = Field(description="Median milliseconds to process the prompt (the time to the first token's logits).")


class Generation(Reported):
    prompt: str
    text: str = Field(description="What the model generated after the prompt (greedy).")


class LlmMeasurement(Reported):
    """One model's numbers in an LLM job (original: the fp32 export; compressed: the result), same text, same runtime."""

    perplexity: float = Field(description="exp(mean negative log-likelihood) of the evaluation text, in windows of `window` tokens.")
    perplexity_increase: float | None = Field(None, description="Compressed only: perplexity / the original's - 1.")
    next_token_agreement: float | None = Field(None, description="Compressed only: share of evaluation positions whose most likely next token equals the original's.")
    generation_agreement: float | None = Field(None, description="Compressed only: share of the first generated tokens (greedy) identical to the original's, over the prompts.")
    decode_tokens_per_s: float = Field(description="Greedy decoding at batch 1 after a short prompt (median of the timed runs).")
    prefill: list[PrefillLatency] = Field(default_factory=list)
    peak_memory_bytes: int | None = Field(None, description="Peak resident memory of a process that loads the model and generates.")
    weight_bytes: int = Field(description="Bytes of model.onnx and its data file.")
    generations: list[Generation] = Field(default_factory=list, description="The prompts and what the model generated (greedy).")


def check_llm_job(model: Any, steps: list[Any], datasets: dict[str, Any]) -> None:
    """An LLM checkpoint takes one quantize step of a weight-only mode, and text datasets; an ONNX model takes no text."""
    if model.format != LLM_FORMAT:
        for field, dataset in datasets.items():
            if getattr(dataset, "kind", "arrays") == "text":
                raise InvalidInput(f"{field} {dataset.id} is a text dataset; text is for LLM checkpoints (format hf_causal_lm). "
                                   "An ONNX model takes a .npz with one array per input")
        for index, step in enumerate(steps):
            if step.method == "quantize" and step.mode == "int8_weight_only":
                raise InvalidInput(f"steps[{index}]: int8_weight_only is for LLM checkpoints; an ONNX model quantizes to int8 with int8_dynamic or int8_static")
            if step.method == "quantize" and step.int4_algorithm == "awq":
                raise InvalidInput(f"steps[{index}]: int4_algorithm awq is for LLM checkpoints; an ONNX model's int4 takes rtn, hqq or gptq")
        return
    if len(steps) != 1 or steps[0].method != "quantize":
        methods = ", ".join(s.method for s in steps)
        raise InvalidInput(f"an LLM checkpoint takes one quantize step (got: {methods}); pruning and distillation of LLMs are not offered yet")
    if steps[0].mode not in LLM_QUANTIZE_MODES:
        raise InvalidInput(f"steps[0]: mode {steps[0].mode} applies to ONNX models; an LLM checkpoint takes {', '.join(LLM_QUANTIZE_MODES)}")
    for field, dataset in datasets.items():
        if getattr(dataset, "kind", "arrays") != "text":
            raise InvalidInput(f"{field} {dataset.id} holds arrays; an LLM checkpoint calibrates and is evaluated on text (.txt or .jsonl)")
