"""Depth students of residual CNNs: identity-shortcut blocks found from the graph and dropped whole."""

from __future__ import annotations


import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from bench.architectures import build, export
from service.core.errors import InvalidInput
from workers.distillation.residual_depth import drop_residual_blocks, residual_blocks
from workers.distillation.transformer_depth import drop_in_graph
from workers.trainable.from_onnx import to_torch


@pytest.fixture(scope="module", params=["resnet", "mobilenet"])
def exported(request, tmp_path_factory) -> tuple[str, onnx.ModelProto]:
    path = export(request.param, "dynamo", tmp_path_factory.mktemp(request.param)).path
    return request.param, onnx.load(str(path))


def identity_shortcut_blocks(arch: str) -> int:
    """What the torch model says: blocks that add their input to their output unchanged."""
    module = build(arch)[0].model
    if arch == "mobilenet":
        return sum(bool(getattr(m, "use_residual", False)) for m in module.modules())
    return sum(type(m).__name__ == "ResNetBasicLayer" and isinstance(m.shortcut, torch.nn.Identity) for m in module.modules())


def test_blocks_found_are_the_identity_shortcut_ones(exported) -> None:
    arch, model = exported
    blocks = residual_blocks(to_torch(model))
    assert len(blocks) == identity_shortcut_blocks(arch) > 0
    assert all(layers for _, _, layers in blocks)


def test_a_dropped_block_passes_its_input_through(exported) -> None:
    arch, model = exported
    student = to_torch(model)
    names, aliases = drop_residual_blocks(student, 1)
    (block_output, block_input), = aliases.items()
    assert names[0].startswith("residual block")
    # In the ONNX graph the block's Add becomes its input; the graph still runs, one Add shorter, and
    # computes something else than the original (the block did something).
    dropped = drop_in_graph(model, aliases)
    x = np.random.default_rng(0).standard_normal((2, 3, 32, 32)).astype(np.float32)
    run = lambda m: ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"pixel_values": x})[0]  # noqa: E731
    before, after = run(model), run(dropped)
    assert after.shape == before.shape and not np.allclose(after, before)
    assert sum(n.op_type == "Add" for n in dropped.graph.node) == sum(n.op_type == "Add" for n in model.graph.node) - 1
    assert any(n.op_type == "Identity" and list(n.input) == [block_input] and list(n.output) == [block_output] for n in dropped.graph.node)
    # The converted student computes the same as the dropped graph.
    with torch.no_grad():
        mine = student(torch.from_numpy(x))
    np.testing.assert_allclose(mine.numpy(), after, rtol=1e-4, atol=1e-4)


def test_asking_for_more_blocks_than_there_are_is_refused(exported) -> None:
    _, model = exported
    student = to_torch(model)
    with pytest.raises(InvalidInput) as refused:
        drop_residual_blocks(student, len(residual_blocks(student)) + 1)
    assert refused.value.code == "invalid_student" and "identity shortcut" in refused.value.message
