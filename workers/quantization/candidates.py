"""Which quantized variants of a model are worth measuring, given the step, the model and the data."""

from __future__ import annotations

from dataclasses import dataclass, replace

from service.core.specs import QuantizeStep
from workers.quantization.cpu import lacks_vnni


@dataclass(frozen=True)
class Candidate:
    family: str  # int8_dynamic | int8_static | fp16 | int4_weight_only
    per_channel: bool = False
    reduce_range: bool = False
    ops: str = "matmul"  # int8: "matmul" (matrix products and embeddings) or "all" supported operators
    fused: bool = False  # after ONNX Runtime's transformer fusions
    smooth: bool = False  # int8: SmoothQuant applied first (alphas chosen on the calibration data)
    calibration: str = "minmax"
    algorithm: str = "rtn"  # int4
    float_nodes: tuple[str, ...] = ()  # left in float by mixed precision

    @property
    def name(self) -> str:
        parts = [("fused+" if self.fused else "") + self.family]
        if self.family.startswith("int8"):
            parts.append("per-channel" if self.per_channel else "per-tensor")
            parts += ["matmul" if self.ops == "matmul" else "all-ops"]
            if self.reduce_range:
                parts.append("7-bit")
            if self.family == "int8_static":
                parts.append(self.calibration)
            if self.smooth:
                parts.append("smoothquant")
        elif self.family == "int4_weight_only":
            parts.append(self.algorithm)
        if self.float_nodes:
            parts.append(f"{len(self.float_nodes)} layers float")
        return "/".join(parts)

    def settings(self) -> dict:
        base = {"family": self.family}
        if self.family.startswith("int8"):
            base.update(per_channel=self.per_channel, reduce_range=self.reduce_range, ops=self.ops, transformer_fusion=self.fused, smooth_quant=self.smooth)
            if self.family == "int8_static":
                base.update(calibration=self.calibration)
        elif self.family == "int4_weight_only":
            base.update(algorithm=self.algorithm)
        if self.float_nodes:
            base["float_nodes"] = list(self.float_nodes)
        return base

    def keeping_float(self, nodes: list[str]) -> "Candidate":
        return replace(self, float_nodes=tuple(nodes))


def _choices(fixed: bool | None, default: tuple[bool, ...]) -> tuple[bool, ...]:
    return default if fixed is None else (fixed,)


def plan(spec: QuantizeStep, *, has_data: bool, transformer: bool, has_matmul: bool, has_conv: bool) -> list[Candidate]:
    """Candidates in the order they are built and measured."""
    families = {
        "auto": [f for f in ("int8_dynamic", "int8_static", "fp16", "int4_weight_only") if spec.candidates is None or f in spec.candidates],
    }.get(spec.mode, [spec.mode])
    per_channel = _choices(spec.per_channel, (False, True))
    reduce_range = _choices(spec.reduce_range, (False, True) if lacks_vnni() else (False,))
    fused = _choices(spec.transformer_fusion, (False, True) if transformer else (False,))
    if spec.op_types:
        op_sets: tuple[str, ...] = ("custom",)
    elif has_conv and has_matmul:
        op_sets = ("matmul", "all")
    else:
        op_sets = ("all",) if has_conv else ("matmul",)
    out: list[Candidate] = []
    if "int8_dynamic" in families and (has_matmul or has_conv or spec.mode == "int8_dynamic"):
        # Dynamic int8 convolutions (ConvInteger) ran 6-13x slower than float on ORT's CPU provider, so
        # "all ops" is a separate candidate the measurement can drop; transformer fusion only matters for matrix products.
        # SmoothQuant helps dynamic int8 too: its activations are quantized per tensor, so one outlier
        # channel coarsens the grid for all (all-MiniLM-L6-v2 per-channel: cosine 0.9896 -> 0.9964).
        smooth = _choices(spec.smooth_quant, (False, True) if transformer and has_data else (False,)) if has_data else (False,)
        out += [Candidate("int8_dynamic", per_channel=pc, reduce_range=rr, ops=ops, fused=f and ops != "all", smooth=sq)
                for ops in op_sets for f in fused for sq in smooth for pc in per_channel for rr in reduce_range
                if not (f and ops == "all") and not (sq and (f or ops == "all"))]
    if "int8_static" in families and has_data:
        calibrations = (spec.calibration.method,) if spec.calibration.method else ("minmax", "percentile")
        smooth = _choices(spec.smooth_quant, (False, True) if transformer else (False,))
        # Static QDQ is per-channel unless told otherwise: per-tensor weights lose more with no speed gain.
        channels = _choices(spec.per_channel, (True,))
        out += [Candidate("int8_static", per_channel=pc, reduce_range=rr, ops=ops, calibration=cal, smooth=sq)
                for ops in op_sets for cal in calibrations for sq in smooth for pc in channels for rr in reduce_range
                if not (sq and ops == "all")]
    if "fp16" in families:
        out.append(Candidate("fp16"))
    if "int4_weight_only" in families and (has_matmul or spec.mode == "int4_weight_only"):
        algorithms = (spec.int4_algorithm,) if spec.int4_algorithm else ("rtn", "hqq", "gptq") if has_data and spec.mode == "int4_weight_only" else ("rtn", "hqq")
        out += [Candidate("int4_weight_only", algorithm=a) for a in algorithms]
    return out
