"""A checkpoint folder to an ONNX Runtime GenAI decoder folder (`genai_config.json`, `model.onnx` +
`model.onnx.data`, tokenizer files) with onnxruntime-genai's model builder: the library made for it
(KV cache layout, GroupQueryAttention, rotary caches, the runtime's config).

The builder runs as its own process (`python -m onnxruntime_genai.models.builder`): it prints
progress bars and can exit the interpreter on bad input; its last message becomes the job's error.
The fp32 export is the "original" every metric compares against."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

from service.core.errors import CompressionFailed

EXPORT_TIMEOUT_S = 3600


def _last_message(output: str) -> str:
    lines = [line.strip() for line in output.replace("\r", "\n").splitlines() if line.strip() and not line.startswith(("Saving", "Reading", "0it"))]
    message = next((line for line in reversed(lines) if "Error" in line or "error" in line), lines[-1] if lines else "no output")
    return re.sub(r"(/[\w.\-]+)+", "<path>", message)[:300]


def build_genai(checkpoint: Path, out: Path, cache: Path, precision: str = "fp32", threads: int = 1) -> Path:
    """Export `checkpoint` into `out`; returns `out`. CompressionFailed(llm_export_failed) with the builder's message."""
    args = [sys.executable, "-m", "onnxruntime_genai.models.builder", "-i", str(checkpoint), "-o", str(out), "-p", precision, "-e", "cpu", "-c", str(cache)]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    try:
        proc = subprocess.run(args, capture_output=True, text=True, timeout=EXPORT_TIMEOUT_S, env=env, check=False)
    except subprocess.TimeoutExpired as exc:
        raise CompressionFailed(f"the export to ONNX took longer than {EXPORT_TIMEOUT_S} s", code="llm_export_failed") from exc
    if proc.returncode != 0 or not (out / "genai_config.json").is_file() or not (out / "model.onnx").is_file():
        raise CompressionFailed(f"the ONNX Runtime GenAI builder could not export this checkpoint: {_last_message(proc.stderr + proc.stdout)}",
                                code="llm_export_failed")
    return out


def folder_bytes(folder: Path) -> int:
    """What the model's weights take: model.onnx and its data files."""
    return sum(p.stat().st_size for p in folder.iterdir() if p.name.startswith("model.onnx"))
