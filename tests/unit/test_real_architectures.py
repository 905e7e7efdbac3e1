"""The methods on the architectures users bring, exported the way they export them: Hugging Face
BERT (MiniLM's class), GPT-2, ViT, ResNet and MobileNetV2 in tiny configurations, from torch's TorchScript
exporter (opset 17) and its default dynamo exporter (opset 18+). Each job runs the worker's
pipeline on real ONNX Runtime; the artifact must keep the original's input/output names and dynamic
axes and run at other batch sizes and sequence lengths."""

from __future__ import annotations

import io
import tempfile
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from bench.architectures import ARCHITECTURES, EXPORTERS, TOKEN_MODELS, Export, dataset, export
from service.core.job_metrics import checked
from service.core.artifacts import ArtifactStore
from service.core.datasets import inspect_npz
from service.core.onnx_probe import probe_onnx
from service.core.settings import Settings
from workers.job_input import JobInput
from workers.pipeline import run_pipeline

MEASURE = {"runs": 5, "warmup": 1, "batch_sizes": [1, 4]}
STEPS = {
    "int8": {"method": "quantize", "mode": "int8_dynamic"},
    "prune-unstructured": {"method": "prune", "kind": "unstructured", "amount": 0.5, "finetune_epochs": 1},
    "prune-sparsegpt": {"method": "prune", "kind": "unstructured", "amount": 0.5, "importance": "sparsegpt", "finetune_epochs": 0},
    "cluster-4bit": {"method": "cluster", "bits": 4, "bit_allocation": "measured"},
    "cluster-4bit-grouped": {"method": "cluster", "bits": 4, "group_size": 8, "finetune_epochs": 1},
    "deep-compression": {"method": "deep_compression"},
    "prune-structured": {"method": "prune", "kind": "structured", "amount": 0.3},
    "prune-heads": {"method": "prune", "kind": "structured", "amount": 0.3, "heads": 0.5, "finetune_epochs": 1},
    "distill-width": {"method": "distill", "student": {"kind": "width", "width": 0.5}, "epochs": 1},
    "distill-low-rank": {"method": "distill", "student": {"kind": "low_rank", "energy": 0.8}, "epochs": 1},
    "distill-depth": {"method": "distill", "student": {"kind": "depth", "drop_count": 1}, "epochs": 1},
    "quantize-auto": {"method": "quantize"},
    "low-rank": {"method": "low_rank", "rank_ratio": 0.5, "min_layer_parameters": 256, "finetune_epochs": 1},
    "depthwise-separable": {"method": "depthwise_separable", "finetune_epochs": 1},
}
# What each architecture's output is, hence its distillation loss.
OUTPUT_KINDS = {"bert": "features", "gpt2": "token_logits", "vit": "classifier", "resnet": "classifier", "mobilenet": "classifier"}
CNNS = ("resnet", "mobilenet")
# GPT-2 has no derived width student (its Conv1D MLP reshapes with the width spelled out; structured pruning narrows it on the graph).
REFUSED = {("gpt2", "distill-width"): "invalid_student",
           # Heads need separate query/key/value projections: GPT-2 fuses them, ResNet has none.
           ("gpt2", "prune-heads"): "head_pruning_unsupported",
           **{(arch, "prune-heads"): "head_pruning_unsupported" for arch in CNNS},
           # No K x K convolution with 4+ input channels (ViT's patch embedding reads 3): nothing to make separable.
           **{(arch, "depthwise-separable"): "nothing_to_replace" for arch in ("bert", "gpt2", "vit")},
           # Its K x K convolutions are depthwise already, and at this size every 1x1 is under min_layer_parameters.
           ("mobilenet", "depthwise-separable"): "nothing_to_replace", ("mobilenet", "low-rank"): "nothing_to_factorise"}
# A randomly initialised MobileNetV2 is chaotic: 1% Gaussian noise on its weights gives output cosine 0.76
# (ResNet 0.9999, ViT 0.9998; measured), so any weight change scores low on it whatever the method does.
# There the matrix checks that the loss is reported, not how small it is (bench/real_models.py measures it).
CHAOTIC = ("mobilenet",)
# int8_dynamic quantizes MatMul/Gemm only: a CNN's one small classifier, which the added scales can
# outweigh (TorchScript's export of the tiny MobileNetV2: 0.96x, reported as larger).
NOT_SMALLER = {("mobilenet", "int8")}


@pytest.fixture(scope="module")
def workspace() -> Path:
    return Path(tempfile.mkdtemp(prefix="real-arch-"))


