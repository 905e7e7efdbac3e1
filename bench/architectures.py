"""Real architectures exported the way users export them: Hugging Face transformers BERT (encoder,
MiniLM's class), GPT-2 (causal LM), ViT and ResNet classifiers, through torch's TorchScript exporter
(opset 17) or its default dynamo exporter (opset 18+), with dynamic batch (and sequence) axes.

`tiny=True` gives tiny configurations of the same classes (what CI runs); the benchmarks use real
sizes. Each export comes with a dataset (.npz arrays named after the inputs) drawn like real data:
token ids within the vocabulary with padded attention masks, or images.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from pathlib import Path

import numpy as np

ARCHITECTURES = ("bert", "gpt2", "vit", "resnet", "mobilenet")
EXPORTERS = ("torchscript", "dynamo")
TOKEN_MODELS = ("bert", "gpt2")


@dataclass
class Export:
    name: str
    path: Path
    inputs: list[str]
    vocab: int | None = None


def build(arch: str, tiny: bool = True):
    """(torch module returning one tensor, example inputs, input names, vocabulary size)."""
    import torch
    from transformers import (BertConfig, BertModel, GPT2Config, GPT2LMHeadModel, MobileNetV2Config, MobileNetV2ForImageClassification,
                              ResNetConfig, ResNetForImageClassification, ViTConfig, ViTForImageClassification)

    torch.manual_seed(0)
    if arch == "bert":
        config = BertConfig(vocab_size=200, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                            max_position_embeddings=128) if tiny else BertConfig(vocab_size=30522, hidden_size=384, num_hidden_layers=6,
                                                                                 num_attention_heads=12, intermediate_size=1536)
        model, kind = BertModel(config), "hidden"
    elif arch == "gpt2":
        config = GPT2Config(vocab_size=200, n_embd=32, n_layer=2, n_head=2, n_positions=128) if tiny else GPT2Config(n_layer=2)
        model, kind = GPT2LMHeadModel(config), "logits"
    elif arch == "vit":
        config = ViTConfig(image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                           num_labels=10) if tiny else ViTConfig(image_size=224, patch_size=16, hidden_size=192, num_hidden_layers=12,
                                                                 num_attention_heads=3, intermediate_size=768, num_labels=1000)
        model, kind = ViTForImageClassification(config), "logits"
    elif arch == "resnet":
        config = ResNetConfig(embedding_size=16, hidden_sizes=[16, 32], depths=[1, 1], layer_type="basic", num_labels=10) if tiny \
            else ResNetConfig(embedding_size=64, hidden_sizes=[64, 128, 256, 512], depths=[2, 2, 2, 2], layer_type="basic", num_labels=1000)
        model, kind = ResNetForImageClassification(config), "logits"
    elif arch == "mobilenet":
        # Inverted residuals: depthwise convolutions between 1x1 expansions (torchvision's MobileNetV2 in transformers' classes).
        config = MobileNetV2Config(image_size=32, depth_multiplier=0.25, min_depth=8, num_labels=10) if tiny \
            else MobileNetV2Config(image_size=224, num_labels=1000)
        model, kind = MobileNetV2ForImageClassification(config), "logits"
        # Freshly initialised, its outputs are ~1e-27 (each block shrinks the activations while the batch
        # norms still hold their initial statistics): every fidelity measure would compare noise. Running
        # the batch norms over images first gives the activation scale a trained model has.
        model.train()
        with torch.no_grad():
            for _ in range(4):
                model(pixel_values=torch.randn(32, 3, config.image_size, config.image_size))
    else:
        raise ValueError(arch)

    class Wrapped(torch.nn.Module):
        # One tensor out, named inputs in: what a user's export wrapper does.
        def __init__(self) -> None:
            super().__init__()
            self.model = model.eval()

        def forward(self, *args: torch.Tensor) -> torch.Tensor:
            if arch in TOKEN_MODELS:
                out = self.model(input_ids=args[0], attention_mask=args[1])
            else:
                out = self.model(pixel_values=args[0])
            return out.last_hidden_state if kind == "hidden" else out.logits

    if arch in TOKEN_MODELS:
        return Wrapped(), (torch.randint(0, config.vocab_size, (2, 16)), torch.ones(2, 16, dtype=torch.long)), ["input_ids", "attention_mask"], config.vocab_size
    size = config.image_size if arch in ("vit", "mobilenet") else (32 if tiny else 224)
    return Wrapped(), (torch.randn(2, 3, size, size),), ["pixel_values"], None


def export(arch: str, exporter: str, directory: Path, tiny: bool = True, dynamic: bool = True) -> Export:
    """With `dynamic=False`, exported as torch does without `dynamic_shapes` / `dynamic_axes`: the
    example's batch (2) and sequence (16) fixed in the graph, as a large share of real uploads are."""
    import torch

    module, example, names, vocab = build(arch, tiny)
    path = directory / f"{arch}-{exporter}{'' if dynamic else '-fixed'}.onnx"
    token = arch in TOKEN_MODELS
    if not dynamic:
        options = {"dynamo": True, "external_data": False} if exporter == "dynamo" else {"dynamo": False, "opset_version": 17}
        torch.onnx.export(module, example, path, input_names=names, output_names=["output"], **options)
    elif exporter == "dynamo":
        batch = torch.export.Dim("batch")
        seq = torch.export.Dim("seq", min=2, max=128)
        shapes = tuple({0: batch, 1: seq} if token else {0: batch} for _ in names)
        torch.onnx.export(module, example, path, input_names=names, output_names=["output"], dynamo=True,
                          external_data=False, dynamic_shapes=(shapes,))
    else:
        axes = {n: ({0: "batch", 1: "sequence"} if token else {0: "batch"}) for n in names}
        torch.onnx.export(module, example, path, input_names=names, output_names=["output"], dynamo=False,
                          opset_version=17, dynamic_axes=axes)
    return Export(f"{arch}-{exporter}", path, names, vocab)


def dataset(exp: Export, samples: int, seed: int = 0, seq: int = 32, image: int = 32) -> bytes:
    """Token ids within the vocabulary with right-padded masks (lengths vary), or images."""
    rng = np.random.default_rng(seed)
    if exp.vocab:
        ids = rng.integers(1, exp.vocab, (samples, seq)).astype(np.int64)
        lengths = rng.integers(seq // 2, seq + 1, samples)
        mask = (np.arange(seq)[None, :] < lengths[:, None]).astype(np.int64)
        arrays = {"input_ids": ids * mask, "attention_mask": mask}
    else:
        arrays = {"pixel_values": rng.standard_normal((samples, 3, image, image)).astype(np.float32)}
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    return buf.getvalue()
