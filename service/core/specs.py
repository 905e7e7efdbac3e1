"""Job step specs: one pydantic model per method, joined in a discriminated union on `method`.

These are shared by the API (validation, /v1/methods, OpenAPI) and the workers (which re-parse a
job's stored steps), so a spec is checked by the same code on both sides.
"""

from __future__ import annotations

from typing import Annotated, Literal, Union

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, model_validator


# Node, layer and operator names: bounded, so a spec cannot smuggle megabytes into the job store.
NameList = list[Annotated[str, Field(min_length=1, max_length=512)]]


class StrictModel(BaseModel):
    # An unknown field is a typo a user wants to hear about, not silently ignore.
    model_config = ConfigDict(extra="forbid")


class CalibrationSpec(StrictModel):
    method: Literal["minmax", "entropy", "percentile"] | None = Field(
        None, description="How activation ranges are chosen from the calibration data. Default: minmax and percentile both measured."
    )
    max_samples: int = Field(256, ge=1, le=100_000, description="Cap on calibration samples taken from the dataset.")
    percentile: float = Field(
        99.99, gt=50.0, le=100.0, description="percentile method: the kept fraction of |activations|, in percent."
    )
    num_bins: int = Field(
        2048, ge=128, le=65536, description="entropy/percentile: histogram bins (more than num_quantized_bins, or entropy equals minmax)."
    )
    num_quantized_bins: int = Field(128, ge=16, le=4096, description="entropy: bins of the quantized distribution.")
    symmetric: bool | None = Field(None, description="Symmetric activation ranges; default: the method's own default.")

    @model_validator(mode="after")
    def _bins_must_differ(self) -> "CalibrationSpec":
        if self.method == "entropy" and self.num_bins <= self.num_quantized_bins:
            raise ValueError("entropy calibration needs num_bins > num_quantized_bins (otherwise it equals minmax)")
        return self


class TrainingSpec(StrictModel):
    """How fine-tuning runs (labels when the data has them, otherwise the original model's outputs)."""

    batch_size: int = Field(64, ge=1, le=65536)
    lr: float | None = Field(None, gt=0, le=10, description="Default: 1e-4 when fine-tuning the uploaded (trained) model, which a larger step can push further from the original than no fine-tuning at all; 1e-3 when training a new student.")
    optimizer: Literal["adam", "sgd"] = "adam"
    weight_decay: float = Field(0.0, ge=0, le=1)
    seed: int = Field(0, ge=0, le=2**32 - 1)


class QualityTarget(StrictModel):
    """What "still behaves like the original" means when quantize measures its candidates."""

    min_cosine: float = Field(0.99, ge=0, le=1, description="Mean cosine similarity of the candidate's outputs to the original's (used without labels).")
    max_accuracy_drop: float = Field(0.01, ge=0, le=1, description="Largest accuracy loss (0.01 = 1 point), used when the evaluation data has labels.")


# Candidate families `quantize` measures; `candidates` may restrict a job to some of them.
QUANTIZE_FAMILIES = ("int8_dynamic", "int8_static", "fp16", "int4_weight_only")


class QuantizeStep(StrictModel):
    """Quantize an ONNX model with ONNX Runtime's quantization tools, choosing the settings by measurement."""

    method: Literal["quantize"] = "quantize"
    mode: Literal["auto", "int8_dynamic", "int8_static", "fp16", "int4_weight_only", "binary"] = Field(
        "auto",
        description=(
            "auto: builds candidates (dynamic int8 per-tensor and per-channel; static QDQ int8 on matrix products or on all "
            "ops, with SmoothQuant on transformers, when the job has a dataset; each also after ONNX Runtime's transformer "
            "fusions on BERT/GPT-2/ViT-like graphs; fp16; int4), measures each on held-out data against the original "
            "(fidelity, and latency interleaved with the original's at batch 1 and 32), and keeps the best by `objective` "
            "among those meeting `target`. A named mode (int8_dynamic, int8_static, int4_weight_only) measures its own "
            "sub-settings the same way, except those fixed in the step. "
            "binary: weights = sign x per-channel scale, 1 bit per weight stored, fine-tuned with a straight-through estimator."
        ),
    )
    objective: Literal["latency", "size"] = Field("latency", description="What the kept candidate is best at, among those meeting the target.")
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
        None, description="int8_static: SmoothQuant (move activation outliers into the weights). Default: measured on transformers, kept only when better."
    )
    smooth_quant_alpha: float = Field(0.5, ge=0, le=1, description="SmoothQuant migration strength: larger moves more of the activation range into the weights.")
    int4_algorithm: Literal["rtn", "hqq", "gptq"] | None = Field(
        None, description="int4_weight_only: round-to-nearest, HQQ or GPTQ (ONNX Runtime's MatMulNBitsQuantizer; GPTQ calibrates on the job's dataset). Default: measured."
    )
    int4_embeddings: bool = Field(True, description="int4_weight_only: quantize embedding tables (Gather) too; a table tied to the output projection is stored once.")
    block_size: int = Field(32, ge=16, le=256, description="int4_weight_only: weights per quantization block (a power of two).")
    binary_keep_first_last: bool = Field(True, description="binary: leave the first and last layers in float (as XNOR-Net and most binary networks do).")
    finetune_epochs: int = Field(0, ge=0, le=1000, description="binary: straight-through fine-tuning epochs (needs a dataset).")
    training: TrainingSpec = Field(default_factory=TrainingSpec)
    per_channel: bool | None = Field(None, description="Per-channel weight scales for int8. Default: measured (both tried).")
    reduce_range: bool | None = Field(
        None, description="7-bit int8 weights, for CPUs without VNNI whose int8 arithmetic saturates. Default: measured where the CPU lacks VNNI, off elsewhere."
    )
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


