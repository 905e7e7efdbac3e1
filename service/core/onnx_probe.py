"""Check an untrusted ONNX file in a child process with memory and time limits.

A malformed model can crash onnx's C++ checker or ONNX Runtime; running them in a child means such a
model fails its upload (or job) with a clear error instead of taking the API or a worker down.
The child prints one JSON object on stdout: {"ok": true, ...description} or {"ok": false, code, message}.
"""

from __future__ import annotations

import errno
import json
import os
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from service.core.errors import InvalidInput
from service.core.hf_checkpoint import inspect_checkpoint, is_checkpoint
from service.core.onnx_bundle import SINGLE_FILE_LIMIT, BundleRefused, internalize, is_zip


# Address space the check may use: enough for Python, onnx and ONNX Runtime plus a few copies of the
# model's weights, and no more (a tiny model whose run allocates by the gigabyte is refused), capped
# by the operator's probe_memory_bytes.
PROBE_BASE_BYTES = 512 * 1024**2
PROBE_BYTES_PER_MODEL_BYTE = 8


def probe_memory_for(path: Path, cap: int, size_bytes: int | None = None) -> int:
    return min(cap, PROBE_BASE_BYTES + PROBE_BYTES_PER_MODEL_BYTE * max(path.stat().st_size, size_bytes or 0))


def probe_onnx(path: Path, *, timeout_s: float, memory_bytes: int, run: bool = True, decoded_bytes: int | None = None,
               max_unpacked_bytes: int = 2 * 1024**3, single_file_limit: int = SINGLE_FILE_LIMIT, external_ok: bool = False) -> dict[str, Any]:
    """Describe a valid model, or raise InvalidInput saying what is wrong with it. `memory_bytes` caps
    the child's address space, which is scaled to the model's size below that cap; `decoded_bytes`
    scales it to what a compressed model unfolds into when loaded (codebooks, packed indices and sparse
    gaps become dense weights: a 6 MB clustered MiniLM decodes to 90 MB). A .zip (a model with
    external data) may unpack to `max_unpacked_bytes`; over `single_file_limit` it keeps its external
    data, and the description's `stored_file` is the canonical archive to store (`external_data`).
    `external_ok`: an .onnx whose data files lie beside it (a worker's own output, never an upload).

    A zip is unpacked into a folder this process makes and removes whatever the check's outcome (a
    refusal, a crash, a kill for memory or time): only a model that passes leaves its `stored_file`
    there for the caller. Memory is sized from what the archive declares it unpacks to (an honest model
    with compressible weights is small as a zip), files the child writes are capped by RLIMIT_FSIZE."""
    zipped = is_zip(path)
    declared = declared_unpacked_bytes(path) if zipped else 0
    if declared > max_unpacked_bytes:
        # Refused from the archive's own header, before anything is unpacked; a header that lies is
        # caught while unpacking (internalize counts the bytes it writes, RLIMIT_FSIZE backs it).
        raise InvalidInput(f"the archive unpacks to {declared / 1024**3:.2f} GiB, over the {max_unpacked_bytes / 1024**3:.2f} GiB "
                           "this server accepts (MODELSHRINK_MAX_UPLOAD_BYTES)", code="model_too_large")
    unpacks_to = declared
    memory_bytes = probe_memory_for(path, memory_bytes, max(decoded_bytes or 0, unpacks_to) or None)
    file_cap = max_unpacked_bytes + 64 * 1024**2

    def limit() -> None:  # runs in the child before exec
        resource.setrlimit(resource.RLIMIT_AS, (memory_bytes, memory_bytes))
        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
        resource.setrlimit(resource.RLIMIT_FSIZE, (file_cap, file_cap))

    work_dir = Path(tempfile.mkdtemp(prefix="bundle-", dir=path.parent)) if zipped else None
    args = [sys.executable, "-m", "service.core.onnx_probe", str(path), str(max_unpacked_bytes), str(single_file_limit)] + ([] if run else ["--no-run"]) \
        + (["--external-ok"] if external_ok else []) + ([f"--work-dir={work_dir}"] if work_dir else [])
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    try:
        result = _run_check(args, env, limit, timeout_s, memory_bytes, path)
    except BaseException:
        if work_dir is not None:
            shutil.rmtree(work_dir, ignore_errors=True)
        raise
    if work_dir is not None and "stored_file" not in result:
        shutil.rmtree(work_dir, ignore_errors=True)
    return result


def declared_unpacked_bytes(path: Path) -> int:
    """What a zip says its members unpack to (the unpacking itself enforces it)."""
    try:
        with zipfile.ZipFile(path) as archive:
            return sum(max(0, info.file_size) for info in archive.infolist())
    except (zipfile.BadZipFile, OSError, ValueError):
        return 0


