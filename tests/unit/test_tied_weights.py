"""A tied weight (GPT-2's output projection reads Transpose(the token embedding), as the dynamo exporter
writes it for a full-size model) stays tied through a training method: the layer is not trained on its
own, and the written-back graph computes it from the table again instead of storing the table twice
(before: the full-size GPT-2 came out of 50% pruning 1.6x *larger* than it went in)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

from service.core.specs import PruneStep
from workers.methods import prune
from workers.steps import StepContext, StepData
from workers.onnx_weights import tied_aliases

VOCAB, DIM = 300, 32


def tied_lm() -> onnx.ModelProto:
    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array((rng.standard_normal((VOCAB, DIM)) * 0.1).astype(np.float32), "wte"),
             numpy_helper.from_array((rng.standard_normal((DIM, DIM)) / np.sqrt(DIM)).astype(np.float32), "fc.weight")]
    nodes = [
        helper.make_node("Gather", ["wte", "ids"], ["emb"], name="embed"),
        helper.make_node("MatMul", ["emb", "fc.weight"], ["h0"], name="fc"),
        helper.make_node("Tanh", ["h0"], ["h"], name="act"),
        helper.make_node("Transpose", ["wte"], ["wte_t"], perm=[1, 0], name="tie"),
        helper.make_node("MatMul", ["h", "wte_t"], ["logits"], name="lm_head"),
    ]
    graph = helper.make_graph(nodes, "tied", [helper.make_tensor_value_info("ids", TensorProto.INT64, ["N", "S"])],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", "S", VOCAB])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=9)


def test_the_tie_is_recognised() -> None:
    assert tied_aliases(tied_lm()) == {"wte_t": "wte"}


def test_fine_tuning_keeps_the_weight_tied_and_stored_once(tmp_path: Path) -> None:
    model = tied_lm()
    ids = np.random.default_rng(1).integers(0, VOCAB, (64, 8)).astype(np.int64)
    step = PruneStep(amount=0.5, finetune_epochs=1, training={"lr": 1e-3})
    result = prune.apply(model, step, StepData(inputs={"ids": ids}), StepContext(work_dir=tmp_path))
    out = result.model
    tables = [i for i in out.graph.initializer if int(np.prod(i.dims)) == VOCAB * DIM]
    assert [t.name for t in tables] == ["wte"], [t.name for t in tables]  # stored once
    assert np.array_equal(numpy_helper.to_array(tables[0]), numpy_helper.to_array(model.graph.initializer[0]))  # not trained on its own
    assert any(n.op_type == "Transpose" and list(n.input) == ["wte"] for n in out.graph.node)
    assert len(out.SerializeToString()) < len(model.SerializeToString())
    session = ort.InferenceSession(out.SerializeToString(), providers=["CPUExecutionProvider"])
    assert session.run(None, {"ids": ids[:2]})[0].shape == (2, 8, VOCAB)


def test_clustering_leaves_the_tie_to_the_embedding_table(tmp_path: Path) -> None:
    from service.core.specs import ClusterStep
    from workers.methods import cluster

    model = tied_lm()
    ids = np.random.default_rng(2).integers(0, VOCAB, (64, 8)).astype(np.int64)
    result = cluster.apply(model, ClusterStep(bits=4, finetune_epochs=1, min_elements=256), StepData(inputs={"ids": ids}), StepContext(work_dir=tmp_path))
    rows = result.report["layers"]
    # The head's layer is named after the table it reads ("wte"): one row for it, the table's.
    assert [(row["layer"], bool(row.get("embedding"))) for row in rows if row["layer"] == "wte"] == [("wte", True)], rows
    out = result.model
    assert not [i for i in out.graph.initializer if int(np.prod(i.dims)) == VOCAB * DIM]  # no float copy of the table left
    assert any(n.op_type == "Transpose" and list(n.input) == ["wte"] for n in out.graph.node)  # the head reads the clustered table
    session = ort.InferenceSession(out.SerializeToString(), providers=["CPUExecutionProvider"])
    assert session.run(None, {"ids": ids[:2]})[0].shape == (2, 8, VOCAB)
    # The table's bits were measured with the head reading it clustered too: with every token the same,
    # the lookup alone would move one row's output; through the head every logit moves.
    one_token = np.full((64, 8), 7, np.int64)
    step = ClusterStep(bits=4, finetune_epochs=0, assignment="nearest", min_elements=256, bit_allocation="measured")
    measured = cluster.apply(model, step, StepData(inputs={"ids": one_token}), StepContext(work_dir=tmp_path / "one"))
    table = next(row for row in measured.report["bit_allocation"]["layers"] if row["layer"] == "wte")
    fc = next(row for row in measured.report["bit_allocation"]["layers"] if row["layer"] != "wte")
    assert table["measured"]["3"] > fc["measured"]["3"], measured.report["bit_allocation"]