_exports: dict[str, tuple[Export, dict, dict]] = {}


def _prepared(arch: str, exporter: str, workspace: Path) -> tuple[Export, dict, dict]:
    key = f"{arch}-{exporter}"
    if key not in _exports:
        exp = export(arch, exporter, workspace)
        description = probe_onnx(exp.path, timeout_s=120, memory_bytes=4 * 1024**3)
        data_path = workspace / f"{key}.npz"
        data_path.write_bytes(dataset(exp, 48))
        arrays = inspect_npz(data_path, max_members=8, max_decompressed_bytes=1 << 30)["arrays"]
        _exports[key] = (exp, description, arrays)
    return _exports[key]


def _feeds(exp: Export, batch: int) -> dict[str, np.ndarray]:
    arrays = np.load(io.BytesIO(dataset(exp, batch, seed=7, seq=20)))
    return {name: arrays[name] for name in exp.inputs}


@pytest.mark.parametrize("step", list(STEPS))
@pytest.mark.parametrize("exporter", EXPORTERS)
@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_method_on_real_architecture(arch: str, exporter: str, step: str, workspace: Path) -> None:
    exp, description, arrays = _prepared(arch, exporter, workspace)
    store = ArtifactStore(workspace / "store")
    store.put_file(f"{exp.name}.onnx", exp.path)
    store.put_file(f"{exp.name}.npz", workspace / f"{exp.name}.npz")
    job = JobInput(f"{exp.name}-{step}", "t", {"artifact_key": f"{exp.name}.onnx", "inputs": description["inputs"],
                   "outputs": description["outputs"], "name": exp.name}, {"artifact_key": f"{exp.name}.npz", "arrays": arrays},
                   None, [STEPS[step]], {"measure": MEASURE})
    work = workspace / job.job_id
    work.mkdir()
    if (arch, step) in REFUSED:
        from service.core.errors import ModelshrinkError

        with pytest.raises(ModelshrinkError) as refused:
            run_pipeline(job, store, Settings(data_dir=workspace), work, lambda *a, **k: None)
        assert refused.value.code == REFUSED[(arch, step)]
        return
    metrics, artifacts = run_pipeline(job, store, Settings(data_dir=workspace), work, lambda *a, **k: None)
    # What the API will answer with validates against the documented (per-method) schema.
    checked(metrics, strict=True)  # a key the schema does not declare (a misspelling) fails here
    # Top-1 agreement only where the output holds scores: the argmax of a hidden state means nothing.
    assert (metrics["compressed"]["fidelity"]["top1_agreement"] is None) == (OUTPUT_KINDS[arch] == "features")

    if step.startswith("distill"):  # one epoch on random tiny models: what is learnt varies, its kind does not
        assert metrics["step_reports"][0]["output_kind"] == OUTPUT_KINDS[arch]
        assert metrics["compressed"]["parameters"] < metrics["original"]["parameters"]
    else:
        assert metrics["compression_ratio"] > 1.0 or (arch, step) in NOT_SMALLER
        # Never silent: a larger file says so.
        assert metrics["compression_ratio"] > 1.0 or any("larger than the original" in w for w in metrics["warnings"]), metrics["warnings"]
        cosine = metrics["compressed"]["fidelity"]["cosine"]
        assert cosine > 0.5 or arch in CHAOTIC
        # Never silent: a result below 0.99 says so in the warnings.
        assert cosine >= 0.99 or any("cosine" in w for w in metrics["warnings"]), metrics["warnings"]
    out_path = store.path(f"jobs/t/{job.job_id}/model.onnx")
    compressed, original = onnx.load(str(out_path)), onnx.load(str(exp.path))
    shape = lambda vi: [d.dim_param or d.dim_value for d in vi.type.tensor_type.shape.dim]  # noqa: E731
    assert [(i.name, shape(i)) for i in compressed.graph.input] == [(i.name, shape(i)) for i in original.graph.input]
    assert [o.name for o in compressed.graph.output] == [o.name for o in original.graph.output]
    session = ort.InferenceSession(str(out_path), providers=["CPUExecutionProvider"])
    feeds = _feeds(exp, 3)
    (out,) = session.run(None, feeds)
    assert out.shape[0] == 3 and np.isfinite(out).all()
    if arch in TOKEN_MODELS:
        assert out.shape[1] == 20  # another sequence length than the export's example
    if step == "distill-depth":
        count = lambda model, op: sum(n.op_type == op for n in model.graph.node)  # noqa: E731
        dropped = metrics["step_reports"][0]["student"]["dropped_layers"]
        if arch in CNNS:  # one identity-shortcut block gone, its residual Add and convolutions with it
            assert len(dropped) == 1 and dropped[0].startswith("residual block"), dropped
            assert count(compressed, "Add") < count(original, "Add") and count(compressed, "Conv") < count(original, "Conv")
        else:  # one whole block of two gone: its two LayerNorms with it
            norms = [count(m, "LayerNormalization") for m in (original, compressed)]
            assert norms[1] == norms[0] - 2 and dropped == ["block 1"], norms
    if step == "cluster-4bit":  # each layer's bits measured, the clusters no larger than `bits` everywhere
        report = metrics["step_reports"][0]
        allocation, bits = report["bit_allocation"], {row["layer"]: row["bits"] for row in report["layers"]}
        assert allocation["stored_bits_allocated"] <= allocation["stored_bits_uniform"]
        assert all(bits[row["layer"]] == row["bits"] for row in allocation["layers"]), (allocation, bits)
        if arch in TOKEN_MODELS:  # the token embedding table is clustered too, and measured with the layers
            tables = [row["layer"] for row in report["layers"] if row.get("embedding") and row["shape"][0] == exp.vocab]
            assert tables and set(tables) <= {row["layer"] for row in allocation["layers"]}, allocation
    if step == "prune-unstructured":  # importance left out: SparseGPT on the transformers (data given), magnitude on the CNNs
        report = metrics["step_reports"][0]
        assert report["importance"] == ("l1" if arch in CNNS else "sparsegpt"), report["importance"]
        assert (report.get("importance_chosen") is None) == (arch in CNNS) and (report.get("reconstruction") is None) == (arch in CNNS)
        # scope global (the default): SparseGPT's layers get sparsities from their measured sensitivity
        assert (report.get("allocation") is None) == (arch in CNNS), report.get("allocation")
        if arch not in CNNS:  # every layer SparseGPT fitted was weighed by how much the output depends on it
            weighed = {row["layer"] for row in report["output_sensitivity"]["layers"]}
            fitted = {row["layer"] for row in report["layers"] if row.get("output_error") is not None}
            assert fitted and fitted <= weighed, (fitted, weighed)
    if step == "prune-heads":  # one head of two gone in every block, and the feed-forward units narrowed too
        report = metrics["step_reports"][0]
        assert report["heads"]["removed"] == 2 and all(row["heads_after"] == 1 for row in report["heads"]["blocks"])
        layers = {row["layer"]: row for row in report["layers"]}
        queries = [row for name, row in layers.items() if name.endswith(("query", "q_proj"))]
        assert queries and all(row["shape_after"][0] == row["shape_before"][0] // 2 for row in queries), layers
        assert metrics["compressed"]["macs"] < metrics["original"]["macs"]
    if step == "prune-structured":
        layers = {row["layer"]: row for row in metrics["step_reports"][0]["layers"]}
        narrowed = [name for name, row in layers.items() if row["shape_after"][0] < row["shape_before"][0]]
        assert narrowed, layers
        if arch in TOKEN_MODELS or arch == "vit":  # only feed-forward hidden units, named as in torch
            assert all(name.endswith(("intermediate.dense", "mlp.fc1", "mlp.c_fc")) for name in narrowed), narrowed
        if arch == "gpt2":  # Conv1D's reshapes state the width: narrowed on the graph, 30% of 128 -> 88 (a multiple of 8)
            report = metrics["step_reports"][0]
            assert report["ffn"]["path"] == "onnx_graph" and [b["units_after"] for b in report["ffn"]["blocks"]] == [88, 88]
            assert sorted(layers[n]["shape_after"][0] for n in narrowed) == [88, 88] and 0.1 < report["achieved"] < 0.3
        if arch in CNNS:  # written back into the user's graph (not re-exported), depthwise convolutions still depthwise
            # (constant folding may drop an exporter's Identity nodes; nothing is renamed or added)
            assert {n.name for n in compressed.graph.node} <= {n.name for n in original.graph.node}
            weights = {t.name: t.dims for t in compressed.graph.initializer}
            for node in compressed.graph.node:
                group = next((a.i for a in node.attribute if a.name == "group"), 1)
                if node.op_type == "Conv" and group > 1:
                    assert group == weights[node.input[1]][0] and weights[node.input[1]][1] == 1, (node.name, group)
