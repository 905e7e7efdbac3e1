"""Measured bit allocation for clusters: each layer's bits chosen from its measured cost under the
size `bits` everywhere would take (on made-up curves, and through the cluster step)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from service.core.methods.cluster import ClusterReport
from service.core.reported import STRICT
from service.core.specs import ClusterStep
from bench.architectures import export
from workers.clustering import bit_allocation
from workers.methods import cluster
from workers.steps import StepContext, StepData


def test_a_cheap_large_table_pays_for_more_bits_where_they_matter() -> None:
    # "table" is a little larger than the two linears together (their 5-bit codebooks cost a little more) and loses little per bit.
    curves = {"table": {3: 0.002, 4: 0.001, 5: 0.0008}, "dear": {3: 0.08, 4: 0.02, 5: 0.004}, "dear2": {3: 0.06, 4: 0.015, 5: 0.003}}
    counts = {"table": 210_000, "dear": 100_000, "dear2": 100_000}
    costs = {n: (lambda b, c=c: bit_allocation.stored_bits(c, 1, b)) for n, c in counts.items()}
    choice = bit_allocation.allocate(curves, costs, 4)
    assert choice == {"table": 3, "dear": 5, "dear2": 5}
    assert sum(costs[n](b) for n, b in choice.items()) <= sum(costs[n](4) for n in curves)
    assert bit_allocation.predicted_loss(curves, choice) < bit_allocation.predicted_loss(curves, dict.fromkeys(curves, 4))
    # A fractional budget: 3.5 bits a weight on average.
    smaller = bit_allocation.allocate(curves, costs, 3.5)
    assert smaller == {"table": 3, "dear": 4, "dear2": 4}
    assert sum(costs[n](b) for n, b in smaller.items()) <= sum(costs[n](3.5) for n in curves)
    # No room above every layer's fewest bits: the fewest.
    assert bit_allocation.allocate(curves, costs, 2.5) == {"table": 3, "dear": 3, "dear2": 3}
    # Equal curves: nothing to trade, every layer keeps the budget's bits.
    same = {n: {3: 0.03, 4: 0.01, 5: 0.003} for n in curves}
    assert bit_allocation.allocate(same, {n: (lambda b: bit_allocation.stored_bits(1000, 1, b)) for n in same}, 4) == dict.fromkeys(same, 4)


def test_the_byte_tables_a_model_pays_once_for_count_in_the_budget() -> None:
    # 3 and 5 bits unpack through 2- and 1-bit planes, whose byte tables 4 bits everywhere does not
    # need (about 350 bytes each, once per model): with them counted, the second 5-bit layer no longer fits.
    curves = {"table": {3: 0.002, 4: 0.001, 5: 0.0008}, "dear": {3: 0.08, 4: 0.02, 5: 0.004}, "dear2": {3: 0.06, 4: 0.015, 5: 0.003}}
    costs = {n: (lambda b, c=c: bit_allocation.stored_bits(c, 1, b)) for n, c in {"table": 210_000, "dear": 100_000, "dear2": 100_000}.items()}
    choice = bit_allocation.allocate(curves, costs, 4, bit_allocation.shared_bits)
    assert choice == {"table": 3, "dear": 5, "dear2": 4}
    total = lambda c: sum(costs[n](b) for n, b in c.items()) + bit_allocation.shared_bits(set(c.values()))  # noqa: E731
    assert total(choice) <= total(dict.fromkeys(curves, 4)) < total({"table": 3, "dear": 5, "dear2": 5})
    assert bit_allocation.shared_bits({4}) < bit_allocation.shared_bits({5}) < bit_allocation.shared_bits({3, 5}) == bit_allocation.shared_bits({3, 4, 5})


def test_the_measured_bits_stay_in_range_and_more_bits_never_cost_more() -> None:
    assert bit_allocation.measured_bits(4) == (3, 4, 5) and bit_allocation.measured_bits(2) == (2, 3) and bit_allocation.measured_bits(8) == (7, 8)
    noisy = iter([0.01, 0.02, 0.001])  # 4 bits measured worse than 3: noise
    curves = bit_allocation.measure({"a": (lambda b: None, lambda: None)}, 4, lambda: next(noisy), lambda *a: None)
    assert curves["a"] == {3: 0.02, 4: 0.02, 5: 0.001}


def test_a_cluster_step_on_bert_moves_bits_to_where_they_cost_and_holds_the_size(tmp_path: Path) -> None:
    # Hugging Face BERT (tiny, random weights: its embedding tables, not its near-uniform attention, carry the
    # output), the data reading 20 of its 200 tokens as a domain's text reads a fraction of a vocabulary.
    exp = export("bert", "torchscript", tmp_path)
    model = onnx.load(str(exp.path))
    rng = np.random.default_rng(0)
    data = StepData(inputs={"input_ids": rng.integers(1, 21, (64, 16)).astype(np.int64), "attention_mask": np.ones((64, 16), np.int64)})
    step = ClusterStep(bits=4, finetune_epochs=0, assignment="nearest", bit_allocation="measured")
    measured: dict = {}
    result = cluster.apply(model, step, data, StepContext(work_dir=tmp_path / "measured"), measured)
    report = ClusterReport.model_validate({"index": 0, **result.report}, context=STRICT)
    assert report.bit_allocation is not None
    chosen = {row.layer: row.bits for row in report.bit_allocation.layers}
    table = next(name for name in chosen if "word_embeddings" in name)
    # At this size (1,024-weight layers) a second index plane's nodes cost about 2 bits a weight: the trade may not pay.
    assert {row.layer: row.bits for row in report.layers} == chosen  # the clusters were made at the bits chosen
    assert report.bit_allocation.stored_bits_allocated <= report.bit_allocation.stored_bits_uniform
    assert report.bit_allocation.predicted_loss_allocated <= report.bit_allocation.predicted_loss_uniform
    for row in report.bit_allocation.layers:
        assert list(row.measured) == ["3", "4", "5"] and row.measured["3"] >= row.measured["4"] >= row.measured["5"]
    # The file holds exactly the bits chosen: no larger than 4 bits everywhere (uniform), and no further from the original.
    uniform = cluster.apply(model, step.model_copy(update={"bit_allocation": "uniform"}), data, StepContext(work_dir=tmp_path / "uniform"))
    assert uniform.report.get("bit_allocation") is None and {row["bits"] for row in uniform.report["layers"]} == {4}
    stored = lambda r: sum(row["stored_bytes"] for row in r.report["layers"])  # noqa: E731
    assert stored(result) <= stored(uniform) + 2 * len(chosen)  # a padding byte per plane at most
    feeds = {k: v[:32] for k, v in data.inputs.items()}
    original = reference_outputs(model, feeds)
    distance = {name: float(np.mean((reference_outputs(r.model, feeds) - original) ** 2)) for name, r in (("measured", result), ("uniform", uniform))}
    assert distance["measured"] <= distance["uniform"] * (1 + 1e-6), distance
    # average_bits 3.5: the clusters take about an eighth less than at 4 bits everywhere. With the costs
    # measured above handed in (deep_compression's ladder), nothing is measured again and the choice is
    # the one a fresh measurement makes.
    smaller = cluster.apply(model, step.model_copy(update={"average_bits": 3.5}), data, StepContext(work_dir=tmp_path / "smaller"), measured)
    remeasured = cluster.apply(model, step.model_copy(update={"average_bits": 3.5}), data, StepContext(work_dir=tmp_path / "remeasured"))
    assert smaller.report["bit_allocation"]["budget_bits"] == 3.5 and smaller.report["bit_allocation"]["reused"]
    assert not result.report["bit_allocation"]["reused"] and not remeasured.report["bit_allocation"]["reused"]
    assert smaller.report["bit_allocation"]["layers"] == remeasured.report["bit_allocation"]["layers"]
    # What a budget will choose is known from those costs before anything is clustered (the ladder skips a
    # rung that would repeat the kept one); costs measured for another codebook layout say nothing.
    chosen = lambda r: {row["layer"]: row["bits"] for row in r.report["bit_allocation"]["layers"]}  # noqa: E731
    assert cluster.planned_bits(measured, step.model_copy(update={"average_bits": 3.5})) == chosen(smaller)
    assert cluster.planned_bits(measured, step) == chosen(result)
    assert cluster.planned_bits(measured, step.model_copy(update={"group_size": 8})) is None
    assert stored(smaller) < 0.92 * stored(uniform), (stored(smaller), stored(uniform))
    # A layer named in layer_bits keeps its bits and is not measured.
    named = cluster.apply(model, step.model_copy(update={"layer_bits": {table: 6}}), data, StepContext(work_dir=tmp_path / "named"))
    assert next(r["bits"] for r in named.report["layers"] if r["layer"] == table) == 6
    assert table not in {r["layer"] for r in named.report["bit_allocation"]["layers"]}


def reference_outputs(model: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> np.ndarray:
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, {i.name: feeds[i.name] for i in session.get_inputs()})[0]


def test_measured_allocation_needs_data() -> None:
    assert ClusterStep(bits=4, bit_allocation="measured").needs_dataset()
    assert ClusterStep(bits=4).resolved_bit_allocation(False) == "uniform" and ClusterStep(bits=4).resolved_bit_allocation(True) == "measured"
    assert ClusterStep(bits=4, finetune_epochs=0).resolved_bit_allocation(True) == "uniform" and not ClusterStep(bits=4).needs_dataset()
    with pytest.raises(ValueError):
        ClusterStep(bits=4, bit_allocation="greedy")
    with pytest.raises(ValueError, match="within 1 of bits"):
        ClusterStep(bits=4, average_bits=2.5)
    with pytest.raises(ValueError, match="needs bit_allocation measured"):
        ClusterStep(bits=4, average_bits=3.5, bit_allocation="uniform")
    assert ClusterStep(bits=4, average_bits=3.5).budget_bits() == 3.5 and ClusterStep(bits=4).budget_bits() == 4
