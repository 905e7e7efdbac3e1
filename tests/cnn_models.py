"""A small residual CNN with batch norm (torch), trained briefly on MNIST downsampled to 14x14."""

from __future__ import annotations

import torch
from torch import nn


class ResidualCNN(nn.Module):
    def __init__(self, width: int = 16, classes: int = 10) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(1, width, 3, padding=1, bias=False), nn.BatchNorm2d(width), nn.ReLU())
        self.block = nn.Sequential(
            nn.Conv2d(width, width, 3, padding=1, bias=False), nn.BatchNorm2d(width), nn.ReLU(),
            nn.Conv2d(width, width, 3, padding=1, bias=False), nn.BatchNorm2d(width),
        )
        self.down = nn.Sequential(nn.Conv2d(width, 2 * width, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(2 * width), nn.ReLU())
        self.fc = nn.Linear(2 * width * 7 * 7, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        x = torch.relu(x + self.block(x))  # residual add: both branches must keep the same channels
        x = self.down(x)
        return self.fc(torch.flatten(x, 1))


def downsample(images):
    """[N, 784] MNIST -> [N, 1, 14, 14] by 2x2 average pooling (4x less compute for the tests)."""
    return images.reshape(-1, 1, 14, 2, 14, 2).mean((3, 5)).astype("float32")


def train_residual_cnn(images, labels, epochs: int = 2, seed: int = 0) -> ResidualCNN:
    from tests.mnist import fit

    torch.manual_seed(seed)
    return fit(ResidualCNN(), torch.from_numpy(images), torch.from_numpy(labels), epochs, lr=3e-3, batch=64, seed=seed)


def write_residual_cnn_files(work, train_x, train_y, test_x, test_y) -> tuple:
    """For the MNIST benchmarks: a residual CNN trained on 8,000 downsampled training images, exported
    to ONNX (TorchScript exporter, dynamic batch), and the downsampled train/test splits as .npz."""
    import io

    from tests import mnist

    net = train_residual_cnn(downsample(train_x[:8000]), train_y[:8000])
    buffer = io.BytesIO()
    torch.onnx.export(net, (torch.zeros(2, 1, 14, 14),), buffer, dynamo=False, opset_version=17, do_constant_folding=False,
                      input_names=["x"], output_names=["logits"], dynamic_axes={"x": {0: "N"}, "logits": {0: "N"}})
    paths = (work / "rescnn.onnx", work / "train14.npz", work / "test14.npz")
    paths[0].write_bytes(buffer.getvalue())
    paths[1].write_bytes(mnist.npz(downsample(train_x[:8000]), train_y[:8000]))
    paths[2].write_bytes(mnist.npz(downsample(test_x), test_y))
    return paths
