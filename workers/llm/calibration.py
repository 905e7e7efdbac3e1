"""Second moments of every quantizable matrix product's input on the calibration text, H = X^T X,
collected in one pass per window (all products at once) from the fp32 decoder.

GPTQ needs H per layer; ONNX Runtime's GPTQ (neural_compressor.gptq_quantize) re-runs the whole
model once per distinct input tensor (120 full passes per sample for a 30-layer decoder), which on a
CPU turns minutes into hours. The same H also measures each layer's sensitivity: the output error a
quantized weight causes on this text, ||X dW||^2 = trace(dW^T H dW), without running the model again."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper

from workers import model_files
from workers.activations import with_outputs
from workers.llm import decoder


def weight_matmuls(model: onnx.ModelProto) -> list[onnx.NodeProto]:
    """MatMuls whose second input is a constant 2-D float weight."""
    inits = {i.name: i for i in model.graph.initializer}
    return [n for n in model.graph.node if n.op_type == "MatMul" and n.input[1] in inits and len(inits[n.input[1]].dims) == 2
            and inits[n.input[1]].data_type == onnx.TensorProto.FLOAT]


def hessians(model: onnx.ModelProto, windows: list[np.ndarray], head: int, work: Path, threads: int, progress=None) -> dict[str, np.ndarray]:
    """{MatMul input tensor name: X^T X / positions} over the windows."""
    names = sorted({n.input[0] for n in weight_matmuls(model)})
    augmented = with_outputs(model, names)  # saved with its weights outside the graph: a checkpoint passes 2 GB
    work.mkdir(parents=True, exist_ok=True)
    model_files.save_to(augmented, work / "model.onnx")
    del augmented
    sess = decoder.session(work, threads)
    totals: dict[str, np.ndarray] = {}
    positions = 0
    for index, ids in enumerate(windows):
        values = sess.run(names, decoder.feed(sess, ids, head))
        for name, value in zip(names, values):
            x = value.reshape(-1, value.shape[-1]).astype(np.float64)
            totals[name] = totals.get(name, 0) + x.T @ x
        positions += ids.size
        if progress is not None:
            progress((index + 1) / len(windows))
    del sess
    for p in work.iterdir():
        p.unlink()
    return {name: (h / max(1, positions)).astype(np.float32) for name, h in totals.items()}


def output_error(weight: np.ndarray, quantized: np.ndarray, h: np.ndarray) -> float:
    """||X (W - Q)||^2 / ||X W||^2 on the calibration text: the share of the layer's output the quantization moves."""
    delta = weight - quantized
    num = float(((h @ delta) * delta).sum(dtype=np.float64))
    den = float(((h @ weight) * weight).sum(dtype=np.float64))
    return num / max(den, 1e-30)


def initializer(model: onnx.ModelProto, name: str) -> np.ndarray:
    return numpy_helper.to_array(next(i for i in model.graph.initializer if i.name == name))
