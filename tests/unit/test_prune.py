"""The prune method on small models, called directly: structure, sizes and the loop's rules."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest

from service.core.errors import CompressionFailed, InvalidInput, JobCancelled
from service.core.specs import PruneStep
from tests.builders import cnn, mlp, reference_outputs
from workers.constant_folding import fold
from workers.methods import prune
from workers.steps import StepContext, StepData
from workers.metrics import macs_per_sample, parameter_counts


@pytest.fixture
def data() -> StepData:
    model = mlp(in_features=32, hidden=64)
    x = np.random.default_rng(0).standard_normal((256, 32)).astype(np.float32)
    return StepData(inputs={"x": x}, labels=reference_outputs(model, x).argmax(-1))


def run(model: onnx.ModelProto, data: StepData, tmp_path: Path, progress=None, **spec):
    ctx = StepContext(work_dir=tmp_path, report_progress=progress or (lambda f, m, milestone=False: None))
    result = prune.apply(model, PruneStep(**spec), data, ctx)
    onnx.checker.check_model(result.model, full_check=True)
    return result


def test_unstructured_global_reaches_target_and_shrinks_file(data: StepData, tmp_path: Path) -> None:
    model = mlp(in_features=32, hidden=64)
    result = run(model, data, tmp_path, kind="unstructured", amount=0.8)
    layers = {row["layer"]: row for row in result.report["layers"]}
    assert result.report["achieved"] == pytest.approx(0.8, abs=0.01)
    assert layers["w2"]["sparsity"] == 0.0  # the output layer is skipped by default
    assert all(row["shape_after"] == row["shape_before"] for row in layers.values())
    assert layers["w0"]["importance_threshold"] == layers["w1"]["importance_threshold"]  # one global threshold
    assert len(result.model.SerializeToString()) < len(model.SerializeToString()) / 2
    total, nonzero = parameter_counts(fold(result.model))
    assert nonzero < total * 0.35


def test_per_layer_scope_overrides_and_skips(data: StepData, tmp_path: Path) -> None:
    result = run(mlp(in_features=32, hidden=64), data, tmp_path, kind="unstructured", amount=0.5, scope="layer",
                 layer_amounts={"w1": 0.9}, skip_layers=["w0"], prune_output_layer=True)
    sparsity = {row["layer"]: row["sparsity"] for row in result.report["layers"]}
    assert sparsity["w0"] == 0.0
    assert sparsity["w1"] == pytest.approx(0.9, abs=0.01)
    assert sparsity["w2"] == pytest.approx(0.5, abs=0.02)


@pytest.mark.parametrize("importance", ["l1", "l2", "apoz", "taylor"])
def test_structured_really_narrows_layers(data: StepData, tmp_path: Path, importance: str) -> None:
    model = mlp(in_features=32, hidden=64)
    result = run(model, data, tmp_path, kind="structured", amount=0.5, scope="layer", importance=importance)
    shapes = {row["layer"]: row["shape_after"] for row in result.report["layers"]}
    assert shapes == {"w0": [32, 32], "w1": [32, 32], "w2": [4, 32]}
    thresholds = {row["layer"]: row["importance_threshold"] for row in result.report["layers"]}
    assert thresholds["w0"] is not None and thresholds["w1"] is not None and thresholds["w2"] is None
    assert parameter_counts(result.model)[0] < parameter_counts(model)[0] * 0.6
    assert macs_per_sample(result.model) < macs_per_sample(model) * 0.6
    out = reference_outputs(result.model, data.inputs["x"][:4])
    assert out.shape == (4, 4)


def test_structured_conv_net_keeps_output_channels(tmp_path: Path) -> None:
    model = cnn(channels=16)
    x = np.random.default_rng(0).standard_normal((64, 1, 8, 8)).astype(np.float32)
    result = run(model, StepData(inputs={"x": x}), tmp_path, kind="structured", amount=0.5, channel_multiple=1)
    assert reference_outputs(result.model, x[:3]).shape == (3, 10)
    assert macs_per_sample(result.model) < macs_per_sample(model) * 0.5


def test_structured_widths_are_multiples_of_eight_by_default(tmp_path: Path) -> None:
    model = cnn(channels=64)
    x = np.random.default_rng(0).standard_normal((64, 1, 8, 8)).astype(np.float32)
    result = run(model, StepData(inputs={"x": x}), tmp_path, kind="structured", amount=0.3, scope="layer")
    widths = [row["shape_after"][0] for row in result.report["layers"][:-1]]  # the output layer keeps its classes
    assert widths and all(w % 8 == 0 and w < 64 for w in widths), widths


def test_iterative_rounds_report_progress_per_epoch(data: StepData, tmp_path: Path) -> None:
    messages: list[str] = []
    result = run(mlp(in_features=32, hidden=64), data, tmp_path, progress=lambda f, m, milestone=False: messages.append(m),
                 kind="unstructured", amount=0.75, iterations=3, finetune_epochs=2)
    rounds = result.report["rounds"]
    assert [r["round"] for r in rounds] == [1, 2, 3]
    assert [round(r["sparsity"], 2) for r in rounds] == [0.37, 0.6, 0.75]
    assert all(len(r["finetune_loss"]) == 2 for r in rounds)
    assert sum("fine-tuned epoch" in m for m in messages) == 6


def test_budget_stops_early_and_keeps_the_last_good_round(data: StepData, tmp_path: Path) -> None:
    result = run(mlp(in_features=32, hidden=64), data, tmp_path, kind="unstructured", amount=0.95, iterations=10, max_accuracy_drop=0.2)
    report = result.report
    assert report["target_reached"] is False and "budget" in report["stopped"]
    assert report["kept_round"] == len(report["rounds"]) - 1
    assert report["baseline"] - report["final"] <= 0.2 + 1e-9
    assert report["final"] == report["rounds"][-2]["accuracy"]


def test_budget_exceeded_in_first_round_fails_clearly(data: StepData, tmp_path: Path) -> None:
    with pytest.raises(CompressionFailed) as info:
        run(mlp(in_features=32, hidden=64), data, tmp_path, kind="unstructured", amount=0.99, max_accuracy_drop=0.0)
    assert info.value.code == "accuracy_budget_exceeded"


def test_lottery_ticket_rewinds_and_reports_each_round(data: StepData, tmp_path: Path) -> None:
    model = mlp(in_features=32, hidden=64)
    result = run(model, data, tmp_path, kind="unstructured", amount=0.8, iterations=2, finetune_epochs=1, lottery_ticket=True)
    rounds = result.report["rounds"]
    assert [r["round"] for r in rounds] == [1, 2, "ticket"]
    assert rounds[-1]["sparsity"] == pytest.approx(0.8, abs=0.01)
    # After each round the survivors are rewound exactly onto the upload, though training had moved them
    # (round 1 trains the dense model, whose best epoch may be the untrained one).
    assert all(r["rewound_max_distance"] == 0.0 for r in rounds[:-1]) and max(r["trained_max_change"] for r in rounds[:-1]) > 1e-3


def test_cancel_between_epochs(data: StepData, tmp_path: Path) -> None:
    def progress(fraction: float, message: str, milestone: bool = False) -> None:
        if "fine-tuned epoch 1" in message:
            raise JobCancelled("cancelled by the user")

    with pytest.raises(JobCancelled):
        run(mlp(in_features=32, hidden=64), data, tmp_path, progress=progress, kind="unstructured", amount=0.5, finetune_epochs=3)


def test_unknown_layer_and_missing_data(data: StepData, tmp_path: Path) -> None:
    with pytest.raises(InvalidInput, match="unknown layer"):
        run(mlp(in_features=32, hidden=64), data, tmp_path, kind="unstructured", skip_layers=["nope"])
    with pytest.raises(CompressionFailed) as info:
        run(mlp(), StepData(), tmp_path, kind="unstructured", finetune_epochs=1)
    assert info.value.code == "dataset_required"


def test_spec_rejects_inconsistent_options() -> None:
    with pytest.raises(ValueError, match="apoz"):
        PruneStep(kind="unstructured", importance="apoz")
    with pytest.raises(ValueError, match="lottery_ticket"):
        PruneStep(lottery_ticket=True)


def test_a_labelled_dataset_fine_tunes_by_default_and_never_ends_worse_than_no_fine_tuning(tmp_path) -> None:
    model = mlp(in_features=32, hidden=64)
    data = StepData(inputs={"x": np.random.default_rng(0).standard_normal((256, 32)).astype(np.float32)})
    data.labels = reference_outputs(model, data.inputs["x"]).argmax(-1)
    default = run(model, data, tmp_path / "a", kind="unstructured", amount=0.7)
    assert default.report["finetune_epochs"] == 2 and default.report["finetune_lr"] == 1e-4
    log = default.report["finetune_by_round"][0]
    assert len(log["scores_by_epoch"]) == 3 and log["scores_by_epoch"][log["kept_epoch"]] == max(log["scores_by_epoch"])
    # A step that can only hurt (a huge learning rate): the just-pruned weights are kept.
    hurt = run(model, data, tmp_path / "b", kind="unstructured", amount=0.7, finetune_epochs=2, training={"lr": 5.0, "optimizer": "sgd"})
    log = hurt.report["finetune_by_round"][0]
    assert log["kept_epoch"] == 0 and hurt.report["final"] == log["scores_by_epoch"][0]
    without = run(model, StepData(), tmp_path / "c", kind="unstructured", amount=0.7)
    assert without.report["finetune_epochs"] == 0


def _cosine(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.mean((a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))))


def test_wanda_keeps_small_weights_on_loud_features_and_prunes_each_row_alike(tmp_path: Path) -> None:
    # Input features 100x apart in scale: magnitude pruning drops the small weights that multiply the
    # loud ones; Wanda (|w| x feature norm, per row) keeps them and stays closer to the original.
    model = mlp(in_features=32, hidden=64, classes=8)
    rng = np.random.default_rng(0)
    x = (rng.standard_normal((256, 32)) * np.geomspace(0.05, 5, 32)).astype(np.float32)
    data = StepData(inputs={"x": x}, labels=reference_outputs(model, x).argmax(-1))
    out = {}
    for importance in ("l1", "wanda"):
        step = PruneStep(kind="unstructured", amount=0.6, importance=importance, finetune_epochs=0, scope="layer")
        result = prune.apply(model, step, data, StepContext(work_dir=tmp_path / importance))
        out[importance] = (result, reference_outputs(result.model, x))
    reference = reference_outputs(model, x)
    assert _cosine(out["wanda"][1], reference) > _cosine(out["l1"][1], reference)
    first = next(w for w in weights_of(fold(out["wanda"][0].model)) if w.shape in ((32, 64), (64, 32)))
    rows = first.T if first.shape == (32, 64) else first  # torch's [out, in]
    assert np.allclose((rows == 0).mean(1), 0.6, atol=1 / 32)  # every output row pruned by the same share


def weights_of(model: onnx.ModelProto) -> list[np.ndarray]:
    return [onnx.numpy_helper.to_array(i) for i in model.graph.initializer if i.data_type == onnx.TensorProto.FLOAT and len(i.dims) == 2]


def test_wanda_needs_data_and_no_lottery_ticket() -> None:
    with pytest.raises(ValueError, match="wanda"):
        PruneStep(importance="wanda", lottery_ticket=True, finetune_epochs=1)
    assert PruneStep(importance="wanda").needs_dataset() and PruneStep(kind="structured", importance="wanda").needs_dataset()


def test_structured_refit_reproduces_what_the_narrowed_layers_output(tmp_path: Path) -> None:
    """A BERT export (the class of MiniLM) with a third of its feed-forward units removed and no
    fine-tuning: each feed-forward output projection refitted by least squares outputs closer to what it
    did before than with the pruned weights alone, and the model as a whole stays closer to the original."""
    import io

    from bench.architectures import dataset, export

    exp = export("bert", "dynamo", tmp_path)
    arrays = dict(np.load(io.BytesIO(dataset(exp, 96, seq=20))))
    data = StepData(inputs={name: arrays[name] for name in exp.inputs})
    model = onnx.load(str(exp.path))
    refitted = run(model, data, tmp_path / "refit", kind="structured", amount=0.5, finetune_epochs=0)
    plain = run(model, data, tmp_path / "plain", kind="structured", amount=0.5, finetune_epochs=0, refit=False)
    rows = refitted.report["refit"]
    assert rows and {row["round"] for row in rows} == {1} and "refit" not in plain.report
    assert all("output.dense" in row["layer"] or "output_dense" in row["layer"] for row in rows), [r["layer"] for r in rows]
    assert all(row["kept"] == "refitted" and row["output_error_refit"] < 0.8 * row["output_error_pruned"] for row in rows), rows
    assert refitted.report["final"] > plain.report["final"], (refitted.report["final"], plain.report["final"])


def test_refit_fits_only_the_outputs_a_layer_still_has(data: StepData, tmp_path: Path) -> None:
    """An MLP's middle layer loses inputs and outputs in one round: it is refitted to its kept outputs."""
    model = mlp(in_features=32, hidden=64)
    result = run(model, data, tmp_path, kind="structured", amount=0.5, scope="layer", finetune_epochs=0)
    rows = {row["layer"]: row for row in result.report["refit"]}
    assert set(rows) == {"w1", "w2"}  # w0 kept its inputs (the model's own)
    assert all(row["output_error_refit"] <= row["output_error_pruned"] for row in rows.values())


