"""Dataset (.npz) validation: hostile files are refused before anything is unpickled or decompressed."""

from __future__ import annotations

import io
import zipfile
from pathlib import Path

import numpy as np
import pytest

from service.core.datasets import check_against_model, inspect_npz
from service.core.errors import InvalidInput

LIMITS = dict(max_members=8, max_decompressed_bytes=10 * 1024 * 1024)
MODEL_INPUTS = [{"name": "x", "dtype": "float32", "shape": ["N", 16]}]


def write_npz(path: Path, **arrays: np.ndarray) -> Path:
    np.savez(path, **arrays)
    return path


def test_valid_dataset_is_described(tmp_path: Path) -> None:
    path = write_npz(tmp_path / "d.npz", x=np.zeros((10, 16), np.float32), labels=np.arange(10))
    info = inspect_npz(path, **LIMITS)
    assert info == {
        "arrays": {"x": {"dtype": "float32", "shape": [10, 16]}, "labels": {"dtype": "int64", "shape": [10], "min": 0, "max": 9}},
        "samples": 10,
        "has_labels": True,
    }


def test_pickled_object_array_is_refused_without_unpickling(tmp_path: Path) -> None:
    path = tmp_path / "evil.npz"
    np.savez(path, x=np.array([{"a": 1}, None], dtype=object))
    with pytest.raises(InvalidInput, match="object dtype"):
        inspect_npz(path, **LIMITS)


@pytest.mark.parametrize(
    ("arrays", "message"),
    [
        ({"x": np.array([[np.nan] * 16], np.float32)}, "NaN"),
        ({"x": np.zeros((3, 16), np.float32), "labels": np.arange(4)}, "same number of samples"),
        ({"x": np.zeros((3, 16), np.float32), "labels": np.zeros(3, np.float32)}, "integer"),
        ({"x": np.array(1.0)}, "scalar"),
        ({"x": np.array(["a", "b"])}, "dtype"),
    ],
)
def test_bad_arrays_are_named(tmp_path: Path, arrays: dict, message: str) -> None:
    with pytest.raises(InvalidInput, match=message):
        inspect_npz(write_npz(tmp_path / "d.npz", **arrays), **LIMITS)


def test_not_a_zip_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "d.npz"
    path.write_bytes(b"not a zip at all")
    with pytest.raises(InvalidInput, match="not a .npz"):
        inspect_npz(path, **LIMITS)


def test_decompression_bomb_is_refused_from_its_header(tmp_path: Path) -> None:
    path = tmp_path / "bomb.npz"
    np.savez_compressed(path, x=np.zeros((4096, 1024), np.float32))  # 16 MiB of zeros, a few KiB on disk
    assert path.stat().st_size < 100_000
    with pytest.raises(InvalidInput, match="decompresses to"):
        inspect_npz(path, **LIMITS)


def test_too_many_members_is_refused(tmp_path: Path) -> None:
    path = write_npz(tmp_path / "d.npz", **{f"a{i}": np.zeros((1, 1)) for i in range(9)})
    with pytest.raises(InvalidInput, match="at most 8"):
        inspect_npz(path, **LIMITS)


def test_unexpected_member_is_refused(tmp_path: Path) -> None:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        zf.writestr("../x.npy", b"whatever")
    path = tmp_path / "d.npz"
    path.write_bytes(buf.getvalue())
    with pytest.raises(InvalidInput, match="unexpected member"):
        inspect_npz(path, **LIMITS)


def test_single_input_model_accepts_any_array_name() -> None:
    arrays = {"pixels": {"dtype": "float32", "shape": [5, 16]}, "labels": {"dtype": "int64", "shape": [5]}}
    assert check_against_model(arrays, MODEL_INPUTS) == {"x": "pixels"}


def test_wrong_shape_names_input_and_expected_shape() -> None:
    arrays = {"x": {"dtype": "float32", "shape": [5, 15]}}
    with pytest.raises(InvalidInput, match=r"model input 'x' expects \[samples, \.\.\.\] matching \['N', 16\]"):
        check_against_model(arrays, MODEL_INPUTS)


def test_missing_input_name_for_multi_input_model() -> None:
    inputs = MODEL_INPUTS + [{"name": "mask", "dtype": "int64", "shape": ["N", 16]}]
    with pytest.raises(InvalidInput, match=r"no array for model input\(s\) \['mask'\]"):
        check_against_model({"x": {"dtype": "float32", "shape": [5, 16]}}, inputs)


def test_integer_data_for_float_input_is_refused() -> None:
    with pytest.raises(InvalidInput, match="expects float32"):
        check_against_model({"x": {"dtype": "int64", "shape": [5, 16]}}, MODEL_INPUTS)


def _npz_with_member(path: Path, name: str, header: dict, data: bytes, compress: bool = True) -> Path:
    """A .npz whose one member has a hand-written header (what a hostile client can send)."""
    import io
    import zipfile

    member = io.BytesIO()
    np.lib.format.write_array_header_1_0(member, header)
    member.write(data)
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED if compress else zipfile.ZIP_STORED) as zf:
        zf.writestr(f"{name}.npy", member.getvalue())
    return path


@pytest.mark.parametrize("shape, data, message", [
    ((4, 4), b"\0" * (1 << 24), "header declares 64"),  # inflates far past its declared shape
    ((1000, 16), b"\0" * 64, "truncated or corrupt"),  # data missing
    ((-5, 16), b"", "invalid shape"),
    ((2**40, 2**40), b"", "header declares"),  # overflows int64: must not wrap to something small
], ids=["inflates-past-header", "missing-data", "negative-dimension", "overflowing-shape"])
def test_members_must_hold_exactly_what_their_header_declares(tmp_path: Path, shape: tuple, data: bytes, message: str) -> None:
    path = _npz_with_member(tmp_path / "d.npz", "x", {"descr": "<f4", "fortran_order": False, "shape": shape}, data)
    with pytest.raises(InvalidInput, match=message):
        inspect_npz(path, **LIMITS)


def test_empty_datasets_and_negative_labels_are_refused(tmp_path: Path) -> None:
    with pytest.raises(InvalidInput, match="no samples"):
        inspect_npz(write_npz(tmp_path / "a.npz", x=np.zeros((0, 16), np.float32)), **LIMITS)
    with pytest.raises(InvalidInput, match="negative"):
        inspect_npz(write_npz(tmp_path / "b.npz", x=np.zeros((3, 16), np.float32), labels=np.array([0, -1, 2])), **LIMITS)


def test_labels_must_be_classes_of_the_model() -> None:
    from service.core.datasets import check_labels_fit

    arrays = {"x": {"dtype": "float32", "shape": [3, 16]}, "labels": {"dtype": "int64", "shape": [3], "min": 0, "max": 7}}
    check_labels_fit(arrays, [{"name": "logits", "dtype": "float32", "shape": ["N", 8]}])
    with pytest.raises(InvalidInput, match="label 7, but the model's output 'logits' has 4 classes") as err:
        check_labels_fit(arrays, [{"name": "logits", "dtype": "float32", "shape": ["N", 4]}])
    assert err.value.code == "labels_out_of_range"
