"""Models on disk the way the store keeps them: one self-contained .onnx, or, over protobuf's 2 GB
limit, a .zip of `model.onnx` and its external data (service.core.onnx_bundle).

A ModelProto over 2 GB can be held and edited in memory but never serialized whole (SerializeToString,
ByteSize and onnx.shape_inference all raise), so such a model is loaded from, and saved to, a folder
with its weights in a data file beside the graph; ONNX Runtime and onnx.checker read that by path.
"""

from __future__ import annotations

from pathlib import Path

import onnx
from google.protobuf.message import EncodeError
from onnx.external_data_helper import _get_all_tensors, load_external_data_for_model

from service.core.errors import CompressionFailed
from service.core.onnx_bundle import SINGLE_FILE_LIMIT, BundleRefused, data_files, is_zip, pack, unpack

# Tensors this small stay inside the graph file (shapes, scalars); bigger ones go to the data file.
EXTERNAL_THRESHOLD = 1024


def local_graph(stored: Path, work_dir: Path) -> Path:
    """The .onnx to load for a stored model: the file itself, or its archive unpacked into work_dir
    (with the checks the upload passed: the store is shared, and a member is read back as written)."""
    if not is_zip(stored):
        return stored
    if work_dir.is_dir():  # unpacked already in this job (a student two steps refer to)
        return next(work_dir.glob("*.onnx"))
    try:
        return unpack(stored, work_dir, max_bytes=4 * stored.stat().st_size + (1 << 20))
    except BundleRefused as exc:  # a stored archive altered since its upload: the job fails with the check's own code
        raise CompressionFailed(f"the stored model archive fails its checks: {exc.message}", code=exc.code) from exc


def on_disk_bytes(graph: Path) -> int:
    """What the model takes on disk: the graph file plus the data files it refers to."""
    return graph.stat().st_size + sum((graph.parent / name).stat().st_size for name in data_files(graph))


def tensor_bytes(model: onnx.ModelProto) -> int:
    """The weights' bytes, counted without serializing (which a model over 2 GB cannot be)."""
    total = 0
    for t in _get_all_tensors(model):
        if t.HasField("raw_data"):
            total += len(t.raw_data)
        else:
            total += 8 * (len(t.float_data) + len(t.int32_data) + len(t.int64_data) + len(t.double_data) + len(t.uint64_data))
    return total


def save_to(model: onnx.ModelProto, path: Path, limit: int = SINGLE_FILE_LIMIT) -> bool:
    """Write the model at `path`: one self-contained file under `limit`, else with its weights in
    `<name>.data` beside it (returns True then). The in-memory model is left as it was (onnx moves
    the weights out while saving; they are read back in)."""
    if tensor_bytes(model) < limit:
        try:
            serialized = model.SerializeToString()
            if len(serialized) <= limit:
                path.write_bytes(serialized)
                return False
        except (EncodeError, ValueError):  # the graph itself pushed it over protobuf's limit
            pass
    onnx.save_model(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True, location=f"{path.name}.data",
                    size_threshold=EXTERNAL_THRESHOLD, convert_attribute=True)
    load_external_data_for_model(model, str(path.parent))
    return True


def save(model: onnx.ModelProto, directory: Path, limit: int = SINGLE_FILE_LIMIT) -> tuple[Path, Path]:
    """Write the model as directory/model.onnx; returns (the .onnx to load and measure, the file to
    store): the same file, or model.zip (model.onnx + model.onnx.data) over `limit`."""
    directory.mkdir(parents=True, exist_ok=True)
    graph = directory / "model.onnx"
    if not save_to(model, graph, limit):
        return graph, graph
    return graph, pack(graph, directory / "model.zip")


def is_external(graph: Path) -> bool:
    return bool(data_files(graph))
