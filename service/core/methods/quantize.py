"""The quantize step: settings chosen by measurement (workers/methods/quantize.py)."""

from __future__ import annotations

from typing import Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from service.core.methods.common import CalibrationSpec, MethodSpec, NameList, StepReport, StrictModel, TrainingSpec
from service.core.methods.rows import LeftAlone, PerLayer, QuantizedLayer, QuantizeSensitivity, per_layer

class QualityTarget(StrictModel):
    """What "still behaves like the original" means when quantize measures its candidates."""

    min_cosine: float = Field(0.99, ge=0, le=1, description="Mean cosine similarity of the candidate's outputs to the original's (used without labels).")
    max_accuracy_drop: float = Field(0.01, ge=0, le=1, description="Largest accuracy loss (0.01 = 1 point), used when the evaluation data has labels.")


# Candidate families `quantize` measures; `candidates` may restrict a job to some of them.
QUANTIZE_FAMILIES = ("int8_dynamic", "int8_static", "fp16", "int4_weight_only")


class QuantizeCandidate(BaseModel):
    model_config = ConfigDict(extra="allow")
    candidate: str = Field(description="e.g. int8_dynamic/per-channel/matmul, fused+int8_dynamic/..., int4_weight_only/hqq")
    settings: dict[str, Any] = Field(default_factory=dict)
    status: str = Field(description="measured or failed")
    error: str | None = None
    compression_ratio: float | None = None
    meets_target: bool = False
    cosine: float | None = None
    top1_agreement: float | None = None
    accuracy: float | None = None
    accuracy_drop: float | None = None
    speedup_by_batch: dict[str, float] = Field(default_factory=dict, description="batch size -> original p50 / candidate p50, timed interleaved")
    # LLM checkpoints: candidates are judged on held-out calibration windows.
    size_bytes: int | None = Field(None, description="LLMs: bytes of the candidate's model.onnx and data.")
    perplexity: float | None = Field(None, description="LLMs: perplexity on the held-out calibration windows.")
    perplexity_increase: float | None = Field(None, description="LLMs: perplexity / the original's - 1 on those windows.")
    next_token_agreement: float | None = Field(None, description="LLMs: share of positions whose most likely next token is the original's.")

    @property
    def first_speedup(self) -> float | None:
        """The speedup at the first batch size timed (the report page's y axis)."""
        return next(iter(self.speedup_by_batch.values()), None)


class QuantizeReport(StepReport):
    method: Literal["quantize"] = "quantize"
    mode: str | None = None
    chosen: str | None = Field(None, description="The kept candidate's name.")
    settings: dict[str, Any] | None = None
    objective: str | None = None
    target: dict[str, Any] | None = Field(None, description="The quality target and whether it was met (`met`).")
    measured_on: str | None = None
    reason: str | None = None
    candidates: list[QuantizeCandidate] = Field(default_factory=list)
    error_feedback: dict[str, Any] | None = Field(None, description="int8 with gptq rounding: the layers refined and each one's output error on the calibration data, rounded to nearest and with GPTQ.")
    sensitivity: list[QuantizeSensitivity] | None = Field(None, description="Layers ranked by the fidelity each costs quantized alone (when mixed precision ran), or, on LLMs, by their output error at int4 and int8 on the calibration text.")
    float_layers: list[LeftAlone] = Field(default_factory=list, description="Weights left in float32 and why.")
    warnings: list[str] = Field(default_factory=list)
    transformer_fusion: dict[str, int] | None = None
    ops_before: dict[str, int] = Field(default_factory=dict)
    ops_after: dict[str, int] = Field(default_factory=dict)
    # What the kept candidate's builder did (only the keys of its family are present).
    smooth_quant: dict[str, Any] | None = Field(None, description="SmoothQuant: the alpha (one, or chosen per activation with the counts of each) and how many activations were smoothed.")
    calibration: dict[str, Any] | None = Field(None, description="int8_static: the calibration method and the number of samples it saw.")
    format: str | None = Field(None, description="int8_static: QDQ (QuantizeLinear/DequantizeLinear pairs around float ops).")
    keep_io_types: bool | None = Field(None, description="fp16: whether the inputs and outputs stayed float32.")
    algorithm: str | None = Field(None, description="int4_weight_only: rtn, hqq, gptq or (LLM checkpoints) awq.")
    block_size: int | None = Field(None, description="int4_weight_only: weights per quantization block.")
    layers: list[QuantizedLayer] | None = Field(None, description="int4_weight_only (and LLMs' weight-only modes): each weight's bits, algorithm and error.")
    tied_tables_stored_once: list[dict[str, str]] | None = Field(None, description="int4_weight_only: embedding tables a matrix product reads through the tie, stored once.")
    float_weights: list[dict[str, Any]] | None = Field(None, description="int4_weight_only: weights left in float, largest first, with their parameters and why.")
    float_share: float | None = Field(None, description="int4_weight_only: share of the parameters left in float.")
    lm_head: dict[str, Any] | None = Field(None, description="LLM jobs: the output projection and the bits it got.")
    binarized_layers: list[str] | None = Field(None, description="binary: the layers whose weights are signs times a per-row scale.")
    quality: dict[str, Any] | None = Field(None, description="binary: quality before and after the binarised fine-tuning.")
    path: str | None = Field(None, description="binary: onnx_initializers when nothing was trained and the weights were binarised where they are stored.")

    def per_layer(self) -> PerLayer | None:
        rows = [row for row in self.layers or [] if row.relative_error is not None]
        return per_layer("quantization error per layer (|W - Wq| / |W|)", rows, lambda row: row.relative_error)


