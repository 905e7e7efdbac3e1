"""Models with external data (torch 2.13's default export: model.onnx + model.onnx.data) upload as one
.zip, are checked member by member in the sandbox, and are stored as one self-contained file."""

from __future__ import annotations

import io
import stat
import zipfile
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from service.client import external_data_files
from tests.builders import mlp


def _default_export(directory: Path) -> Path:
    """What a user gets from torch.onnx.export(model, args, "model.onnx") with torch 2.13's defaults."""
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(64, 256), torch.nn.ReLU(), torch.nn.Linear(256, 10)).eval()
    path = directory / "model.onnx"
    torch.onnx.export(net, (torch.randn(2, 64),), path, input_names=["x"], dynamic_shapes=({0: torch.export.Dim("batch")},))
    assert (directory / "model.onnx.data").exists(), "the default exporter no longer writes external data"
    return path


def _zip(members: dict[str, bytes], symlink: str | None = None) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        for name, data in members.items():
            zf.writestr(name, data)
        if symlink:
            info = zipfile.ZipInfo(symlink)
            info.external_attr = (stat.S_IFLNK | 0o777) << 16
            zf.writestr(info, "/etc/passwd")
    return buf.getvalue()


def test_a_default_torch_export_uploads_as_a_zip_and_is_stored_as_one_file(client, tmp_path: Path) -> None:
    path = _default_export(tmp_path)
    assert external_data_files(path) == ["model.onnx.data"]
    bundle = _zip({"model.onnx": path.read_bytes(), "model.onnx.data": (tmp_path / "model.onnx.data").read_bytes()})
    response = client.post("/v1/models", files={"file": ("model.zip", bundle)})
    assert response.status_code == 201, response.text
    body = response.json()
    assert body["parameters"] == 64 * 256 + 256 + 256 * 10 + 10
    assert body["inputs"][0]["name"] == "x" and isinstance(body["inputs"][0]["shape"][0], str)
    stored = next(client.app.state.store.root.glob(f"models/*/{body['id']}/model.onnx"))
    assert body["size_bytes"] == stored.stat().st_size and list(stored.parent.iterdir()) == [stored]
    model = onnx.load(str(stored))
    assert not any(t.data_location == onnx.TensorProto.EXTERNAL for t in model.graph.initializer)
    x = np.random.default_rng(0).standard_normal((3, 64)).astype(np.float32)
    expected = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    np.testing.assert_allclose(ort.InferenceSession(str(stored), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0], expected, rtol=1e-6)
    assert list(client.app.state.store.temp_dir().iterdir()) == []  # nothing left behind


def _external(tmp_path: Path) -> tuple[bytes, bytes]:
    path = _default_export(tmp_path)
    return path.read_bytes(), (tmp_path / "model.onnx.data").read_bytes()


def _with_offset(graph: bytes, offset: int) -> bytes:
    """The graph with its last external tensor's offset rewritten (a hand-edited or hostile file)."""
    model = onnx.load_from_string(graph)
    tensor = [t for t in model.graph.initializer if t.data_location == onnx.TensorProto.EXTERNAL][-1]
    entry = next(e for e in tensor.external_data if e.key == "offset") if any(e.key == "offset" for e in tensor.external_data) else tensor.external_data.add()
    entry.key, entry.value = "offset", str(offset)
    return model.SerializeToString()


