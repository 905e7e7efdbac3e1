"""Real MNIST (../shared/data/mnist, idx format, gzip) and LeNet-300-100 trained on it, for tests and benchmarks."""

from __future__ import annotations

import gzip
import io
from functools import lru_cache
from pathlib import Path

import numpy as np

MNIST_DIR = Path(__file__).resolve().parents[2] / "shared" / "data" / "mnist"


def available() -> bool:
    return (MNIST_DIR / "train-images.idx3-ubyte.gz").exists()


def _idx(path: Path) -> np.ndarray:
    with gzip.open(path, "rb") as fh:
        data = fh.read()
    dims = data[3]
    shape = [int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(dims)]
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * dims).reshape(shape)


@lru_cache(maxsize=2)
def load(split: str) -> tuple[np.ndarray, np.ndarray]:
    """(images as float32 [N, 784] scaled to 0..1, labels int64)."""
    prefix = "train" if split == "train" else "t10k"
    images = _idx(MNIST_DIR / f"{prefix}-images.idx3-ubyte.gz").reshape(-1, 784).astype(np.float32) / 255.0
    labels = _idx(MNIST_DIR / f"{prefix}-labels.idx1-ubyte.gz").astype(np.int64)
    return images, labels


def fit(model, x, y, epochs: int, lr: float = 1e-3, batch: int = 128, seed: int = 0):
    """Adam on shuffled mini-batches with cross-entropy; returns the model in eval mode."""
    import torch
    from torch import nn

    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    generator = torch.Generator().manual_seed(seed)
    for _ in range(epochs):
        model.train()
        order = torch.randperm(len(x), generator=generator)
        for start in range(0, len(x), batch):
            idx = order[start:start + batch]
            loss = nn.functional.cross_entropy(model(x[idx]), y[idx])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    return model.eval()


def lenet_300_100(epochs: int = 4, seed: int = 0, dynamo: bool = False) -> bytes:
    """Train LeNet-300-100 (784-300-100-10, ReLU) on the training split; return it as ONNX bytes."""
    import torch
    from torch import nn

    torch.manual_seed(seed)
    x, y = (torch.from_numpy(a) for a in load("train"))
    model = nn.Sequential(nn.Linear(784, 300), nn.ReLU(), nn.Linear(300, 100), nn.ReLU(), nn.Linear(100, 10))
    return export(fit(model, x, y, epochs, seed=seed), torch.zeros(2, 784), dynamo)


def lenet_5(epochs: int = 3, seed: int = 0) -> bytes:
    """Train Caffe's LeNet-5 (conv 20 -> pool -> conv 50 -> pool -> fc 500 -> fc 10); return ONNX bytes."""
    import torch
    from torch import nn

    torch.manual_seed(seed)
    x, y = load("train")
    x, y = torch.from_numpy(x.reshape(-1, 1, 28, 28)), torch.from_numpy(y)
    model = nn.Sequential(
        nn.Conv2d(1, 20, 5), nn.MaxPool2d(2), nn.Conv2d(20, 50, 5), nn.MaxPool2d(2), nn.Flatten(),
        nn.Linear(800, 500), nn.ReLU(), nn.Linear(500, 10),
    )
    return export(fit(model, x, y, epochs, seed=seed), torch.zeros(2, 1, 28, 28))


def export(model, example, dynamo: bool = False) -> bytes:
    import torch

    buffer = io.BytesIO()
    if dynamo:
        program = torch.onnx.export(model, (example,), dynamo=True, input_names=["x"], output_names=["logits"],
                                    dynamic_shapes=({0: torch.export.Dim("batch")},), external_data=False)
        program.save(buffer, external_data=False) if hasattr(program, "save") else None
        return program.model_proto.SerializeToString()
    torch.onnx.export(model, (example,), buffer, dynamo=False, opset_version=17, input_names=["x"], output_names=["logits"],
                      dynamic_axes={"x": {0: "N"}, "logits": {0: "N"}})
    return buffer.getvalue()


def npz(images: np.ndarray, labels: np.ndarray | None) -> bytes:
    buffer = io.BytesIO()
    arrays = {"x": images}
    if labels is not None:
        arrays["labels"] = labels
    np.savez(buffer, **arrays)
    return buffer.getvalue()


def write_files(work: Path, lenet_epochs: int = 4, unlabelled: bool = False) -> dict[str, Path]:
    """LeNet-300-100 as ONNX plus the train/test splits as .npz files, for the HTTP benchmarks."""
    train_x, train_y = load("train")
    test_x, test_y = load("test")
    paths = {"lenet": work / "lenet.onnx", "train": work / "train.npz", "test": work / "test.npz"}
    paths["lenet"].write_bytes(lenet_300_100(epochs=lenet_epochs))
    paths["train"].write_bytes(npz(train_x, train_y))
    paths["test"].write_bytes(npz(test_x, test_y))
    if unlabelled:
        paths["train_unlabelled"] = work / "train_unlabelled.npz"
        paths["train_unlabelled"].write_bytes(npz(train_x, None))
    return paths
