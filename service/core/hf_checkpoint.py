"""A Hugging Face causal-LM checkpoint uploaded as one .zip: checked from its zip directory, its JSON
files and its safetensors headers, never by loading the weights.

Runs inside the sandboxed check child (service.core.onnx_probe) for uploads, and again in the worker
before a job unpacks a stored checkpoint. What is refused, each with its own code:
- pickled weights (`pytorch_model.bin`, `.pt`, `.pth`, `.ckpt`, `.pkl`): loading them runs code;
- any code file, and a config that asks for remote code (`auto_map`): no remote code, ever;
- a safetensors file whose header does not describe exactly its bytes (overlapping or uncovered
  ranges, a length that disagrees with dtype x shape), an unknown dtype, a shape beyond the bounds;
- an architecture the ONNX Runtime GenAI model builder cannot export (the message lists those it can);
- a checkpoint without tokenizer files;
- everything the ONNX zips are refused for (links, unsafe paths, nested folders, too many members).
safetensors' own loader checks the header too, but only when it loads the file; here nothing but
the header is read, so the check costs kilobytes whatever the model's size.
"""

from __future__ import annotations

import json
import math
import struct
import zipfile
from pathlib import Path
from typing import Any

from service.core.onnx_bundle import MAX_MEMBERS, BundleRefused, check_member

# Architectures onnxruntime-genai's builder exports as a plain decoder (text in, logits out) and that
# this service measures. The builder knows more (vision, audio, MoE variants); those need inputs a
# text-only evaluation cannot feed. Exercised here on Llama; the others share the builder's path.
SUPPORTED_ARCHITECTURES = (
    "LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM", "Phi3ForCausalLM", "PhiForCausalLM",
    "GemmaForCausalLM", "Gemma2ForCausalLM", "GraniteForCausalLM", "OlmoForCausalLM", "NemotronForCausalLM", "SmolLM3ForCausalLM",
)
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle", ".joblib", ".h5", ".msgpack", ".npy", ".npz")
CODE_SUFFIXES = (".py", ".pyc", ".pyo", ".so", ".dll", ".dylib", ".sh", ".js", ".exe", ".ipynb", ".bat", ".ps1")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model")
# What may sit beside the weights; anything else is refused so nothing unexpected reaches the builder.
ALLOWED_FILES = {"config.json", "generation_config.json", "model.safetensors.index.json", "tokenizer.json", "tokenizer.model",
                 "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json", "vocab.json", "merges.txt",
                 "chat_template.jinja", "chat_template.json", "README.md", "LICENSE", "LICENSE.txt", "USE_POLICY.md", ".gitattributes"}
MAX_JSON_BYTES = 64 * 1024**2  # a large vocabulary's tokenizer.json is ~10-30 MB
MAX_SMALL_JSON_BYTES = 4 * 1024**2
MAX_HEADER_BYTES = 100 * 1024**2  # safetensors' own cap on its JSON header
MAX_DIM = 2**31
MAX_PARAMETERS = 200 * 10**9
DTYPE_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1,
               "F8_E4M3": 1, "F8_E5M2": 1, "U16": 2, "U32": 4, "U64": 8}


def is_checkpoint(zip_path: Path) -> bool:
    """A zip holding a config.json and no .onnx is a Hugging Face checkpoint (an ONNX zip has a .onnx)."""
    try:
        with zipfile.ZipFile(zip_path) as zf:
            names = [n.rsplit("/", 1)[-1] for n in zf.namelist()]
    except (zipfile.BadZipFile, OSError):
        return False
    return "config.json" in names and not any(n.endswith(".onnx") for n in names)


def _members(zf: zipfile.ZipFile) -> dict[str, zipfile.ZipInfo]:
    infos = zf.infolist()
    members = [i for i in infos if not i.is_dir()]
    if len(members) > MAX_MEMBERS:
        raise BundleRefused("unsafe_archive", f"the archive holds {len(members)} files; at most {MAX_MEMBERS}")
    for info in infos:
        check_member(info)
    prefixes = {m.filename.split("/")[0] for m in members}
    strip = f"{prefixes.pop()}/" if len(prefixes) == 1 and all("/" in m.filename for m in members) else ""
    flat = {m.filename[len(strip):]: m for m in members}
    nested = sorted(n for n in flat if "/" in n)
    if nested:
        raise BundleRefused("unsafe_archive", f"checkpoint files must sit side by side in one folder; '{nested[0]}' is in a subfolder")
    return flat


