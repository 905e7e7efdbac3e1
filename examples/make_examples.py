"""Writes the quick start's example files (committed; rerun to regenerate):

- model.onnx: a small MLP classifier (64 -> 128 -> 128 -> 10) exported with torch.onnx.export.
- calib.npz:  256 samples for it, an `x` array (the model's input) and integer `labels`.

Your own files look the same: export with either exporter, e.g.

    torch.onnx.export(model, (x,), "model.onnx", input_names=["x"], dynamo=False, opset_version=17,
                      dynamic_axes={"x": {0: "batch"}})
    torch.onnx.export(model, (x,), "model.onnx", input_names=["x"],            # the default exporter
                      dynamic_shapes=({0: torch.export.Dim("batch")},))       # -> model.onnx + model.onnx.data

and write one array per model input (samples on axis 0), plus optional labels:

    np.savez("calib.npz", x=inputs.astype(np.float32), labels=labels.astype(np.int64))
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

HERE = Path(__file__).resolve().parent


def main() -> None:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 128), torch.nn.ReLU(), torch.nn.Linear(128, 128), torch.nn.ReLU(), torch.nn.Linear(128, 10)).eval()
    x = torch.randn(256, 64)
    torch.onnx.export(model, (x[:2],), HERE / "model.onnx", input_names=["x"], output_names=["logits"], dynamo=False,
                      opset_version=17, dynamic_axes={"x": {0: "batch"}, "logits": {0: "batch"}})
    with torch.no_grad():
        labels = model(x).argmax(-1)
    np.savez(HERE / "calib.npz", x=x.numpy(), labels=labels.numpy().astype(np.int64))


if __name__ == "__main__":
    main()
