"""A model with external data, uploaded as one .zip (what torch 2.13's default exporter writes:
`model.onnx` + `model.onnx.data`), checked, and turned into a single-file model when it fits in one
(protobuf caps a serialized model at 2 GB); a larger model keeps its external data and is stored and
served as a canonical .zip (`model.onnx` + its data files).

Runs inside the sandboxed check child (service.core.onnx_probe), never in the API process. Every
member must be a plain file with a plain relative name (no `..`, no absolute path, no directory
parts, no symlink or special file); there must be exactly one `.onnx`; every tensor's location must
name a member, and its offset and length must lie inside that member.
"""

from __future__ import annotations

import shutil
import stat
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

MAX_MEMBERS = 4096
# protobuf's hard limit for one serialized message: a single-file ONNX model must stay below it;
# larger models keep their weights in external data files.
SINGLE_FILE_LIMIT = 2 * 1024**3 - 1


class BundleRefused(Exception):
    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code, self.message = code, message


def is_zip(path: Path) -> bool:
    with open(path, "rb") as fh:
        return fh.read(4) == b"PK\x03\x04"


def looks_like_pytorch(zf: zipfile.ZipFile) -> bool:
    # torch.save / torch.export archives hold a pickle (data.pkl) and a version record.
    return any(n.endswith(("data.pkl", "/version", ".pkl")) or n == "version" for n in zf.namelist())


def check_member(info: zipfile.ZipInfo) -> None:
    name = info.filename
    # Unix file type bits, when the archiver recorded them (many leave them zero: a plain file).
    kind = stat.S_IFMT(info.external_attr >> 16)
    if kind and kind not in (stat.S_IFREG, stat.S_IFDIR):
        raise BundleRefused("unsafe_archive", f"archive member '{name}' is a link or special file; only plain files are accepted")
    if name.startswith(("/", "\\")) or "\\" in name or ".." in name.split("/") or ":" in name:
        raise BundleRefused("unsafe_archive", f"archive member '{name}' has an unsafe path; use plain file names")


@dataclass(frozen=True)
class Unpacked:
    graph: Path  # the .onnx to check and load, its data files beside it when `external`
    stored: Path  # what the store keeps: one self-contained .onnx, or a canonical .zip
    external: bool