def _refuse_unsafe_files(names: list[str]) -> None:
    pickled = sorted(n for n in names if n.lower().endswith(PICKLE_SUFFIXES))
    if pickled:
        raise BundleRefused("pickled_weights", f"'{pickled[0]}' is a pickle-based file: loading it can run code from the file. "
                            "Save the weights as safetensors (`model.save_pretrained(folder, safe_serialization=True)`) and zip that folder")
    code = sorted(n for n in names if n.lower().endswith(CODE_SUFFIXES))
    if code:
        raise BundleRefused("code_not_allowed", f"'{code[0]}' is code; checkpoints with code files are refused (remote code never runs here)")
    other = sorted(n for n in names if n not in ALLOWED_FILES and not n.endswith(".safetensors"))
    if other:
        raise BundleRefused("unsafe_archive", f"unexpected file '{other[0]}' in the checkpoint; it may hold config.json, *.safetensors "
                            "(+ model.safetensors.index.json), tokenizer and generation files only")


def _json(zf: zipfile.ZipFile, info: zipfile.ZipInfo, limit: int) -> Any:
    if info.file_size > limit:
        raise BundleRefused("invalid_checkpoint", f"'{info.filename}' is {info.file_size} bytes; at most {limit}")
    with zf.open(info) as fh:
        raw = fh.read(limit + 1)
    if len(raw) > limit:
        raise BundleRefused("unsafe_archive", f"'{info.filename}' is larger than its directory entry says")
    try:
        return json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise BundleRefused("invalid_checkpoint", f"'{info.filename}' is not valid UTF-8 JSON") from exc


def safetensors_header(zf: zipfile.ZipFile, info: zipfile.ZipInfo) -> dict[str, tuple[str, list[int]]]:
    """{tensor: (dtype, shape)}, after checking that the header describes exactly the file's bytes."""
    name = info.filename
    with zf.open(info) as fh:
        prefix = fh.read(8)
        if len(prefix) < 8:
            raise BundleRefused("invalid_checkpoint", f"'{name}' is too short to be a safetensors file")
        (length,) = struct.unpack("<Q", prefix)
        if length > MAX_HEADER_BYTES or 8 + length > info.file_size:
            raise BundleRefused("invalid_checkpoint", f"'{name}' declares a {length}-byte header in a {info.file_size}-byte file")
        raw = fh.read(length)
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise BundleRefused("invalid_checkpoint", f"'{name}' has a header that is not JSON") from exc
    if not isinstance(header, dict):
        raise BundleRefused("invalid_checkpoint", f"'{name}' has a header that is not a JSON object")
    header.pop("__metadata__", None)
    data_bytes = info.file_size - 8 - length
    tensors, ranges = {}, []
    for tensor, entry in header.items():
        if not isinstance(entry, dict) or not isinstance(entry.get("shape"), list) or not isinstance(entry.get("data_offsets"), list):
            raise BundleRefused("invalid_checkpoint", f"'{name}': tensor '{tensor[:100]}' has no dtype, shape and data_offsets")
        dtype, shape, offsets = entry.get("dtype"), entry["shape"], entry["data_offsets"]
        if dtype not in DTYPE_BYTES:
            raise BundleRefused("invalid_checkpoint", f"'{name}': tensor '{tensor[:100]}' has dtype {str(dtype)[:20]}; known: {', '.join(DTYPE_BYTES)}")
        if len(shape) > 8 or any(not isinstance(d, int) or isinstance(d, bool) or d < 0 or d > MAX_DIM for d in shape):
            raise BundleRefused("invalid_checkpoint", f"'{name}': tensor '{tensor[:100]}' declares shape {str(shape)[:100]}, beyond the bounds")
        if len(offsets) != 2 or any(not isinstance(o, int) or isinstance(o, bool) for o in offsets) or not 0 <= offsets[0] <= offsets[1]:
            raise BundleRefused("invalid_checkpoint", f"'{name}': tensor '{tensor[:100]}' has invalid data_offsets {str(offsets)[:100]}")
        expected = math.prod(shape) * DTYPE_BYTES[dtype]
        if offsets[1] - offsets[0] != expected:
            raise BundleRefused("invalid_checkpoint", f"'{name}': tensor '{tensor[:100]}' holds {offsets[1] - offsets[0]} bytes but "
                                f"{dtype} x {shape} needs {expected}")
        tensors[tensor] = (dtype, shape)
        ranges.append((offsets[0], offsets[1], tensor))
    position = 0
    for start, end, tensor in sorted(ranges):
        if start != position:
            raise BundleRefused("invalid_checkpoint", f"'{name}': tensor '{tensor[:100]}' starts at byte {start}, expected {position} "
                                "(tensors overlap or leave a gap)")
        position = end
    if position != data_bytes:
        raise BundleRefused("invalid_checkpoint", f"'{name}': the header describes {position} bytes of tensor data, the file holds {data_bytes}")
    return tensors