class QuantizeStep(MethodSpec):
    """Quantize an ONNX model with ONNX Runtime's quantization tools, choosing the settings by measurement."""

    listing_order: ClassVar[int] = 10
    report_model: ClassVar[type[StepReport]] = QuantizeReport
    method: Literal["quantize"] = "quantize"
    mode: Literal["auto", "int8_dynamic", "int8_static", "fp16", "int4_weight_only", "int8_weight_only", "binary"] = Field(
        "auto",
        description=(
            "auto: builds candidates (dynamic int8 per-tensor and per-channel; static QDQ int8 on matrix products or on all "
            "ops, with SmoothQuant on transformers, when the job has a dataset; each also after ONNX Runtime's transformer "
            "fusions on BERT/GPT-2/ViT-like graphs; fp16; int4), measures each on held-out data against the original "
            "(fidelity, and latency interleaved with the original's at batch 1 and 32), and keeps the best by `objective` "
            "among those meeting `target`. A named mode (int8_dynamic, int8_static, int4_weight_only) measures its own "
            "sub-settings the same way, except those fixed in the step. "
            "binary: weights = sign x per-channel scale, 1 bit per weight stored, fine-tuned with a straight-through estimator. "
            "On an LLM checkpoint (format hf_causal_lm): auto measures all-int4 and int4 with the layers most sensitive on the calibration "
            "text in int8, and keeps the smallest within max_perplexity_increase; int4_weight_only / int8_weight_only quantize every layer's weights so."
        ),
    )
    objective: Literal["latency", "size"] = Field(
        "latency", description="What the kept candidate is best at, among those meeting the target. latency: from the smallest candidate up, "
        "a larger one is kept only when it is at least 10% faster (geometric mean over batch sizes; close calls timed head to head) than "
        "every smaller one kept, so that identical jobs keep one model; size: the smallest.")
    target: QualityTarget = Field(default_factory=QualityTarget)
    on_target_missed: Literal["fail", "keep_closest"] = Field(
        "fail",
        description="auto, when no candidate meets the target: fail with `quantization_target_missed` and the candidate table, "
        "or keep the most faithful candidate (flagged in the report and its warnings). A named mode always keeps its most faithful setting, flagged.",
    )
    candidates: list[Literal["int8_dynamic", "int8_static", "fp16", "int4_weight_only"]] | None = Field(
        None, max_length=4, description="auto: only these candidate families (default: all that apply)."
    )
    mixed_precision: bool = Field(
        True,
        description="When the best candidate by the objective misses the target, rank its layers by sensitivity (each quantized "
        "alone) and leave the most sensitive in float until the target holds.",
    )
    transformer_fusion: bool | None = Field(
        None, description="Apply ONNX Runtime's transformer optimizer (attention, LayerNorm, GELU fusions) first. Default: measured with and without on transformer graphs."
    )
    smooth_quant: bool | None = Field(
        None, description="int8 (dynamic and static): SmoothQuant (move activation outliers into the weights). Default: measured on transformers "
        "when the job has a dataset, kept only when better."
    )
    smooth_quant_alpha: float | None = Field(
        None, ge=0, le=1, description="SmoothQuant migration strength: larger moves more of the activation range into the weights. "
        "Default: chosen per activation among 0.3-0.9, the one whose int8 product on the calibration data is closest to the float one.")
    int4_algorithm: Literal["rtn", "hqq", "gptq", "awq"] | None = Field(
        None, description="int4_weight_only: round-to-nearest, HQQ or GPTQ (ONNX Runtime's MatMulNBitsQuantizer; GPTQ calibrates on the job's dataset). "
        "Default: measured; on an LLM checkpoint, gptq (on the calibration text, or built-in text without one). awq (LLM checkpoints only): "
        "activation-aware per-channel scales searched on the calibration text, then round-to-nearest."
    )
    symmetric: bool | None = Field(None, description="int4/int8 weight-only on an LLM checkpoint: symmetric blocks (no zero points). Default: symmetric.")
    accuracy_level: Literal[0, 1, 2, 3, 4] | None = Field(
        None, description="MatMulNBits accuracy_level on an LLM checkpoint: 4 multiplies with int8 activations (fastest on CPU, as the GenAI builder), 0-1 in float. Default: 4.")
    max_perplexity_increase: float = Field(
        0.05, gt=0, le=10, description="LLM checkpoints, auto: largest relative perplexity increase (0.05 = +5%) a kept candidate may have, on the last quarter of the calibration windows (held out from GPTQ).")
    lm_head_bits: Literal[4, 8, 32] | None = Field(
        None, description="LLM checkpoints: bits of the output projection (lm_head; 32 leaves it float). Default: 4 in int4_weight_only, 8 in int8_weight_only, measured in auto.")
    calibration_tokens: int = Field(8192, ge=64, le=1_000_000, description="LLM checkpoints: tokens of calibration text used for GPTQ, sensitivity and choosing.")
    int4_embeddings: bool = Field(True, description="int4_weight_only: quantize embedding tables (Gather) too; a table tied to the output projection is stored once.")
    block_size: int = Field(32, ge=16, le=256, description="int4_weight_only: weights per quantization block (a power of two).")
    binary_keep_first_last: bool = Field(True, description="binary: leave the first and last layers in float (as XNOR-Net and most binary networks do).")
    finetune_epochs: int = Field(0, ge=0, le=1000, description="binary: straight-through fine-tuning epochs (needs a dataset).")
    training: TrainingSpec = Field(default_factory=TrainingSpec)
    per_channel: bool | None = Field(None, description="Per-channel weight scales for int8. Default: measured (both tried).")
    reduce_range: bool | None = Field(
        None, description="7-bit int8 weights, for CPUs without VNNI whose int8 arithmetic saturates. Default: measured where the CPU lacks VNNI, off elsewhere."
    )
    int8_rounding: Literal["gptq", "nearest"] = Field(
        "nearest", description="int8 weights: nearest rounds each weight alone, as ONNX Runtime does; gptq spreads each weight's rounding "
        "error over the input channels not yet rounded, so every layer's output on the calibration data moves as little as it can "
        "(ONNX Runtime's scales, operators and size unchanged; needs a dataset). gptq helps per-tensor weights most (all-MiniLM-L6-v2: "
        "cosine 0.955 -> 0.973) and can lose after SmoothQuant (0.9964 -> 0.9916), so it is not the default.")
    calibration: CalibrationSpec = Field(default_factory=CalibrationSpec)
    op_types: NameList | None = Field(None, max_length=4096, description="Only quantize these operator types (default: measured: matrix products only, or all supported).")
    exclude_op_types: NameList = Field(default_factory=list, max_length=4096, description="Operator types left in float.")
    exclude_nodes: NameList = Field(default_factory=list, max_length=4096, description="Node names left in float.")
    keep_io_types: bool = Field(True, description="fp16: keep float32 model inputs/outputs so callers need no change.")

    @model_validator(mode="after")
    def _candidates_only_for_auto(self) -> "QuantizeStep":
        if self.candidates is not None and self.mode != "auto":
            raise ValueError("candidates chooses among families for mode auto; a named mode measures only its own settings")
        return self

    def needs_dataset(self) -> bool:
        return self.mode == "int8_static" or self.smooth_quant is True or self.int8_rounding == "gptq" or (self.mode == "binary" and self.finetune_epochs > 0) or (self.mode == "int4_weight_only" and self.int4_algorithm == "gptq")

    def trains(self, has_dataset: bool) -> bool:
        return self.mode == "binary" and self.finetune_epochs > 0 and has_dataset
