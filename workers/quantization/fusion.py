"""ONNX Runtime's transformer optimizer (`onnxruntime.transformers`): fuses attention, LayerNorm,
GELU and embedding subgraphs into single kernels, which dynamic int8 then quantizes as whole
operators (an Attention node keeps its projections in int8 end to end).

Whether it helps depends on the export: a BERT exported with eager attention fuses into Attention
nodes; one exported through SDPA only fuses LayerNorm/GELU and ran 7% slower in our measurements.
So it is a candidate to measure, not a rule.
"""

from __future__ import annotations

import logging
from pathlib import Path

import onnx

log = logging.getLogger(__name__)


def model_kinds(model: onnx.ModelProto) -> tuple[str, ...]:
    """The optimizer's model types worth trying on this graph: ('vit',) for a transformer over float
    inputs, ('bert', 'gpt2') for one over token ids (the fused operator counts decide), () when the
    graph has no softmax attention over matrix products. Judged from the graph, not its producer."""
    ops = {n.op_type for n in model.graph.node}
    if "Softmax" not in ops or "MatMul" not in ops:
        return ()
    constants = {t.name for t in model.graph.initializer}
    inputs = [i for i in model.graph.input if i.name not in constants]
    tokens = any(i.type.tensor_type.elem_type in (onnx.TensorProto.INT64, onnx.TensorProto.INT32) for i in inputs)
    return ("bert", "gpt2") if tokens else ("vit",)


def fuse(source: Path, out: Path, kinds: tuple[str, ...]) -> dict[str, int] | None:
    """Writes the most fused model to `out`; its fused operator counts, or None when nothing fused."""
    from onnxruntime.transformers.optimizer import optimize_model

    best, best_counts = None, {}
    for kind in kinds:
        try:
            optimized = optimize_model(str(source), model_type=kind, num_heads=0, hidden_size=0, opt_level=0)
        except Exception:  # the optimizer raises many kinds; an unfusable graph is just not a candidate
            log.info("transformer optimizer (%s) failed on this graph", kind, exc_info=True)
            continue
        counts = {k: v for k, v in optimized.get_fused_operator_statistics().items() if v}
        if sum(counts.values()) > sum(best_counts.values()):
            best, best_counts = optimized, counts
    if best is None:
        return None
    best.topological_sort()
    best.save_model_to_file(str(out))
    return best_counts
