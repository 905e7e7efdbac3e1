"""The .msz bundle: an ONNX model with its integer tensors (cluster indices, sparse gaps) Huffman
coded and everything else deflated, as in Deep Compression's final stage. It decodes back to the
exact bytes of the ONNX model (checked against a SHA-256 stored in the bundle).

Layout: MAGIC | uint32 little-endian header length | deflated header JSON | deflated skeleton | payload.
The header lists each coded tensor (name, codec, offset/length in the payload, symbol count and the
canonical Huffman code as per-length counts + symbols); the "skeleton" is the model with those
tensors' bytes removed, deflated. Canonical Huffman coding is bitarray's (a C extension).
Only numpy, onnx and bitarray are needed to decode: `modelshrink unpack model.msz -o model.onnx`.
"""

from __future__ import annotations

import hashlib
import json
import struct
import zlib
from collections import Counter
from typing import Any

import numpy as np
import onnx
from bitarray import bitarray
from bitarray.util import canonical_decode, canonical_huffman

MAGIC = b"MSHZ\x01\n"
HUFFMAN_DTYPES = {onnx.TensorProto.UINT8, onnx.TensorProto.INT8}
MIN_TENSOR_BYTES = 64


class BundleError(ValueError):
    pass


def _huffman(data: bytes) -> tuple[bytes, dict[str, Any]]:
    counts = Counter(data)
    if len(counts) == 1:  # a single symbol: its count says everything
        return b"", {"count": [], "symbol": [data[0]], "single": True}
    code, count, symbol = canonical_huffman(dict(counts))
    bits = bitarray(endian="big")
    bits.encode(code, data)
    return bits.tobytes(), {"count": list(count), "symbol": list(symbol), "bits": len(bits)}


def _unhuffman(payload: bytes, meta: dict[str, Any], n: int) -> bytes:
    if meta.get("single"):
        return bytes([meta["symbol"][0]]) * n
    bits = bitarray(endian="big")
    bits.frombytes(payload)
    del bits[meta["bits"]:]
    out = np.fromiter(canonical_decode(bits, meta["count"], meta["symbol"]), dtype=np.uint8, count=n)
    return out.tobytes()


def encode(model_bytes: bytes) -> tuple[bytes, dict[str, Any]]:
    """Bundle an ONNX model; returns (bundle, per-tensor report)."""
    model = onnx.load_model_from_string(model_bytes)
    skeleton = onnx.ModelProto()
    skeleton.CopyFrom(model)
    payload = bytearray()
    tensors, report = [], []
    for init in skeleton.graph.initializer:
        raw = init.raw_data
        if len(raw) < MIN_TENSOR_BYTES or init.data_location == onnx.TensorProto.EXTERNAL:
            continue
        if init.data_type in HUFFMAN_DTYPES:
            coded, meta = _huffman(raw)
            codec = "huffman"
        else:
            coded, meta, codec = zlib.compress(raw, 9), {}, "zlib"
            if len(coded) >= len(raw):
                coded, codec = raw, "raw"
        tensors.append({"name": init.name, "codec": codec, "offset": len(payload), "length": len(coded), "size": len(raw), **meta})
        report.append({"tensor": init.name, "codec": codec, "bytes_before": len(raw), "bytes_after": len(coded),
                       "bits_per_symbol": round(8 * len(coded) / len(raw), 3)})
        payload += coded
        init.raw_data = b""
    skeleton_bytes = zlib.compress(skeleton.SerializeToString(), 9)
    header = {"format": 1, "sha256": hashlib.sha256(model_bytes).hexdigest(), "skeleton_length": len(skeleton_bytes), "tensors": tensors}
    header_bytes = zlib.compress(json.dumps(header, separators=(",", ":")).encode(), 9)
    bundle = MAGIC + struct.pack("<I", len(header_bytes)) + header_bytes + skeleton_bytes + bytes(payload)
    return bundle, {"tensors": report, "skeleton_bytes": len(skeleton_bytes), "header_bytes": len(header_bytes)}


def decode(bundle: bytes) -> bytes:
    """The exact ONNX bytes a bundle was made from; BundleError for anything else (a damaged or
    truncated file fails in whichever decoder meets the damage first: zlib, json, protobuf, Huffman)."""
    if not bundle.startswith(MAGIC):
        raise BundleError("not a modelshrink bundle (.msz)")
    try:
        return _decode(bundle)
    except BundleError:
        raise
    except Exception as exc:
        raise BundleError(f"the bundle is damaged ({type(exc).__name__})") from exc


def _decode(bundle: bytes) -> bytes:
    (header_len,) = struct.unpack_from("<I", bundle, len(MAGIC))
    start = len(MAGIC) + 4
    header = json.loads(zlib.decompress(bundle[start:start + header_len]))
    body = start + header_len
    skeleton = onnx.load_model_from_string(zlib.decompress(bundle[body:body + header["skeleton_length"]]))
    payload = memoryview(bundle)[body + header["skeleton_length"]:]
    by_name = {t["name"]: t for t in header["tensors"]}
    for init in skeleton.graph.initializer:
        meta = by_name.get(init.name)
        if meta is None:
            continue
        chunk = bytes(payload[meta["offset"]:meta["offset"] + meta["length"]])
        if meta["codec"] == "huffman":
            init.raw_data = _unhuffman(chunk, meta, meta["size"])
        elif meta["codec"] == "zlib":
            init.raw_data = zlib.decompress(chunk)
        else:
            init.raw_data = chunk
    model_bytes = skeleton.SerializeToString()
    if hashlib.sha256(model_bytes).hexdigest() != header["sha256"]:
        raise BundleError("the decoded model does not match the bundle's checksum")
    return model_bytes