def unpack(zip_path: Path, dest: Path, max_bytes: int) -> Path:
    """Check the archive and extract it into dest; returns the .onnx, every tensor's data checked to
    lie inside a data file beside it. The worker unpacks stored archives with the same checks."""
    import onnx
    from onnx.external_data_helper import ExternalDataInfo, _get_all_tensors

    try:
        zf = zipfile.ZipFile(zip_path)
    except zipfile.BadZipFile as exc:
        raise BundleRefused("invalid_model", "the upload is not a valid .zip archive") from exc
    with zf:
        if looks_like_pytorch(zf):
            raise BundleRefused(
                "unsupported_format",
                "PyTorch archives (.pt2/.pt) are not accepted: loading them unpickles objects, which can run code "
                "from the file. Export the model to ONNX and upload the .onnx (zip it with its .data file).",
            )
        members = [i for i in zf.infolist() if not i.is_dir()]
        if len(members) > MAX_MEMBERS:
            raise BundleRefused("unsafe_archive", f"the archive holds {len(members)} files; at most {MAX_MEMBERS}")
        for info in zf.infolist():
            check_member(info)
        # Members may sit in one top-level folder (zip -r model/); strip it.
        prefixes = {m.filename.split("/")[0] for m in members if "/" in m.filename}
        strip = f"{prefixes.pop()}/" if len(prefixes) == 1 and all("/" in m.filename for m in members) else ""
        flat = {m.filename[len(strip):]: m for m in members}
        if any("/" in name for name in flat):
            raise BundleRefused("unsafe_archive", "archive members must sit side by side (no nested folders)")
        graphs = [n for n in flat if n.endswith(".onnx")]
        if len(graphs) != 1:
            raise BundleRefused("invalid_model", f"the archive must hold exactly one .onnx file; it holds {len(graphs)}")
        total = sum(m.file_size for m in members)
        if total > max_bytes:
            raise BundleRefused("model_too_large", f"the archive unpacks to {total} bytes; the upload limit is {max_bytes}")
        dest.mkdir(parents=True)
        for name, info in flat.items():
            with zf.open(info) as src, open(dest / name, "wb") as dst:
                copied = 0
                while chunk := src.read(1 << 20):
                    copied += len(chunk)
                    if copied > info.file_size:  # the directory understated it: refuse, do not fill the disk
                        raise BundleRefused("unsafe_archive", f"archive member '{name}' is larger than its directory entry says")
                    dst.write(chunk)
    graph_path = dest / graphs[0]
    try:
        model = onnx.load_model(str(graph_path), load_external_data=False)
    except Exception as exc:
        raise BundleRefused("invalid_model", f"'{graphs[0]}' in the archive is not an ONNX model") from exc
    for tensor in _get_all_tensors(model):
        if tensor.data_location != onnx.TensorProto.EXTERNAL:
            continue
        try:
            external: Any = ExternalDataInfo(tensor)
        except ValueError as exc:  # onnx refuses negative or malformed offsets and lengths itself
            raise BundleRefused("invalid_model", f"tensor '{tensor.name}' lies outside its data file: {exc}") from exc
        location = external.location
        if location not in flat or location.endswith(".onnx"):
            raise BundleRefused("invalid_model", f"tensor '{tensor.name}' refers to '{location}', which is not a data file in the archive")
        size = (dest / location).stat().st_size
        end = (external.offset or 0) + (external.length if external.length is not None else 0)
        if (external.offset or 0) > size or end > size:
            raise BundleRefused("invalid_model", f"tensor '{tensor.name}' lies outside '{location}' (offset {external.offset}, length {external.length}, file {size} bytes)")
    return graph_path


def data_files(graph_path: Path) -> list[str]:
    """The data files a model's tensors refer to (names beside the .onnx)."""
    import onnx
    from onnx.external_data_helper import ExternalDataInfo, _get_all_tensors

    model = onnx.load_model(str(graph_path), load_external_data=False)
    external: Any = [ExternalDataInfo(t) for t in _get_all_tensors(model) if t.data_location == onnx.TensorProto.EXTERNAL]
    return sorted({e.location for e in external})


def pack(graph_path: Path, out: Path) -> Path:
    """A canonical archive of a model with external data: the graph as `model.onnx` and the data files
    it refers to, stored uncompressed (weights barely compress and are read back whole)."""
    with zipfile.ZipFile(out, "w", compression=zipfile.ZIP_STORED, allowZip64=True) as zf:
        zf.write(graph_path, "model.onnx")
        for name in data_files(graph_path):
            zf.write(graph_path.parent / name, name)
    return out


def internalize(zip_path: Path, work_dir: Path, max_bytes: int, single_file_limit: int = SINGLE_FILE_LIMIT) -> Unpacked:
    """Check the archive and extract it into work_dir. A model that fits one file is written as
    work_dir/model.onnx with its weights inside, so later stages see one self-contained file; a
    larger one (protobuf cannot hold it) stays with external data and is kept as a canonical zip."""
    import onnx
    from onnx.external_data_helper import load_external_data_for_model

    extracted = work_dir / "bundle"
    graph_path = unpack(zip_path, extracted, max_bytes)
    weights = sum((extracted / name).stat().st_size for name in data_files(graph_path))
    if graph_path.stat().st_size + weights > single_file_limit:
        return Unpacked(graph=graph_path, stored=pack(graph_path, work_dir / "model.zip"), external=True)
    model = onnx.load_model(str(graph_path), load_external_data=False)
    load_external_data_for_model(model, str(extracted))
    single = work_dir / "model.onnx"
    onnx.save_model(model, str(single))
    shutil.rmtree(extracted, ignore_errors=True)
    return Unpacked(graph=single, stored=single, external=False)