def _run_check(args: list[str], env: dict[str, str], limit: Any, timeout_s: float, memory_bytes: int, path: Path) -> dict[str, Any]:
    try:
        proc = subprocess.run(args, capture_output=True, timeout=timeout_s, preexec_fn=limit, env=env, check=False)
    except subprocess.TimeoutExpired as exc:
        raise InvalidInput(f"checking the model took longer than {timeout_s:.0f} s", code="model_check_timeout") from exc
    if proc.returncode == -signal.SIGXFSZ:
        raise InvalidInput("the archive unpacks to more than the upload limit allows", code="model_too_large")
    out_of_memory = b"bad_alloc" in proc.stderr or b"MemoryError" in proc.stderr
    if proc.returncode < 0 and out_of_memory:
        raise InvalidInput(f"checking the model needed more than {memory_bytes // 1024**2} MiB of memory", code="model_too_large")
    if proc.returncode < 0:
        sig = signal.Signals(-proc.returncode).name
        raise InvalidInput(f"the model crashed the ONNX checker or runtime ({sig})", code="model_crashed")
    try:
        result = json.loads(proc.stdout.decode().strip().splitlines()[-1])
    except (ValueError, IndexError) as exc:
        if out_of_memory:
            raise InvalidInput(f"checking the model needed more than {memory_bytes // 1024**2} MiB of memory", code="model_too_large") from exc
        raise InvalidInput("the model could not be checked (the checker exited abnormally)", code="model_crashed") from exc
    if not result.get("ok"):
        # Library messages can quote the file's location on this host; a client never sees it.
        message = result["message"].replace(str(path), "the model").replace(str(path.parent), "")
        raise InvalidInput(message, code=result["code"])
    result.pop("ok")
    return dict(result)


# ---- child side: imports onnx/onnxruntime only here, never in the API process itself ----

def _all_tensors(graph: Any) -> Iterator[Any]:
    import onnx

    yield from graph.initializer
    for sparse in graph.sparse_initializer:
        yield sparse.values
        yield sparse.indices
    for node in graph.node:
        for attr in node.attribute:
            if attr.type == onnx.AttributeProto.TENSOR:
                yield attr.t
            elif attr.type == onnx.AttributeProto.TENSORS:
                yield from attr.tensors
            elif attr.type == onnx.AttributeProto.GRAPH:
                yield from _all_tensors(attr.g)
            elif attr.type == onnx.AttributeProto.GRAPHS:
                for g in attr.graphs:
                    yield from _all_tensors(g)


def value_info(vi: Any) -> dict[str, Any]:
    import onnx

    tt = vi.type.tensor_type
    dtype = onnx.helper.tensor_dtype_to_np_dtype(tt.elem_type).name if tt.elem_type else "unknown"
    shape: list[int | str | None] = []
    for dim in tt.shape.dim:
        if dim.HasField("dim_value"):
            shape.append(int(dim.dim_value))
        elif dim.HasField("dim_param"):
            shape.append(dim.dim_param)
        else:
            shape.append(None)
    return {"name": vi.name, "dtype": dtype, "shape": shape}


NUMERIC_DTYPES = frozenset({"float16", "float32", "float64", "bfloat16", "int8", "int16", "int32", "int64", "uint8", "uint16", "uint32", "uint64", "bool"})


def _fail(code: str, message: str) -> dict[str, Any]:
    return {"ok": False, "code": code, "message": message}


def _run_once(session: Any) -> dict[str, Any] | None:
    """The model run once on zero inputs (dynamic dimensions as 1): None, or the refusal."""
    import numpy as np

    feed = {}
    for meta in session.get_inputs():
        shape = [d if isinstance(d, int) and d > 0 else 1 for d in meta.shape]
        feed[meta.name] = np.zeros(shape, dtype=np.dtype(_ort_np(meta.type)))
    try:
        session.run(None, feed)
    except Exception as exc:  # noqa: BLE001 - ORT's run errors, told apart by message below
        if "Failed to allocate memory" in str(exc) or "bad_alloc" in str(exc):
            return _fail("model_too_large", "running the model once on zero inputs needed more memory than the upload check allows "
                         "(a few hundred MiB plus a multiple of the file's size)")
        return _fail("model_not_runnable", f"ONNX Runtime cannot run the model on zero inputs: {str(exc).splitlines()[0][:300]}")
    return None