def test_head_pruning_refits_each_output_projection_on_the_graph(tmp_path: Path) -> None:
    """Half the attention heads of a BERT export removed on the graph, no fine-tuning: each block's
    output projection is refitted (padded positions left out) and the model stays closer to the original."""
    import io

    from bench.architectures import dataset, export

    exp = export("bert", "torchscript", tmp_path)
    arrays = dict(np.load(io.BytesIO(dataset(exp, 96, seq=20))))
    data = StepData(inputs={name: arrays[name] for name in exp.inputs})
    model = onnx.load(str(exp.path))
    refitted = run(model, data, tmp_path / "refit", kind="structured", amount=0.0, heads=0.5, finetune_epochs=0)
    plain = run(model, data, tmp_path / "plain", kind="structured", amount=0.0, heads=0.5, finetune_epochs=0, refit=False)
    rows = refitted.report["heads"]["refit"]
    assert len(rows) == len([b for b in refitted.report["heads"]["blocks"] if b["removed"]]) > 0
    assert all(row["kept"] == "refitted" and row["output_error_refit"] < row["output_error_pruned"] for row in rows), rows
    assert "refit" not in plain.report["heads"]
    assert refitted.report["final"] > plain.report["final"], (refitted.report["final"], plain.report["final"])


def test_a_schedule_sets_each_rounds_sparsity_and_stops_within_the_budget(data: StepData, tmp_path: Path) -> None:
    schedule = [0.3, 0.6, 0.9, 0.97, 0.99]
    result = run(mlp(in_features=32, hidden=64), data, tmp_path, kind="unstructured", schedule=schedule, finetune_epochs=1, max_accuracy_drop=0.4)
    report = result.report
    assert report["target_amount"] == 0.99
    reached = [r["sparsity"] for r in report["rounds"]]
    assert reached == pytest.approx(schedule[: len(reached)], abs=0.01)
    assert report["achieved"] == pytest.approx(schedule[report["kept_round"] - 1], abs=0.01)
    assert report["baseline"] - report["final"] <= 0.4 + 1e-9
    assert report["stopped"] is None or report["kept_round"] == len(reached) - 1


def test_a_schedule_must_increase_and_prune_single_weights() -> None:
    step = PruneStep(schedule=[0.5, 0.8])
    assert (step.amount, step.iterations) == (0.8, 2) and 1 - (1 - step.amount) ** step.round_fraction(0) == pytest.approx(0.5)
    assert PruneStep.model_validate(step.model_dump()) == step  # stored and read back by the worker
    for bad in ({"schedule": [0.5, 0.5]}, {"schedule": [0.5, 1.0]}, {"schedule": [0.5], "kind": "structured"}):
        with pytest.raises(ValueError):
            PruneStep(**bad)
