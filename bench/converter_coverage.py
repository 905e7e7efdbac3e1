"""The trainable converter (workers/trainable) against ONNX's own backend node test cases.

The onnx wheel ships, as code, one-node (and "expanded" function) models with inputs and expected
outputs (`onnx.backend.test.case.node.collect_testcases()`). Every case whose operators the
converter claims is run through `OnnxGraphModule` and compared with the expected outputs. Prints the
pass count per operator and writes bench/results/converter_coverage.json:

    python -m bench.converter_coverage

tests/unit/test_converter_coverage.py runs the same cases and requires exactly the failures listed
in KNOWN_GAPS, each with its reason, so a regression (or a fix) is seen at once.
"""

from __future__ import annotations

import warnings
from collections import defaultdict
from dataclasses import dataclass, field

import numpy as np

# Element types no exporter writes into a model that is trained: cases converting to or from them.
EXOTIC_TYPES = ("FLOAT8", "FLOAT4", "INT4", "UINT4", "INT2", "UINT2", "E8M0", "STRING")

# Other cases the converter does not handle, with the reason. None of these forms appear in what
# torch's exporters write for the architectures in DESIGN.md (explicit pads, no negative steps).
KNOWN_GAPS: dict[str, str] = {
    "test_attention_": "the opset-23 Attention function at fp16/bf16 precision or with masks/caches we do not expand",
    "test_averagepool_2d_ceil_last_window_starts_on_pad": "a ceil-mode window that starts in the padding",
    "test_averagepool_2d_dilations": "dilated average pooling",
    "test_averagepool_3d_dilations_": "dilated average pooling",
    "test_averagepool_2d_pads": "pads over half the kernel (torch refuses them)",
    "test_averagepool_2d_precomputed_same_upper": "auto_pad SAME_* (exporters write explicit pads)",
    "test_averagepool_2d_same_": "auto_pad SAME_*",
    "test_maxpool_2d_pads": "pads over half the kernel (torch refuses them)",
    "test_maxpool_2d_precomputed_same_upper": "auto_pad SAME_*",
    "test_maxpool_2d_same_": "auto_pad SAME_*",
    "test_maxpool_with_argmax": "MaxPool's Indices output",
    "test_center_crop_pad_crop_": "CenterCropPad with axes (Pad's axes input)",
    "test_constant_pad_axes": "Pad's axes input",
    "test_constant_pad_negative_axes": "Pad's axes input",
    "test_einsum_scalar": "Einsum over 0-d operands",
    "test_equal_string": "string tensors",
    "test_identity_opt": "optional types",
    "test_identity_sequence": "sequence types",
    "test_reduce_max_empty_set": "reducing an empty axis",
    "test_reduce_min_empty_set": "reducing an empty axis",
    "test_slice_neg_steps": "negative Slice steps",
    "test_training_dropout": "training-mode dropout is random by definition",
}


@dataclass
class Coverage:
    per_op: dict[str, list[int]] = field(default_factory=lambda: defaultdict(lambda: [0, 0]))  # op -> [passed, total]
    failures: dict[str, str] = field(default_factory=dict)  # case name -> what went wrong
    case_ops: dict[str, str] = field(default_factory=dict)  # case name -> the operator it counts for

    @property
    def passed(self) -> int:
        return sum(p for p, _ in self.per_op.values())

    @property
    def total(self) -> int:
        return sum(t for _, t in self.per_op.values())


def known_gap(case_name: str) -> str | None:
    if case_name.startswith(("test_cast", "test_castlike")) and any(t in case_name.upper() for t in EXOTIC_TYPES):
        return "float8/float4/int4/int2/string element types"
    return next((why for prefix, why in KNOWN_GAPS.items() if case_name.startswith(prefix)), None)


def _array(value):
    from onnx import numpy_helper

    return np.asarray(value) if isinstance(value, (np.ndarray, np.generic)) else numpy_helper.to_array(value)


def _tensor(x: np.ndarray):
    import torch

    if x.dtype.name == "bfloat16":
        return torch.from_numpy(x.astype(np.float32)).to(torch.bfloat16)
    return torch.from_numpy(np.array(x))  # a writable copy


def _matches(got, expected: np.ndarray) -> bool:
    import torch

    value = (got.float() if got.dtype == torch.bfloat16 else got).numpy()
    return value.shape == expected.shape and np.allclose(value.astype(np.float64), expected.astype(np.float64), rtol=1e-4, atol=1e-5, equal_nan=True)


def run_cases() -> Coverage:
    import onnx.backend.test.case.node as node_cases
    import torch

    from workers.trainable.from_onnx import OnnxGraphModule
    from workers.trainable.onnx_ops import OPS

    coverage = Coverage()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        cases = node_cases.collect_testcases(None)
    for case in cases:
        ops = {n.op_type for n in case.model.graph.node} - {"Constant"}
        if not ops or not ops <= set(OPS):
            continue
        op = case.model.graph.node[-1].op_type + (" (expanded)" if len(case.model.graph.node) > 1 else "")
        coverage.case_ops[case.name] = op
        for inputs, outputs in case.data_sets:
            coverage.per_op[op][1] += 1
            try:
                module = OnnxGraphModule(case.model)
                with torch.no_grad():
                    got = module(*[_tensor(_array(x)) for x in inputs])
                got = got if isinstance(got, tuple) else (got,)
                if all(_matches(g, _array(e)) for g, e in zip(got, outputs)):
                    coverage.per_op[op][0] += 1
                    continue
                coverage.failures[case.name] = "outputs differ"
            except Exception as exc:  # noqa: BLE001 - a case the converter cannot run: recorded, not fatal
                coverage.failures[case.name] = (str(exc).splitlines() or [type(exc).__name__])[0][:160]
    return coverage


def main() -> None:
    from bench.common import report

    coverage = run_cases()
    rows = [[op, p, t, "; ".join(sorted({known_gap(n) or "UNEXPECTED" for n in coverage.case_ops if coverage.case_ops[n] == op and n in coverage.failures}))]
            for op, (p, t) in sorted(coverage.per_op.items())]
    report("converter_coverage", f"Converter vs ONNX backend node cases: {coverage.passed}/{coverage.total} passed, {len(coverage.per_op)} operators",
           ["operator", "passed", "cases", "gaps"], rows,
           {"passed": coverage.passed, "total": coverage.total, "failures": coverage.failures})


if __name__ == "__main__":
    main()
