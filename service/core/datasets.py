"""Validation of uploaded .npz datasets, without ever unpickling anything.

Limits are checked from the zip directory and each member's .npy header *before* any array is
decompressed, so a zip bomb or a huge declared shape is refused without allocating it.
"""

from __future__ import annotations

import math
import zipfile
from pathlib import Path
from typing import Any

import numpy as np

from service.core.errors import InvalidInput

LABELS = "labels"


def _member_header(zf: zipfile.ZipFile, info: zipfile.ZipInfo) -> tuple[tuple[int, ...], np.dtype]:
    """The member's shape and dtype, after checking that its data is exactly what the header declares."""
    name = info.filename
    with zf.open(info) as fh:
        try:
            version = np.lib.format.read_magic(fh)
            read_header = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
            shape, _fortran, dtype = read_header(fh, max_header_size=10000)
            header_bytes = fh.tell()
        except Exception as exc:
            raise InvalidInput(f"dataset member '{name}' is not a valid .npy array") from exc
    if dtype.hasobject:  # before any size arithmetic: a pickled payload has no meaningful size
        raise InvalidInput(f"array '{name[:-4]}' has an object dtype; only numeric arrays are accepted (no pickles)")
    if any(not isinstance(d, int) or d < 0 for d in shape):
        raise InvalidInput(f"dataset member '{name}' declares an invalid shape {shape}")
    # Python integers: a shape whose product overflows int64 must not wrap around to something small.
    declared = math.prod(shape) * dtype.itemsize
    # The zip directory's size is what reading the member will ever yield: it must match the header,
    # so a member cannot inflate past its declared shape (nor stop short of it).
    if info.file_size != header_bytes + declared:
        raise InvalidInput(
            f"dataset member '{name}' holds {info.file_size - header_bytes} bytes of data but its header declares "
            f"{declared} (shape {list(shape)}, {dtype}); the file is truncated or corrupt"
        )
    return tuple(int(d) for d in shape), dtype


CHUNK_BYTES = 16 * 1024 * 1024


def _all_finite(zf: zipfile.ZipFile, info: zipfile.ZipInfo, dtype: np.dtype) -> bool:
    """Scan a float member in fixed-size chunks, so checking a 1 GB dataset costs 16 MB of memory."""
    with zf.open(info) as fh:
        version = np.lib.format.read_magic(fh)
        (np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0)(fh, max_header_size=10000)
        step = CHUNK_BYTES - CHUNK_BYTES % dtype.itemsize
        while chunk := fh.read(step):
            usable = len(chunk) - len(chunk) % dtype.itemsize
            if not np.isfinite(np.frombuffer(chunk[:usable], dtype=dtype)).all():
                return False
    return True


def _label_range(zf: zipfile.ZipFile, info: zipfile.ZipInfo) -> tuple[int, int]:
    # Labels are one integer per sample: small enough to read whole once the sizes above checked out.
    with zf.open(info) as fh:
        labels = np.lib.format.read_array(fh, allow_pickle=False)
    return int(labels.min()), int(labels.max())


def check_labels_fit(arrays: dict[str, Any], model_outputs: list[dict[str, Any]], what: str = "dataset") -> None:
    """Labels must be class indices of the model's first output (when its class axis is fixed)."""
    labels = arrays.get(LABELS)
    if not labels or "max" not in labels or not model_outputs:
        return
    classes = (model_outputs[0].get("shape") or [None])[-1]
    if isinstance(classes, int) and classes > 1 and labels["max"] >= classes:
        raise InvalidInput(
            f"{what} has label {labels['max']}, but the model's output '{model_outputs[0]['name']}' has {classes} classes (0..{classes - 1})",
            code="labels_out_of_range",
        )