class PruneStep(StrictModel):
    """Prune weights (unstructured: stored sparse, so the file shrinks) or whole neurons/channels
    (structured: layers physically narrower), optionally in rounds of prune -> fine-tune."""

    method: Literal["prune"] = "prune"
    kind: Literal["unstructured", "structured"] = "unstructured"
    amount: float = Field(0.5, gt=0, lt=1, description="Fraction of weights (unstructured) or channels/neurons (structured) to remove.")
    scope: Literal["global", "layer"] = Field("global", description="One threshold across layers, or the same fraction in every layer.")
    importance: Literal["l1", "l2", "apoz", "taylor"] = Field(
        "l1", description="l1/l2 weight magnitude; apoz: how often a neuron outputs zero on the data (structured only); taylor: |weight x gradient|."
    )
    layer_amounts: dict[str, float] = Field(default_factory=dict, description="Per-layer overrides of `amount`, by layer name (see the step report).")
    skip_layers: NameList = Field(default_factory=list, max_length=4096, description="Layers left untouched.")
    channel_multiple: int = Field(
        8, ge=1, le=256,
        description="structured: keep a multiple of this many channels/neurons per layer. Odd widths (14, 55...) run slower than the wider multiple of 8 on most CPU and GPU kernels; 1 keeps the exact amount.",
    )
    prune_output_layer: bool = Field(False, description="Also prune the last layer (structured pruning never narrows the model's outputs).")
    iterations: int = Field(1, ge=1, le=50, description="Rounds of prune -> fine-tune; the pruned fraction grows to `amount` over the rounds.")
    finetune_epochs: int | None = Field(
        None, ge=0, le=1000,
        description="Fine-tuning epochs after each round. Default: 2 when the job has a dataset, else 0. The best epoch on the evaluation data is kept, so fine-tuning never leaves the model worse than pruning alone.",
    )
    max_accuracy_drop: float | None = Field(
        None, ge=0, le=1, description="Stop before accuracy (absolute, on the evaluation data) drops more than this; keep the best model within it."
    )
    lottery_ticket: bool = Field(False, description="Iterative magnitude pruning with rewinding to the uploaded weights (Frankle & Carbin).")
    training: TrainingSpec = Field(default_factory=TrainingSpec)

    @model_validator(mode="after")
    def _consistent(self) -> "PruneStep":
        if self.importance == "apoz" and self.kind != "structured":
            raise ValueError("importance 'apoz' ranks neurons, so it needs kind 'structured'")
        if self.lottery_ticket and (self.kind != "unstructured" or (self.finetune_epochs or 0) < 1):
            raise ValueError("lottery_ticket needs kind 'unstructured' and finetune_epochs >= 1 (the ticket is trained)")
        for name, amount in self.layer_amounts.items():
            if not 0 <= amount < 1:
                raise ValueError(f"layer_amounts['{name}'] must be in [0, 1)")
        return self


class StudentSpec(StrictModel):
    """How the service derives the student from the teacher."""

    kind: Literal["width", "depth", "low_rank"] = "width"
    width: float = Field(0.5, gt=0, lt=1, description="width: fraction of every hidden layer's neurons/channels kept (the teacher's most important, by L2 norm).")
    drop_layers: NameList = Field(default_factory=list, max_length=4096, description="depth: layers to remove (each must map its input shape to itself, e.g. a residual block's conv).")
    drop_count: int = Field(1, ge=1, le=100, description="depth, when drop_layers is empty: remove this many shape-preserving layers, last first.")
    rank: int | None = Field(None, ge=1, le=65536, description="low_rank: rank of every factorised linear layer.")
    energy: float = Field(0.9, gt=0, le=1, description="low_rank, when rank is unset: keep the singular values holding this share of the energy.")


class HintSpec(StrictModel):
    teacher_layer: str
    student_layer: str


