"""Models kept as the store keeps them: one file under the single-file limit, a graph with its
weights in a data file beside it over it (protobuf cannot serialize a model over 2 GB), stored as a
canonical zip. The limit is lowered here so a small model takes the path a 2 GB one takes."""

from __future__ import annotations

import zipfile
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from service.core.errors import CompressionFailed
from service.core.onnx_bundle import internalize, pack
from tests.builders import mlp
from workers import model_files

X = np.random.default_rng(0).standard_normal((3, 64)).astype(np.float32)


def _run(model: onnx.ModelProto | Path) -> np.ndarray:
    source = str(model) if isinstance(model, Path) else model.SerializeToString()
    return ort.InferenceSession(source, providers=["CPUExecutionProvider"]).run(None, {"x": X})[0]


def test_under_the_limit_one_self_contained_file(tmp_path: Path) -> None:
    model = mlp(in_features=64, hidden=256)
    graph, stored = model_files.save(model, tmp_path / "out")
    assert graph == stored == tmp_path / "out" / "model.onnx" and sorted(p.name for p in graph.parent.iterdir()) == ["model.onnx"]
    assert not model_files.is_external(graph) and model_files.on_disk_bytes(graph) == graph.stat().st_size


def test_over_the_limit_weights_go_beside_the_graph_and_the_model_in_memory_keeps_them(tmp_path: Path) -> None:
    model = mlp(in_features=64, hidden=256)
    expected = _run(model)
    assert model_files.tensor_bytes(model) > 300_000
    graph, stored = model_files.save(model, tmp_path / "out", limit=100_000)
    assert stored.name == "model.zip" and model_files.is_external(graph)
    assert graph.stat().st_size < 10_000  # the graph alone; the weights are in model.onnx.data
    assert model_files.on_disk_bytes(graph) == graph.stat().st_size + (graph.parent / "model.onnx.data").stat().st_size
    with zipfile.ZipFile(stored) as zf:
        assert sorted(zf.namelist()) == ["model.onnx", "model.onnx.data"]
    np.testing.assert_array_equal(_run(graph), expected)
    # Saving moved the weights out and read them back: the caller's model is whole and self-contained.
    assert not any(t.data_location == onnx.TensorProto.EXTERNAL for t in model.graph.initializer)
    np.testing.assert_array_equal(_run(model), expected)

    # The worker gets it back from the stored zip with the upload's checks.
    local = model_files.local_graph(stored, tmp_path / "unpacked")
    np.testing.assert_array_equal(_run(onnx.load_model(str(local))), expected)
    assert model_files.local_graph(stored, tmp_path / "unpacked") == local  # asked again in the same job: the same files
    assert model_files.local_graph(graph.parent / "model.onnx", tmp_path / "unused") == graph.parent / "model.onnx"


def test_an_upload_over_the_limit_stays_external_and_a_small_one_becomes_one_file(tmp_path: Path) -> None:
    model = mlp(in_features=64, hidden=256)
    expected = _run(model)
    export = tmp_path / "export"
    export.mkdir()
    onnx.save_model(model, str(export / "net.onnx"), save_as_external_data=True, location="weights.bin", size_threshold=0)
    upload = pack(export / "net.onnx", tmp_path / "upload.zip")

    large = internalize(upload, tmp_path / "large", max_bytes=1 << 30, single_file_limit=100_000)
    assert large.external and large.stored.name == "model.zip"
    with zipfile.ZipFile(large.stored) as zf:
        assert sorted(zf.namelist()) == ["model.onnx", "weights.bin"]  # the data file keeps the name the graph gives it
    np.testing.assert_array_equal(_run(large.graph), expected)

    small = internalize(upload, tmp_path / "small", max_bytes=1 << 30)
    assert not small.external and small.stored == small.graph and not model_files.is_external(small.graph)
    np.testing.assert_array_equal(_run(small.graph), expected)


def test_a_stored_archive_is_unpacked_with_the_uploads_checks(tmp_path: Path) -> None:
    forged = tmp_path / "forged.zip"
    with zipfile.ZipFile(forged, "w") as zf:
        zf.writestr("model.onnx", mlp().SerializeToString())
        zf.writestr("../escape.data", b"x")
    with pytest.raises(CompressionFailed, match="unsafe path") as refused:
        model_files.local_graph(forged, tmp_path / "out")
    assert refused.value.code == "unsafe_archive"  # a specific code, never internal_error
    assert not (tmp_path / "escape.data").exists()