def inspect_npz(path: Path, *, max_members: int, max_decompressed_bytes: int) -> dict[str, Any]:
    """Return {"arrays": {name: {dtype, shape}}, "samples": N, "has_labels": bool} or raise InvalidInput."""
    try:
        zf = zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError) as exc:
        raise InvalidInput("the dataset is not a .npz file (numpy.savez / savez_compressed)") from exc
    with zf:
        members = [i for i in zf.infolist() if not i.is_dir()]
        if not members:
            raise InvalidInput("the dataset holds no arrays")
        if len(members) > max_members:
            raise InvalidInput(f"the dataset holds {len(members)} arrays; at most {max_members} are allowed")
        total = 0
        headers: dict[str, tuple[tuple[int, ...], np.dtype]] = {}
        for info in members:
            if not info.filename.endswith(".npy") or "/" in info.filename:
                raise InvalidInput(f"unexpected member '{info.filename}' in the .npz file")
            shape, dtype = _member_header(zf, info)
            name = info.filename[: -len(".npy")]
            if dtype.hasobject:
                raise InvalidInput(f"array '{name}' has an object dtype; only numeric arrays are accepted (no pickles)")
            if dtype.kind not in "biuf":
                raise InvalidInput(f"array '{name}' has dtype {dtype}; only bool, integer and float arrays are accepted")
            if not shape:
                raise InvalidInput(f"array '{name}' is a scalar; the first axis must index samples")
            total += math.prod(shape) * dtype.itemsize
            headers[name] = (shape, dtype)
        if total > max_decompressed_bytes:
            raise InvalidInput(f"the dataset decompresses to {total} bytes; the limit is {max_decompressed_bytes}")

        samples = {name: shape[0] for name, (shape, _) in headers.items()}
        if len(set(samples.values())) != 1:
            raise InvalidInput(f"every array must have the same number of samples on axis 0; got {samples}")
        if next(iter(samples.values())) == 0:
            raise InvalidInput("the dataset holds no samples (axis 0 has length 0)")
        label_range = None
        if LABELS in headers:
            shape, dtype = headers[LABELS]
            if dtype.kind not in "iu" or len(shape) != 1:
                raise InvalidInput("'labels' must be a 1-D integer array (one class index per sample)")
            label_range = _label_range(zf, zf.getinfo(f"{LABELS}.npy"))
            if label_range[0] < 0:
                raise InvalidInput(f"'labels' holds negative values (smallest {label_range[0]}); labels are class indices 0..C-1")
        if len(headers) == 1 and LABELS in headers:
            raise InvalidInput("the dataset holds only labels; add the model's input arrays")

        for info in members:
            name = info.filename[: -len(".npy")]
            if headers[name][1].kind == "f" and not _all_finite(zf, info, headers[name][1]):
                raise InvalidInput(f"array '{name}' contains NaN or infinite values")
    arrays: dict[str, dict[str, Any]] = {name: {"dtype": dtype.name, "shape": list(shape)} for name, (shape, dtype) in headers.items()}
    if label_range is not None:
        arrays[LABELS].update({"min": label_range[0], "max": label_range[1]})
    return {
        "arrays": arrays,
        "samples": next(iter(samples.values())),
        "has_labels": LABELS in headers,
    }


def input_arrays(arrays: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in arrays.items() if k != LABELS}


def check_against_model(arrays: dict[str, Any], model_inputs: list[dict[str, Any]], what: str = "dataset") -> dict[str, str]:
    """Map dataset arrays to model inputs, or raise InvalidInput naming the input and the expected shape.

    A single-input model accepts one array under any name; otherwise names must match the inputs.
    Returns {model_input_name: array_name}.
    """
    data = input_arrays(arrays)
    if len(model_inputs) == 1 and len(data) == 1:
        mapping = {model_inputs[0]["name"]: next(iter(data))}
    else:
        missing = [i["name"] for i in model_inputs if i["name"] not in data]
        if missing:
            raise InvalidInput(f"{what} has no array for model input(s) {missing}; it holds {sorted(data)}")
        mapping = {i["name"]: i["name"] for i in model_inputs}
    for inp in model_inputs:
        arr = data[mapping[inp["name"]]]
        expected = inp["shape"]
        got = arr["shape"]
        fixed = [d if isinstance(d, int) else "N" for d in expected]
        if len(got) != len(expected) or any(
            isinstance(e, int) and i > 0 and e != g for i, (e, g) in enumerate(zip(expected, got))
        ):
            raise InvalidInput(
                f"{what} array '{mapping[inp['name']]}' has shape {got}; model input '{inp['name']}' expects "
                f"[samples, ...] matching {fixed}"
            )
        if not _dtype_compatible(arr["dtype"], inp["dtype"]):
            raise InvalidInput(
                f"{what} array '{mapping[inp['name']]}' has dtype {arr['dtype']}; model input '{inp['name']}' expects {inp['dtype']}"
            )
    return mapping


def _dtype_compatible(have: str, want: str) -> bool:
    # Floats are cast to the input's float type; integers must stay integers (token ids, indices).
    h, w = np.dtype(have), np.dtype(want) if want != "unknown" else None
    if w is None:
        return True
    return (h.kind == "f" and w.kind == "f") or (h.kind in "iub" and w.kind in "iub") or h == w
