"""Untrusted ONNX files are checked in a child process; every bad one gets a clear code."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from service.core.errors import InvalidInput
from service.core.onnx_probe import probe_onnx
from tests.builders import mlp, save

LIMITS = dict(timeout_s=60, memory_bytes=4 * 1024**3)


def test_valid_model_is_described(tmp_path: Path) -> None:
    info = probe_onnx(save(mlp(), tmp_path / "m.onnx"), **LIMITS)
    assert info["inputs"] == [{"name": "x", "dtype": "float32", "shape": ["N", 16]}]
    assert info["outputs"] == [{"name": "logits", "dtype": "float32", "shape": ["N", 4]}]
    assert info["parameters"] == 16 * 32 + 32 + 32 * 32 + 32 + 32 * 4 + 4
    assert info["opset"] == 17


@pytest.mark.parametrize(("content", "code"), [(b"", "invalid_model"), (b"\x08\x07garbage" * 100, "invalid_model")])
def test_not_onnx(tmp_path: Path, content: bytes, code: str) -> None:
    path = tmp_path / "m.onnx"
    path.write_bytes(content)
    with pytest.raises(InvalidInput) as info:
        probe_onnx(path, **LIMITS)
    assert info.value.code == code


def test_truncated_model(tmp_path: Path) -> None:
    path = tmp_path / "m.onnx"
    path.write_bytes(mlp().SerializeToString()[:700])
    with pytest.raises(InvalidInput) as info:
        probe_onnx(path, **LIMITS)
    assert info.value.code == "invalid_model"


def test_external_data_reference_is_refused(tmp_path: Path) -> None:
    from onnx.external_data_helper import set_external_data

    model = mlp()
    tensor = model.graph.initializer[0]
    set_external_data(tensor, location="../../etc/passwd")  # a hostile path: must never be opened
    tensor.ClearField("raw_data")
    tensor.ClearField("float_data")
    tensor.data_location = onnx.TensorProto.EXTERNAL
    (tmp_path / "m.onnx").write_bytes(model.SerializeToString())
    with pytest.raises(InvalidInput) as info:
        probe_onnx(tmp_path / "m.onnx", **LIMITS)
    assert info.value.code == "external_data_not_supported"


def test_model_the_checker_rejects(tmp_path: Path) -> None:
    node = helper.make_node("NoSuchOp", ["x"], ["y"])
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])], [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])])
    save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), tmp_path / "m.onnx")
    with pytest.raises(InvalidInput) as info:
        probe_onnx(tmp_path / "m.onnx", **LIMITS)
    assert info.value.code == "invalid_model"


def test_model_that_fails_at_run_time(tmp_path: Path) -> None:
    # Valid to the checker, but the Reshape target cannot hold the input: ONNX Runtime fails when run.
    shape = numpy_helper.from_array(np.array([7, 5], np.int64), "shape")
    node = helper.make_node("Reshape", ["x", "shape"], ["y"])
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3])], [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], [shape])
    save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=9), tmp_path / "m.onnx")
    with pytest.raises(InvalidInput) as info:
        probe_onnx(tmp_path / "m.onnx", **LIMITS)
    assert info.value.code in ("model_not_runnable", "invalid_model")


def test_memory_hungry_model_fails_without_harming_the_caller(tmp_path: Path) -> None:
    # A 64 MB initializer under a 300 MB address-space limit (python + onnxruntime need most of it).
    big = numpy_helper.from_array(np.zeros((4096, 4096), np.float32), "w")
    node = helper.make_node("MatMul", ["x", "w"], ["y"])
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4096])], [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4096])], [big])
    save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=9), tmp_path / "m.onnx")
    with pytest.raises(InvalidInput) as info:
        probe_onnx(tmp_path / "m.onnx", timeout_s=60, memory_bytes=300 * 1024**2)
    assert info.value.code in ("model_too_large", "model_crashed", "model_not_runnable", "invalid_model")


def test_pytorch_archives_are_refused_without_loading(tmp_path: Path) -> None:
    import torch

    program = torch.export.export(torch.nn.Linear(4, 2), (torch.zeros(1, 4),))
    torch.export.save(program, tmp_path / "model.pt2")
    with pytest.raises(InvalidInput) as info:
        probe_onnx(tmp_path / "model.pt2", **LIMITS)
    assert info.value.code == "unsupported_format" and "unpickles" in info.value.message


def _zipped_external(tmp_path: Path, name: str, rows: int, bad_graph: bool = False) -> Path:
    """A real MatMul model whose all-zero weight ([rows, 256] float32) lies in external data, zipped as
    torch.onnx.export's default output is uploaded: compressible to almost nothing."""
    import zipfile

    import numpy as np
    from onnx import TensorProto, helper, numpy_helper

    folder = tmp_path / f"{name}-src"
    folder.mkdir()
    weight = numpy_helper.from_array(np.zeros((rows, 256), np.float32), "w")
    node = helper.make_node("NoSuchOp" if bad_graph else "MatMul", ["x", "w"], ["y"])
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", rows])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 256])], [weight])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=9)
    onnx.save_model(model, str(folder / "model.onnx"), save_as_external_data=True, location="model.onnx.data", size_threshold=0)
    archive = tmp_path / "uploads" / f"{name}.zip"
    archive.parent.mkdir(exist_ok=True)
    with zipfile.ZipFile(archive, "w", zipfile.ZIP_DEFLATED) as out:
        for member in ("model.onnx", "model.onnx.data"):
            out.write(folder / member, member)
    return archive


def test_an_unpacked_archive_is_removed_whatever_the_checks_outcome(tmp_path: Path) -> None:
    uploads = tmp_path / "uploads"
    rejected = _zipped_external(tmp_path, "rejected", 64, bad_graph=True)  # unpacks, then the checker refuses it
    with pytest.raises(InvalidInput):
        probe_onnx(rejected, timeout_s=60, memory_bytes=2 * 1024**3)
    bomb = _zipped_external(tmp_path, "bomb", 256 * 1024)  # 256 MiB of zeros in a zip of a few hundred KB
    assert bomb.stat().st_size < 2 * 1024**2
    for _ in range(3):
        with pytest.raises(InvalidInput) as refused:  # too large for the memory the check may use
            probe_onnx(bomb, timeout_s=60, memory_bytes=700 * 1024**2)
        assert refused.value.code == "model_too_large"
    assert sorted(p.name for p in uploads.iterdir()) == ["bomb.zip", "rejected.zip"]  # no unpacked folder left behind


def test_an_honest_model_with_compressible_weights_is_accepted(tmp_path: Path) -> None:
    # Memory is sized from what the archive unpacks to, not from the zip's few hundred KB.
    archive = _zipped_external(tmp_path, "zeros", 96 * 1024)  # 96 MiB of zero weights
    description = probe_onnx(archive, timeout_s=120, memory_bytes=4 * 1024**3)
    assert description["inputs"][0]["shape"] == ["N", 96 * 1024] and Path(description["stored_file"]).is_file()


def test_an_archive_whose_header_declares_more_than_the_limit_is_refused_before_unpacking(tmp_path: Path) -> None:
    archive = _zipped_external(tmp_path, "declared", 64 * 1024)  # 64 MiB of zeros, honestly declared
    with pytest.raises(InvalidInput) as refused:
        probe_onnx(archive, timeout_s=60, memory_bytes=2 * 1024**3, max_unpacked_bytes=32 * 1024**2)
    assert refused.value.code == "model_too_large" and "0.06 GiB" in refused.value.message
    assert [p.name for p in archive.parent.iterdir()] == ["declared.zip"]  # no folder was made for it
