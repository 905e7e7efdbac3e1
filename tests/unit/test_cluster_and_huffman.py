"""Weight clustering, the Huffman bundle, and the low-bit quantize modes, on small models."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest

from service.core.specs import ClusterStep, HuffmanStep, QuantizeStep
from tests.builders import cnn, mlp, reference_outputs
from workers import bundle
from workers.clustering import storage
from workers.clustering.kmeans import kmeans_1d
from workers.constant_folding import fold
from workers.methods import cluster, huffman, prune, quantize
from workers.steps import StepContext, StepData
from workers.metrics import parameter_counts
from service.core.specs import PruneStep


def data_for(model: onnx.ModelProto, n: int = 128) -> StepData:
    dims = [d.dim_value or 1 for d in model.graph.input[0].type.tensor_type.shape.dim][1:]
    x = np.random.default_rng(0).standard_normal((n, *dims)).astype(np.float32)
    return StepData(inputs={"x": x}, labels=reference_outputs(model, x).argmax(-1))


def weights(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    return {i.name: onnx.numpy_helper.to_array(i) for i in fold(model).graph.initializer}


def test_density_init_crowds_where_weights_are_dense() -> None:
    # Han et al.: density initialisation spends centroids on the many small weights, few on the rare large ones.
    values = np.concatenate([np.full(100, -1.0), np.full(50, 0.5), np.full(10, 3.0)])
    centroids, _ = kmeans_1d(values, 3, "density")
    assert (centroids < 0).sum() == 2 and centroids.max() < 3.0


@pytest.mark.parametrize("init", ["linear", "kmeans++"])
def test_kmeans_1d_finds_separated_clusters(init: str) -> None:
    values = np.concatenate([np.full(100, -1.0), np.full(50, 0.5), np.full(10, 3.0)]) + np.random.default_rng(0).normal(0, 0.01, 160)
    centroids, labels = kmeans_1d(values, 3, init)
    np.testing.assert_allclose(centroids, [-1.0, 0.5, 3.0], atol=0.01)
    assert np.bincount(labels).tolist() == [100, 50, 10]


@pytest.mark.parametrize("bits", range(1, 9))
def test_packing_takes_exactly_bits_per_index_and_round_trips(bits: int) -> None:
    idx = np.random.default_rng(bits).integers(0, 2**bits, 8 * 101 + 3)  # a count that leaves padding in every plane
    planes = storage.pack(idx, bits)
    assert sum(p.size for p in planes) == storage.packed_bytes(idx.size, bits) <= (idx.size * bits + 7 * len(planes)) // 8 + len(planes)
    assert np.array_equal(storage.unpack(planes, bits, idx.size), idx)


@pytest.mark.parametrize("bits", [2, 3, 4, 5, 6])
def test_clustered_model_holds_codebook_and_indices(bits: int, tmp_path: Path) -> None:
    model = cnn(channels=16)
    result = cluster.apply(model, ClusterStep(bits=bits, min_elements=64), StepData(), StepContext(work_dir=tmp_path))
    onnx.checker.check_model(result.model, full_check=True)
    dense = weights(result.model)
    for row in result.report["layers"]:
        assert row["centroids"] == 2**bits
        # Packed to exactly `bits` bits a weight (plus the codebook and at most a padding byte a plane).
        assert row["stored_bytes"] - 4 * row["centroids"] <= row["dense_bytes"] // 4 * bits // 8 + 4
    conv = next(w for name, w in dense.items() if w.shape == (16, 16, 3, 3))
    assert len(np.unique(conv)) <= 2**bits
    integer_tensors = [i for i in result.model.graph.initializer if i.data_type == onnx.TensorProto.UINT8 and i.name.startswith("cl")]
    assert integer_tensors, "indices must be stored as integers"
    x = data_for(model).inputs["x"][:4]
    assert reference_outputs(result.model, x).shape == (4, 10)
    if bits == 4:
        assert len(model.SerializeToString()) / len(result.model.SerializeToString()) > 2.5


def test_pruned_layers_keep_their_zeros_when_clustered(tmp_path: Path) -> None:
    model = mlp(in_features=64, hidden=128)
    data = data_for(model)
    pruned = prune.apply(model, PruneStep(kind="unstructured", amount=0.9), data, StepContext(work_dir=tmp_path))
    clustered = cluster.apply(pruned.model, ClusterStep(bits=4, finetune_epochs=1), data, StepContext(work_dir=tmp_path))
    onnx.checker.check_model(clustered.model, full_check=True)
    sparse_rows = [r for r in clustered.report["layers"] if r["sparse"]]
    assert sparse_rows
    before = parameter_counts(fold(pruned.model))[1]
    after = parameter_counts(fold(clustered.model))[1]
    assert after <= before  # fine-tuning the centroids never revives a pruned weight
    assert len(clustered.model.SerializeToString()) < len(pruned.model.SerializeToString())


def test_huffman_bundle_decodes_to_the_exact_model(tmp_path: Path) -> None:
    model = mlp(in_features=64, hidden=128)
    data = data_for(model)
    pruned = prune.apply(model, PruneStep(kind="unstructured", amount=0.9), data, StepContext(work_dir=tmp_path))
    clustered = cluster.apply(pruned.model, ClusterStep(bits=4), data, StepContext(work_dir=tmp_path))
    result = huffman.apply(clustered.model, HuffmanStep(), data, StepContext(work_dir=tmp_path))
    original = clustered.model.SerializeToString()
    assert result.bundle is not None and len(result.bundle) < len(original)
    assert bundle.decode(result.bundle) == original
    decoded = onnx.load_model_from_string(bundle.decode(result.bundle))
    x = data.inputs["x"]
    assert np.array_equal(reference_outputs(decoded, x), reference_outputs(clustered.model, x))
    (tmp_path / "m.msz").write_bytes(result.bundle)
    subprocess.run([sys.executable, "-m", "service.cli", "unpack", str(tmp_path / "m.msz"), "-o", str(tmp_path / "m.onnx")], check=True)
    assert (tmp_path / "m.onnx").read_bytes() == original


def test_corrupt_bundle_is_refused() -> None:
    packed, _ = bundle.encode(mlp().SerializeToString())
    with pytest.raises(bundle.BundleError):
        bundle.decode(b"not a bundle")
    for position in (-1, len(packed) // 2, 12):  # the payload's end, its middle, the header
        tampered = bytearray(packed)
        tampered[position] ^= 0xFF
        with pytest.raises(bundle.BundleError):
            bundle.decode(bytes(tampered))
    with pytest.raises(bundle.BundleError):
        bundle.decode(packed[: len(packed) // 3])  # truncated


def test_int4_weight_only_uses_matmulnbits(tmp_path: Path) -> None:
    model = mlp(in_features=256, hidden=256)
    result = quantize.apply(model, QuantizeStep(mode="int4_weight_only"), StepData(), StepContext(work_dir=tmp_path))
    assert sum(layer["kind"] == "matmul" for layer in result.report["layers"]) == 3 and result.report["float_share"] < 0.01
    assert len(model.SerializeToString()) / len(result.model.SerializeToString()) > 4
    x = data_for(model).inputs["x"][:8]
    ref, out = reference_outputs(model, x), reference_outputs(result.model, x)
    assert (ref * out).sum() / (np.linalg.norm(ref) * np.linalg.norm(out)) > 0.98


def test_binary_stores_one_bit_per_weight(tmp_path: Path) -> None:
    model = mlp(in_features=256, hidden=256)
    data = data_for(model)
    result = quantize.apply(model, QuantizeStep(mode="binary", binary_keep_first_last=False, finetune_epochs=1), data, StepContext(work_dir=tmp_path))
    onnx.checker.check_model(result.model, full_check=True)
    dense = weights(result.model)
    hidden = next(w for w in dense.values() if w.shape == (256, 256))
    assert all(len(np.unique(np.abs(row))) == 1 for row in hidden)  # sign x one scale per output channel
    packed = [i for i in result.model.graph.initializer if i.data_type == onnx.TensorProto.UINT8 and i.name.startswith("bn")]
    assert sum(int(np.prod(i.dims)) for i in packed) * 8 >= 256 * 256 + 256 * 256 + 256 * 4
    assert sum(int(np.prod(i.dims)) for i in packed) <= (256 * 256 * 2 + 256 * 4) // 8 + 3
    assert result.report["quality"]["after"] is not None


def test_grouped_codebooks_follow_rows_of_different_scales_and_decode_exactly(tmp_path: Path) -> None:
    from workers.clustering import storage
    from workers.methods.cluster import _cluster_layer

    rng = np.random.default_rng(0)
    weight = (rng.standard_normal((64, 48)) * np.geomspace(0.01, 10, 64)[:, None]).astype(np.float32)  # rows 1000x apart in scale
    whole, grouped = _cluster_layer(weight, 4, "linear", 0), _cluster_layer(weight, 4, "linear", 0, group_size=8)
    assert not whole.grouped and grouped.grouped and len(grouped.codebook) == 8 * 16
    # Mean relative error per row: one codebook for all rows spends its centroids on the large ones.
    error = {name: float((np.linalg.norm(c.codebook[c.labels] - weight, axis=1) / np.linalg.norm(weight, axis=1)).mean())
             for name, c in (("whole", whole), ("grouped", grouped))}
    assert error["grouped"] < error["whole"] / 5, error
    # In a graph (and transposed, as exporters store MatMul weights; and at 3 and 5 bits, stored as two planes):
    # ONNX Runtime rebuilds codebook[labels] exactly.
    three, five = (_cluster_layer(weight, bits, "linear", 0, group_size=8) for bits in (3, 5))
    for c in (grouped, storage.Clustered(grouped.codebook, grouped.labels.T.copy(), 4, False), three, storage.Clustered(five.codebook, five.labels.T.copy(), 5, False)):
        shape = list(c.labels.shape)
        dense = onnx.numpy_helper.from_array(np.zeros(shape, np.float32), "w")
        graph = onnx.helper.make_graph([onnx.helper.make_node("Identity", ["w"], ["y"])], "g", [],
                                       [onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, shape)], initializer=[dense])
        plain = onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 17)])
        model = storage.replace_initializers(plain, {"w": storage.encode("w", c, prefix="g")})
        model.ir_version = 8
        import onnxruntime as ort

        (out,) = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {})
        assert np.array_equal(out, c.codebook[c.labels])
        assert storage.stored_bytes(c) <= c.labels.size * c.bits / 8 + 4 * max(c.labels.shape)  # bits per weight, and the groups' offsets


def test_cluster_step_with_groups_runs_and_fine_tunes(tmp_path: Path) -> None:
    model = mlp(in_features=64, hidden=128)
    data = data_for(model)
    result = cluster.apply(model, ClusterStep(bits=4, group_size=16, finetune_epochs=1), data, StepContext(work_dir=tmp_path))
    onnx.checker.check_model(result.model, full_check=True)
    grouped = [r for r in result.report["layers"] if r["centroids"] > 16]
    assert grouped, result.report["layers"]
    x = data.inputs["x"][:4]
    assert reference_outputs(result.model, x).shape == reference_outputs(model, x).shape