class DistillStep(StrictModel):
    """Train a smaller student on the uploaded model's outputs (knowledge distillation)."""

    method: Literal["distill"] = "distill"
    student_model_id: str | None = Field(None, description="Use this uploaded model as the student (same inputs and outputs as the teacher).")
    student: StudentSpec = Field(default_factory=StudentSpec, description="How to derive the student when student_model_id is not given.")
    temperature: float = Field(4.0, gt=0, le=100, description="Softmax temperature of the soft targets; the soft loss is scaled by T^2.")
    alpha: float = Field(0.5, ge=0, le=1, description="Weight of the hard-label cross-entropy when the data has labels (soft loss: 1 - alpha).")
    hints: list[HintSpec] = Field(default_factory=list, max_length=64, description="Feature distillation: match these intermediate outputs (a learned projection bridges different widths).")
    hint_weight: float = Field(1.0, ge=0, le=1000, description="Weight of the feature (hint) loss against the logit loss.")
    epochs: int = Field(10, ge=1, le=1000)
    patience: int | None = Field(None, ge=1, le=1000, description="Early stopping: stop after this many epochs without a better validation score.")
    schedule: Literal["cosine", "constant"] = "cosine"
    training: TrainingSpec = Field(default_factory=TrainingSpec)
    compare_baseline: bool = Field(False, description="Also train the same student from scratch on hard labels with the same budget, and report both.")


class ClusterStep(StrictModel):
    """Weight sharing: k-means per layer; the model stores a codebook and bit-packed indices."""

    method: Literal["cluster"] = "cluster"
    bits: int = Field(5, ge=2, le=8, description="2^bits centroids per layer (a pruned layer reserves one for zero).")
    init: Literal["linear", "density", "kmeans++"] = Field("linear", description="Centroid initialisation (Han et al. found linear best).")
    layer_bits: dict[str, int] = Field(default_factory=dict, description="Per-layer overrides of `bits`, by layer name.")
    skip_layers: NameList = Field(default_factory=list, max_length=4096)
    min_elements: int = Field(256, ge=1, le=2**31, description="Smaller weight tensors stay float32.")
    embeddings: bool = Field(
        True, description="Also cluster embedding tables (a Gather's weight): often most of a language model's size. They are clustered as they are, not fine-tuned.",
    )
    finetune_epochs: int | None = Field(
        None, ge=0, le=1000,
        description="Fine-tune the centroids (gradients summed per cluster). Default: 2 when the job has a dataset, else 0; the best epoch on the evaluation data is kept.",
    )
    training: TrainingSpec = Field(default_factory=TrainingSpec)

    @model_validator(mode="after")
    def _bits(self) -> "ClusterStep":
        for name, bits in self.layer_bits.items():
            if not 2 <= bits <= 8:
                raise ValueError(f"layer_bits['{name}'] must be between 2 and 8")
        return self


class HuffmanStep(StrictModel):
    """Entropy-code the model's integer tensors (cluster indices, sparse gaps) into a .msz bundle that
    decodes to exactly the same ONNX model (`modelshrink unpack`). Must be the last step."""

    method: Literal["huffman"] = "huffman"


class DeepCompressionStep(StrictModel):
    """The Deep Compression recipe (Han, Mao & Dally, ICLR 2016): prune with fine-tuning, cluster with
    centroid fine-tuning, Huffman-code; a per-stage table of size and accuracy. Must be the last step."""

    method: Literal["deep_compression"] = "deep_compression"
    prune: PruneStep = Field(default_factory=lambda: PruneStep(kind="unstructured", amount=0.92, iterations=3, finetune_epochs=3, training=TrainingSpec(lr=1e-3)))
    cluster: ClusterStep = Field(default_factory=lambda: ClusterStep(bits=4, finetune_epochs=2, training=TrainingSpec(lr=1e-4)))
    huffman: bool = True


StepSpec = Annotated[
    Union[QuantizeStep, PruneStep, DistillStep, ClusterStep, HuffmanStep, DeepCompressionStep], Field(discriminator="method")
]
STEP_TYPES: tuple[type[StrictModel], ...] = (QuantizeStep, PruneStep, DistillStep, ClusterStep, HuffmanStep, DeepCompressionStep)
BUNDLE_STEPS = ("huffman", "deep_compression")
step_adapter: TypeAdapter[StepSpec] = TypeAdapter(StepSpec)


class MeasureSpec(StrictModel):
    """How the before/after metrics are measured (same settings for both models)."""

    warmup: int = Field(5, ge=0, le=1000)
    runs: int = Field(50, ge=5, le=100_000, description="Timed runs per batch size.")
    batch_sizes: list[Annotated[int, Field(ge=1, le=4096)]] = Field(default_factory=lambda: [1, 32], min_length=1, max_length=4)
    threads: int = Field(1, ge=1, le=64, description="ONNX Runtime intra-op threads for both models.")
    max_eval_samples: int = Field(1000, ge=1, le=1_000_000, description="Cap on samples for accuracy and fidelity.")


def step_requires_dataset(step: StrictModel) -> bool:
    if isinstance(step, QuantizeStep):
        return (step.mode == "int8_static" or (step.mode == "binary" and step.finetune_epochs > 0)
                or (step.mode == "int4_weight_only" and step.int4_algorithm == "gptq"))
    if isinstance(step, DistillStep):
        return True
    if isinstance(step, ClusterStep):
        return (step.finetune_epochs or 0) > 0
    if isinstance(step, DeepCompressionStep):
        return step_requires_dataset(step.prune) or step_requires_dataset(step.cluster)
    if isinstance(step, PruneStep):
        return (step.finetune_epochs or 0) > 0 or step.importance in ("apoz", "taylor") or step.max_accuracy_drop is not None
    return False
