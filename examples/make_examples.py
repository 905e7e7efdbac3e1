"""Writes the quick start's example files (committed; rerun to regenerate, needs scikit-learn):

- model.onnx: an MLP classifier (64 -> 512 -> 512 -> 10) trained on scikit-learn's bundled
  handwritten digits (1,797 real 8x8 images), exported with torch.onnx.export.
- calib.npz:  the 1,297 training images (`x`, the model's input, pixels scaled to 0..1) and `labels`.
- eval.npz:   the other 500 images, held out, to judge the compressed model on.

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
HELD_OUT = 500


def main() -> None:
    from sklearn.datasets import load_digits

    digits = load_digits()
    x = (digits.data / 16.0).astype(np.float32)
    y = digits.target.astype(np.int64)
    order = np.random.default_rng(0).permutation(len(x))
    train, held = order[HELD_OUT:], order[:HELD_OUT]
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 512), torch.nn.ReLU(), torch.nn.Linear(512, 512), torch.nn.ReLU(), torch.nn.Linear(512, 10))
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3, weight_decay=1e-4)
    xt, yt = torch.from_numpy(x[train]), torch.from_numpy(y[train])
    for _ in range(60):
        for idx in torch.randperm(len(xt)).split(64):
            optimizer.zero_grad()
            torch.nn.functional.cross_entropy(model(xt[idx]), yt[idx]).backward()
            optimizer.step()
    model.eval()
    with torch.no_grad():
        accuracy = float((model(torch.from_numpy(x[held])).argmax(-1).numpy() == y[held]).mean())
    print(f"held-out accuracy {accuracy:.4f}")
    torch.onnx.export(model, (xt[:2],), HERE / "model.onnx", input_names=["x"], output_names=["logits"], dynamo=False,
                      opset_version=17, dynamic_axes={"x": {0: "batch"}, "logits": {0: "batch"}})
    np.savez(HERE / "calib.npz", x=x[train], labels=y[train])
    np.savez(HERE / "eval.npz", x=x[held], labels=y[held])


if __name__ == "__main__":
    main()