@pytest.mark.parametrize("case, code, words", [
    ("traversal", "unsafe_archive", "unsafe path"),
    ("symlink", "unsafe_archive", "link or special file"),
    ("missing-data", "invalid_model", "not a data file in the archive"),
    ("short-data", "invalid_model", "lies outside"),
    ("two-graphs", "invalid_model", "exactly one .onnx"),
    ("negative-offset", "invalid_model", "lies outside"),
    ("pytorch", "unsupported_format", "PyTorch archives"),
])
def test_unsafe_or_inconsistent_archives_are_refused(client, tmp_path: Path, case: str, code: str, words: str) -> None:
    graph, data = _external(tmp_path)
    members = {
        "traversal": {"model.onnx": graph, "../model.onnx.data": data},
        "symlink": {"model.onnx": graph},
        "missing-data": {"model.onnx": graph},
        "short-data": {"model.onnx": graph, "model.onnx.data": data[: len(data) // 2]},
        "two-graphs": {"model.onnx": graph, "other.onnx": graph, "model.onnx.data": data},
        "negative-offset": {"model.onnx": _with_offset(graph, -64), "model.onnx.data": data},
        "pytorch": {"archive/data.pkl": b"\x80\x04N.", "archive/version": b"3"},
    }[case]
    response = client.post("/v1/models", files={"file": ("m.zip", _zip(members, symlink="model.onnx.data" if case == "symlink" else None))})
    assert response.status_code == 422, response.text
    assert response.json()["error"]["code"] == code and words in response.json()["error"]["message"]
    assert list(client.app.state.store.temp_dir().iterdir()) == []


def test_a_single_file_model_still_uploads_as_before(client) -> None:
    response = client.post("/v1/models", files={"file": ("m.onnx", mlp().SerializeToString())})
    assert response.status_code == 201


def _zero_weight_zip(path: Path, data_bytes: int) -> Path:
    """An honest zip of a MatMul model whose all-zero float weight (`data_bytes` of it) is external
    data: a few hundred KB per GiB. Written in chunks, so the test never holds the GiB itself."""
    rows = data_bytes // (256 * 4)
    weight = onnx.TensorProto(name="w", dims=[rows, 256], data_type=onnx.TensorProto.FLOAT, data_location=onnx.TensorProto.EXTERNAL)
    for key, value in (("location", "model.onnx.data"), ("offset", "0"), ("length", str(rows * 256 * 4))):
        weight.external_data.add(key=key, value=value)
    graph = onnx.helper.make_graph([onnx.helper.make_node("MatMul", ["x", "w"], ["y"])], "g",
                                   [onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, ["N", rows])],
                                   [onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, ["N", 256])], [weight])
    model = onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 17)], ir_version=9)
    chunk = bytes(16 * 1024**2)
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED, compresslevel=1) as archive:
        archive.writestr("model.onnx", model.SerializeToString())
        with archive.open("model.onnx.data", "w", force_zip64=True) as data:
            for _ in range(rows * 256 * 4 // len(chunk)):
                data.write(chunk)
    return path


def test_a_one_gib_zip_bomb_sent_five_times_leaves_nothing_under_the_data_dir(tmp_path: Path) -> None:
    """The red team's 1 MB zip of 1 GiB of zeros, refused because checking it would take more memory
    than the operator allows: each refusal removed its upload and its unpacked folder (before, every
    request left 1 GiB under the incoming folder until a restart)."""
    from tests.conftest import authed_client, fast_settings

    bomb = _zero_weight_zip(tmp_path / "bomb.zip", 1024**3)
    assert bomb.stat().st_size < 8 * 1024**2
    settings = fast_settings(tmp_path / "data", probe_memory_bytes=768 * 1024**2)
    with authed_client(settings) as client:
        for _ in range(5):
            with bomb.open("rb") as body:
                response = client.post("/v1/models", files={"file": ("bomb.zip", body)})
            assert response.status_code == 422 and response.json()["error"]["code"] == "model_too_large", response.text
        left = [p for p in (tmp_path / "data").rglob("*") if p.is_file() and p.stat().st_size > 1024**2]
        assert left == [], left  # only the database and the keys remain
        assert list(client.app.state.store.temp_dir().iterdir()) == []
        # The same model under the limits (64 MiB of zero weights) is an honest model and is accepted.
        honest = client.post("/v1/models", files={"file": ("zeros.zip", _zero_weight_zip(tmp_path / "zeros.zip", 64 * 1024**2).read_bytes())})
        assert honest.status_code == 201, honest.text