def describe(path: Path, run: bool, max_unpacked: int = 2 * 1024**3, single_file_limit: int = SINGLE_FILE_LIMIT, external_ok: bool = False,
             work_dir: Path | None = None) -> dict[str, Any]:
    import numpy as np
    import onnx

    if path.stat().st_size == 0:
        return _fail("invalid_model", "the file is empty")
    unpacked = None
    if is_zip(path) and is_checkpoint(path):
        # A Hugging Face causal-LM folder, zipped: checked from headers, nothing unpacked.
        try:
            return {"ok": True, "llm": inspect_checkpoint(path)}
        except BundleRefused as exc:
            return _fail(exc.code, exc.message)
    if is_zip(path):
        # A model with external data, zipped; or a PyTorch archive, which is refused (torch 2.13's
        # torch.export.load unpickles with weights_only=False, so loading one can run code from it).
        # The parent made work_dir and removes it unless the model passes (probe_onnx).
        work_dir = work_dir or Path(tempfile.mkdtemp(prefix="bundle-", dir=path.parent))
        try:
            unpacked = internalize(path, work_dir, max_bytes=max_unpacked, single_file_limit=single_file_limit)
        except BundleRefused as exc:
            return _fail(exc.code, exc.message)
        path = unpacked.graph
    external = unpacked.external if unpacked is not None else external_ok
    try:
        model = onnx.load_model(str(path), load_external_data=False)
    except Exception:  # noqa: BLE001 - whatever the parser raises, the client's file is not ONNX
        return _fail("invalid_model", "the file is not an ONNX model (it could not be parsed as an ONNX protobuf)")
    if not model.graph.node and not model.graph.output:
        return _fail("invalid_model", "the file is not an ONNX model (no graph found)")
    if not external and any(t.data_location == onnx.TensorProto.EXTERNAL for t in _all_tensors(model.graph)):
        return _fail(
            "external_data_not_supported",
            "the model references external data files: upload them together as one .zip (e.g. `zip model.zip model.onnx "
            "model.onnx.data`; `modelshrink submit` does this for you), or export a single file (external_data=False)",
        )
    try:
        # By path when the weights are external: the checker then reads them itself (and an in-memory
        # model over 2 GB could not be handed to it at all).
        onnx.checker.check_model(str(path) if external else model, full_check=True)
    except Exception as exc:  # noqa: BLE001 - the checker raises several types; each means a bad model
        return _fail("invalid_model", f"the ONNX checker rejected the model: {str(exc).splitlines()[0][:300]}")

    initializer_names = {t.name for t in model.graph.initializer}
    inputs = [value_info(vi) for vi in model.graph.input if vi.name not in initializer_names]
    outputs = [value_info(vi) for vi in model.graph.output]
    if not inputs:
        return _fail("invalid_model", "the model has no inputs; there is nothing to feed it data through")
    unsupported = [f"{i['name']} ({i['dtype']})" for i in inputs if i["dtype"] not in NUMERIC_DTYPES]
    if unsupported:
        return _fail("unsupported_input_type", f"model inputs must be numeric or boolean tensors; these are not: {', '.join(unsupported)}")

    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    try:
        session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    except Exception as exc:  # noqa: BLE001 - ORT raises its own types; each means the model cannot load
        return _fail("model_not_runnable", f"ONNX Runtime cannot load the model: {str(exc).splitlines()[0][:300]}")

    failed = _run_once(session) if run else None
    if failed is not None:
        return failed
    parameters = int(sum(int(np.prod(t.dims)) if len(t.dims) else 1 for t in model.graph.initializer))
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), None)
    result = {"ok": True, "inputs": inputs, "outputs": outputs, "parameters": parameters, "opset": opset}
    if unpacked is not None:
        # The API stores this instead of the upload: one self-contained .onnx, or a canonical archive.
        result.update(stored_file=str(unpacked.stored), external_data=external)
    return result


def _ort_np(ort_type: str) -> str:
    # ORT describes types as "tensor(float)"; map the few names that differ from numpy's.
    name = ort_type.removeprefix("tensor(").removesuffix(")")
    return {"float": "float32", "double": "float64", "float16": "float16", "bool": "bool"}.get(name, name)


def main() -> None:
    from google.protobuf.message import EncodeError  # the child's own import, as onnx's

    path, max_unpacked, single_file_limit = Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
    run = "--no-run" not in sys.argv[4:]
    work_dir = next((Path(a.split("=", 1)[1]) for a in sys.argv[4:] if a.startswith("--work-dir=")), None)
    try:
        result = describe(path, run, max_unpacked, single_file_limit, external_ok="--external-ok" in sys.argv[4:], work_dir=work_dir)
    except MemoryError:
        result = _fail("model_too_large", "checking the model exceeded the memory limit")
    except OSError as exc:  # a file over RLIMIT_FSIZE (EFBIG: Python ignores SIGXFSZ), or no memory for a mapping
        if exc.errno not in (errno.EFBIG, errno.ENOMEM):
            raise
        result = _fail("model_too_large", "the model unpacks to more than the check allows (memory or file size)")
    except EncodeError:  # protobuf could not hold the unpacked model in the memory allowed
        result = _fail("model_too_large", "checking the model exceeded the memory limit (the unpacked model could not be written as one file)")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