def _weights(zf: zipfile.ZipFile, flat: dict[str, zipfile.ZipInfo]) -> dict[str, tuple[str, list[int]]]:
    shards = sorted(n for n in flat if n.endswith(".safetensors"))
    if not shards:
        raise BundleRefused("invalid_checkpoint", "the checkpoint holds no *.safetensors weights")
    tensors: dict[str, tuple[str, list[int]]] = {}
    where: dict[str, str] = {}
    for shard in shards:
        for tensor, spec in safetensors_header(zf, flat[shard]).items():
            if tensor in tensors:
                raise BundleRefused("invalid_checkpoint", f"tensor '{tensor[:100]}' is in both '{where[tensor]}' and '{shard}'")
            tensors[tensor], where[tensor] = spec, shard
    index_info = flat.get("model.safetensors.index.json")
    if index_info is not None:
        index = _json(zf, index_info, MAX_JSON_BYTES)
        weight_map = index.get("weight_map") if isinstance(index, dict) else None
        if not isinstance(weight_map, dict):
            raise BundleRefused("invalid_checkpoint", "model.safetensors.index.json has no weight_map")
        for tensor, shard in weight_map.items():
            if where.get(tensor) != shard:
                raise BundleRefused("invalid_checkpoint", f"model.safetensors.index.json puts '{str(tensor)[:100]}' in '{str(shard)[:100]}', "
                                    f"which {'does not hold it' if shard in flat else 'is not in the archive'}")
    elif len(shards) > 1:
        raise BundleRefused("invalid_checkpoint", "a sharded checkpoint needs its model.safetensors.index.json")
    return tensors


def _int(config: dict[str, Any], key: str, default: int | None = None) -> int | None:
    value = config.get(key, default)
    return value if isinstance(value, int) and not isinstance(value, bool) else default


def inspect_checkpoint(zip_path: Path) -> dict[str, Any]:
    """Describe the checkpoint (what the models API returns as `llm`), or raise BundleRefused."""
    try:
        zf = zipfile.ZipFile(zip_path)
    except zipfile.BadZipFile as exc:
        raise BundleRefused("invalid_model", "the upload is not a valid .zip archive") from exc
    with zf:
        flat = _members(zf)
        _refuse_unsafe_files(list(flat))
        config = _json(zf, flat["config.json"], MAX_SMALL_JSON_BYTES)
        if not isinstance(config, dict):
            raise BundleRefused("invalid_checkpoint", "config.json is not a JSON object")
        if "auto_map" in config:
            raise BundleRefused("code_not_allowed", "config.json asks for remote code (auto_map); custom modelling code never runs here")
        architectures = config.get("architectures")
        architecture = architectures[0] if isinstance(architectures, list) and architectures and isinstance(architectures[0], str) else None
        if architecture not in SUPPORTED_ARCHITECTURES:
            raise BundleRefused("unsupported_architecture", f"architecture {str(architecture)[:80]!r} cannot be exported; supported: {', '.join(SUPPORTED_ARCHITECTURES)}")
        if not any(name in flat for name in TOKENIZER_FILES):
            raise BundleRefused("tokenizer_missing", "the checkpoint has no tokenizer (tokenizer.json or tokenizer.model): save the tokenizer "
                                "into the same folder (`tokenizer.save_pretrained(folder)`)")
        for name in ("tokenizer_config.json", "generation_config.json", "special_tokens_map.json", "tokenizer.json"):
            if name in flat:
                _json(zf, flat[name], MAX_JSON_BYTES)
        tensors = _weights(zf, flat)
    parameters = sum(math.prod(shape) for _, shape in tensors.values())
    if parameters > MAX_PARAMETERS:
        raise BundleRefused("model_too_large", f"the checkpoint declares {parameters} parameters; at most {MAX_PARAMETERS}")
    heads = _int(config, "num_attention_heads")
    return {
        "architecture": architecture,
        "model_type": str(config.get("model_type", ""))[:64],
        "parameters": parameters,
        "layers": _int(config, "num_hidden_layers"),
        "hidden_size": _int(config, "hidden_size"),
        "heads": heads,
        "kv_heads": _int(config, "num_key_value_heads", heads),
        "vocabulary": _int(config, "vocab_size"),
        "context_length": _int(config, "max_position_embeddings"),
        "tied_embeddings": bool(config.get("tie_word_embeddings", False)),
        "weight_dtypes": sorted({dtype for dtype, _ in tensors.values()}),
        "tokenizer": sorted(n for n in flat if n.startswith("tokenizer") or n in ("vocab.json", "merges.txt")),
        "chat_template": any(n.startswith("chat_template") for n in flat),
    }


def extract(zip_path: Path, dest: Path) -> Path:
    """Check a stored checkpoint again and unpack it flat into dest (for the export)."""
    inspect_checkpoint(zip_path)
    with zipfile.ZipFile(zip_path) as zf:
        dest.mkdir(parents=True, exist_ok=True)
        for name, info in _members(zf).items():
            with zf.open(info) as src, open(dest / name, "wb") as dst:
                copied = 0
                while chunk := src.read(1 << 20):
                    copied += len(chunk)
                    if copied > info.file_size:
                        raise BundleRefused("unsafe_archive", f"archive member '{name}' is larger than its directory entry says")
                    dst.write(chunk)
    return dest
